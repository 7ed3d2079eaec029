"""IPFIX decoding: messages built here with exact expected values (the hard cases), then real
exporters' captures checked against tshark's decode of the same files; plus sampling and
sequence-number accounting for v9 and IPFIX."""

from __future__ import annotations

import ipaddress
import random
import struct
from pathlib import Path

import pytest

from sensors.netflow.decoder import Datagram, decode_datagrams, decode_payloads, flush_pending
from sensors.netflow.stats import DecodeStats
from sensors.netflow.templates import TemplateStore
from sensors.schema import RAW_SCHEMA
from tests.oracle import (
    DATA,
    NO_DETAILS,
    assert_matches_oracle,
    decode_captures,
    payloads_to_pcap,
    shared_testdata,
    table_rows,
    tshark_decode,
)

EXPORTER_A = ipaddress.IPv6Address("::ffff:192.0.2.1").packed
EXPORTER_B = ipaddress.IPv6Address("::ffff:192.0.2.2").packed
SECS = 1_700_000_000
VAR = 0xFFFF

# src, dst, sport, dport, proto, flags, bytes (reduced to 4), packets, start ms, end ms, in, out
V4 = [(8, 4), (12, 4), (7, 2), (11, 2), (4, 1), (6, 1), (1, 4), (2, 8), (152, 8), (153, 8), (10, 4), (14, 4)]


# --- builders -------------------------------------------------------------------------------


def message(*sets: bytes, domain: int = 0, secs: int = SECS, sequence: int = 0) -> bytes:
    body = b"".join(sets)
    return struct.pack("!HHIII", 10, 16 + len(body), secs, sequence, domain) + body


def _spec(field: tuple[int, ...]) -> bytes:
    if len(field) == 3:  # (type, length, pen)
        return struct.pack("!HHI", field[0] | 0x8000, field[1], field[2])
    return struct.pack("!HH", field[0], field[1])


def template_set(*templates: tuple[int, list[tuple[int, ...]]]) -> bytes:
    body = b"".join(struct.pack("!HH", tid, len(f)) + b"".join(map(_spec, f)) for tid, f in templates)
    return struct.pack("!HH", 2, 4 + len(body)) + body


def options_template_set(tid: int, scope: list[tuple[int, ...]], options: list[tuple[int, ...]]) -> bytes:
    body = struct.pack("!HHH", tid, len(scope) + len(options), len(scope)) + b"".join(map(_spec, scope + options))
    body += b"\0" * (-len(body) % 4)
    return struct.pack("!HH", 3, 4 + len(body)) + body


def withdrawal(tid: int, set_id: int = 2) -> bytes:
    return struct.pack("!HHHH", set_id, 8, tid, 0)


def record(fields: list[tuple[int, ...]], values: dict[int, int | bytes]) -> bytes:
    out = b""
    for field in fields:
        ftype, length = field[0], field[1]
        value = values.get(ftype, 0) if len(field) == 2 else values.get(-ftype, 0)
        if length == VAR:
            raw = value if isinstance(value, bytes) else b""
            out += (bytes([len(raw)]) if len(raw) < 255 else b"\xff" + struct.pack("!H", len(raw))) + raw
        else:
            out += value if isinstance(value, bytes) else value.to_bytes(length, "big")
    return out


def data_set(tid: int, *records: bytes, pad: int = 0) -> bytes:
    body = b"".join(records) + b"\0" * pad
    return struct.pack("!HH", tid, 4 + len(body)) + body


def ip4(text: str) -> int:
    return int(ipaddress.IPv4Address(text))


def flow(src: str, dst: str, nbytes: int, pkts: int, sport: int = 1000, dport: int = 443, proto: int = 6,
         start: int = SECS * 1000 - 5000, end: int = SECS * 1000 - 1000) -> dict[int, int | bytes]:
    return {8: ip4(src), 12: ip4(dst), 7: sport, 11: dport, 4: proto, 6: 0x12, 1: nbytes, 2: pkts,
            152: start, 153: end, 10: 3, 14: 4}


def dg(payload: bytes, exporter: bytes = EXPORTER_A, received_ms: int = SECS * 1000 + 7) -> Datagram:
    return Datagram(exporter, received_ms, payload)


def decode(*datagrams: Datagram, templates: TemplateStore | None = None,
           stats: DecodeStats | None = None) -> tuple[list[dict], DecodeStats]:
    stats = stats if stats is not None else DecodeStats()
    table = decode_datagrams(list(datagrams), templates if templates is not None else TemplateStore(), stats)
    assert table.schema.equals(RAW_SCHEMA, check_metadata=True)
    assert table.num_rows == stats.records
    return sorted(table_rows(table), key=lambda r: (r["src_addr"], r["src_port"], r["bytes"])), stats


def brief(rows: list[dict]) -> list[tuple]:
    return [(r["src_addr"], r["dst_addr"], r["bytes"], r["packets"]) for r in rows]


# --- built messages: exact values -----------------------------------------------------------


