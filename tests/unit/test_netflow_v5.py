"""NetFlow v5 decoding: packets built here with exact expected values, then real exporters'
captures checked against tshark's decode of the same files."""

from __future__ import annotations

import ipaddress
import struct
from pathlib import Path

from sensors.netflow.decoder import Datagram, decode_datagrams
from sensors.netflow.stats import DecodeStats
from sensors.netflow.templates import TemplateStore
from tests.oracle import (
    DATA,
    NO_DETAILS,
    assert_matches_oracle,
    conversation_times,
    decode_captures,
    payloads_to_pcap,
    shared_testdata,
    table_rows,
    traffic_truth,
    tshark_decode,
)

EXPORTER = ipaddress.IPv6Address("::ffff:198.51.100.7").packed
OTHER_EXPORTER = ipaddress.IPv6Address("2001:db8::7").packed
SECS, NSECS, UPTIME = 1_700_000_000, 250_000_000, 10_000_000


def v5_packet(*records: bytes, uptime: int = UPTIME, secs: int = SECS, nsecs: int = NSECS,
              sampling: int = 0, engine: tuple[int, int] = (0, 0), count: int | None = None) -> bytes:
    header = struct.pack("!HHIIIIBBH", 5, len(records) if count is None else count, uptime, secs, nsecs, 77,
                         engine[0], engine[1], sampling)
    return header + b"".join(records)


def v5_record(src: str, dst: str, sport: int, dport: int, proto: int, nbytes: int, pkts: int,
              first: int = UPTIME - 3000, last: int = UPTIME - 100, in_if: int = 1, out_if: int = 2,
              flags: int = 0x12) -> bytes:
    return struct.pack(
        "!4s4s4sHHIIIIHHBBBBHHBBH",
        ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed, b"\0\0\0\0", in_if, out_if,
        pkts, nbytes, first, last, sport, dport, 0, flags, proto, 0, 65000, 65001, 24, 16, 0,
    )


def decode(*datagrams: Datagram) -> tuple[list[dict], DecodeStats]:
    stats = DecodeStats()
    table = decode_datagrams(list(datagrams), TemplateStore(), stats)
    return sorted(table_rows(table), key=lambda r: (r["exporter"], r["src_addr"])), stats


EXPORT_MS = SECS * 1000 + NSECS // 1_000_000


def test_v5_exact_values() -> None:
    packet = v5_packet(
        v5_record("10.0.0.1", "192.168.1.1", 51000, 53, 17, 76, 1),
        v5_record("10.0.0.2", "192.168.1.2", 40000, 443, 6, 123_456, 99, first=UPTIME - 60_000, last=UPTIME),
        sampling=(1 << 14) | 100,  # mode 1, interval 100
        engine=(1, 2),
    )
    rows, stats = decode(Datagram(EXPORTER, 1_700_000_001_000, packet))
    base = {"time_received": 1_700_000_001_000, "exporter": "198.51.100.7", "observation_domain": 0x0102,
            "observer": "", "version": 5, "sampling_rate": 100, "tcp_flags": 0x12, "in_if": 1, "out_if": 2,
            "nat_addr": "::", "nat_port": 0, "initiator": 0, "conn_state": "", **NO_DETAILS}
    assert rows == [
        {**base, "start": EXPORT_MS - 3000, "end": EXPORT_MS - 100, "src_addr": "10.0.0.1",
         "dst_addr": "192.168.1.1", "src_port": 51000, "dst_port": 53, "proto": 17, "bytes": 76, "packets": 1},
        {**base, "start": EXPORT_MS - 60_000, "end": EXPORT_MS, "src_addr": "10.0.0.2",
         "dst_addr": "192.168.1.2", "src_port": 40000, "dst_port": 443, "proto": 6, "bytes": 123_456,
         "packets": 99},
    ]
    assert stats.as_dict() == {"packets": 1, "records": 2, "options_records": 0, "templates": 0, "errors": {}}


