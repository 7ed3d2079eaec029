"""The load generator: synthetic cluster, inventory, flows, the v9 encoder (checked against tshark)
and the UDP sender (checked end to end on loopback)."""

from __future__ import annotations

import argparse
import errno
import ipaddress
import json
import re
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import dpkt
import numpy as np
import pytest

from enricher.inventory import OwnerKind, load_inventory
from flowtally.dev import generator as gen
from tests.oracle import shared_testdata

NF_PORT = 2055
V4_MAPPED_PREFIX = np.array([0] * 10 + [0xFF, 0xFF], dtype=np.uint8)
EPOCH_MS = 1_760_000_000_000  # an arbitrary fixed "now" for deterministic tests


# --- helpers ----------------------------------------------------------------------------------


def _ip(raw: bytes) -> str:
    addr = ipaddress.IPv6Address(raw)
    return str(addr.ipv4_mapped or addr)


def _expected_records(cols: dict[str, np.ndarray]) -> Counter[tuple[Any, ...]]:
    """Generator columns as a multiset of (src, dst, sport, dport, proto, bytes, packets, flags,
    in_if, out_if, start ms, end ms)."""
    rows = zip(
        (_ip(bytes(a)) for a in cols["src_addr"]),
        (_ip(bytes(a)) for a in cols["dst_addr"]),
        *(cols[k].tolist() for k in (
            "src_port", "dst_port", "proto", "bytes", "packets", "tcp_flags", "in_if", "out_if",
            "start", "end",
        )),
        strict=True,
    )
    return Counter(rows)


def _write_pcap(path: Path, payloads: list[bytes]) -> None:
    """Wrap UDP payloads as Ethernet/IPv4/UDP frames to NF_PORT, as a capture on the collector would."""
    with path.open("wb") as fh:
        writer = dpkt.pcap.Writer(fh)
        for i, payload in enumerate(payloads):
            udp = dpkt.udp.UDP(sport=40000, dport=NF_PORT, data=payload)
            udp.ulen = len(udp)
            ip = dpkt.ip.IP(
                src=socket.inet_aton("192.0.2.1"), dst=socket.inet_aton("192.0.2.2"), p=dpkt.ip.IP_PROTO_UDP,
                data=udp,
            )
            ip.len = len(ip)
            eth = dpkt.ethernet.Ethernet(type=dpkt.ethernet.ETH_TYPE_IP, data=ip)
            writer.writepkt(bytes(eth), ts=1_700_000_000 + i / 1000)


_TSHARK_FIELDS = (
    "cflow.version", "cflow.count", "cflow.sysuptime", "cflow.unix_secs", "cflow.sequence",
    "cflow.source_id", "cflow.template_id",
    "cflow.srcaddr", "cflow.dstaddr", "cflow.srcaddrv6", "cflow.dstaddrv6",
    "cflow.srcport", "cflow.dstport", "cflow.protocol", "cflow.octets", "cflow.packets",
    "cflow.tcpflags", "cflow.inputint", "cflow.outputint", "cflow.timestart", "cflow.timeend",
)


def _ms(seconds: str) -> int:
    return int(Decimal(seconds) * 1000)


def _run_tshark(payloads: list[bytes], tmp_path: Path, fields: Sequence[str], what: str,
                separator: str = ",") -> list[tuple[dict[str, str], dict[str, list[str]]]]:
    """Decode NetFlow payloads with tshark (the independent decoder): per datagram, the fields'
    raw text and their lists of values (occurrences joined with ``separator``)."""
    tshark = shutil.which("tshark")
    if tshark is None:
        pytest.fail(f"tshark is required (Debian package tshark): it is the independent {what} decoder")
    pcap = tmp_path / f"{what}.pcap"
    _write_pcap(pcap, payloads)
    cmd = [tshark, "-r", str(pcap), "-d", f"udp.port=={NF_PORT},cflow", "-T", "fields", "-E",
           f"aggregator={separator}"]
    for f in fields:
        cmd += ["-e", f]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    rows = []
    for line in out.splitlines():
        values = dict(zip(fields, line.split("\t"), strict=True))
        rows.append((values, {k: (v.split(separator) if v else []) for k, v in values.items()}))
    assert len(rows) == len(payloads), f"tshark did not decode every {what} datagram"
    return rows


#: The flow fields both encoders carry, in the order of _expected_records.
_FLOW_FIELDS = ("srcport", "dstport", "protocol", "octets", "packets", "tcpflags", "inputint", "outputint")