def test_template_and_data_exact_values_reduced_size_and_padding() -> None:
    msg = message(template_set((256, V4)),
                  data_set(256, record(V4, flow("10.0.0.1", "10.0.0.2", 1500, 3)), pad=3), domain=7)
    rows, stats = decode(dg(msg))
    assert rows == [{
        "time_received": SECS * 1000 + 7, "exporter": "192.0.2.1", "observation_domain": 7, "observer": "",
        "version": 10, "start": SECS * 1000 - 5000, "end": SECS * 1000 - 1000,
        "src_addr": "10.0.0.1", "dst_addr": "10.0.0.2", "src_port": 1000, "dst_port": 443, "proto": 6,
        "bytes": 1500, "packets": 3, "sampling_rate": 1, "tcp_flags": 0x12, "in_if": 3, "out_if": 4,
            "nat_addr": "::", "nat_port": 0, "initiator": 0, "conn_state": "", **NO_DETAILS,
    }]
    counts = stats.by_exporter()["192.0.2.1"]
    assert (counts.packets, counts.records, counts.templates, dict(counts.errors)) == (1, 1, 1, {})


def test_template_after_data_is_held_then_decoded_in_a_later_call() -> None:
    templates = TemplateStore()
    data = message(data_set(256, record(V4, flow("10.0.0.1", "10.0.0.2", 100, 1))))
    rows, stats = decode(dg(data), templates=templates)
    assert rows == [] and stats.by_exporter()["192.0.2.1"].pending_sets == 1 and templates.pending_sets() == 1
    rows, stats = decode(dg(message(template_set((256, V4)))), templates=templates)
    assert brief(rows) == [("10.0.0.1", "10.0.0.2", 100, 1)]
    assert rows[0]["time_received"] == SECS * 1000 + 7  # the held set keeps its own context
    assert templates.pending_sets() == 0 and stats.errors_by_reason() == {}


def test_held_data_ages_out_and_is_counted_never_guessed() -> None:
    templates = TemplateStore(max_pending_age_ms=1000)
    data = message(data_set(256, record(V4, flow("10.0.0.1", "10.0.0.2", 100, 1))))
    other = message(template_set((300, V4)))
    rows, stats = decode(dg(data, received_ms=1_000), dg(other, received_ms=2_500), templates=templates)
    assert rows == [] and stats.errors_by_reason() == {"missing_template_expired": 1}
    rows, stats = decode(dg(message(template_set((256, V4))), received_ms=3_000), templates=templates)
    assert rows == []


def test_held_data_is_bounded_per_domain() -> None:
    templates = TemplateStore(max_pending_sets=2)
    sets = [dg(message(data_set(256, record(V4, flow("10.0.0.1", "10.0.0.2", i, 1))))) for i in range(1, 5)]
    _, stats = decode(*sets, templates=templates)
    assert stats.errors_by_reason() == {"missing_template_expired": 2}
    rows, _ = decode(dg(message(template_set((256, V4)))), templates=templates)
    assert [r["bytes"] for r in rows] == [3, 4]  # the newest two were kept
    assert flush_pending(templates, DecodeStats()) == 0


def test_template_change_mid_stream_and_two_exporters_same_id() -> None:
    other = [(8, 4), (12, 4), (85, 8), (86, 4)]
    msgs = [
        dg(message(template_set((256, V4)), data_set(256, record(V4, flow("10.0.0.1", "10.0.0.9", 10, 1))))),
        dg(message(template_set((256, other)), data_set(256, record(other, {8: ip4("10.0.0.2"), 85: 20, 86: 2})))),
        dg(message(template_set((256, other)), data_set(256, record(other, {8: ip4("10.0.0.3"), 85: 30, 86: 3}))),
           exporter=EXPORTER_B),
    ]
    rows, _ = decode(*msgs)
    assert [(r["exporter"], r["src_addr"], r["bytes"], r["packets"]) for r in rows] == [
        ("192.0.2.1", "10.0.0.1", 10, 1), ("192.0.2.1", "10.0.0.2", 20, 2), ("192.0.2.2", "10.0.0.3", 30, 3),
    ]


def test_withdrawal_of_one_template_and_of_all() -> None:
    templates = TemplateStore()
    fields = [(8, 4), (1, 4)]
    decode(dg(message(template_set((256, fields), (257, fields)))), templates=templates)
    assert len(templates) == 2
    decode(dg(message(withdrawal(256))), templates=templates)
    assert templates.get(10, EXPORTER_A, 0, 256) is None and templates.get(10, EXPORTER_A, 0, 257) is not None
    decode(dg(message(withdrawal(2))), templates=templates)  # template ID 2: withdraw all
    assert len(templates) == 0


