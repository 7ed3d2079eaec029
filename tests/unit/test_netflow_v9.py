"""NetFlow v9 decoding: packets built here with exact expected values, then real exporters'
captures checked against tshark's decode of the same files."""

from __future__ import annotations

import ipaddress
import struct
from collections import Counter
from pathlib import Path

import pytest

from sensors.netflow.decoder import Datagram, decode_datagrams, decode_payloads, flush_pending
from sensors.netflow.stats import DecodeStats
from sensors.netflow.templates import Field, Template, TemplateStore
from sensors.schema import RAW_SCHEMA
from tests.oracle import (
    DATA,
    NO_DETAILS,
    assert_matches_oracle,
    conversation_times,
    decode_captures,
    flow_keys,
    payloads_to_pcap,
    shared_testdata,
    table_rows,
    traffic_truth,
    tshark_decode,
)

EXPORTER_A = ipaddress.IPv6Address("::ffff:192.0.2.1").packed
EXPORTER_B = ipaddress.IPv6Address("::ffff:192.0.2.2").packed
EXPORTER_V6 = ipaddress.IPv6Address("2001:db8::99").packed
SECS = 1_700_000_000  # 2023-11-14T22:13:20Z
UPTIME = 3_600_000

# A typical IPv4 template: the fields the decoder maps, in an exporter-like order.
V4_FIELDS = [
    (8, 4), (12, 4), (7, 2), (11, 2), (4, 1), (6, 1), (1, 4), (2, 4), (22, 4), (21, 4), (10, 2), (14, 2),
]


# --- packet builders (also used by the fuzz test) ---------------------------------------------


def v9_packet(*flowsets: bytes, source_id: int = 0, uptime: int = UPTIME, secs: int = SECS,
              sequence: int = 1, count: int | None = None) -> bytes:
    """A v9 export packet; ``count`` defaults to the number of flowsets (the decoder ignores it)."""
    header = struct.pack("!HHIIII", 9, len(flowsets) if count is None else count, uptime, secs, sequence, source_id)
    return header + b"".join(flowsets)


def template_flowset(*templates: tuple[int, list[tuple[int, int]]]) -> bytes:
    body = b"".join(
        struct.pack("!HH", tid, len(fields)) + b"".join(struct.pack("!HH", t, n) for t, n in fields)
        for tid, fields in templates
    )
    return struct.pack("!HH", 0, 4 + len(body)) + body


def options_template_flowset(tid: int, scope: list[tuple[int, int]], options: list[tuple[int, int]]) -> bytes:
    body = struct.pack("!HHH", tid, 4 * len(scope), 4 * len(options))
    body += b"".join(struct.pack("!HH", t, n) for t, n in scope + options)
    body += b"\0" * (-len(body) % 4)
    return struct.pack("!HH", 1, 4 + len(body)) + body


def record(fields: list[tuple[int, int]], values: dict[int, int | bytes]) -> bytes:
    """One data record: each field's value big-endian in its template length (0 if not given)."""
    out = b""
    for field_type, length in fields:
        value = values.get(field_type, 0)
        out += value if isinstance(value, bytes) else value.to_bytes(length, "big")
    return out


def data_flowset(tid: int, *records: bytes) -> bytes:
    body = b"".join(records)
    body += b"\0" * (-len(body) % 4)  # padding to 32 bits, as RFC 3954 allows
    return struct.pack("!HH", tid, 4 + len(body)) + body


def ip4(text: str) -> int:
    return int(ipaddress.IPv4Address(text))


def flow(src: str, dst: str, sport: int, dport: int, proto: int, nbytes: int, pkts: int,
         first: int = UPTIME - 5000, last: int = UPTIME - 1000, in_if: int = 3, out_if: int = 4,
         flags: int = 0x1B) -> dict[int, int | bytes]:
    return {8: ip4(src), 12: ip4(dst), 7: sport, 11: dport, 4: proto, 6: flags, 1: nbytes, 2: pkts,
            22: first, 21: last, 10: in_if, 14: out_if}


def decode(*datagrams: Datagram, templates: TemplateStore | None = None,
           stats: DecodeStats | None = None) -> tuple[list[dict], DecodeStats]:
    stats = stats if stats is not None else DecodeStats()
    table = decode_datagrams(list(datagrams), templates if templates is not None else TemplateStore(), stats)
    assert table.schema.equals(RAW_SCHEMA, check_metadata=True)
    return sorted(table_rows(table), key=lambda r: (r["src_addr"], r["src_port"], r["bytes"])), stats


def dg(payload: bytes, exporter: bytes = EXPORTER_A, received_ms: int = SECS * 1000 + 7) -> Datagram:
    return Datagram(exporter, received_ms, payload)


