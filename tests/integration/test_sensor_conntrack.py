"""`flowtally sensor conntrack` against the real kernel: a node namespace with pods routed through
it and kube-proxy-like DNAT rules (tests/netns.py), the sensor running inside the node namespace.

The oracle is the kernel's own table as conntrack-tools lists it (`conntrack -L -o extended`,
an independent netlink reader) once the traffic is over; the connections are then deleted with
`conntrack -D`, which makes the kernel send their DESTROY events. Every connection's records
must add up to the kernel's counters exactly, per direction.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from flowtally.dev.localstack import Stage, free_port
from sensors.schema import address_text
from tests.integration.test_sensor_netflow import _read
from tests.netns import (
    DestroyOracle,
    NetnsError,
    OracleEntry,
    Pod,
    PortBridge,
    Topology,
    conntrack_list,
    in_netns,
    require_tools,
    sh,
    socket_in,
)

CLUSTER_IP = "10.96.0.10"
CLUSTER_IP6 = "fd00:96::10"
METRICS_PORT = 9464  # inside the node namespace
REPLY_BYTES = 3000


@dataclass
class NetnsStage(Stage):
    """A stage run inside a network namespace; /metrics reached through a port bridge."""

    netns: str = ""
    stdout_path: Path | None = None
    bridges: list[PortBridge] = field(default_factory=list)

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        bridge = PortBridge(None, ("127.0.0.1", 0), self.netns, ("127.0.0.1", METRICS_PORT))
        self.bridges.append(bridge)
        self.metrics_port = bridge.address[1]
        with open(self.log_path, "ab") as log:
            out = open(self.stdout_path, "wb") if self.stdout_path else log  # noqa: SIM115
            with out:
                self.process = subprocess.Popen(
                    ["ip", "netns", "exec", self.netns, sys.executable, "-m", "flowtally.cli", *self.argv],
                    env=os.environ | self.env, stdout=out, stderr=log)

    def stop(self, timeout: float = 30.0) -> int:
        code = super().stop(timeout)
        for bridge in self.bridges:
            bridge.close()
        self.bridges.clear()
        return code

    def records(self) -> list[dict[str, Any]]:
        assert self.stdout_path is not None
        return [json.loads(line) for line in self.stdout_path.read_text().splitlines() if line.strip()]


@dataclass
class Cluster:
    """The topology, its servers and the sensor."""

    topo: Topology
    client: Pod
    backends: list[Pod]
    tmp: Path
    stages: list[NetnsStage] = field(default_factory=list)
    closers: list[Any] = field(default_factory=list)
    oracle: DestroyOracle | None = None

    def sensor(self, stdout: bool = True, **env: str) -> NetnsStage:
        """Start the oracle (conntrack -E) and the sensor in the node namespace."""
        if self.oracle is None:
            self.oracle = DestroyOracle(self.topo.node, str(self.tmp / "conntrack-events.txt"))
        stage = NetnsStage(
            "sensor", ["sensor", "conntrack", *(["--stdout"] if stdout else []),
                       "--metrics-listen", f"127.0.0.1:{METRICS_PORT}"],
            {"FLOWTALLY_OBSERVER": "node-1", "FLOWTALLY_DUMP_INTERVAL_S": "0.5",
             "FLOWTALLY_BATCH_MAX_AGE_MS": "100", "FLOWTALLY_EXPORTER": "192.0.2.1"}
            | {f"FLOWTALLY_{k}": v for k, v in env.items()},
            self.tmp / f"sensor-{len(self.stages)}.log", 0, netns=self.topo.node,
            stdout_path=self.tmp / f"sensor-{len(self.stages)}.jsonl" if stdout else None)
        self.stages.append(stage)
        stage.start()
        stage.wait_healthy(60)
        return stage


def _serve_tcp(pod: Pod, port: int) -> socket.socket:
    """Reads each connection to EOF, answers REPLY_BYTES bytes, closes (dual-stack)."""
    srv = socket_in(pod.ns, socket.AF_INET6)
    srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    srv.bind(("::", port))
    srv.listen(128)

    def handle(conn: socket.socket) -> None:
        with conn:
            while conn.recv(65536):
                pass
            conn.sendall(b"r" * REPLY_BYTES)

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return srv


def _serve_udp(pod: Pod, port: int) -> socket.socket:
    """Echoes every datagram (dual-stack)."""
    srv = socket_in(pod.ns, socket.AF_INET6, socket.SOCK_DGRAM)
    srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    srv.bind(("::", port))

    def serve() -> None:
        while True:
            try:
                data, peer = srv.recvfrom(65536)
                srv.sendto(data, peer)
            except OSError:
                return

    threading.Thread(target=serve, daemon=True).start()
    return srv


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """Node + client + two backends, a TCP and a UDP ClusterIP service (IPv4 and IPv6) DNATed to
    both backends, servers on the backends. Everything is removed afterwards, pass or fail."""
    try:
        require_tools()
    except NetnsError as exc:
        pytest.fail(str(exc), pytrace=False)
    topo = Topology()
    cl: Cluster | None = None
    try:
        topo.create_node()
        client = topo.add_pod("client", 10)
        backends = [topo.add_pod("b1", 11), topo.add_pod("b2", 12)]
        for name, ip, family in (("web", CLUSTER_IP, "ip4"), ("web6", CLUSTER_IP6, "ip6")):
            topo.add_service(name, ip, 80, "tcp", [(getattr(b, family), 8080) for b in backends])
            topo.add_service(f"{name}-dead", ip, 81, "tcp", [(getattr(backends[0], family), 9999)])
            topo.add_service(f"{name}-dns", ip, 53, "udp", [(getattr(b, family), 5353) for b in backends])
        cl = Cluster(topo, client, backends, tmp_path)
        for b in backends:
            cl.closers += [_serve_tcp(b, 8080), _serve_udp(b, 5353)]
        yield cl
    finally:
        if cl is not None:
            for stage in cl.stages:
                stage.stop(10)
            if cl.oracle is not None:
                cl.oracle.stop()
            for closer in cl.closers:
                with contextlib.suppress(OSError):
                    closer.close()
        topo.destroy()


# -- traffic -----------------------------------------------------------------------------------

def tcp_transfer(pod: Pod, address: str, port: int, payload: int) -> tuple[int, int]:
    """Send ``payload`` bytes, read the answer; (client port, bytes received)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket_in(pod.ns, family) as s:
        s.settimeout(10)
        s.connect((address, port))
        s.sendall(b"q" * payload)
        s.shutdown(socket.SHUT_WR)
        got = 0
        while chunk := s.recv(65536):
            got += len(chunk)
        return s.getsockname()[1], got