def test_variable_length_and_enterprise_fields_are_skipped_by_length() -> None:
    fields = [(8, 4), (82, VAR), (12, 4), (1000, 6, 9), (1, 4), (83, VAR), (2, 4)]
    long_name = b"x" * 300  # the 3-byte length form
    recs = [
        record(fields, {8: ip4("10.0.0.1"), 82: b"eth0", 12: ip4("10.0.0.2"), -1000: b"ABCDEF", 1: 64, 2: 1}),
        record(fields, {8: ip4("10.0.0.3"), 82: long_name, 12: ip4("10.0.0.4"), 1: 128, 83: b"", 2: 2}),
        record(fields, {8: ip4("10.0.0.5"), 82: b"", 12: ip4("10.0.0.6"), 1: 256, 83: b"y" * 20, 2: 3}),
    ]
    rows, stats = decode(dg(message(template_set((256, fields)), data_set(256, *recs, pad=2))))
    assert brief(rows) == [("10.0.0.1", "10.0.0.2", 64, 1), ("10.0.0.3", "10.0.0.4", 128, 2),
                           ("10.0.0.5", "10.0.0.6", 256, 3)]
    counts = stats.by_exporter()["192.0.2.1"]
    assert counts.enterprise_fields == 3 and dict(counts.errors) == {}


def test_ipv6_and_delta_and_ntp_times() -> None:
    fields = [(27, 16), (28, 16), (1, 8), (2, 8), (158, 4), (159, 4)]
    values: dict[int, int | bytes] = {27: ipaddress.IPv6Address("2001:db8::1").packed,
                                      28: ipaddress.IPv6Address("2001:db8::2").packed,
                                      1: 1000, 2: 4, 158: 3_000_000, 159: 500_000}
    ntp_fields = [(8, 4), (1, 4), (156, 8), (157, 8)]
    ntp = ((SECS + 2_208_988_800) << 32) | (1 << 31)  # SECS + 0.5 s
    rows, _ = decode(dg(message(template_set((256, fields), (257, ntp_fields)),
                                data_set(256, record(fields, values)),
                                data_set(257, record(ntp_fields, {8: 1, 1: 5, 156: ntp, 157: ntp})))))
    assert [(r["src_addr"], r["start"], r["end"]) for r in rows] == [
        ("0.0.0.1", SECS * 1000 + 500, SECS * 1000 + 500),
        ("2001:db8::1", SECS * 1000 - 3000, SECS * 1000 - 500),
    ]


def test_uptime_times_need_system_init_time_and_handle_the_wrap() -> None:
    fields = [(8, 4), (1, 4), (22, 4), (21, 4)]
    opts = options_template_set(400, [(149, 4)], [(160, 8)])
    init = SECS * 1000 - (1 << 32) - 10_000  # the 32-bit uptime wrapped once since init
    templates = TemplateStore()
    rows, stats = decode(dg(message(template_set((256, fields)),
                                    data_set(256, record(fields, {8: 1, 1: 5, 22: 100, 21: 200})))),
                         templates=templates)
    assert rows[0]["start"] == SECS * 1000 and stats.errors_by_reason() == {"missing_system_init_time": 1}
    rows, stats = decode(dg(message(opts, data_set(400, record([(149, 4), (160, 8)], {160: init})),
                                    data_set(256, record(fields, {8: 1, 1: 5, 22: 4000, 21: 9000})))),
                         templates=templates)
    assert (rows[0]["start"], rows[0]["end"]) == (SECS * 1000 - 6000, SECS * 1000 - 1000)
    assert stats.options_records == 1 and stats.errors_by_reason() == {}


def test_biflow_reverse_direction_is_its_own_record() -> None:
    fields = [(8, 4), (12, 4), (7, 2), (11, 2), (10, 4), (14, 4), (1, 8), (2, 8), (1, 8, 29305), (2, 8, 29305),
              (6, 1, 29305)]
    recs = [
        record(fields, {8: ip4("10.0.0.1"), 12: ip4("10.0.0.2"), 7: 5000, 11: 53, 10: 1, 14: 2,
                        1: 60, 2: 1, -1: 120, -2: 1, -6: 0x10}),
        record(fields, {8: ip4("10.0.0.3"), 12: ip4("10.0.0.4"), 7: 5001, 11: 53, 1: 70, 2: 1}),  # no answer
    ]
    rows, stats = decode(dg(message(template_set((256, fields)), data_set(256, *recs))))
    assert [(r["src_addr"], r["dst_addr"], r["src_port"], r["dst_port"], r["in_if"], r["out_if"], r["bytes"],
             r["tcp_flags"]) for r in rows] == [
        ("10.0.0.1", "10.0.0.2", 5000, 53, 1, 2, 60, 0),
        ("10.0.0.2", "10.0.0.1", 53, 5000, 2, 1, 120, 0x10),
        ("10.0.0.3", "10.0.0.4", 5001, 53, 0, 0, 70, 0),
    ]
    counts = stats.by_exporter()["192.0.2.1"]
    assert (counts.records, counts.reverse_records, counts.enterprise_fields) == (3, 1, 0)