def _flow_records(multi: dict[str, list[str]], times: tuple[list[int], list[int]],
                  *extra: list[str]) -> list[tuple[Any, ...]]:
    """A datagram's records as _expected_records has them (plus ``extra`` columns), IPv4 or IPv6."""
    src = multi["cflow.srcaddr"] or multi["cflow.srcaddrv6"]
    dst = multi["cflow.dstaddr"] or multi["cflow.dstaddrv6"]
    return [
        (s, d, int(sp), int(dp), int(pr), int(o), int(p), int(fl, 16), int(i), int(o2), *rest)
        for s, d, sp, dp, pr, o, p, fl, i, o2, *rest in zip(
            src, dst, *(multi[f"cflow.{k}"] for k in _FLOW_FIELDS), *times, *extra, strict=True)
    ]


def _tshark(payloads: list[bytes], tmp_path: Path) -> list[dict[str, Any]]:
    """Decode v9 payloads with tshark. One dict per datagram: header fields, templates, records."""
    datagrams = []
    for values, multi in _run_tshark(payloads, tmp_path, _TSHARK_FIELDS, "v9"):
        assert not (multi["cflow.srcaddr"] and multi["cflow.srcaddrv6"]), \
            "a datagram mixes IPv4 and IPv6 data records"
        unix_secs, uptime = int(values["cflow.unix_secs"]), _ms(values["cflow.sysuptime"])
        boot = unix_secs * 1000 - uptime  # absolute time = boot + switched
        times = ([boot + _ms(t) for t in multi["cflow.timestart"]], [boot + _ms(t) for t in multi["cflow.timeend"]])
        datagrams.append(
            {
                "version": int(values["cflow.version"]),
                "count": int(values["cflow.count"]),
                "sequence": int(values["cflow.sequence"]),
                "source_id": int(values["cflow.source_id"]),
                "unix_secs": unix_secs,
                "uptime_ms": uptime,
                "templates": [int(t) for t in multi["cflow.template_id"]],
                "records": _flow_records(multi, times),
            }
        )
    return datagrams


@pytest.fixture(scope="module")
def cluster() -> gen.SyntheticCluster:
    return gen.synthetic_cluster(7)


# --- the encoder against tshark ---------------------------------------------------------------


def test_encode_v9_matches_tshark(cluster: gen.SyntheticCluster, tmp_path: Path) -> None:
    cols = gen.synthetic_flows(cluster, 4000, seed=3, start_ms=EPOCH_MS, span_ms=2000)
    v6 = ~(cols["src_addr"][:, :12] == V4_MAPPED_PREFIX).all(axis=1)
    assert 0 < v6.sum() < len(v6), "the sample must hold both IPv4 and IPv6 flows"
    unix_secs = EPOCH_MS // 1000 + 3
    packets, next_seq = gen.encode_v9(
        cols, source_id=4242, sequence=100, unix_secs=unix_secs, uptime_ms=5_000_000, template_every=7
    )
    assert next_seq == 100 + len(packets)
    assert all(len(p) <= gen.MAX_DATAGRAM and len(p) % 4 == 0 for p in packets)

    decoded = _tshark(packets, tmp_path)
    for i, d in enumerate(decoded):
        assert d["version"] == 9
        assert d["source_id"] == 4242
        assert d["sequence"] == 100 + i
        assert (d["unix_secs"], d["uptime_ms"]) == (unix_secs, 5_000_000)
        # Templates in the first packet and whenever the sequence is a multiple of 7.
        expect_template = i == 0 or (100 + i) % 7 == 0
        assert d["templates"] == ([256, 257] if expect_template else [])
        assert d["count"] == len(d["records"]) + len(d["templates"])
        assert 0 < len(d["records"]) <= 30

    got = Counter(r for d in decoded for r in d["records"])
    assert got == _expected_records(cols)  # addresses, ports, counters and absolute times
    assert sum(r[5] for r in got.elements()) == int(cols["bytes"].sum())
    assert sum(r[6] for r in got.elements()) == int(cols["packets"].sum())