# --- built packets: exact values ------------------------------------------------------------


def test_template_and_data_in_one_packet_exact_values() -> None:
    packet = v9_packet(
        template_flowset((256, V4_FIELDS)),
        data_flowset(256, record(V4_FIELDS, flow("10.0.0.1", "10.0.0.2", 40000, 443, 6, 1500, 3)),
                     record(V4_FIELDS, flow("10.0.0.2", "10.0.0.1", 443, 40000, 6, 80, 2, first=UPTIME, last=UPTIME))),
        source_id=42,
    )
    rows, stats = decode(dg(packet))
    assert rows == [
        {
            "time_received": SECS * 1000 + 7, "exporter": "192.0.2.1", "observation_domain": 42,
            "observer": "", "version": 9,
            "start": SECS * 1000 - 5000, "end": SECS * 1000 - 1000,
            "src_addr": "10.0.0.1", "dst_addr": "10.0.0.2", "src_port": 40000, "dst_port": 443, "proto": 6,
            "bytes": 1500, "packets": 3, "sampling_rate": 1, "tcp_flags": 0x1B, "in_if": 3, "out_if": 4,
            "nat_addr": "::", "nat_port": 0, "initiator": 0, "conn_state": "", **NO_DETAILS,
        },
        {
            "time_received": SECS * 1000 + 7, "exporter": "192.0.2.1", "observation_domain": 42,
            "observer": "", "version": 9,
            "start": SECS * 1000, "end": SECS * 1000,
            "src_addr": "10.0.0.2", "dst_addr": "10.0.0.1", "src_port": 443, "dst_port": 40000, "proto": 6,
            "bytes": 80, "packets": 2, "sampling_rate": 1, "tcp_flags": 0x1B, "in_if": 3, "out_if": 4,
            "nat_addr": "::", "nat_port": 0, "initiator": 0, "conn_state": "", **NO_DETAILS,
        },
    ]
    counts = stats.by_exporter()["192.0.2.1"]
    assert (counts.packets, counts.records, counts.templates, dict(counts.errors)) == (1, 2, 1, {})


def test_template_in_one_packet_data_in_the_next_same_call_and_later_call() -> None:
    templates = TemplateStore()
    tpl = v9_packet(template_flowset((300, V4_FIELDS)), sequence=1)
    data1 = v9_packet(data_flowset(300, record(V4_FIELDS, flow("10.1.1.1", "10.2.2.2", 1, 2, 17, 100, 1))), sequence=2)
    rows, stats = decode(dg(tpl), dg(data1), templates=templates)
    assert [(r["src_addr"], r["bytes"]) for r in rows] == [("10.1.1.1", 100)]
    # The store is the caller's state: a later call still knows the template.
    data2 = v9_packet(data_flowset(300, record(V4_FIELDS, flow("10.1.1.3", "10.2.2.2", 1, 2, 17, 200, 2))), sequence=3)
    rows, stats = decode(dg(data2), templates=templates)
    assert [(r["src_addr"], r["bytes"], r["packets"]) for r in rows] == [("10.1.1.3", 200, 2)]
    assert stats.errors_by_reason() == {}


def test_template_redefinition_with_a_different_layout_replaces_it() -> None:
    old_fields = [(8, 4), (12, 4), (1, 4), (2, 4)]
    new_fields = [(12, 4), (8, 4), (2, 8), (1, 8), (4, 1)]  # other order, wider counters
    packets = [
        v9_packet(template_flowset((260, old_fields)),
                  data_flowset(260, record(old_fields, {8: ip4("1.1.1.1"), 12: ip4("2.2.2.2"), 1: 10, 2: 1}))),
        v9_packet(template_flowset((260, new_fields)),
                  data_flowset(260, record(new_fields, {8: ip4("3.3.3.3"), 12: ip4("4.4.4.4"), 1: 2**40, 2: 7, 4: 17}))),
    ]
    templates = TemplateStore()
    rows, stats = decode(*(dg(p) for p in packets), templates=templates)
    assert [(r["src_addr"], r["dst_addr"], r["bytes"], r["packets"], r["proto"]) for r in rows] == [
        ("1.1.1.1", "2.2.2.2", 10, 1, 0),
        ("3.3.3.3", "4.4.4.4", 2**40, 7, 17),
    ]
    assert templates.get(9, EXPORTER_A, 0, 260) == Template(tuple(Field(t, n) for t, n in new_fields))
    assert stats.templates == 2


