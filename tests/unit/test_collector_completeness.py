"""Pure parts of the sensor's receiving side: completeness accounting and the exporter allowlist."""

from __future__ import annotations

import struct
from collections import Counter

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from sensors.completeness import (
    COMPLETENESS_SCHEMA,
    UNKNOWN_EXPORTER,
    CompletenessAccumulator,
    group_counts,
    minute_of,
)
from sensors.netflow.collector import Allowlist, NetflowReceiver, NetflowSettings, _sequence_lost
from sensors.netflow.receiver import Run, domains_many, header_bytes
from sensors.netflow.stats import ExporterStats
from sensors.publisher import Publisher
from sensors.schema import address16
from tests.oracle import domain_of

E = address16("10.0.0.1")


def test_accumulator_takes_closed_minutes_only() -> None:
    acc = CompletenessAccumulator("node-a")
    acc.counts(60_000 + 5, E, 7).packets += 2
    acc.counts(60_000 + 59_999, E, 7).records += 30
    acc.counts(120_000, E, 7).packets += 1
    acc.add_kernel_drops(60_500, 4)
    first = acc.take(before_ms=120_000)
    assert first.schema == COMPLETENESS_SCHEMA
    rows = {(r["exporter"], r["observation_domain"]): r for r in first.to_pylist()}
    assert rows[(E, 7)]["packets"] == 2 and rows[(E, 7)]["records"] == 30
    assert rows[(UNKNOWN_EXPORTER, 0)]["kernel_drops"] == 4
    assert all(r["observer"] == "node-a" for r in rows.values())
    rest = acc.take()
    assert rest.num_rows == 1 and rest.column("packets").to_pylist() == [1]
    assert len(acc) == 0 and acc.take().num_rows == 0


def test_domain_of_headers() -> None:
    v9 = b"\x00\x09\x00\x01" + b"\x00" * 12 + (1234).to_bytes(4, "big")
    ipfix = b"\x00\x0a\x00\x10" + b"\x00" * 8 + (99).to_bytes(4, "big")
    v5 = b"\x00\x05\x00\x01" + b"\x00" * 16 + b"\x02\x03" + b"\x00" * 2
    assert (domain_of(v9), domain_of(ipfix), domain_of(v5), domain_of(b"\x00")) == (1234, 99, 0x0203, 0)


_HEADER_STARTS = st.sampled_from([b"\x00\x09", b"\x00\x0a", b"\x00\x05", b"\x01\x09", b""])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(_HEADER_STARTS, st.binary(max_size=30)), min_size=1, max_size=12))
def test_header_domains_equals_domain_of(parts: list[tuple[bytes, bytes]]) -> None:
    """The batch version reads every header as domain_of does, short payloads included."""
    payloads = [start + rest for start, rest in parts]
    lengths = np.array([len(p) for p in payloads], dtype=np.int64)
    assert domains_many(header_bytes(payloads), lengths).tolist() == [domain_of(p) for p in payloads]


def test_group_counts() -> None:
    minutes = np.array([0, 1, 60_000, 60_001, 60_002])
    domains = np.array([1, 1, 1, 2, 2])
    assert list(group_counts(minutes, domains)) == [(0, 1, 2), (60_000, 1, 1), (60_000, 2, 2)]


def test_allowlist_matches_mapped_ipv4() -> None:
    allow = Allowlist(["10.0.0.0/8", "2001:db8::/32"])
    assert allow.allows("10.1.2.3") and allow.allows("::ffff:10.1.2.3") and allow.allows("2001:db8::5")
    assert not allow.allows("11.0.0.1") and not allow.allows("::1")
    assert Allowlist([]).allows("192.0.2.1")


def test_sequence_lost_is_net_of_late_and_tolerates_old_stats() -> None:
    stats = ExporterStats()
    assert _sequence_lost(stats) == 0
    if hasattr(stats, "lost_packets"):
        stats.lost_packets = 5
        stats.late_packets = 2
        assert _sequence_lost(stats) == 3


def _v9(source_id: int, seq: int, records: int) -> bytes:
    """A v9 datagram with its template and ``records`` records of 4-byte address fields."""
    template = struct.pack("!HHHHHHHH", 0, 16, 256, 2, 8, 4, 12, 4)
    data = struct.pack("!HH", 256, 4 + 8 * records) + bytes(range(8)) * records
    return struct.pack("!HHIIII", 9, 2, 1000, 1_700_000_000, seq, source_id) + template + data


def test_flush_counts_packets_bytes_records_per_minute_and_domain() -> None:
    """The datagrams of one exporter's batch, received in two minutes and from two observation
    domains, land on their own (minute, domain) rows, with the receiver's lengths and domains."""
    publisher = Publisher(lambda: None, "raw", 10)  # never started: offer() only queues
    receiver = NetflowReceiver(NetflowSettings(observer="node-a"), publisher, completeness_topic="completeness")
    wakeups = [(59_990, [_v9(1, 0, 3), _v9(2, 0, 5)]), (60_010, [_v9(1, 1, 7)]), (60_020, [_v9(1, 2, 2)])]
    expected: Counter[tuple[int, int, str]] = Counter()
    for ms, payloads in wakeups:
        run = Run(E)
        run.payloads.extend(payloads)
        run.records = sum(struct.unpack_from("!H", p, 2)[0] for p in payloads)
        lengths = np.array([len(p) for p in payloads], dtype=np.int64)
        run.lengths.append(lengths)
        run.heads.append(header_bytes(payloads))
        receiver._on_datagrams([run], ms)
        for p in payloads:
            key = (minute_of(ms), domain_of(p))
            expected[(*key, "packets")] += 1
            expected[(*key, "bytes")] += len(p)
            expected[(*key, "records")] += (len(p) - 20 - 16 - 4) // 8
    receiver._flush(E)
    rows = receiver._completeness.take()
    got: Counter[tuple[int, int, str]] = Counter()
    for row in rows.to_pylist():
        assert row["exporter"] == E and row["observer"] == "node-a"
        minute = int(row["minute"].timestamp() * 1000)
        for name in ("packets", "bytes", "records"):
            if row[name]:
                got[(minute, row["observation_domain"], name)] += row[name]
    assert got == expected
    assert {k[:2] for k in got} == {(0, 1), (0, 2), (60_000, 1)}