def test_encode_v9_extreme_values_with_tshark(tmp_path: Path) -> None:
    """Counters, ports and times at the edges of their fields survive the trip through tshark."""
    unix_secs, uptime = 2_000_000_000, 0xFFFF_FFFF
    boot = unix_secs * 1000 - uptime
    addrs = [
        ("0.0.0.0", "255.255.255.255"),
        ("::", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"),
        ("10.0.0.1", "1.2.3.4"),
    ]

    def a16(ip: str) -> bytes:
        a = ipaddress.ip_address(ip)
        return (b"\0" * 10 + b"\xff\xff" + a.packed) if a.version == 4 else a.packed

    cols: dict[str, np.ndarray] = {
        "src_addr": np.frombuffer(b"".join(a16(s) for s, _ in addrs), np.uint8).reshape(-1, 16),
        "dst_addr": np.frombuffer(b"".join(a16(d) for _, d in addrs), np.uint8).reshape(-1, 16),
        "src_port": np.array([0, 65535, 1], np.uint16),
        "dst_port": np.array([65535, 0, 2], np.uint16),
        "proto": np.array([255, 0, 6], np.uint8),
        "bytes": np.array([2**64 - 1, 0, 1], np.uint64),
        "packets": np.array([2**64 - 1, 0, 1], np.uint64),
        "tcp_flags": np.array([0xFF, 0, 0x02], np.uint8),
        "in_if": np.array([65535, 0, 1], np.uint32),
        "out_if": np.array([0, 65535, 2], np.uint32),
        # switched from 1 to 2**32 - 1 (tshark shows a switched time of 0 as an absolute time,
        # in another field, so 0 is left out here).
        "start": np.array([boot + 1, boot + 1, boot + 1], np.int64),
        "end": np.array([boot + 0xFFFF_FFFF, boot + 1, boot + 2], np.int64),
    }
    packets, next_seq = gen.encode_v9(
        cols, source_id=0xFFFF_FFFF, sequence=0xFFFF_FFFF, unix_secs=unix_secs, uptime_ms=uptime
    )
    assert next_seq == 1  # two packets (IPv4, IPv6); the 32-bit sequence wraps
    decoded = _tshark(packets, tmp_path)
    assert [d["sequence"] for d in decoded] == [0xFFFF_FFFF, 0]
    assert all(d["source_id"] == 0xFFFF_FFFF for d in decoded)
    assert Counter(r for d in decoded for r in d["records"]) == _expected_records(cols)
    assert gen.encode_v9(
        {k: v[:0] for k, v in cols.items()}, source_id=1, sequence=5, unix_secs=unix_secs, uptime_ms=uptime
    ) == ([], 5)


def test_encode_v9_layout(cluster: gen.SyntheticCluster) -> None:
    cols = gen.synthetic_flows(cluster, 3000, seed=5, start_ms=EPOCH_MS)
    enc = gen.encode_packets(
        cols, source_id=1, sequence=0, unix_secs=EPOCH_MS // 1000 + 2, uptime_ms=10_000_000
    )
    assert int(enc.records.sum()) == 3000
    assert int(enc.bytes.sum()) == int(cols["bytes"].sum())
    assert int(enc.pkts.sum()) == int(cols["packets"].sum())
    for data, n_records in zip(enc.packets, enc.records.tolist(), strict=True):
        version, count, _, _, _, _ = struct.unpack_from("!HHIIII", data)
        assert version == 9
        offset, flowset_records = 20, 0
        while offset < len(data):  # flowsets tile the datagram exactly
            flowset_id, length = struct.unpack_from("!HH", data, offset)
            assert length % 4 == 0 and length >= 4
            if flowset_id >= 256:
                size = 42 if flowset_id == 256 else 66
                flowset_records += (length - 4) // size
            offset += length
        assert offset == len(data)
        assert flowset_records == n_records
        assert count in (n_records, n_records + 2)
    # IPv6 records are bigger: fewer of them fit the 1400-byte limit.
    assert gen._records_per_packet(66, 30) == 19
    assert gen._records_per_packet(42, 30) == 30
    assert gen._records_per_packet(42, 5) == 5


def test_encode_v9_rejects_what_it_cannot_encode(cluster: gen.SyntheticCluster) -> None:
    cols = gen.synthetic_flows(cluster, 50, seed=1, start_ms=EPOCH_MS)
    with pytest.raises(ValueError, match="sysUptime"):  # flows before the exporter booted
        gen.encode_v9(cols, source_id=1, sequence=0, unix_secs=EPOCH_MS // 1000 + 2, uptime_ms=1_000)
    mixed = dict(cols)
    mixed["dst_addr"] = cols["dst_addr"].copy()
    mixed["dst_addr"][0] = np.frombuffer(ipaddress.IPv6Address("2001:db8::1").packed, dtype=np.uint8)
    with pytest.raises(ValueError, match="mixes"):
        gen.encode_v9(mixed, source_id=1, sequence=0, unix_secs=EPOCH_MS // 1000 + 2, uptime_ms=10**7)
    big_if = dict(cols, in_if=np.full(50, 70_000, dtype=np.uint32))
    with pytest.raises(ValueError, match="in_if"):
        gen.encode_v9(big_if, source_id=1, sequence=0, unix_secs=EPOCH_MS // 1000 + 2, uptime_ms=10**7)
    with pytest.raises(ValueError, match="source_id"):
        gen.encode_v9(cols, source_id=-1, sequence=0, unix_secs=EPOCH_MS // 1000 + 2, uptime_ms=10**7)


def test_same_seed_same_bytes() -> None:
    def run(seed: int) -> list[bytes]:
        cols = gen.synthetic_flows(gen.synthetic_cluster(seed), 2000, seed=seed, start_ms=EPOCH_MS)
        packets, _ = gen.encode_v9(
            cols, source_id=1, sequence=0, unix_secs=EPOCH_MS // 1000 + 2, uptime_ms=10**7
        )
        return packets

    assert run(11) == run(11)
    assert run(11) != run(12)
    assert gen.inventory_yaml(gen.synthetic_cluster(11)) == gen.inventory_yaml(gen.synthetic_cluster(11))
    assert gen.inventory_yaml(gen.synthetic_cluster(11)) != gen.inventory_yaml(gen.synthetic_cluster(12))


# --- the cluster and its inventory ------------------------------------------------------------


def test_cluster_shape(cluster: gen.SyntheticCluster) -> None:
    assert [n.name for n in cluster.nodes] == ["node-1", "node-2", "node-3"]
    assert {"shop", "payments", "search", "monitoring", "kube-system"} <= set(cluster.namespaces)
    kinds = Counter(w.kind for w in cluster.workloads)
    assert kinds["StatefulSet"] >= 1 and kinds["DaemonSet"] >= 1 and kinds["Deployment"] >= 8
    assert 30 <= len(cluster.pods) <= 50
    nodes = {n.name: n for n in cluster.nodes}
    for pod in cluster.pods:
        assert ipaddress.ip_address(pod.ip) in ipaddress.ip_network(f"10.244.{nodes[pod.node].index}.0/24")
        if pod.workload_kind == "Deployment":
            assert re.fullmatch(rf"{pod.workload}-[a-z0-9]{{10}}-[a-z0-9]{{5}}", pod.name), pod.name
        elif pod.workload_kind == "StatefulSet":
            assert re.fullmatch(rf"{pod.workload}-\d+", pod.name), pod.name
        else:
            assert re.fullmatch(rf"{pod.workload}-[a-z0-9]{{5}}", pod.name), pod.name
    daemons = [p for p in cluster.pods if p.workload_kind == "DaemonSet"]
    assert sorted(p.node for p in daemons) == sorted(nodes)
    for svc in cluster.services:
        if svc.cluster_ip:
            assert ipaddress.ip_address(svc.cluster_ip) in ipaddress.ip_network("10.96.0.0/12")
    assert len({p.name for p in cluster.pods}) == len(cluster.pods)


def test_externals_resolve_in_maxmind_test_databases(cluster: gen.SyntheticCluster) -> None:
    import maxminddb

    mmdb = shared_testdata("mmdb")
    with maxminddb.open_database(str(mmdb / "GeoIP2-City-Test.mmdb")) as city, maxminddb.open_database(
        str(mmdb / "GeoLite2-ASN-Test.mmdb")
    ) as asn:
        for host in cluster.externals:
            assert ipaddress.ip_address(host.ip) in ipaddress.ip_network(host.network)
            assert city.get(host.ip) or asn.get(host.ip), f"{host.ip} resolves in no test database"
    assert any(ipaddress.ip_address(h.ip).version == 6 for h in cluster.externals)


def test_inventory_validates_and_covers_every_internal_address(
    cluster: gen.SyntheticCluster, tmp_path: Path
) -> None:
    path = tmp_path / "inventory.yaml"
    path.write_text(gen.inventory_yaml(cluster))
    inventory = load_inventory(path)
    by_addr = {o.address16(): o for o in inventory.owners}
    kinds = Counter(o.kind for o in inventory.owners)
    assert kinds[OwnerKind.NODE] == 3
    assert kinds[OwnerKind.POD] == 2 * len(cluster.pods)  # dual-stack
    assert kinds[OwnerKind.SERVICE] == sum(1 for s in cluster.services if s.cluster_ip)
    frontend = next(o for o in inventory.owners if o.workload == "frontend" and o.kind == OwnerKind.POD)
    assert frontend.namespace == "shop" and frontend.workload_kind == "Deployment"
    assert frontend.service == "frontend"
    assert frontend.node in {n.name for n in cluster.nodes}

    externals = {ipaddress.ip_address(h.ip) for h in cluster.externals}
    cols = gen.synthetic_flows(cluster, 20_000, seed=9, start_ms=EPOCH_MS)
    seen = {bytes(a) for a in np.unique(np.concatenate([cols["src_addr"], cols["dst_addr"]]), axis=0)}
    for raw in seen:
        addr = ipaddress.ip_address(_ip(raw))
        assert (raw in by_addr) != (addr in externals), f"{addr} is both or neither internal and external"
    # Every flow has at least one party inside the cluster.
    src_in = np.array([bytes(a) in by_addr for a in cols["src_addr"][:2000]])
    dst_in = np.array([bytes(a) in by_addr for a in cols["dst_addr"][:2000]])
    assert (src_in | dst_in).all()
    # Every owner kind shows up in traffic: pods, ClusterIPs and nodes.
    kinds_seen = {by_addr[r].kind for r in seen if r in by_addr}
    assert kinds_seen == {OwnerKind.POD, OwnerKind.SERVICE, OwnerKind.NODE}


def test_generate_inventory_cli() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "flowtally.cli", "generate", "inventory", "--seed", "2"],
        capture_output=True, text=True, check=True,
    ).stdout
    assert out == gen.inventory_yaml(gen.synthetic_cluster(2))


# --- the traffic ------------------------------------------------------------------------------


def test_flows_are_sane_and_mixed(cluster: gen.SyntheticCluster) -> None:
    n = 100_000
    cols = gen.synthetic_flows(cluster, n, seed=1, start_ms=EPOCH_MS, span_ms=10_000, max_duration_ms=4000)
    assert set(cols) == set(gen.FLOW_COLUMNS)
    assert all(len(v) == n for v in cols.values())
    assert cols["src_addr"].shape == (n, 16) and cols["src_addr"].dtype == np.uint8
    end, start = cols["end"], cols["start"]
    assert (np.diff(end) >= 0).all() and end[0] >= EPOCH_MS and end[-1] <= EPOCH_MS + 10_000
    assert ((end - start) >= 0).all() and ((end - start) <= 4000).all()
    assert (cols["packets"] >= 1).all() and (cols["bytes"] >= 40 * cols["packets"]).all()

    ephemeral = lambda p: (p >= 32768) & (p <= 60999)  # noqa: E731
    assert (ephemeral(cols["src_port"]) ^ ephemeral(cols["dst_port"])).all(), "one side is the client"
    udp = cols["proto"] == 17
    assert ((cols["src_port"][udp] == 53) | (cols["dst_port"][udp] == 53)).all()
    assert (cols["tcp_flags"][udp] == 0).all() and (cols["tcp_flags"][~udp] != 0).all()

    mapped = (cols["src_addr"][:, :12] == V4_MAPPED_PREFIX).all(axis=1)
    src4 = cols["src_addr"][:, 12]
    dst4 = cols["dst_addr"][:, 12]
    internal_src = mapped & (src4 == 10) | (cols["src_addr"][:, 0] == 0xFD)
    internal_dst = mapped & (dst4 == 10) | (cols["dst_addr"][:, 0] == 0xFD)
    both = (internal_src & internal_dst).mean()
    assert 0.6 < both < 0.95, both  # mostly east-west
    assert (internal_src & ~internal_dst).mean() > 0.03  # egress (and replies to ingress)
    assert (~internal_src & internal_dst).mean() > 0.03  # ingress (and replies to egress)
    assert 0.002 < (~mapped).mean() < 0.1  # some IPv6
    assert 0.05 < ((cols["dst_port"] == 53) & udp).mean() < 0.15  # DNS queries
    # Heavy tail: the biggest 1 % of flows carry a large share of the bytes.
    b = np.sort(cols["bytes"])
    assert b[-n // 100 :].sum() > 0.2 * b.sum()


def test_generation_is_fast(cluster: gen.SyntheticCluster) -> None:
    # Loose bound (noisy 2-core machines): the benchmark measures the real figure.
    t0 = time.perf_counter()
    for i in range(10):
        cols = gen.synthetic_flows(cluster, 20_000, seed=(1, i), start_ms=EPOCH_MS)
        gen.encode_v9(cols, source_id=1, sequence=0, unix_secs=EPOCH_MS // 1000 + 2, uptime_ms=10**7)
    assert time.perf_counter() - t0 < 2.0


# --- the sender -------------------------------------------------------------------------------


class _Receiver:
    """A UDP socket drained by a thread, with a receive buffer big enough not to drop."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        # Root may exceed net.core.rmem_max (SO_RCVBUFFORCE, Linux); others get what rmem_max allows.
        force = getattr(socket, "SO_RCVBUFFORCE", 33 if sys.platform == "linux" else None)
        try:
            if force is None:
                raise PermissionError
            self.sock.setsockopt(socket.SOL_SOCKET, force, 32 << 20)
        except PermissionError:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 << 20)
        self.sock.bind((host, 0))
        self.sock.settimeout(0.2)
        port = self.sock.getsockname()[1]
        self.target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.datagrams: list[bytes] = []
        self.arrivals: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.datagrams.append(self.sock.recv(65535))
                self.arrivals.append(time.monotonic())
            except TimeoutError:
                continue

    def close(self, expected: int, timeout: float = 5.0) -> list[bytes]:
        deadline = time.monotonic() + timeout
        while len(self.datagrams) < expected and time.monotonic() < deadline:
            time.sleep(0.01)
        self._stop.set()
        self._thread.join()
        self.sock.close()
        return self.datagrams


def _args(**kw: Any) -> argparse.Namespace:
    defaults = {"flows": 5000, "rate": 0.0, "seed": 3, "source_id": 9, "json": True, "format": "v9"}
    return argparse.Namespace(**(defaults | kw))


def _check_received(report: dict[str, Any], datagrams: list[bytes], tmp_path: Path, t0_ms: int,
                    t1_ms: int) -> None:
    assert report["complete"] is True
    assert len(datagrams) == report["datagrams"]
    assert sum(map(len, datagrams)) == report["payload_bytes"]
    decoded = sorted(_tshark(datagrams, tmp_path), key=lambda d: d["sequence"])
    assert [d["sequence"] for d in decoded] == list(range(len(decoded)))  # per-packet sequence from 0
    assert decoded[0]["templates"] == [256, 257]
    records = [r for d in decoded for r in d["records"]]
    assert len(records) == report["flows"]
    assert sum(r[5] for r in records) == report["bytes"]
    assert sum(r[6] for r in records) == report["packets"]
    ends = np.array([r[11] for r in records])
    # Flows end about when they are sent, never after their datagram's export time.
    assert ends.min() >= t0_ms - 1000 and ends.max() <= t1_ms
    for d in decoded:
        assert all(r[11] <= d["unix_secs"] * 1000 for r in d["records"])


def test_run_netflow_loopback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rx = _Receiver()
    t0_ms = time.time_ns() // 1_000_000
    status = gen.run_netflow(_args(to=rx.target, flows=5000, rate=0))
    t1_ms = time.time_ns() // 1_000_000
    report = json.loads(capsys.readouterr().out)
    datagrams = rx.close(report["datagrams"])
    assert status == 0
    assert report["flows"] == 5000 and report["source_id"] == 9
    _check_received(report, datagrams, tmp_path, t0_ms, t1_ms)


def test_run_netflow_paced(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rx = _Receiver()
    t0_ms = time.time_ns() // 1_000_000
    status = gen.run_netflow(_args(to=rx.target, flows=3000, rate=20_000))
    t1_ms = time.time_ns() // 1_000_000
    report = json.loads(capsys.readouterr().out)
    datagrams = rx.close(report["datagrams"])
    assert status == 0
    # Never faster than asked: 3000 flows at 20k/s take at least ~0.15 s.
    assert report["elapsed_s"] >= 0.13
    assert report["rate"] <= 20_000 * 1.15
    # Paced: datagrams arrive spread over the run, not all at once.
    assert rx.arrivals[-1] - rx.arrivals[0] >= 0.1
    _check_received(report, datagrams, tmp_path, t0_ms, t1_ms)


def test_generate_netflow_cli_ipv6(tmp_path: Path) -> None:
    rx = _Receiver("::1")
    t0_ms = time.time_ns() // 1_000_000
    proc = subprocess.run(
        [sys.executable, "-m", "flowtally.cli", "generate", "netflow", "--to", rx.target,
         "--flows", "2000", "--rate", "0", "--source-id", "5", "--json"],
        capture_output=True, text=True, check=True,
    )
    t1_ms = time.time_ns() // 1_000_000
    report = json.loads(proc.stdout)
    datagrams = rx.close(report["datagrams"])
    assert report["flows"] == 2000 and report["source_id"] == 5
    _check_received(report, datagrams, tmp_path, t0_ms, t1_ms)


def test_generate_netflow_cli_human_line_and_bad_target() -> None:
    rx = _Receiver()
    proc = subprocess.run(
        [sys.executable, "-m", "flowtally.cli", "generate", "netflow", "--to", rx.target, "--flows", "100"],
        capture_output=True, text=True, check=True,
    )
    rx.close(1)
    assert re.match(r"sent 100 flows \(\d+ bytes, \d+ packets\) in \d+ datagrams to ", proc.stdout)
    bad = subprocess.run(
        [sys.executable, "-m", "flowtally.cli", "generate", "netflow", "--to", "nowhere", "--flows", "1"],
        capture_output=True, text=True,
    )
    assert bad.returncode == 2 and "--to" in bad.stderr


def test_full_send_buffer_is_retried_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    class FullThenFine:
        def __init__(self) -> None:
            self.calls = 0
            self.sent: list[bytes] = []

        def sendto(self, data: bytes, addr: Any) -> int:
            self.calls += 1
            if self.calls <= 3:
                raise OSError(errno.ENOBUFS, "No buffer space available")
            self.sent.append(data)
            return len(data)

    sock = FullThenFine()
    totals = gen._Totals()
    gen._send(sock, b"x", ("127.0.0.1", 9), totals)  # type: ignore[arg-type]
    assert sock.sent == [b"x"] and totals.send_retries == 3
    assert "send buffer full" in caplog.text


# --- the IPFIX encoder against tshark ---------------------------------------------------------

_IPFIX_TSHARK_FIELDS = (
    "cflow.version", "cflow.len", "cflow.exporttime", "cflow.sequence", "cflow.od_id", "cflow.template_id",
    "cflow.srcaddr", "cflow.dstaddr", "cflow.srcaddrv6", "cflow.dstaddrv6",
    "cflow.srcport", "cflow.dstport", "cflow.protocol", "cflow.octets", "cflow.packets",
    "cflow.tcpflags", "cflow.inputint", "cflow.outputint", "cflow.abstimestart", "cflow.abstimeend",
    "cflow.if_name",
)


def _abs_ms(text: str) -> int:
    """tshark's absolute time ("Oct  9, 2025 08:53:18.896000000 UTC") as Unix ms."""
    from datetime import UTC, datetime

    stamp, frac = text.removesuffix(" UTC").rsplit(".", 1)
    secs = datetime.strptime(stamp, "%b %d, %Y %H:%M:%S").replace(tzinfo=UTC).timestamp()
    return int(secs) * 1000 + int(frac[:3])


def _tshark_ipfix(payloads: list[bytes], tmp_path: Path) -> list[dict[str, Any]]:
    """Decode IPFIX payloads with tshark: one dict per message (header, templates, records with
    the interfaceName last)."""
    messages = []
    # Lists are joined with "|": absolute times contain commas.
    for values, multi in _run_tshark(payloads, tmp_path, _IPFIX_TSHARK_FIELDS, "ipfix", separator="|"):
        times = ([_abs_ms(t) for t in multi["cflow.abstimestart"]], [_abs_ms(t) for t in multi["cflow.abstimeend"]])
        messages.append({
            "version": int(values["cflow.version"]),
            "length": int(values["cflow.len"]),
            "export_secs": int(values["cflow.exporttime"]),
            "sequence": int(values["cflow.sequence"]),
            "domain": int(values["cflow.od_id"]),
            "templates": [int(t) for t in multi["cflow.template_id"] if t],
            # An empty interfaceName is a value too (split() of "" drops it).
            "records": _flow_records(multi, times, values["cflow.if_name"].split("|") if times[0] else []),
        })
    return messages


def _with_names(expected: Counter[tuple[Any, ...]], names: dict[int, str] | None = None) -> Counter[tuple[Any, ...]]:
    """Expected records with the interfaceName the encoder sends for their ingress interface."""
    def name(index: int) -> str:
        return names.get(index, "") if names is not None else gen.interface_name(index)

    return Counter({(*r, name(r[8])): n for r, n in expected.items()})


def test_encode_ipfix_matches_tshark(cluster: gen.SyntheticCluster, tmp_path: Path) -> None:
    """Every record, header field and template of the IPFIX encoder as tshark decodes it, and the
    sensor's decoder agrees (same records, no error, no sequence gap)."""
    from sensors.netflow.decoder import decode_payloads
    from sensors.netflow.stats import DecodeStats
    from sensors.netflow.templates import TemplateStore
    from sensors.schema import address16

    cols = gen.synthetic_flows(cluster, 4000, seed=3, start_ms=EPOCH_MS, span_ms=2000)
    v6 = ~(cols["src_addr"][:, :12] == V4_MAPPED_PREFIX).all(axis=1)
    assert 0 < v6.sum() < len(v6), "the sample must hold both IPv4 and IPv6 flows"
    export_secs = EPOCH_MS // 1000 + 3
    enc = gen.encode_ipfix_packets(cols, domain=4242, sequence=0xFFFF_FF00, export_secs=export_secs,
                                   template_every=7, message_index=3)
    assert enc.next_sequence == (0xFFFF_FF00 + 4000) % 2**32  # IPFIX counts data records; wraps
    assert all(len(p) <= gen.MAX_DATAGRAM for p in enc.packets)

    decoded = _tshark_ipfix(enc.packets, tmp_path)
    sequence = 0xFFFF_FF00
    for i, (m, payload) in enumerate(zip(decoded, enc.packets, strict=True)):
        assert (m["version"], m["length"], m["domain"], m["export_secs"]) == (10, len(payload), 4242, export_secs)
        assert m["sequence"] == sequence % 2**32
        sequence += len(m["records"])
        assert m["templates"] == ([256, 257] if i == 0 or (3 + i) % 7 == 0 else [])
        assert 0 < len(m["records"]) <= 30
    got = Counter(r for m in decoded for r in m["records"])
    assert got == _with_names(_expected_records(cols))
    assert {r[12] for r in got} >= {"eth0", "veth4"}  # the variable-length field varies

    stats = DecodeStats()
    exporter = address16("192.0.2.1")
    table = decode_payloads(exporter, enc.packets, [EPOCH_MS] * len(enc.packets), TemplateStore(), stats)
    counts = stats.by_exporter()["192.0.2.1"]
    assert table.num_rows == 4000 and not counts.errors
    assert counts.sequence_gaps == counts.sequence_resets == counts.reordered == 0
    rows = table.to_pydict()
    mine = Counter(zip(
        (_ip(a) for a in rows["src_addr"]), (_ip(a) for a in rows["dst_addr"]),
        *(rows[k] for k in ("src_port", "dst_port", "proto", "bytes", "packets", "tcp_flags", "in_if", "out_if")),
        (int(t.timestamp() * 1000) for t in table.column("start").to_pylist()),
        (int(t.timestamp() * 1000) for t in table.column("end").to_pylist()),
        strict=True,
    ))
    assert mine == _expected_records(cols)


def test_encode_ipfix_variable_lengths_and_extremes_with_tshark(tmp_path: Path) -> None:
    """Empty and >= 255-byte interfaceNames (the 3-byte length form), counters and times at the
    edges of their fields, IPv4 and IPv6."""
    addrs = [("0.0.0.0", "255.255.255.255"), ("::", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"),
             ("10.0.0.1", "1.2.3.4")]

    def a16(ip: str) -> bytes:
        a = ipaddress.ip_address(ip)
        return (b"\0" * 10 + b"\xff\xff" + a.packed) if a.version == 4 else a.packed

    cols: dict[str, np.ndarray] = {
        "src_addr": np.frombuffer(b"".join(a16(s) for s, _ in addrs), np.uint8).reshape(-1, 16),
        "dst_addr": np.frombuffer(b"".join(a16(d) for _, d in addrs), np.uint8).reshape(-1, 16),
        "src_port": np.array([0, 65535, 1], np.uint16),
        "dst_port": np.array([65535, 0, 2], np.uint16),
        "proto": np.array([255, 0, 6], np.uint8),
        "bytes": np.array([2**64 - 1, 0, 1], np.uint64),
        "packets": np.array([2**64 - 1, 0, 1], np.uint64),
        "tcp_flags": np.array([0xFF, 0, 0x02], np.uint8),
        "in_if": np.array([2**32 - 1, 0, 7], np.uint32),
        "out_if": np.array([0, 2**32 - 1, 2], np.uint32),
        "start": np.array([0, EPOCH_MS, EPOCH_MS + 1], np.int64),
        "end": np.array([EPOCH_MS, EPOCH_MS, EPOCH_MS + 999], np.int64),
    }
    names = {2**32 - 1: "x" * 300, 0: "", 7: "ens7"}
    enc = gen.encode_ipfix_packets(cols, domain=0xFFFF_FFFF, sequence=5, export_secs=EPOCH_MS // 1000 + 1,
                                   names=names)
    assert enc.next_sequence == 8 and len(enc.packets) == 2  # one IPv4 and one IPv6 message
    decoded = _tshark_ipfix(enc.packets, tmp_path)
    assert [m["sequence"] for m in decoded] == [5, 7]
    assert Counter(r for m in decoded for r in m["records"]) == _with_names(_expected_records(cols), names)
    with pytest.raises(ValueError, match="domain"):
        gen.encode_ipfix_packets(cols, domain=-1, sequence=0, export_secs=1)
    assert gen.encode_ipfix_packets({k: v[:0] for k, v in cols.items()}, domain=1, sequence=9,
                                    export_secs=1).packets == []


def test_generate_ipfix_module_cli(tmp_path: Path) -> None:
    """`python -m flowtally.dev.generator netflow --format ipfix` sends what it reports, and
    tshark decodes every record of it."""
    rx = _Receiver()
    proc = subprocess.run(
        [sys.executable, "-m", "flowtally.dev.generator", "netflow", "--format", "ipfix", "--to", rx.target,
         "--flows", "3000", "--rate", "0", "--source-id", "6", "--json"],
        capture_output=True, text=True, check=True,
    )
    report = json.loads(proc.stdout)
    datagrams = rx.close(report["datagrams"])
    assert report["format"] == "ipfix" and report["flows"] == 3000 and len(datagrams) == report["datagrams"]
    decoded = _tshark_ipfix(datagrams, tmp_path)
    records = [r for m in decoded for r in m["records"]]
    assert len(records) == 3000
    assert sum(r[5] for r in records) == report["bytes"] and sum(r[6] for r in records) == report["packets"]
    assert {m["domain"] for m in decoded} == {6} and decoded[0]["templates"] == [256, 257]
    sequence = 0
    for m in decoded:  # the record-counting sequence runs on across the sender's chunks
        assert m["sequence"] == sequence
        sequence += len(m["records"])