def test_two_exporters_same_template_id_different_layouts() -> None:
    fields_a = [(8, 4), (12, 4), (1, 4), (2, 4)]
    fields_b = [(1, 8), (2, 8), (8, 4), (12, 4), (7, 2), (11, 2)]
    a = v9_packet(template_flowset((256, fields_a)),
                  data_flowset(256, record(fields_a, {8: ip4("10.0.0.1"), 12: ip4("10.0.0.9"), 1: 111, 2: 1})))
    b = v9_packet(template_flowset((256, fields_b)),
                  data_flowset(256, record(fields_b, {8: ip4("10.0.0.2"), 12: ip4("10.0.0.9"), 1: 222, 2: 2,
                                                      7: 53, 11: 5353})))
    # b's data arrives after a's template in the same call: it must use b's own template.
    b_data_only = v9_packet(data_flowset(256, record(fields_b, {8: ip4("10.0.0.3"), 1: 333, 2: 3})))
    rows, stats = decode(dg(a, EXPORTER_A), dg(b, EXPORTER_B), dg(b_data_only, EXPORTER_B))
    assert [(r["exporter"], r["src_addr"], r["bytes"], r["packets"], r["src_port"]) for r in rows] == [
        ("192.0.2.1", "10.0.0.1", 111, 1, 0),
        ("192.0.2.2", "10.0.0.2", 222, 2, 53),
        ("192.0.2.2", "10.0.0.3", 333, 3, 0),
    ]
    assert stats.by_exporter()["192.0.2.2"].records == 2


def test_source_ids_of_one_exporter_are_separate_template_scopes() -> None:
    fields = [(8, 4), (1, 4)]
    tpl = v9_packet(template_flowset((256, fields)), source_id=1)
    data_other_domain = v9_packet(data_flowset(256, record(fields, {8: 1, 1: 5})), source_id=2)
    templates = TemplateStore()
    rows, stats = decode(dg(tpl), dg(data_other_domain), templates=templates)
    assert rows == []
    # Held for its own domain's template, which never comes: counted when given up.
    assert stats.by_exporter()["192.0.2.1"].pending_sets == 1 and templates.pending_sets() == 1
    assert flush_pending(templates, stats) == 1
    assert stats.errors_by_reason() == {"missing_template_expired": 1}


def test_unknown_template_is_counted_and_other_flowsets_still_decode() -> None:
    fields = [(8, 4), (1, 4), (2, 4)]
    packet = v9_packet(
        data_flowset(999, b"\x01" * 24),  # never defined
        template_flowset((256, fields)),
        data_flowset(256, record(fields, {8: ip4("10.9.9.9"), 1: 64, 2: 1})),
    )
    rows, stats = decode(dg(packet), templates=TemplateStore(max_pending_sets=0))  # holding disabled
    assert [(r["src_addr"], r["bytes"]) for r in rows] == [("10.9.9.9", 64)]
    assert stats.by_exporter()["192.0.2.1"].errors == {"missing_template": 1}


def test_truncated_and_malformed_packets_are_counted_and_do_not_affect_the_others() -> None:
    fields = [(8, 4), (1, 4), (2, 4)]
    good = v9_packet(template_flowset((256, fields)), data_flowset(256, record(fields, {8: ip4("10.0.0.1"), 1: 10, 2: 1})))
    # The first flowset is fine, the second claims more bytes than the packet has.
    partly_bad = v9_packet(data_flowset(256, record(fields, {8: ip4("10.0.0.2"), 1: 20, 2: 2})),
                           struct.pack("!HH", 256, 200) + b"\0" * 12)
    rows, stats = decode(
        dg(good),
        dg(good[:15], EXPORTER_B),  # truncated header
        dg(partly_bad),
        dg(v9_packet(struct.pack("!HH", 256, 2)), EXPORTER_B),  # flowset length below 4
        dg(v9_packet(template_flowset((12, fields))), EXPORTER_B),  # template ID below 256
        dg(v9_packet(struct.pack("!HH", 0, 8) + struct.pack("!HH", 300, 5)), EXPORTER_B),  # fields past the end
        dg(v9_packet(data_flowset(7, b"\0" * 4)), EXPORTER_B),  # reserved flowset ID
        dg(b"\x00\x09"),  # version only
        dg(b""),
    )
    # Records of the valid first flowset of partly_bad are kept.
    assert [(r["src_addr"], r["bytes"]) for r in rows] == [("10.0.0.1", 10), ("10.0.0.2", 20)]
    assert stats.by_exporter()["192.0.2.1"].errors == {"bad_flowset_length": 1, "truncated_header": 2}
    assert stats.by_exporter()["192.0.2.2"].errors == {
        "truncated_header": 1, "bad_flowset_length": 1, "bad_template": 2, "reserved_flowset_id": 1,
    }
    assert stats.packets == 9