def test_malformed_messages_are_counted() -> None:
    good = message(template_set((256, V4)), data_set(256, record(V4, flow("10.0.0.1", "10.0.0.2", 1, 1))))
    bad = [
        b"\x00\x0a\x00",  # truncated header
        good[:2] + struct.pack("!H", len(good) + 10) + good[4:],  # length beyond the datagram
        message(struct.pack("!HH", 256, 2)),  # set length below 4
        message(struct.pack("!HH", 1, 4)),  # reserved set ID
        message(struct.pack("!HHHH", 2, 12, 5, 1) + struct.pack("!HH", 8, 4)),  # template ID < 256
    ]
    rows, stats = decode(*[dg(b) for b in bad], dg(good, exporter=EXPORTER_B))
    assert brief(rows) == [("10.0.0.1", "10.0.0.2", 1, 1)]
    assert stats.by_exporter()["192.0.2.1"].errors == {
        "truncated_header": 1, "bad_message_length": 1, "bad_set_length": 1, "reserved_set_id": 1,
        "bad_template": 1,
    }


# --- sampling -------------------------------------------------------------------------------


def test_options_sampling_per_domain_and_per_sampler_and_per_record() -> None:
    templates = TemplateStore()
    fields = [(8, 4), (1, 4), (48, 1)]
    per_record = [(8, 4), (1, 4), (305, 4), (306, 4)]
    msg = message(
        options_template_set(300, [(149, 4)], [(309, 4), (310, 4)]),
        options_template_set(301, [(48, 1)], [(34, 4)]),
        template_set((256, fields), (257, per_record)),
        data_set(300, record([(149, 4), (309, 4), (310, 4)], {309: 1, 310: 256})),
        data_set(301, record([(48, 1), (34, 4)], {48: 5, 34: 1000})),
        data_set(256, record(fields, {8: 1, 1: 10, 48: 5}), record(fields, {8: 2, 1: 20, 48: 6})),
        data_set(257, record(per_record, {8: 3, 1: 30, 305: 1, 306: 9})),
    )
    rows, stats = decode(dg(msg), templates=templates)
    assert [(r["src_addr"], r["bytes"], r["sampling_rate"]) for r in rows] == [
        ("0.0.0.1", 10, 1000),  # its sampler's rate
        ("0.0.0.2", 20, 256),  # unknown sampler: the domain's rate
        ("0.0.0.3", 30, 10),  # its own fields: 1 in (1 + 9)
    ]
    assert stats.options_records == 2


@pytest.mark.parametrize(
    ("files", "rates"),
    [
        (["samplingrate-template.pcap", "samplingrate-data.pcap"], {2048}),
        (["multiplesamplingrates-options-template.pcap", "multiplesamplingrates-options-data.pcap",
          "multiplesamplingrates-template.pcap", "multiplesamplingrates-data.pcap"], {4000, 2000}),
    ],
)
def test_akvorado_sampling_captures(files: list[str], rates: set[int]) -> None:
    table, stats = decode_captures([shared_testdata("netflow-pcaps", "akvorado", f) for f in files])
    assert set(table["sampling_rate"].to_pylist()) == rates
    assert stats.errors_by_reason() == {}


def test_pmacct_104_options_sampling_population() -> None:
    path = shared_testdata("netflow-pcaps", "pmacct", "104-IPFIXv10-IPv6-CISCO-sampling_option__traffic-00.pcap")
    table, _ = decode_captures(path)
    rates = table["sampling_rate"].to_pylist()
    assert rates[-1] == 256  # announced as samplingPopulation 256 of samplingSize 1
    assert all(r in (1, 256) for r in rates)


# --- sequence numbers -----------------------------------------------------------------------


def test_ipfix_sequence_gap_reorder_restart_and_wrap() -> None:
    templates = TemplateStore()
    fields = [(8, 4), (1, 4)]
    rec = record(fields, {8: 1, 1: 1})

    def msg(seq: int, n: int = 2) -> Datagram:
        return dg(message(template_set((256, fields)), data_set(256, *[rec] * n), sequence=seq))

    stats = DecodeStats()
    decode(msg(0), msg(2), msg(6), msg(4), msg(8), templates=templates, stats=stats)
    c = stats.by_exporter()["192.0.2.1"]
    assert (c.sequence_gaps, c.lost_records, c.reordered, c.late_records, c.sequence_resets) == (1, 2, 1, 2, 0)
    stats = DecodeStats()
    # A jump far ahead (not loss), then a restart (far behind).
    decode(msg(50_000_000), msg(0), templates=templates, stats=stats)
    c = stats.by_exporter()["192.0.2.1"]
    assert (c.sequence_gaps, c.lost_records, c.reordered, c.sequence_resets) == (0, 0, 0, 2)
    stats = DecodeStats()  # the 32-bit wrap, in order
    decode(msg(0xFFFFFFFF), msg(1), msg(3), templates=TemplateStore(), stats=stats)
    c = stats.by_exporter()["192.0.2.1"]
    assert (c.sequence_gaps, c.lost_records, c.reordered, c.sequence_resets) == (0, 0, 0, 0)


def test_v9_sequence_counts_packets() -> None:
    from tests.unit.test_netflow_v9 import v9_packet

    stats = DecodeStats()
    decode(*[dg(v9_packet(sequence=s)) for s in (10, 11, 14, 12, 15)], stats=stats)
    c = stats.by_exporter()["192.0.2.1"]
    assert (c.sequence_gaps, c.lost_packets, c.reordered, c.late_packets) == (1, 2, 1, 1)