def test_v5_unsampled_and_several_exporters_in_one_call() -> None:
    a = v5_packet(*(v5_record(f"10.0.0.{i}", "10.9.9.9", i, 80, 6, 100 * i, i) for i in range(1, 31)))
    b = v5_packet(v5_record("10.1.0.1", "10.9.9.9", 1, 80, 6, 5, 1), sampling=0)
    rows, stats = decode(Datagram(EXPORTER, 0, a), Datagram(OTHER_EXPORTER, 0, b))
    assert len(rows) == 31
    assert {r["sampling_rate"] for r in rows} == {1}
    assert [r["exporter"] for r in rows].count("2001:db8::7") == 1
    assert sum(r["bytes"] for r in rows) == 100 * sum(range(1, 31)) + 5
    assert stats.by_exporter()["198.51.100.7"].records == 30


def test_v5_uptime_wrap_and_late_switch() -> None:
    packet = v5_packet(
        v5_record("10.0.0.1", "10.0.0.2", 1, 2, 17, 10, 1, first=2**32 - 2000, last=2**32 - 1),
        v5_record("10.0.0.3", "10.0.0.4", 1, 2, 17, 20, 1, first=700, last=1500),
        uptime=1000,
    )
    rows, _ = decode(Datagram(EXPORTER, 0, packet))
    assert [(r["bytes"], r["start"], r["end"]) for r in rows] == [
        (10, EXPORT_MS - 3000, EXPORT_MS - 1001),  # before the wrap
        (20, EXPORT_MS - 300, EXPORT_MS + 500),  # LAST_SWITCHED after the header's uptime
    ]


def test_v5_malformed_packets_are_counted_and_others_decode() -> None:
    good = v5_packet(v5_record("10.0.0.1", "10.0.0.2", 1, 2, 17, 10, 1))
    rows, stats = decode(
        Datagram(EXPORTER, 0, good[:20]),  # truncated header
        Datagram(EXPORTER, 0, v5_packet(v5_record("10.0.0.5", "10.0.0.6", 1, 2, 17, 10, 1), count=2)),
        Datagram(EXPORTER, 0, good),
        Datagram(EXPORTER, 0, good + b"\0" * 10),  # trailing bytes are tolerated
        Datagram(EXPORTER, 0, v5_packet()),  # no records: valid and empty
    )
    assert [r["src_addr"] for r in rows] == ["10.0.0.1", "10.0.0.1"]
    assert stats.by_exporter()["198.51.100.7"].errors == {"truncated_header": 1, "count_mismatch": 1}
    assert stats.packets == 5


def test_softflowd_v5_matches_tshark_and_the_generated_traffic() -> None:
    capture = DATA / "softflowd-v5.pcap"
    oracle = tshark_decode(capture)
    table, stats = decode_captures(capture)
    assert_matches_oracle(table, oracle)
    # v5 carries IPv4 only: softflowd leaves the IPv6 flows of the traffic out.
    assert oracle.totals == (68, 43227, 230)
    assert stats.errors_by_reason() == {}

    truth = traffic_truth()
    for r in table_rows(table):
        dport = r["dst_port"]
        if r["proto"] == 1:
            # softflowd writes ICMP type << 8 | code into the v5 destination port (echo request:
            # 8 << 8); the decoder passes ports through, the generated truth has 0.
            assert dport in (0, 8 << 8)
            dport = 0
        key = (r["src_addr"], r["dst_addr"], r["src_port"], dport, r["proto"])
        assert (r["bytes"], r["packets"]) == (truth[key]["bytes"], truth[key]["packets"]), key
        # v5 headers carry nanoseconds, so the times are exact.
        assert (r["start"], r["end"]) == conversation_times(truth, key), key


def test_akvorado_v5_matches_tshark() -> None:
    capture = shared_testdata("netflow-pcaps", "akvorado", "nfv5.pcap")
    oracle = tshark_decode(capture)
    table, _ = decode_captures(capture)
    assert_matches_oracle(table, oracle)
    assert oracle.totals == (29, 88345, 78)


def test_telegraf_v5_payload_matches_tshark(tmp_path: Path) -> None:
    payload = shared_testdata("telegraf-netflow", "netflow_v5_example", "netflow_v5.bin").read_bytes()
    pcap = payloads_to_pcap([payload], tmp_path / "telegraf-v5.pcap")
    oracle = tshark_decode(pcap)
    table, _ = decode_captures(pcap)
    assert_matches_oracle(table, oracle)
    assert oracle.totals == (8, 103623, 175)  # also what SOURCES.md states