def test_sysuptime_wrap_and_switch_after_header() -> None:
    fields = [(8, 4), (22, 4), (21, 4), (1, 4)]
    # The router's 32-bit millisecond uptime wrapped 1.5 s before the export: the flow started
    # 2.5 s and ended 0.5 s before the header's time, on the other side of the wrap.
    uptime = 1000
    packet = v9_packet(
        template_flowset((256, fields)),
        data_flowset(256,
                     record(fields, {8: 1, 22: 2**32 - 1500, 21: 500, 1: 1}),
                     # switched 200 ms *after* the header's uptime (stamped late): a negative age
                     record(fields, {8: 2, 22: uptime + 200, 21: uptime + 200, 1: 2})),
        uptime=uptime,
    )
    rows, _ = decode(dg(packet))
    assert [(r["bytes"], r["start"], r["end"]) for r in rows] == [
        (1, SECS * 1000 - 2500, SECS * 1000 - 500),
        (2, SECS * 1000 + 200, SECS * 1000 + 200),
    ]


def test_odd_field_lengths_are_combined_generically() -> None:
    fields = [(8, 4), (1, 3), (2, 6), (10, 1), (14, 3), (7, 1), (11, 5), (4, 2), (6, 2), (70, 3), (34, 3),
              (1, 4)]  # a second IN_BYTES: the first occurrence wins
    values: dict[int, int | bytes] = {8: ip4("10.0.0.5"), 1: 0xABCDEF, 2: 0x0102030405, 10: 7, 14: 0x010203,
                                      7: 80, 11: 443, 4: 17, 6: 0x0112, 70: 0x123456, 34: 0x000100}
    packet = v9_packet(template_flowset((256, fields)), data_flowset(256, record(fields, values)))
    rows, _ = decode(dg(packet))
    (row,) = rows
    assert (row["bytes"], row["packets"], row["in_if"], row["out_if"]) == (0xABCDEF, 0x0102030405, 7, 0x010203)
    assert (row["src_port"], row["dst_port"], row["proto"], row["tcp_flags"]) == (80, 443, 17, 0x12)
    assert row["sampling_rate"] == 256


def test_ipv6_template() -> None:
    fields = [(27, 16), (28, 16), (7, 2), (11, 2), (4, 1), (1, 8), (2, 8), (22, 4), (21, 4)]
    src, dst = ipaddress.IPv6Address("2001:db8::1"), ipaddress.IPv6Address("fd00::abcd")
    packet = v9_packet(
        template_flowset((1024, fields)),
        data_flowset(1024, record(fields, {27: src.packed, 28: dst.packed, 7: 1234, 11: 80, 4: 6, 1: 9000,
                                           2: 6, 22: UPTIME - 10, 21: UPTIME})),
    )
    rows, _ = decode(dg(packet, EXPORTER_V6))
    assert [(r["exporter"], r["src_addr"], r["dst_addr"], r["src_port"], r["dst_port"], r["bytes"], r["packets"],
             r["start"], r["end"]) for r in rows] == [
        ("2001:db8::99", "2001:db8::1", "fd00::abcd", 1234, 80, 9000, 6, SECS * 1000 - 10, SECS * 1000)
    ]


def test_template_with_both_families_picks_the_one_in_use() -> None:
    # Cisco-style: IPv4 and IPv6 fields in one template, the unused pair zeroed.
    fields = [(8, 4), (12, 4), (27, 16), (28, 16), (1, 4)]
    v6 = ipaddress.IPv6Address("2001:db8::5").packed
    packet = v9_packet(
        template_flowset((256, fields)),
        data_flowset(256,
                     record(fields, {8: ip4("10.0.0.1"), 12: ip4("10.0.0.2"), 1: 1}),
                     record(fields, {27: v6, 28: v6, 1: 2}),
                     record(fields, {1: 3})),  # nothing set: stays IPv4 0.0.0.0
    )
    rows, _ = decode(dg(packet))
    assert [(r["bytes"], r["src_addr"], r["dst_addr"]) for r in rows] == [
        (3, "0.0.0.0", "0.0.0.0"), (1, "10.0.0.1", "10.0.0.2"), (2, "2001:db8::5", "2001:db8::5"),
    ]


def test_options_template_data_is_counted_not_decoded() -> None:
    packet = v9_packet(
        options_template_flowset(257, scope=[(1, 4)], options=[(34, 4), (35, 1)]),
        data_flowset(257, struct.pack("!IIB", 0, 100, 2), struct.pack("!IIB", 0, 200, 2)),
    )
    rows, stats = decode(dg(packet))
    assert rows == []
    counts = stats.by_exporter()["192.0.2.1"]
    assert (counts.options_records, counts.records, counts.templates, dict(counts.errors)) == (2, 0, 1, {})