# --- real exporters against tshark ----------------------------------------------------------

PM = "netflow-pcaps/pmacct/"
AK = "netflow-pcaps/akvorado/"
ORACLE_CASES = {
    "softflowd-ipfix": (["softflowd-ipfix.pcap"], (72, 60832, 275)),
    "pmacct-100": ([PM + "100-IPFIXv10-CISCO__traffic-00.pcap"], (12, 34172, 34)),
    "pmacct-104": ([PM + "104-IPFIXv10-IPv6-CISCO-sampling_option__traffic-00.pcap"], (3, 10632, 121)),
    "pmacct-106": ([PM + "106-IPFIXv10-HUAWEI-vrf_name__traffic-00.pcap"], (3, 284557, 1227)),
    "pmacct-111-ipfix": ([PM + "111-IPFIXv10-NFv9-IPv6-IPv4-mix_sources__traffic-01.pcap"], (13, 9820, 16)),
    "pmacct-400": ([PM + "400-IPFIXv10-BMP-CISCO-SRv6-multiple-sources__traffic-01.ipfix-only.pcap"],
                   (109, 10947666, 58241)),
    "pmacct-403": ([PM + "403-IPFIXv10-BMP-IPv6-CISCO-locrib-peerdown-vrf__traffic-00.ipfix-only.pcap"],
                   (480, 37595573, 208972)),
    "pmacct-500": ([PM + "500-IPFIXv10-BGP-CISCO-SRv6__traffic-00.ipfix-only.pcap"], (43, 53644, 558)),
    "pmacct-501": ([PM + "501-IPFIXv10-BGP-IPv6-CISCO-MPLS__traffic-00.ipfix-only.pcap"], (74, 5141109, 27813)),
    "pmacct-502": ([PM + "502-IPFIXv10-BGP-IPv6-CISCO-SRv6-lcomms__traffic-00.ipfix-only.pcap"],
                   (75, 4989084, 26562)),
    "akvorado-mpls": ([AK + "mpls.pcap"], (2, 979, 11)),
    "akvorado-physicalinterfaces": ([AK + "physicalinterfaces.pcap"], (8, 31111, 29)),
    "akvorado-ipfixprobe": ([AK + "ipfixprobe-templates.pcap", AK + "ipfixprobe-data.pcap"], None),
    "akvorado-datalink": ([AK + "datalink-template.pcap", AK + "datalink-data.pcap"], None),
    "akvorado-juniper-cpid": ([AK + "juniper-cpid-template.pcap", AK + "juniper-cpid-data.pcap"], None),
    "akvorado-srv6": ([AK + "ipfix-srv6-template.pcap", AK + "ipfix-srv6-data.pcap"], None),
    "akvorado-eompls": ([AK + "ethernet-over-mpls-with-control-word-template.pcap",
                         AK + "ethernet-over-mpls-with-control-word-data.pcap"], None),
}


def _paths(names: list[str]) -> list[Path]:
    return [shared_testdata(*n.split("/")) if n.startswith("netflow-pcaps/") else DATA / n for n in names]


@pytest.mark.parametrize("case", sorted(ORACLE_CASES))
def test_real_ipfix_captures_match_tshark(case: str) -> None:
    names, expected = ORACLE_CASES[case]
    paths = _paths(names)
    oracle = tshark_decode(paths)
    table, stats = decode_captures(paths)
    assert_matches_oracle(table, oracle)
    if expected is not None:
        assert oracle.totals == expected
    assert stats.options_records == oracle.options_records
    assert set(stats.errors_by_reason()) <= {"missing_system_init_time"}


TELEGRAF = ["ipfix_example", "ipfix_options", "ipfix_pen_35632", "issue_13305", "issue_14370"]


@pytest.mark.parametrize("folder", TELEGRAF)
def test_telegraf_ipfix_payloads_match_tshark(folder: str, tmp_path: Path) -> None:
    files = sorted(shared_testdata("telegraf-netflow", folder).glob("*.bin"))
    assert files
    pcap = payloads_to_pcap([f.read_bytes() for f in files], tmp_path / f"{folder}.pcap")
    oracle = tshark_decode(pcap)
    table, _ = decode_captures(pcap)
    assert_matches_oracle(table, oracle)


def test_pmacct_112_port_change_is_one_exporter() -> None:
    """The exporter changes its UDP source port after its only data template. tshark scopes
    templates per transport session and decodes nothing after the change; we scope by address
    and observation domain (as nfcapd, pmacct and goflow2 do) and decode the 9 records."""
    path = shared_testdata(*(PM + "112-IPFIXv10-CISCO-options-map-reassignment__traffic-00.pcap").split("/"))
    oracle = tshark_decode(path)
    table, stats = decode_captures(path)
    assert oracle.totals == (0, 0, 0) and oracle.missing_template_flowsets == 6
    assert (table.num_rows, sum(table["bytes"].to_pylist()), sum(table["packets"].to_pylist())) == (9, 1197, 19)
    assert stats.options_records == oracle.options_records == 76


