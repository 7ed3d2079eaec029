"""Property tests: whatever arrives, decode_datagrams never raises, accounts for every datagram,
and bad datagrams do not change what the good ones in the same call decode to."""

from __future__ import annotations

import ipaddress
import random
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sensors.netflow.decoder import Datagram, decode_datagrams
from sensors.netflow.pcap import iter_udp
from sensors.netflow.stats import DecodeStats
from sensors.netflow.templates import TemplateStore
from sensors.schema import RAW_SCHEMA
from tests.oracle import DATA, shared_testdata, table_rows
from tests.unit.test_netflow_v9 import (
    data_flowset,
    options_template_flowset,
    record,
    template_flowset,
    v9_packet,
)

GOOD = ipaddress.IPv6Address("::ffff:203.0.113.1").packed
BAD = ipaddress.IPv6Address("::ffff:203.0.113.66").packed


def _payloads(path: Path) -> list[bytes]:
    return [p.payload for p in iter_udp(str(path))]


def _seeds() -> list[bytes]:
    netflow = ("netflow-pcaps", "akvorado")
    seeds = (
        _payloads(DATA / "softflowd-v5.pcap")
        + _payloads(DATA / "softflowd-v9.pcap")
        + _payloads(DATA / "softflowd-v9-abstime.pcap")
        + _payloads(shared_testdata(*netflow, "nfv5.pcap"))
        + _payloads(shared_testdata(*netflow, "template.pcap"))
        + _payloads(shared_testdata(*netflow, "data.pcap"))
        + _payloads(shared_testdata(*netflow, "data+templates.pcap"))
        + _payloads(shared_testdata(*netflow, "options-template.pcap"))
        + _payloads(shared_testdata(*netflow, "options-data.pcap"))
        + _payloads(shared_testdata("netflow-pcaps", "pmacct", "101-NFv9-CISCO-cust_primitives__traffic-00.pcap"))[:5]
        + [shared_testdata("telegraf-netflow", "netflow_v9_example", "netflow_v9.bin").read_bytes()]
        # IPFIX: softflowd, Huawei (enterprise and variable-length fields), ipfixprobe (biflow).
        + _payloads(DATA / "softflowd-ipfix.pcap")
        + _payloads(shared_testdata("netflow-pcaps", "pmacct", "106-IPFIXv10-HUAWEI-vrf_name__traffic-00.pcap"))
        + _payloads(shared_testdata(*netflow, "ipfixprobe-templates.pcap"))
        + _payloads(shared_testdata(*netflow, "ipfixprobe-data.pcap"))
    )
    odd = [(8, 4), (1, 3), (2, 6), (7, 1), (27, 16), (22, 4), (21, 4)]
    seeds.append(v9_packet(
        template_flowset((300, odd)),
        options_template_flowset(301, [(1, 4)], [(34, 4)]),
        data_flowset(300, record(odd, {8: 1, 1: 2, 2: 3}), record(odd, {27: b"\x20" * 16, 1: 9})),
        data_flowset(301, b"\0" * 8),
    ))
    return seeds


SEEDS = _seeds()
# Template-carrying packets, replayed unmodified first so that mutated data meets real templates.
PRIMERS = [s for s in SEEDS if s[:2] in (b"\x00\x09", b"\x00\x0a")]
VALID = _payloads(DATA / "softflowd-v9.pcap") + _payloads(DATA / "softflowd-v5.pcap")


def _baseline() -> list[dict]:
    table = decode_datagrams([Datagram(GOOD, 1, p) for p in VALID], TemplateStore(), DecodeStats())
    return sorted(table_rows(table), key=repr)


BASELINE = _baseline()


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        pos = draw(st.integers(0, len(data) - 1))
        op = draw(st.sampled_from(["byte", "u16", "truncate", "insert", "delete"]))
        if op == "byte":
            data[pos] = draw(st.integers(0, 255))
        elif op == "u16":  # lengths, counts, template and flowset IDs are 16-bit
            data[pos:pos + 2] = draw(st.sampled_from([0, 1, 3, 4, 255, 256, 0x7FFF, 0xFFFF])).to_bytes(2, "big")
        elif op == "truncate":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=12))
        else:
            del data[pos:pos + draw(st.integers(1, 24))]
    return bytes(data)


def _check(datagrams: list[Datagram]) -> tuple[list[dict], DecodeStats]:
    stats = DecodeStats()
    table = decode_datagrams(datagrams, TemplateStore(), stats)  # must not raise
    assert table.schema.equals(RAW_SCHEMA)
    assert stats.packets == len(datagrams)  # every datagram accounted for
    assert "malformed_packet" not in stats.errors_by_reason()  # no parser exception was swallowed
    assert table.num_rows == stats.records
    return table_rows(table), stats


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
header = st.sampled_from([b"", b"\x00\x05", b"\x00\x09", b"\x00\x0a", b"\x00\x09\x00\x01"])


@FUZZ
@given(st.lists(st.tuples(header, st.binary(max_size=400)), max_size=12))
def test_random_bytes_never_raise(parts: list[tuple[bytes, bytes]]) -> None:
    _check([Datagram(BAD, 0, h + body) for h, body in parts])


@FUZZ
@given(st.lists(mutated(), min_size=1, max_size=8), st.randoms(use_true_random=False))
def test_mutated_packets_leave_valid_datagrams_untouched(bad: list[bytes], rnd: random.Random) -> None:
    bad_datagrams = [Datagram(BAD, 1, p) for p in PRIMERS + bad]
    good_datagrams = [Datagram(GOOD, 1, p) for p in VALID]
    # Interleave the bad among the good, keeping each side's own order (templates before data).
    merged: list[Datagram] = []
    i = j = 0
    while i < len(good_datagrams) or j < len(bad_datagrams):
        if j >= len(bad_datagrams) or (i < len(good_datagrams) and rnd.random() < 0.5):
            merged.append(good_datagrams[i])
            i += 1
        else:
            merged.append(bad_datagrams[j])
            j += 1
    rows, stats = _check(merged)
    good_rows = sorted((r for r in rows if r["exporter"] == "203.0.113.1"), key=repr)
    assert good_rows == BASELINE
    assert stats.by_exporter()["203.0.113.1"].errors == {}
    assert stats.by_exporter()["203.0.113.66"].packets == len(bad_datagrams)