def test_counter_fallbacks_absolute_times_and_sampling() -> None:
    out_fields = [(8, 4), (23, 4), (24, 4), (150, 4), (151, 4)]
    total_fields = [(8, 4), (85, 8), (86, 8), (152, 8), (153, 8), (22, 4), (21, 4), (34, 4)]
    packet = v9_packet(
        template_flowset((256, out_fields), (257, total_fields)),
        data_flowset(256, record(out_fields, {8: 1, 23: 500, 24: 5, 150: SECS - 60, 151: SECS - 30})),
        data_flowset(257, record(total_fields, {8: 2, 85: 7000, 86: 70, 152: SECS * 1000 - 1234,
                                                153: SECS * 1000 - 234, 22: 0, 21: 0, 34: 100})),
    )
    rows, _ = decode(dg(packet))
    assert [(r["bytes"], r["packets"], r["start"], r["end"], r["sampling_rate"]) for r in rows] == [
        (500, 5, (SECS - 60) * 1000, (SECS - 30) * 1000, 1),
        # absolute milliseconds win over the uptime-based fields
        (7000, 70, SECS * 1000 - 1234, SECS * 1000 - 234, 100),
    ]


def test_records_without_times_or_counters() -> None:
    fields = [(8, 4), (12, 4), (4, 1)]  # e.g. NAT events: no counters, no times
    packet = v9_packet(template_flowset((256, fields)), data_flowset(256, record(fields, {8: 1, 12: 2, 4: 17})))
    rows, stats = decode(dg(packet))
    assert [(r["bytes"], r["packets"], r["start"], r["end"]) for r in rows] == [(0, 0, SECS * 1000, SECS * 1000)]
    assert stats.records == 1


def test_padding_is_accepted() -> None:
    fields = [(8, 4), (1, 4), (4, 1)]  # 9-byte records: the flowset carries 3 bytes of padding
    packet = v9_packet(template_flowset((256, fields)), data_flowset(256, record(fields, {8: 1, 1: 5, 4: 6})))
    rows, stats = decode(dg(packet + b"\0" * 8))  # and zero padding after the last flowset
    assert [(r["bytes"], r["proto"]) for r in rows] == [(5, 6)]
    assert stats.errors_by_reason() == {}


def test_other_versions_are_counted() -> None:
    ipfix = struct.pack("!HHIII", 10, 16, SECS, 1, 0)
    rows, stats = decode(dg(ipfix), dg(b"\x00\x07" + b"\0" * 30), dg(b"GET / HTTP/1.1\r\n"))
    assert rows == []
    assert stats.errors_by_reason() == {"unknown_version": 2}  # the empty IPFIX message is fine
    assert stats.packets == 3


def test_template_store_scope_and_replacement() -> None:
    store = TemplateStore()
    t1 = Template((Field(8, 4), Field(1, 4)))
    t2 = Template((Field(8, 4), Field(1, 8)))
    assert store.put(9, EXPORTER_A, 0, 256, t1) is True
    assert store.put(9, EXPORTER_A, 0, 256, Template((Field(8, 4), Field(1, 4)))) is False  # a refresh
    assert store.get(9, EXPORTER_A, 0, 256) is t1  # ... keeps the stored object
    assert store.put(9, EXPORTER_A, 0, 256, t2) is True
    assert store.get(9, EXPORTER_A, 0, 256) is t2
    assert store.get(9, EXPORTER_B, 0, 256) is None
    assert store.get(9, EXPORTER_A, 1, 256) is None
    assert store.get(10, EXPORTER_A, 0, 256) is None
    store.put(9, EXPORTER_B, 0, 256, t1)
    store.clear(EXPORTER_A)
    assert len(store) == 1 and store.get(9, EXPORTER_B, 0, 256) is t1
    assert store.remove(9, EXPORTER_B, 0, 256) and len(store) == 0
    assert t2.record_length == 12 and t2.offsets() == {8: (0, 4), 1: (4, 8)}


def test_decode_stats_merge_reset_and_summary() -> None:
    fields = [(8, 4), (1, 4)]
    packet = v9_packet(template_flowset((256, fields)), data_flowset(256, record(fields, {8: 1, 1: 5})))
    total = DecodeStats()
    for _ in range(2):
        _, stats = decode(dg(packet), dg(b"\x00\x05"), dg(packet, EXPORTER_B))
        total.merge(stats)
    assert total.as_dict() == {"packets": 6, "records": 4, "options_records": 0, "templates": 4,
                               "errors": {"truncated_header": 2}}
    assert total.by_exporter()["192.0.2.1"].packets == 4
    total.reset()
    assert total.as_dict()["packets"] == 0 and total.by_exporter() == {}