# --- the lockstep walk of variable-length sets equals the record-by-record one ----------------


def _random_set(rng: random.Random, segments: list[int], tail: int) -> bytes:
    """Records of the layout (fixed runs, variable fields with 1- or 3-byte lengths), then maybe
    zero padding, or a truncated record, or junk."""
    out = b""
    for _ in range(rng.randrange(0, 6)):
        for gap in segments:
            out += bytes(rng.randrange(256) for _ in range(gap))
            value = bytes(rng.randrange(256) for _ in range(rng.choice([0, 1, 5, 254, 255, 300])))
            out += (bytes([len(value)]) if len(value) < 255 else b"\xff" + struct.pack("!H", len(value))) + value
        out += bytes(rng.randrange(256) for _ in range(tail))
    ending = rng.randrange(4)
    if ending == 1:
        out += b"\x00" * rng.randrange(1, 4)  # padding
    elif ending == 2:
        out += bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40)))  # junk or a partial record
    elif ending == 3:
        out += b"\xff\x01"  # a 3-byte length cut short
    return out


@pytest.mark.parametrize("layout", [[(7, 2), (82, 0xFFFF)], [(82, 0xFFFF), (7, 2), (96, 0xFFFF), (4, 1)],
                                    [(8, 4), (82, 0xFFFF), (96, 0xFFFF)]])
def test_lockstep_walk_equals_record_walk(layout: list[tuple[int, int]]) -> None:
    from sensors.netflow import ipfix
    from sensors.netflow.fields import Group
    from sensors.netflow.stats import ExporterStats
    from sensors.netflow.templates import Field, Template

    plan = ipfix._Plan(Template(fields=tuple(Field(t, n) for t, n in layout)))
    rng = random.Random(len(layout))
    for _ in range(30):
        sets = [_random_set(rng, plan.segments, plan.tail) for _ in range(rng.randrange(1, 12))]
        group = Group()
        stats = [ExporterStats() for _ in sets]
        for body, counts in zip(sets, stats, strict=True):
            group.add(body, 0, 0, -1, 0, 0, 0, 1, None)
            group.stats.append(counts)
        starts, consumed, added = ipfix._walk_sets(plan, group)
        assert added == [st.records for st in stats]
        want_starts: list[int] = []
        want_consumed: list[int] = []
        offset = 0
        for body, counts in zip(sets, stats, strict=True):
            s, c, stop = ipfix._walk(memoryview(body), 0, len(body), plan.segments, plan.tail)
            assert counts.records == len(s)
            bad = stop < len(body) and not ipfix._is_zero(body, stop, len(body))
            assert counts.errors == ({"bad_data_record": 1} if bad else {})
            want_starts += [offset + x for x in s]
            want_consumed += c
            offset += len(body)
        assert (starts.tolist(), consumed.tolist()) == (want_starts, want_consumed)
        # Sets without a record leave the per-set lists; the bytes stay joined as they were.
        assert group.counts == [n for n in (st.records for st in stats) if n]
        assert len(group.export_ms) == len(group.counts)
        assert b"".join(bytes(c) for c in group.chunks) == b"".join(sets)


def test_lockstep_walk_of_empty_sets() -> None:
    """Data sets with no bytes at all (a bare set header): no records, nothing read."""
    from sensors.netflow import ipfix
    from sensors.netflow.fields import Group
    from sensors.netflow.stats import ExporterStats
    from sensors.netflow.templates import Field, Template

    plan = ipfix._Plan(Template(fields=(Field(7, 2), Field(82, 0xFFFF))))
    group = Group()
    stats = ExporterStats()
    for _ in range(2):
        group.add(b"", 0, 0, -1, 0, 0, 0, 1, None)
        group.stats.append(stats)
    starts, consumed, added = ipfix._walk_sets(plan, group)
    assert (starts.tolist(), consumed.tolist(), added) == ([], [], [0, 0])
    assert stats.records == 0 and not stats.errors and group.counts == []


# --- the bulk path (decode_payloads of many messages) equals the message-by-message walk -------

FIXED = [(8, 4), (12, 4), (7, 2), (11, 2), (4, 1), (6, 1), (1, 8), (2, 8), (152, 8), (153, 8), (10, 4), (14, 4)]
NAMED = [*FIXED, (82, VAR)]


