"""tshark as the independent NetFlow decoder that our decoder's output is checked against.

Wireshark's cflow dissector is a separate implementation (C, its own field tables), so agreement
on record counts, byte and packet sums and the multiset of flow keys is strong evidence. Tests
that use it must fail, never skip, when tshark is missing: a silently skipped oracle is no oracle.

Things tshark does differently, which the helpers here account for:

* it keeps templates per capture file and per transport session (addresses *and* ports), so a
  sequence of files is concatenated with ``mergecap -a`` first;
* it only dissects the cflow protocol on its default ports, so every UDP destination port of the
  capture is registered with ``-d udp.port==P,cflow``;
* it labels field types its own way: IN_BYTES/IN_PKTS are ``cflow.octets``/``cflow.packets``,
  OUT_BYTES/OUT_PKTS (23/24) are ``cflow.post_octets``/``cflow.post_packets`` and the totals
  (85/86) ``cflow.permanent_octets``/``cflow.permanent_packets``;
* options data records look like flow records in its output; they are told apart here by the
  options template IDs it announced, and counted separately;
* it stops at the header's record count, which our decoder does not enforce (see sensors.netflow.v9).
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, NamedTuple

import dpkt
import pyarrow as pa
import pytest

from sensors.netflow.decoder import Datagram, decode_datagrams, flush_pending
from sensors.netflow.pcap import iter_udp
from sensors.netflow.stats import DecodeStats
from sensors.netflow.templates import TemplateStore
from sensors.schema import ADDRESS_COLUMNS, DETAIL_COLUMNS, address_bytes, address_text

#: The flow details of a record that reports none (raw.v1's DETAIL_COLUMNS at 0).
NO_DETAILS = dict.fromkeys(DETAIL_COLUMNS, 0)

REPO_ROOT = Path(__file__).resolve().parents[1]



def _find_shared_testdata() -> Path:
    """The workplace's shared third-party test data: $FLOWTALLY_SHARED_TESTDATA, else
    ``../shared/testdata`` next to this checkout, else ``/work/shared/testdata`` (where it lives
    on these machines when the repository is cloned elsewhere, as CI checks do)."""
    candidates = [REPO_ROOT.parent / "shared" / "testdata", Path("/work/shared/testdata")]
    if os.environ.get("FLOWTALLY_SHARED_TESTDATA"):
        candidates.insert(0, Path(os.environ["FLOWTALLY_SHARED_TESTDATA"]))
    return next((c for c in candidates if c.is_dir()), candidates[0])


SHARED_TESTDATA = _find_shared_testdata()
DATA = Path(__file__).resolve().parent / "data"

_FLOWSET = re.compile(r"^(?:Flow)?Set \d+ \[id=(\d+)\]")
_RECORD = re.compile(r"^(Flow \d+|pdu \d+/\d+)$")
_OPTIONS_TEMPLATE = re.compile(r"^Options Template \(Id = (\d+)\)")
_ABSTIME = re.compile(r"^(\w{3}) +(\d+), (\d{4}) (\d\d):(\d\d):(\d\d)\.(\d+) UTC$")
_MONTHS = {m: i for i, m in enumerate(["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"], 1)}


class FlowKey(NamedTuple):
    """What the oracle comparison looks at, per record."""

    src: str
    dst: str
    sport: int
    dport: int
    proto: int
    bytes: int
    packets: int


@dataclass
class OracleResult:
    """tshark's view of a capture (v5 and v9 packets only unless asked otherwise)."""

    records: list[FlowKey] = field(default_factory=list)
    #: (start_ms, end_ms) per record, aligned with ``records``; None where tshark shows no times
    times: list[tuple[int, int] | None] = field(default_factory=list)
    #: raw.v1's flow details (DETAIL_COLUMNS order) per record, aligned with ``records``
    details: list[tuple[int, ...]] = field(default_factory=list)
    options_records: int = 0
    missing_template_flowsets: int = 0
    packets_by_version: Counter[int] = field(default_factory=Counter)

    @property
    def totals(self) -> tuple[int, int, int]:
        """(record count, byte sum, packet sum)."""
        return (
            len(self.records),
            sum(r.bytes for r in self.records),
            sum(r.packets for r in self.records),
        )

    def multiset(self) -> Counter[FlowKey]:
        """The records as a multiset, for order-insensitive comparison."""
        return Counter(self.records)