def test_bare_ipv4_and_invalid_exporter_addresses() -> None:
    fields = [(8, 4), (1, 4)]
    packet = v9_packet(template_flowset((256, fields)), data_flowset(256, record(fields, {8: 1, 1: 5})))
    rows, stats = decode(Datagram(bytes([192, 0, 2, 1]), 0, packet), Datagram(b"\x01\x02", 0, packet))
    assert [r["exporter"] for r in rows] == ["192.0.2.1"]
    assert stats.errors_by_reason() == {"bad_exporter_address": 1}


# --- real exporters, checked against tshark ---------------------------------------------------

# Each case: capture files decoded in sequence with one template store (tshark: concatenated).
# "softflowd-*" files are this repository's golden captures (tests/data), the others are read
# from the shared third-party captures (../shared/testdata/netflow-pcaps).
ORACLE_CASES = {
    "softflowd-v9": ["softflowd-v9.pcap"],
    "softflowd-v9-abstime": ["softflowd-v9-abstime.pcap"],
    "akvorado-template-data": ["akvorado/template.pcap", "akvorado/data.pcap"],
    # a data flowset before its template in one packet: both tshark and we skip that flowset
    "akvorado-data+templates": ["akvorado/data+templates.pcap"],
    # ICMPv6; the exporter encodes ICMP type/code in L4_DST_PORT, which both sides pass through
    "akvorado-icmp": ["akvorado/icmp-template.pcap", "akvorado/icmp-data.pcap"],
    # options data only: no flow records on either side, options records counted
    "akvorado-options": ["akvorado/options-template.pcap", "akvorado/options-data.pcap"],
    "akvorado-samplingrate": ["akvorado/samplingrate-template.pcap", "akvorado/samplingrate-data.pcap"],
    "akvorado-multiplesamplingrates": [
        "akvorado/multiplesamplingrates-options-template.pcap",
        "akvorado/multiplesamplingrates-options-data.pcap",
        "akvorado/multiplesamplingrates-template.pcap",
        "akvorado/multiplesamplingrates-data.pcap",
    ],
    # NAT events without octet/packet counters: both sides report 0 bytes/packets per record
    "akvorado-nat": ["akvorado/nat.pcap"],
    "pmacct-101": ["pmacct/101-NFv9-CISCO-cust_primitives__traffic-00.pcap"],
    # templates and data from two UDP source ports of one exporter address
    "pmacct-102": ["pmacct/102-NFv9-CISCO-f2rd-pretag-sampling-reload__traffic-00.pcap"],
    "pmacct-111-v9": ["pmacct/111-IPFIXv10-NFv9-IPv6-IPv4-mix_sources__traffic-00.pcap"],
}

# What the decode must produce (records, bytes, packets), so that a change in tshark or in the
# files cannot make both sides agree on nothing.
EXPECTED_TOTALS = {
    "softflowd-v9": (72, 60832, 275),
    "softflowd-v9-abstime": (72, 60832, 275),
    "akvorado-template-data": (4, 5848, 4),
    # tshark: 10 records; it skips the flowsets placed before their template in the packet,
    # which we hold and decode when the template follows: 11 more (see ORACLE_LATE below).
    "akvorado-data+templates": (10, 54592, 48),
    "akvorado-icmp": (4, 376, 4),
    "akvorado-options": (0, 0, 0),
    "akvorado-samplingrate": (6, 3740, 6),
    "akvorado-multiplesamplingrates": (12, 14818, 38),
    "akvorado-nat": (9, 0, 0),
    "pmacct-101": (51, 4500, 56),
    "pmacct-102": (35, 7594, 107),
    "pmacct-111-v9": (11, 955, 11),
}


#: Cases where a data flowset precedes its template: (records, bytes, packets) decoded beyond tshark.
ORACLE_LATE = {"akvorado-data+templates": (11, 3737, 18)}


def _paths(case: str) -> list[Path]:
    return [
        DATA / name if name.startswith("softflowd-") else shared_testdata("netflow-pcaps", *name.split("/"))
        for name in ORACLE_CASES[case]
    ]