def _ipfix_both_ways(payloads: list[bytes], chunk: int) -> None:
    from tests.unit.test_netflow_v9 import _state

    received = [SECS * 1000 + i for i in range(len(payloads))]
    bulk_store, bulk_stats, bulk_rows = TemplateStore(), DecodeStats(), []
    ref_store, ref_stats, ref_rows = TemplateStore(), DecodeStats(), []
    for i in range(0, len(payloads), chunk):
        part, times = payloads[i : i + chunk], received[i : i + chunk]
        bulk_rows += table_rows(decode_payloads(EXPORTER_A, part, times, bulk_store, bulk_stats))
        ref_rows += table_rows(decode_datagrams([Datagram(EXPORTER_A, ms, p) for p, ms in zip(part, times,
                                                 strict=True)], ref_store, ref_stats))

    def key(r: dict) -> tuple[object, ...]:
        return tuple(sorted((k, str(v)) for k, v in r.items()))

    assert sorted(bulk_rows, key=key) == sorted(ref_rows, key=key)
    label = "192.0.2.1"
    bulk, ref = bulk_stats.by_exporter()[label], ref_stats.by_exporter()[label]
    assert (bulk.counters(), dict(bulk.errors)) == (ref.counters(), dict(ref.errors))
    assert _state(bulk_store) == _state(ref_store)


def _awkward_ipfix() -> list[bytes]:
    tpl = template_set((256, FIXED), (257, NAMED))
    seq = 0
    out: list[bytes] = []

    def msg(*sets: bytes, domain: int = 0, n: int = 0) -> bytes:
        nonlocal seq
        packet = message(*sets, domain=domain, sequence=seq)
        seq += n
        return packet

    def fixed(n: int, domain: int = 0) -> bytes:
        return msg(data_set(256, *[record(FIXED, flow("10.0.0.1", "10.0.0.2", 10 * seq + k, 1)) for k in range(n)]),
                   domain=domain, n=n)

    def named(n: int, pad: int = 0) -> bytes:
        recs = [record(NAMED, {**flow("10.0.0.3", "10.0.0.4", seq + k, 2), 82: b"veth" * (k % 3) + b"x" * (300 * (k == 2))})
                for k in range(n)]
        return msg(data_set(257, *recs, pad=pad), n=n)

    out.append(msg(tpl))
    out += [fixed(k % 4) for k in range(10)] + [named(k % 5, pad=k % 2) for k in range(10)]
    out.append(msg(tpl, data_set(256, record(FIXED, flow("10.0.0.5", "10.0.0.6", 5, 1))), n=1))  # refresh
    out += [named(3) for _ in range(6)]
    seq += 7  # lost records
    out += [fixed(2) for _ in range(6)]
    late = message(data_set(256, record(FIXED, flow("10.0.0.7", "10.0.0.8", 7, 1))), sequence=seq - 5)
    out.append(late)
    out += [fixed(2, domain=9) for _ in range(4)]  # template unknown in domain 9: held
    out.append(message(template_set((256, FIXED)), domain=9, sequence=seq))
    out += [fixed(3, domain=9) for _ in range(8)]
    out.append(msg(withdrawal(257)))
    out += [named(2) for _ in range(3)]  # withdrawn: held
    out.append(msg(template_set((257, NAMED))))
    out += [named(2) for _ in range(9)]
    out.append(fixed(2) + b"\x00\x00")  # header length shorter than the datagram
    out.append(msg(data_set(256, record(FIXED, flow("10.0.0.9", "10.0.0.9", 1, 1))),
                   data_set(257, record(NAMED, flow("10.0.0.9", "10.0.0.9", 2, 1))), n=2))  # two sets
    out += [fixed(1) for _ in range(9)]
    return out


@pytest.mark.parametrize("chunk", [1000, 13, 8, 3])
def test_bulk_path_equals_message_walk(chunk: int) -> None:
    _ipfix_both_ways(_awkward_ipfix(), chunk)


@pytest.mark.parametrize("chunk", [1000, 7])
def test_bulk_path_of_variable_length_sets_in_two_domains(chunk: int) -> None:
    """Messages of two observation domains interleaved in one bulk run, all with variable-length
    records: each domain's sequence check gets its own messages' record counts (domain 5 skips
    4 records once; domain 0 has none lost)."""
    seqs = {0: 0, 5: 0}
    out = [message(template_set((257, NAMED)), domain=d, sequence=0) for d in seqs]
    for k in range(40):
        domain = 5 if k % 3 else 0
        n = 1 + k % 4
        recs = [record(NAMED, {**flow("10.0.0.3", "10.0.0.4", k, 2), 82: b"eth" * (j % 3)}) for j in range(n)]
        out.append(message(data_set(257, *recs), domain=domain, sequence=seqs[domain]))
        seqs[domain] += n + (4 if domain == 5 and k == 20 else 0)
    _ipfix_both_ways(out, chunk)
    stats = DecodeStats()
    decode_payloads(EXPORTER_A, out, [SECS * 1000] * len(out), TemplateStore(), stats)
    counts = stats.by_exporter()["192.0.2.1"]
    assert (counts.sequence_gaps, counts.lost_records) == (1, 4)


def test_bulk_path_on_the_generator_ipfix_stream() -> None:
    from flowtally.dev.generator import encode_ipfix_packets, synthetic_cluster, synthetic_flows

    cols = synthetic_flows(synthetic_cluster(4), 6000, (4, 0), SECS * 1000 - 2000, span_ms=1000)
    enc = encode_ipfix_packets(cols, domain=3, sequence=0xFFFF_FF00, export_secs=SECS, template_every=9)
    packets = enc.packets[:40] + enc.packets[41:]  # one message lost on the way
    _ipfix_both_ways(packets, 64)
    _ipfix_both_ways([*packets[:3], b"\x00\x0a", *packets[3:]], 64)  # a runt datagram in the call