def require_tool(name: str) -> str:
    """The path of a command-line tool the oracle needs; fails the test (never skips) if absent."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"{name} is required as the independent NetFlow oracle but was not found on PATH; "
            "install Wireshark's command-line tools (Debian: apt-get install tshark)",
            pytrace=False,
        )
    return path


def shared_testdata(*parts: str) -> Path:
    """A file of the shared third-party test data (``../shared/testdata``); fails if absent."""
    path = SHARED_TESTDATA.joinpath(*parts)
    if not path.exists():
        pytest.fail(f"shared test data missing: {path} (set FLOWTALLY_SHARED_TESTDATA to the shared/testdata folder)",
                    pytrace=False)
    return path


def payloads_to_pcap(
    payloads: Iterable[bytes],
    path: Path,
    src: str = "127.0.0.1",
    dst: str = "127.0.0.1",
    sport: int = 40000,
    dport: int = 2055,
    start_ts: float = 1_700_000_000.0,
) -> Path:
    """Wrap raw UDP payloads (e.g. Telegraf's .bin files) into an Ethernet/IPv4/UDP pcap."""
    with path.open("wb") as f:
        writer = dpkt.pcap.Writer(f)
        for i, payload in enumerate(payloads):
            udp = dpkt.udp.UDP(sport=sport, dport=dport, data=payload)
            udp.ulen = 8 + len(payload)
            ip = dpkt.ip.IP(src=socket.inet_aton(src), dst=socket.inet_aton(dst), p=17, ttl=64, data=udp)
            ip.len = 20 + len(udp)
            eth = dpkt.ethernet.Ethernet(src=b"\x02\x00\x00\x00\x00\x01", dst=b"\x02\x00\x00\x00\x00\x02",
                                         type=dpkt.ethernet.ETH_TYPE_IP, data=ip)
            writer.writepkt(bytes(eth), ts=start_ts + i * 0.001)
    return path


def tshark_decode(paths: Path | Sequence[Path], versions: Iterable[int] = (5, 9, 10)) -> OracleResult:
    """Decode captures with tshark; several files are decoded as one sequence (one template state).

    Only records of the given NetFlow versions are returned.
    """
    tshark = require_tool("tshark")
    files = [paths] if isinstance(paths, Path) else list(paths)
    with tempfile.TemporaryDirectory(prefix="oracle-") as tmp:
        if len(files) > 1:
            merged = Path(tmp) / "merged.pcap"
            subprocess.run(
                [require_tool("mergecap"), "-a", "-F", "pcap", "-w", str(merged), *map(str, files)],
                check=True, capture_output=True,
            )
            capture = merged
        else:
            capture = files[0]
        ports = _udp_ports(tshark, capture)
        decode_as = [arg for port in sorted(ports) for arg in ("-d", f"udp.port=={port},cflow")]
        proc = subprocess.run(
            [tshark, "-n", "-r", str(capture), *decode_as, "-T", "json", "--no-duplicate-keys",
             "-J", "ip ipv6 cflow"],
            check=True, capture_output=True,
        )
    return _parse(json.loads(proc.stdout or b"[]"), set(versions))


def _udp_ports(tshark: str, capture: Path) -> set[int]:
    proc = subprocess.run(
        [tshark, "-n", "-r", str(capture), "-T", "fields", "-e", "udp.dstport"],
        check=True, capture_output=True, text=True,
    )
    return {int(p) for line in proc.stdout.split() for p in line.split(",") if p}


def _first(value: Any) -> Any:
    return value[0] if isinstance(value, list) else value


def _parse(frames: list[dict[str, Any]], versions: set[int]) -> OracleResult:
    out = OracleResult()
    options_ids: set[tuple[str, str, int]] = set()
    sys_init: dict[tuple[str, str], int] = {}  # IPFIX systemInitTimeMilliseconds from options data
    for frame in frames:
        layers = frame["_source"]["layers"]
        cflow = _first(layers.get("cflow"))
        if not isinstance(cflow, dict):
            continue
        version = int(_first(cflow["cflow.version"]))
        out.packets_by_version[version] += 1
        if version not in versions:
            continue
        ip = _first(layers.get("ip") or layers.get("ipv6") or {})
        exporter = ip.get("ip.src") or ip.get("ipv6.src") or "?"
        domain = str(_first(cflow.get("cflow.source_id", cflow.get("cflow.od_id", "0"))))
        header = _Header(cflow, sys_init.get((exporter, domain)))
        for key, value in cflow.items():
            if _RECORD.match(key):  # v5 records sit directly under the header
                _add_record(out, value, header)
                continue
            m = _FLOWSET.match(key)
            if not m:
                continue
            flowset_id = int(m.group(1))
            for item in value if isinstance(value, list) else [value]:
                if flowset_id == 1 or (version == 10 and flowset_id == 3):
                    for sub in item:
                        o = _OPTIONS_TEMPLATE.match(sub)
                        if o:
                            options_ids.add((exporter, domain, int(o.group(1))))
                elif flowset_id >= 256:
                    if any("no template found" in sub for sub in item):
                        out.missing_template_flowsets += 1
                        continue
                    records = [v for k, v in item.items() if _RECORD.match(k)]
                    if (exporter, domain, flowset_id) in options_ids:
                        out.options_records += len(records)
                        for record in records:
                            if "cflow.sys_init_time" in record:
                                sys_init[(exporter, domain)] = _abstime_ms(_first(record["cflow.sys_init_time"]))
                                header = _Header(cflow, sys_init[(exporter, domain)])
                        continue
                    for record in records:
                        _add_record(out, record, header)
    return out


class _Header:
    """The header times tshark shows, to turn record times into UTC milliseconds.

    IPFIX has no uptime in its header: its relative times (flowStart/EndSysUpTime) count from
    the systemInitTimeMilliseconds of an options record seen earlier (``sys_init``); without one
    they cannot be placed and are not compared."""

    def __init__(self, cflow: dict[str, Any], sys_init: int | None = None) -> None:
        tree = _first(cflow.get("cflow.timestamp_tree", {}))
        self.ipfix = "cflow.exporttime" in tree
        secs = int(_first(tree.get("cflow.unix_secs", tree.get("cflow.exporttime", "0"))))
        nsecs = int(_first(tree.get("cflow.unix_nsecs", "0")))
        self.export_ms = secs * 1000 + nsecs // 1_000_000
        self.uptime_ms = _seconds_to_ms(_first(cflow.get("cflow.sysuptime", "0")))
        self.sys_init = sys_init

    def absolute(self, relative: str) -> int | None:
        if self.ipfix:
            return None if self.sys_init is None else self.sys_init + _seconds_to_ms(relative)
        return self.export_ms - (self.uptime_ms - _seconds_to_ms(relative))


def _seconds_to_ms(text: str) -> int:
    return int(Decimal(text) * 1000)


def _abstime_ms(text: str) -> int:
    m = _ABSTIME.match(text)
    if not m:
        raise ValueError(f"unexpected tshark time format: {text!r}")
    mon, day, year, hh, mm, ss, frac = m.groups()
    dt = datetime(int(year), _MONTHS[mon], int(day), int(hh), int(mm), int(ss), tzinfo=UTC)
    return int(dt.timestamp()) * 1000 + int(frac[:3].ljust(3, "0"))


def _record_times(record: dict[str, Any], header: _Header) -> tuple[int, int] | None:
    trees = record.get("cflow.timedelta_tree")
    if trees is None:
        return None
    if isinstance(trees, list):
        return None  # several time encodings in one record: which one a decoder prefers is a choice
    tree = trees
    if "cflow.abstimestart" in tree and "cflow.abstimeend" in tree:
        return _abstime_ms(_first(tree["cflow.abstimestart"])), _abstime_ms(_first(tree["cflow.abstimeend"]))
    if "cflow.timestart" in tree and "cflow.timeend" in tree:
        start, end = header.absolute(_first(tree["cflow.timestart"])), header.absolute(_first(tree["cflow.timeend"]))
        return None if start is None or end is None else (start, end)
    # tshark 4.0 shows a FIRST_SWITCHED of 0 as an absolute "Jan 1, 1970" next to a relative
    # end time; there is nothing to compare in that case.
    return None


def _add_record(out: OracleResult, record: dict[str, Any], header: _Header) -> None:
    def get(*names: str, default: str | None = None) -> str | None:
        for name in names:
            if name in record:
                return str(_first(record[name]))
        return default

    def num(*names: str) -> int:
        value = get(*names)
        return 0 if value is None else int(value, 0)

    src4, dst4 = get("cflow.srcaddr"), get("cflow.dstaddr")
    src6, dst6 = get("cflow.srcaddrv6"), get("cflow.dstaddrv6")
    has4 = src4 is not None or dst4 is not None
    has6 = src6 is not None or dst6 is not None
    zero4 = {None, "0.0.0.0"}
    zero6 = {None, "::"}
    # The same family choice as the decoder documents: IPv6 when the record has IPv6 addresses
    # and its IPv4 addresses are absent or both 0.0.0.0.
    use6 = has6 and (not has4 or (src4 in zero4 and dst4 in zero4 and (src6 not in zero6 or dst6 not in zero6)))
    if use6:
        src, dst = src6 or "::", dst6 or "::"
    else:
        src, dst = src4 or "0.0.0.0", dst4 or "0.0.0.0"
    out.records.append(
        FlowKey(
            src=ipaddress.ip_address(src).compressed,
            dst=ipaddress.ip_address(dst).compressed,
            sport=num("cflow.srcport"),
            dport=num("cflow.dstport"),
            proto=num("cflow.protocol"),
            bytes=num("cflow.octets", "cflow.post_octets", "cflow.permanent_octets"),
            packets=num("cflow.packets", "cflow.post_packets", "cflow.permanent_packets"),
        )
    )
    out.times.append(_record_times(record, header))
    out.details.append(_record_details(out.records[-1], record, get))
    # RFC 5103 biflow: tshark lists the reverse counters as a second value of the same field;
    # the decoder emits the reverse direction as its own record when it carried anything.
    octets = next((record[k] for k in ("cflow.octets", "cflow.post_octets", "cflow.permanent_octets")
                   if k in record), None)
    packets = next((record[k] for k in ("cflow.packets", "cflow.post_packets", "cflow.permanent_packets")
                    if k in record), None)
    if isinstance(octets, list) or isinstance(packets, list):
        rbytes = int(octets[1]) if isinstance(octets, list) and len(octets) > 1 else 0
        rpackets = int(packets[1]) if isinstance(packets, list) and len(packets) > 1 else 0
        if rbytes or rpackets:
            fwd = out.records[-1]
            out.records.append(FlowKey(fwd.dst, fwd.src, fwd.dport, fwd.sport, fwd.proto, rbytes, rpackets))
            out.times.append(None)
            direction, _, _, src_vlan, dst_vlan, mpls = out.details[-1]
            icmp = _icmp_from_port(out.records[-1])
            out.details.append((direction, *icmp, dst_vlan, src_vlan, mpls))


def _icmp_from_port(key: FlowKey) -> tuple[int, int]:
    """The ICMP type and code of an ICMP/ICMPv6 record from its destination port (the v5 and
    pmacctd convention the decoder documents), (0, 0) for other protocols."""
    return (key.dport >> 8, key.dport & 0xFF) if key.proto in (1, 58) else (0, 0)


def _record_details(key: FlowKey, record: dict[str, Any], get: Any) -> tuple[int, ...]:
    """raw.v1's flow details of a record from the fields tshark shows (DETAIL_COLUMNS order)."""
    def num(*names: str) -> int | None:
        value = get(*names)
        return None if value is None else int(value, 0)

    direction = num("cflow.direction")
    icmp = _icmp_from_port(key)
    family = {1: ("ipv4", "cflow.icmp_type_code_ipv4"), 58: ("ipv6", None)}.get(key.proto)
    if family is not None:
        kind, both = family
        icmp_type, icmp_code = num(f"cflow.icmp_{kind}_type"), num(f"cflow.icmp_{kind}_code")
        combined = num(both) if both else None
        if icmp_type is not None:
            icmp = (icmp_type, icmp_code or 0)
        elif combined is not None:
            icmp = (combined >> 8, combined & 0xFF)
    src_vlan = num("cflow.vlanid", "cflow.dot1q_vlan_id") or 0
    dst_vlan = num("cflow.post_vlanid", "cflow.post_dot1q_vlan_id") or 0
    # tshark puts MPLS_LABEL_1 (70) in a subtree named after its value ("MPLS-Label1: 20005 ...").
    top = next((v for k, v in record.items() if k.startswith("MPLS-Label1:")), None)
    mpls = int(_first(_first(top).get("cflow.mpls_label", "0"))) if top is not None else 0
    return (direction + 1 if direction in (0, 1) else 0, *icmp, src_vlan & 0xFFF, dst_vlan & 0xFFF, mpls)


# --- our side of the comparison -------------------------------------------------------------


def decode_captures(paths: Path | Sequence[Path]) -> tuple[pa.Table, DecodeStats]:
    """Decode captures in order with one template store, as `flowtally decode` does."""
    files = [paths] if isinstance(paths, Path) else list(paths)
    templates = TemplateStore()
    stats = DecodeStats()
    tables = []
    for path in files:
        datagrams = [Datagram(p.src_addr, p.timestamp_ms, p.payload) for p in iter_udp(str(path))]
        tables.append(decode_datagrams(datagrams, templates, stats))
    flush_pending(templates, stats)
    return pa.concat_tables(tables), stats


def table_rows(table: pa.Table) -> list[dict[str, Any]]:
    """Rows as dicts with printable addresses and integer millisecond times (tests only)."""
    columns: dict[str, list[Any]] = {}
    for name in table.column_names:
        column = table[name]
        if name in ADDRESS_COLUMNS:
            columns[name] = [address_text(bytes(a)) for a in address_bytes(column)]
        elif pa.types.is_timestamp(column.type):
            columns[name] = column.cast(pa.int64()).to_pylist()
        else:
            columns[name] = column.to_pylist()
    return [{name: columns[name][i] for name in columns} for i in range(table.num_rows)]


def flow_keys(table: pa.Table) -> list[FlowKey]:
    """Our decoded records in the oracle's terms."""
    return [
        FlowKey(r["src_addr"], r["dst_addr"], r["src_port"], r["dst_port"], r["proto"], r["bytes"], r["packets"])
        for r in table_rows(table)
    ]


def flow_details(table: pa.Table) -> list[tuple[int, ...]]:
    """raw.v1's flow details per row (DETAIL_COLUMNS order), aligned with :func:`flow_keys`."""
    return [tuple(r[name] for name in DETAIL_COLUMNS) for r in table_rows(table)]


def flow_times(table: pa.Table) -> list[tuple[int, int]]:
    """(start_ms, end_ms) per row, aligned with :func:`flow_keys`."""
    return [(r["start"], r["end"]) for r in table_rows(table)]


def assert_matches_oracle(table: pa.Table, oracle: OracleResult, compare_times: bool = True) -> None:
    """Record count, byte and packet sums, the multiset of flow keys and (where tshark shows
    them) start/end times must all agree with tshark."""
    ours = flow_keys(table)
    totals = (len(ours), sum(k.bytes for k in ours), sum(k.packets for k in ours))
    assert totals == oracle.totals, f"(records, bytes, packets): ours {totals}, tshark {oracle.totals}"
    only_ours = Counter(ours) - oracle.multiset()
    only_tshark = oracle.multiset() - Counter(ours)
    assert not only_ours and not only_tshark, f"only ours: {only_ours}; only tshark: {only_tshark}"
    # Direction, ICMP type/code, VLANs and MPLS label of every record (0 where tshark shows none).
    mine_details = Counter(zip(ours, flow_details(table), strict=True))
    their_details = Counter(zip(oracle.records, oracle.details, strict=True))
    assert mine_details == their_details, (f"details differ: ours-only {mine_details - their_details}, "
                                           f"tshark-only {their_details - mine_details}")
    if compare_times:
        theirs = Counter((k, t) for k, t in zip(oracle.records, oracle.times, strict=True) if t is not None)
        known = {k for k, t in zip(oracle.records, oracle.times, strict=True) if t is not None}
        mine = Counter((k, t) for k, t in zip(ours, flow_times(table), strict=True) if k in known)
        assert mine == theirs, f"times differ: ours-only {mine - theirs}, tshark-only {theirs - mine}"


# --- the generated traffic behind the softflowd captures --------------------------------------

TruthKey = tuple[str, str, int, int, int]  # src, dst, sport, dport, proto


def traffic_truth() -> dict[TruthKey, dict[str, Any]]:
    """Per-direction packets, IP bytes and first/last times of ``tests/data/traffic.pcap``, as
    written by make_softflowd_captures.py when it built the traffic."""
    flows = json.loads((DATA / "traffic-expected.json").read_text())
    return {(f["src"], f["dst"], f["sport"], f["dport"], f["proto"]): f for f in flows}


def conversation_times(truth: dict[TruthKey, dict[str, Any]], key: TruthKey) -> tuple[int, int]:
    """The (first, last) times softflowd reports for a record: it tracks both directions of a
    TCP/UDP conversation as one flow, so both records carry the conversation's times; ICMP flows
    are keyed by type/code, so an echo request and its reply are separate flows."""
    src, dst, sport, dport, proto = key
    if proto in (1, 58):
        return truth[key]["first_ms"], truth[key]["last_ms"]
    both = [truth[key]] + ([truth[k]] if (k := (dst, src, dport, sport, proto)) in truth else [])
    return min(f["first_ms"] for f in both), max(f["last_ms"] for f in both)


def domain_of(payload: bytes) -> int:
    """One NetFlow payload's observation domain read the plain way (v9 source ID, IPFIX observation
    domain ID, v5 engine type << 8 | engine ID; 0 if none): the oracle of the receiver's batched read."""
    if len(payload) >= 20 and payload[1] == 9 and payload[0] == 0:
        return int.from_bytes(payload[16:20], "big")
    if len(payload) >= 16 and payload[1] == 10 and payload[0] == 0:
        return int.from_bytes(payload[12:16], "big")
    if len(payload) >= 22 and payload[1] == 5 and payload[0] == 0:
        return (payload[20] << 8) | payload[21]
    return 0