@pytest.mark.parametrize("case", sorted(ORACLE_CASES))
def test_real_captures_match_tshark(case: str) -> None:
    paths = _paths(case)
    oracle = tshark_decode(paths)
    table, stats = decode_captures(paths)
    assert oracle.totals == EXPECTED_TOTALS[case]
    assert stats.options_records == oracle.options_records
    if case in ORACLE_LATE:
        # tshark's records are a sub-multiset of ours; the rest came from the held flowsets.
        ours = Counter(flow_keys(table))
        assert not oracle.multiset() - ours
        late = ours - oracle.multiset()
        totals = (sum(late.values()), sum(k.bytes * c for k, c in late.items()), sum(k.packets * c for k, c in late.items()))
        assert totals == ORACLE_LATE[case]
        assert stats.errors_by_reason() == {}
        return
    assert_matches_oracle(table, oracle)
    # Skipped flowsets agree with tshark's view too: held, then given up at the end.
    assert stats.errors_by_reason().get("missing_template_expired", 0) == oracle.missing_template_flowsets
    assert set(stats.errors_by_reason()) <= {"missing_template_expired"}


def test_data_without_its_template_decodes_nothing_and_is_counted() -> None:
    table, stats = decode_captures(shared_testdata("netflow-pcaps", "akvorado", "data.pcap"))
    assert table.num_rows == 0
    assert stats.errors_by_reason() == {"missing_template_expired": 1}


def test_telegraf_v9_payload_matches_tshark(tmp_path: Path) -> None:
    payload = shared_testdata("telegraf-netflow", "netflow_v9_example", "netflow_v9.bin").read_bytes()
    pcap = payloads_to_pcap([payload], tmp_path / "telegraf-v9.pcap")
    oracle = tshark_decode(pcap)
    table, _ = decode_captures(pcap)
    assert_matches_oracle(table, oracle)
    assert oracle.totals == (8, 103623, 175)  # also what SOURCES.md states


def test_softflowd_v9_matches_the_generated_traffic() -> None:
    """Third check, independent of tshark: the truth written when the traffic was generated.

    softflowd tracks both directions of a TCP/UDP conversation as one flow and gives both records
    the conversation's first/last times; v9 headers carry whole seconds only, so uptime-based times
    lie up to 1 s before the truth, while -A milli (flowStart/EndMilliseconds) is exact.
    """
    truth = traffic_truth()
    for name, exact in (("softflowd-v9.pcap", False), ("softflowd-v9-abstime.pcap", True)):
        table, _ = decode_captures(DATA / name)
        rows = table_rows(table)
        assert len(rows) == len(truth)
        for r in rows:
            key = (r["src_addr"], r["dst_addr"], r["src_port"], r["dst_port"], r["proto"])
            expected = truth[key]
            assert (r["bytes"], r["packets"]) == (expected["bytes"], expected["packets"]), key
            first, last = conversation_times(truth, key)
            if exact:
                assert (r["start"], r["end"]) == (first, last), key
            else:
                assert -1000 < r["start"] - first <= 0 and r["end"] - r["start"] == last - first, key


def test_field_length_65535_is_a_bad_template() -> None:
    """v9 has no variable-length fields: a 65535-byte field (IPFIX's marker) cannot fit a datagram.
    Found by tests/benchmarks/fuzz_decoder.py: it used to be sized as 1 byte and crash the batch."""
    fields = [(153, 8), (152, 0xFFFF), (1, 8)]
    rows, stats = decode(dg(v9_packet(template_flowset((256, fields)), data_flowset(256, b"\x00" * 17))))
    assert rows == []
    assert stats.errors_by_reason()["bad_template"] == 1


# --- the bulk path (decode_payloads of many datagrams) equals the per-datagram walk ------------


def _state(store: TemplateStore) -> tuple[object, ...]:
    return (sorted((k, t) for k, t in store), dict(store.sequences), store.pending_sets(), dict(store.sampling))


def _both_ways(payloads: list[bytes], chunk: int) -> None:
    """decode_payloads in calls of ``chunk`` datagrams (bulk where it can) against decode_datagrams
    one datagram at a time in one call (never bulk): same rows, counters and template state."""
    received = [SECS * 1000 + i for i in range(len(payloads))]
    bulk_store, bulk_stats, bulk_rows = TemplateStore(), DecodeStats(), []
    for i in range(0, len(payloads), chunk):
        table = decode_payloads(EXPORTER_A, payloads[i : i + chunk], received[i : i + chunk], bulk_store, bulk_stats)
        bulk_rows += table_rows(table)
    ref_store, ref_stats = TemplateStore(), DecodeStats()
    ref_rows: list[dict] = []
    for i in range(0, len(payloads), chunk):
        table = decode_datagrams([Datagram(EXPORTER_A, ms, p) for p, ms in zip(payloads[i : i + chunk],
                                  received[i : i + chunk], strict=True)], ref_store, ref_stats)
        ref_rows += table_rows(table)

    def key(r: dict) -> tuple[object, ...]:
        return tuple(sorted((k, str(v)) for k, v in r.items()))

    assert sorted(bulk_rows, key=key) == sorted(ref_rows, key=key)
    bulk, ref = bulk_stats.by_exporter()["192.0.2.1"], ref_stats.by_exporter()["192.0.2.1"]
    assert (bulk.counters(), dict(bulk.errors)) == (ref.counters(), dict(ref.errors))
    assert _state(bulk_store) == _state(ref_store)