# --- flow details: direction, ICMP, VLAN, MPLS ----------------------------------------------

DETAIL = [(61, 1), (58, 2), (59, 2), (70, 3)]


def details(row: dict) -> tuple:
    return (row["flow_direction"], row["icmp_type"], row["icmp_code"], row["src_vlan"], row["dst_vlan"],
            row["mpls_label"])


def test_flow_details_from_their_elements() -> None:
    fields = V4 + DETAIL + [(176, 1), (177, 1)]
    label = (16063 << 4) | 0x1  # label, traffic class 0, bottom of stack
    recs = [
        record(fields, {**flow("10.0.0.1", "10.0.0.2", 100, 1), 61: 0, 58: 0x1064, 59: 20, 70: label}),
        record(fields, {**flow("10.0.0.3", "10.0.0.4", 200, 2, sport=0, dport=0, proto=1), 61: 1, 176: 3, 177: 1}),
        record(fields, {**flow("10.0.0.5", "10.0.0.6", 300, 3), 61: 7, 176: 8, 177: 9}),  # not ICMP; bad 61
    ]
    rows, _ = decode(dg(message(template_set((256, fields)), data_set(256, *recs))))
    # VLAN IDs keep their 12 bits (0x1064: priority bit set), the MPLS label its 20.
    assert [details(r) for r in rows] == [(1, 0, 0, 0x064, 20, 16063), (2, 3, 1, 0, 0, 0), (0, 0, 0, 0, 0, 0)]


def test_icmp_type_code_fallbacks() -> None:
    # icmpTypeCodeIPv4 (32) for ICMP and icmpTypeCodeIPv6 (139) for ICMPv6 records; without any
    # ICMP element the destination port (type << 8 | code, as pmacctd and v5 exporters send it).
    with_elements = [*V4, (32, 2), (139, 2), (243, 2), (254, 2)]
    rows, _ = decode(dg(message(template_set((256, with_elements), (257, V4)),
                                data_set(256, record(with_elements, {**flow("10.0.0.1", "10.0.0.2", 1, 1, proto=1,
                                                                            dport=0), 32: 0x0800, 243: 5, 254: 6}),
                                         record(with_elements, {**flow("10.0.0.3", "10.0.0.4", 2, 1, proto=58,
                                                                       dport=0x0800), 139: 0x8100})),
                                data_set(257, record(V4, flow("10.0.0.5", "10.0.0.6", 3, 1, proto=1, dport=0x0303)),
                                         record(V4, flow("10.0.0.7", "10.0.0.8", 4, 1, proto=6, dport=0x0303))))))
    assert [details(r) for r in rows] == [(0, 8, 0, 5, 6, 0), (0, 129, 0, 0, 0, 0), (0, 3, 3, 0, 0, 0),
                                          (0, 0, 0, 0, 0, 0)]


def test_biflow_reverse_record_swaps_vlans_and_takes_its_own_icmp() -> None:
    fields = [(8, 4), (12, 4), (7, 2), (11, 2), (4, 1), (1, 8), (2, 8), (1, 8, 29305), (2, 8, 29305),
              (61, 1), (58, 2), (59, 2), (32, 2), (32, 2, 29305)]
    rec = record(fields, {8: ip4("10.0.0.1"), 12: ip4("10.0.0.2"), 4: 1, 1: 84, 2: 1, -1: 84, -2: 1,
                          61: 0, 58: 10, 59: 20, 32: 0x0800, -32: 0x0000})
    rows, _ = decode(dg(message(template_set((256, fields)), data_set(256, rec))))
    assert [(r["src_addr"], *details(r)) for r in rows] == [("10.0.0.1", 1, 8, 0, 10, 20, 0),
                                                            ("10.0.0.2", 1, 0, 0, 20, 10, 0)]


def test_details_survive_a_batch_mixing_versions() -> None:
    # One decode call with v5 records (no detail elements) and IPFIX records with VLAN and
    # direction: the IPFIX details are kept and the v5 records read 0, in either order.
    from tests.unit.test_netflow_v5 import v5_packet, v5_record

    fields = [*V4, (61, 1), (58, 2)]
    ipfix = dg(message(template_set((256, fields)),
                       data_set(256, record(fields, {**flow("10.0.0.1", "10.0.0.2", 100, 1), 61: 1, 58: 42}))))
    v5 = dg(v5_packet(v5_record("10.0.0.9", "10.0.0.8", 0, 0x0301, 1, 64, 1)))
    for order in ((v5, ipfix), (ipfix, v5)):
        rows, _ = decode(*order)
        assert [(r["version"], *details(r)) for r in rows] == [(10, 2, 0, 0, 42, 0, 0), (5, 0, 3, 1, 0, 0, 0)]