def udp_exchange(pod: Pod, address: str, port: int, payload: int) -> int:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket_in(pod.ns, family, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        s.sendto(b"u" * payload, (address, port))
        assert len(s.recv(65536)) == payload
        return int(s.getsockname()[1])


def icmp_echo(pod: Pod, address: str, ident: int, payload: int = 56) -> None:
    """One ICMP echo request and its reply (a raw socket: no ping binary needed)."""
    body = b"p" * payload
    header = struct.pack("!BBHHH", 8, 0, 0, ident, 1)
    data = header + body
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    packet = struct.pack("!BBHHH", 8, 0, ~total & 0xFFFF, ident, 1) + body
    with socket_in(pod.ns, socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as s:
        s.settimeout(5)
        s.sendto(packet, (address, 0))
        while True:
            reply = s.recv(65536)
            if reply[20] == 0 and struct.unpack("!H", reply[24:26])[0] == ident:
                return


def refused(pod: Pod, address: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket_in(pod.ns, family) as s, pytest.raises(ConnectionRefusedError):
        s.settimeout(5)
        s.connect((address, port))


# -- checking ----------------------------------------------------------------------------------

def end_traffic(cl: Cluster, sensor: NetnsStage, timeout: float = 60, expect: int | None = None
                ) -> list[OracleEntry]:
    """Delete every connection of the client (the kernel sends their DESTROY events), wait until
    the sensor has reported as many bytes as conntrack-tools saw in those events (or ``expect``
    bytes), and return what conntrack-tools saw (loopback left out, as the sensor does)."""
    time.sleep(0.3)  # the last ACKs
    for family, src in (("ipv4", cl.client.ip4), ("ipv6", cl.client.ip6)):
        sh("conntrack", "-D", "-f", family, "-s", src, ns=cl.topo.node, check=False)
    assert cl.oracle is not None
    deadline = time.monotonic() + timeout
    reported = want = 0.0
    oracle: list[OracleEntry] = []
    while time.monotonic() < deadline:
        sensor.check_alive()
        oracle = [e for e in cl.oracle.entries()
                  if not e.orig["src"].startswith("127.") and e.orig["src"] != "::1"]
        want = expect if expect is not None else sum(int(e.orig["bytes"]) + int(e.reply["bytes"])
                                                     for e in oracle)
        reported = sensor.metric("flowtally_sensor_conntrack_reported_bytes_total")
        if reported == want and not [e for e in conntrack_list(cl.topo.node)
                                     if e.orig["src"] in (cl.client.ip4, cl.client.ip6)]:
            break
        time.sleep(0.3)
    assert reported == want, f"sensor reported {reported} bytes, the kernel's DESTROY events say {want}"
    if expect is None:
        assert not cl.oracle.overrun(), "conntrack -E itself overran: the oracle is incomplete"
    return oracle


def by_connection(records: list[dict[str, Any]]) -> dict[tuple[int, str, int], dict[int, list[dict[str, Any]]]]:
    """Records grouped by connection (proto, initiator address, initiator port) and direction."""
    out: dict[tuple[int, str, int], dict[int, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        if r["initiator"] == 1:
            key = (r["proto"], r["src_addr"], r["src_port"])
        else:
            key = (r["proto"], r["dst_addr"], r["dst_port"])
        out[key][r["initiator"]].append(r)
    return out


def oracle_key(e: OracleEntry) -> tuple[int, str, int]:
    return e.proto, e.orig["src"], 0 if e.proto in (1, 58) else int(e.orig["sport"])


def assert_exact(records: list[dict[str, Any]], oracle: list[OracleEntry]) -> dict[tuple[int, str, int], Any]:
    """Per connection and direction: record sums == the kernel's counters; endpoints right."""
    grouped = by_connection(records)
    assert set(grouped) == {oracle_key(e) for e in oracle}
    for e in oracle:
        directions = grouped[oracle_key(e)]
        for initiator, side in ((1, e.orig), (2, e.reply)):
            rows = directions.get(initiator, [])
            assert sum(r["bytes"] for r in rows) == int(side["bytes"]), (e, initiator)
            assert sum(r["packets"] for r in rows) == int(side["packets"]), (e, initiator)
        for r in directions[1]:
            assert (r["src_addr"], r["dst_addr"]) == (e.orig["src"], e.reply["src"])
        for r in directions.get(2, []):
            assert (r["src_addr"], r["dst_addr"]) == (e.reply["src"], e.orig["src"])
        translated = e.orig["dst"] != e.reply["src"]
        for r in directions[1] + directions.get(2, []):
            assert r["observer"] == "node-1" and r["version"] == 0 and r["exporter"] == "192.0.2.1"
            assert r["observation_domain"] == 0
            assert r["start"] <= r["end"]
            if translated:
                assert (r["nat_addr"], r["nat_port"]) == (e.orig["dst"], int(e.orig.get("dport", 0)))
            else:
                assert (r["nat_addr"], r["nat_port"]) == ("", 0)
    return grouped


def test_services_exact_bytes_dnat_state(cluster: Cluster) -> None:
    """TCP through the ClusterIP (IPv4 twice: both backends; IPv6 once), UDP request/response
    through the ClusterIP, a refused connection, an ICMP echo: exact per-direction counters,
    the backend as dst and the ClusterIP as nat_addr, the initiator and the connection state."""
    sensor = cluster.sensor()
    acct = sh("sysctl", "-n", "net.netfilter.nf_conntrack_acct", ns=cluster.topo.node).strip()
    assert acct == "1", "the sensor turns accounting on"
    ports = [tcp_transfer(cluster.client, CLUSTER_IP, 80, n) for n in (100_000, 7)]
    assert [got for _, got in ports] == [REPLY_BYTES, REPLY_BYTES]
    port6, _ = tcp_transfer(cluster.client, CLUSTER_IP6, 80, 12_345)
    udp_port = udp_exchange(cluster.client, CLUSTER_IP, 53, 200)
    refused(cluster.client, CLUSTER_IP, 81)
    icmp_echo(cluster.client, cluster.backends[1].ip4, ident=4242)
    oracle = end_traffic(cluster, sensor)
    assert sensor.stop(30) == 0
    records = sensor.records()
    grouped = assert_exact(records, oracle)
    assert len(oracle) == 6, oracle

    c4 = cluster.client.ip4
    first, second = (grouped[(6, c4, p)] for p, _ in ports)
    assert {first[1][0]["dst_addr"], second[1][0]["dst_addr"]} == {b.ip4 for b in cluster.backends}
    for conn in (first, second):
        assert conn[1][0]["nat_addr"] == CLUSTER_IP and conn[1][0]["nat_port"] == 80
        assert conn[1][0]["dst_port"] == 8080 and conn[2][0]["src_port"] == 8080
        assert {r["conn_state"] for r in conn[1] + conn[2]} <= {"established", "closing"}
    assert sum(r["bytes"] for r in first[1]) > 100_000
    v6 = grouped[(6, cluster.client.ip6, port6)]
    assert v6[1][0]["nat_addr"] == CLUSTER_IP6 and v6[1][0]["dst_addr"] in {b.ip6 for b in cluster.backends}
    udp = grouped[(17, c4, udp_port)]
    assert udp[1][0]["bytes"] == 228 and udp[2][0]["bytes"] == 228  # 20 + 8 + 200, each way
    assert udp[1][0]["conn_state"] == "established" and udp[1][0]["nat_port"] == 53
    dead = [conn for (proto, _, _), conn in grouped.items()
            if proto == 6 and conn[1][0]["nat_port"] == 81]
    assert len(dead) == 1
    assert dead[0][1][-1]["conn_state"] == "refused" and dead[0][1][0]["dst_port"] == 9999
    assert dead[0][2][0]["packets"] == 1  # the reset
    icmp = grouped[(1, c4, 0)]
    assert icmp[1][0]["dst_addr"] == cluster.backends[1].ip4 and icmp[1][0]["dst_port"] == 8 << 8
    assert icmp[2][0]["dst_port"] == 0 and icmp[2][0]["src_port"] == 0  # echo reply: type 0 code 0
    assert icmp[1][0]["bytes"] == icmp[2][0]["bytes"] == 84 and icmp[1][0]["nat_addr"] == ""
    assert not any(r["src_addr"].startswith("127.") for r in records)  # its own traffic: filtered


def test_long_lived_connection_deltas(cluster: Cluster) -> None:
    """A connection open across several dumps shows up in each, and its deltas add up to the
    counters the kernel had when it was destroyed."""
    sensor = cluster.sensor()
    with socket_in(cluster.client.ns) as s:
        s.connect((CLUSTER_IP, 80))
        port = s.getsockname()[1]
        for _ in range(5):
            s.sendall(b"l" * 20_000)
            time.sleep(1.2)  # > dump interval: each chunk lands in another dump
        s.shutdown(socket.SHUT_WR)
        while s.recv(65536):
            pass
    oracle = end_traffic(cluster, sensor)
    assert sensor.stop(30) == 0
    grouped = assert_exact(sensor.records(), oracle)
    orig = grouped[(6, cluster.client.ip4, port)][1]
    assert len(orig) >= 5, f"expected a record per dump while it lived, got {len(orig)}"
    assert all(r["bytes"] > 0 for r in orig)
    assert len({r["start"] for r in orig}) == 1  # every delta carries the connection's start


def test_overrun_resync_totals_exact(cluster: Cluster) -> None:
    """A tiny event buffer and a burst of short UDP connections: overruns are counted and
    resynchronised with dumps, and every connection's records still add up to exactly one
    datagram each way (what the burst sent and the echo server answered: 20 + 8 + payload
    bytes). conntrack -E is no oracle here: the kernel rebroadcasts the DESTROYs the sensor
    missed to every listener, so conntrack-tools sees duplicates and overruns too."""
    sensor = cluster.sensor(RECEIVE_BUFFER_BYTES="2048")
    n, payload = 3000, 40
    answered = udp_burst(cluster, n, payload)
    assert answered == n
    end_traffic(cluster, sensor, timeout=120, expect=2 * n * (28 + payload))
    overruns = sensor.metric("flowtally_sensor_conntrack_overruns_total")
    dumps = sensor.metric("flowtally_sensor_conntrack_dumps_total")
    assert sensor.stop(60) == 0
    grouped = by_connection(sensor.records())
    assert len(grouped) == n
    for (proto, client, _), directions in grouped.items():
        assert (proto, client) == (17, cluster.client.ip4)
        for initiator in (1, 2):
            rows = directions[initiator]
            assert (sum(r["bytes"] for r in rows), sum(r["packets"] for r in rows)) == (28 + payload, 1)
    assert overruns > 0, "a 2 KiB event buffer did not overrun: the test proves nothing"
    assert dumps >= 2


def udp_burst(cluster: Cluster, n: int, payload: int) -> int:
    """``n`` UDP flows (each from its own source port) from the client to a backend's echo
    server, as fast as this process can; returns how many were answered."""
    target = (cluster.backends[0].ip4, 5353)

    def burst() -> int:
        answered = 0
        open_sockets = []
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.sendto(b"b" * payload, target)
            open_sockets.append(s)
        for s in open_sockets:
            s.settimeout(5)
            with contextlib.suppress(TimeoutError):
                s.recv(65536)
                answered += 1
            s.close()
        return answered

    return in_netns(cluster.client.ns, burst)


def test_publishes_raw_v1_to_kafka(cluster: Cluster, kafka_bootstrap: str) -> None:
    """Published to the real Kafka: raw.v1 batches keyed by the node, the same exact counters,
    and completeness rows of stage sensor-conntrack."""
    prefix = f"t{uuid.uuid4().hex[:10]}"
    host, port = kafka_bootstrap.rsplit(":", 1)
    bridge = PortBridge(cluster.topo.node, ("127.0.0.1", int(port)), None, (host, int(port)))
    cluster.closers.append(bridge)
    sensor = cluster.sensor(stdout=False, KAFKA_BOOTSTRAP=f"127.0.0.1:{port}", KAFKA_TOPIC_PREFIX=prefix)
    tcp_transfer(cluster.client, CLUSTER_IP, 80, 50_000)
    udp_exchange(cluster.client, CLUSTER_IP, 53, 10)
    oracle = end_traffic(cluster, sensor)
    published = 0.0
    deadline = time.monotonic() + 30
    made = sensor.metric("flowtally_sensor_conntrack_delta_records_total")
    while time.monotonic() < deadline and published < made:
        published = sensor.metric("flowtally_sensor_flows_published_total")
        time.sleep(0.2)
    assert sensor.stop(30) == 0
    raw = _read(kafka_bootstrap, f"{prefix}.flows.raw", int(made))
    assert raw and all(h["flowtally-schema"] == b"raw.v1" and k == b"node-1" for k, _, h in raw)
    table = pa.concat_tables([t for _, t, _ in raw])
    records = []
    for row in table.to_pylist():
        for k in ("exporter", "src_addr", "dst_addr", "nat_addr"):
            row[k] = "" if k in ("exporter", "nat_addr") and not any(row[k]) else address_text(row[k])
        records.append(row)
    assert len(records) == made
    assert_exact(records, oracle)
    rows = _read(kafka_bootstrap, f"{prefix}.sensor.completeness", 1)
    completeness = pa.concat_tables([t for _, t, _ in rows]).to_pylist()
    assert {r["stage"] for r in completeness} == {"sensor-conntrack"}
    assert {r["observer"] for r in completeness} == {"node-1"}
    assert sum(r["records"] for r in completeness) == made
    assert sum(r["kernel_drops"] + r["dropped_backpressure"] for r in completeness) == 0


def test_missing_accounting_is_named(tmp_path: Path) -> None:
    """Accounting off and the sensor not allowed to change it: it stops and says what is missing."""
    try:
        require_tools()
    except NetnsError as exc:
        pytest.fail(str(exc), pytrace=False)
    topo = Topology()
    try:
        ns = topo.add_namespace(f"ftbare-{topo.run_id}")
        assert sh("sysctl", "-n", "net.netfilter.nf_conntrack_acct", ns=ns).strip() == "0"
        proc = subprocess.run(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "flowtally.cli", "sensor", "conntrack",
             "--stdout", "--metrics-listen", f"127.0.0.1:{free_port()}"],
            env=os.environ | {"FLOWTALLY_ENABLE_SYSCTLS": "false"}, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2  # could not start (flowtally.lifecycle)
        assert "net.netfilter.nf_conntrack_acct is 0, needs 1" in proc.stderr
        assert "byte or packet counters" in proc.stderr
    finally:
        topo.destroy()