def _awkward_stream() -> list[bytes]:
    """Everything the bulk path must hand back to the per-datagram walk, between plain datagrams."""
    fields2 = [*V4_FIELDS[:-1], (34, 4)]  # redefinition of 256 with a sampling interval field
    tpl = template_flowset((256, V4_FIELDS))
    out = [v9_packet(tpl, data_flowset(256, record(V4_FIELDS, flow("10.0.0.1", "10.0.0.2", 1, 2, 6, 10, 1))),
                     sequence=1)]
    seq = 2

    def plain(n: int, source_id: int = 0, tid: int = 256, fields: list[tuple[int, int]] = V4_FIELDS) -> bytes:
        nonlocal seq
        recs = [record(fields, flow("10.0.0.3", "10.0.0.4", seq, k, 17, 100 * seq + k, k + 1)) for k in range(n)]
        packet = v9_packet(data_flowset(tid, *recs), source_id=source_id, sequence=seq)
        seq += 1
        return packet

    out += [plain(k % 5) for k in range(12)]  # 0-record flowsets (padding only) included
    out.append(v9_packet(tpl, data_flowset(256, record(V4_FIELDS, flow("10.0.0.5", "10.0.0.6", 3, 4, 6, 7, 1))),
                         sequence=seq))  # an unchanged refresh: taken into the bulk
    seq += 1
    out += [plain(3) for _ in range(5)]
    seq += 3  # a gap of 3 packets
    out += [plain(2) for _ in range(4)]
    late = seq - 6
    out.append(v9_packet(data_flowset(256, record(V4_FIELDS, flow("10.0.0.7", "10.0.0.8", 5, 6, 6, 9, 1))),
                         sequence=late))  # reordered
    out += [plain(2, source_id=7) for _ in range(3)]  # another domain, template unknown: held
    out.append(v9_packet(template_flowset((256, V4_FIELDS)), source_id=7, sequence=seq))  # ... released
    seq += 1
    out += [plain(4, source_id=7) for _ in range(9)]
    out.append(v9_packet(options_template_flowset(300, scope=[(1, 4)], options=[(34, 4)]),
                         data_flowset(300, struct.pack("!II", 0, 64)), sequence=seq))  # sampling 1:64
    seq += 1
    out += [plain(2) for _ in range(9)]
    out.append(v9_packet(template_flowset((256, fields2)), sequence=seq))  # a changed layout
    seq += 1
    out += [plain(3, fields=fields2) for _ in range(9)]
    out.append(plain(2) + b"\x01\x02\x03")  # trailing bytes: not the usual shape
    two = v9_packet(data_flowset(256, record(fields2, flow("10.0.0.9", "10.0.0.9", 7, 7, 6, 1, 1))),
                    data_flowset(256, record(fields2, flow("10.0.0.9", "10.0.0.9", 8, 8, 6, 2, 1))), sequence=seq)
    seq += 1
    out += [two, b"\x00\x05" + b"\x00" * 30, plain(1, tid=999)]  # two flowsets; a v5 stub; unknown template
    out += [plain(2, fields=fields2) for _ in range(9)]
    return out


@pytest.mark.parametrize("chunk", [1000, 17, 8, 5])
def test_bulk_path_equals_per_datagram_walk(chunk: int) -> None:
    _both_ways(_awkward_stream(), chunk)


def test_bulk_path_on_the_generator_stream() -> None:
    from flowtally.dev.generator import encode_packets, synthetic_cluster, synthetic_flows

    cols = synthetic_flows(synthetic_cluster(2), 6000, (2, 0), SECS * 1000 - 2000, span_ms=1000)
    enc = encode_packets(cols, source_id=3, sequence=0xFFFF_FFF0, unix_secs=SECS, uptime_ms=UPTIME,
                         template_every=9)
    packets = enc.packets[:40] + enc.packets[41:]  # one datagram lost on the way
    _both_ways(packets, 64)
    _both_ways([*packets[:3], b"\x00\x09", *packets[3:]], 64)  # a runt datagram in the call
