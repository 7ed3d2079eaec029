"""Golden captures from Debian's pmacctd (nfprobe plugin, NetFlow v9 and IPFIX) on
``tests/data/traffic.pcap`` (made by ``tests/data/make_pmacctd_captures.py``): our decode equals
tshark's decode of the same file exactly, and the truth written when the traffic was built."""

from __future__ import annotations

import pytest

from tests.oracle import (
    DATA,
    assert_matches_oracle,
    decode_captures,
    table_rows,
    traffic_truth,
    tshark_decode,
)

CAPTURES = ["pmacctd-v9.pcap", "pmacctd-ipfix.pcap"]
#: records, bytes, packets: pmacctd exports every direction of traffic.pcap as its own flow.
TOTALS = (72, 60832, 275)


@pytest.mark.parametrize("name", CAPTURES)
def test_pmacctd_capture_matches_tshark(name: str) -> None:
    oracle = tshark_decode(DATA / name)
    table, stats = decode_captures(DATA / name)
    assert oracle.totals == TOTALS
    assert_matches_oracle(table, oracle)
    assert stats.errors_by_reason() == {}
    assert stats.options_records == oracle.options_records == 0
    assert stats.templates == 4  # IPv4 and IPv6 data templates, each with its 1025/2049 twin


@pytest.mark.parametrize("name", CAPTURES)
def test_pmacctd_capture_matches_the_generated_traffic(name: str) -> None:
    """pmacctd keys ICMP flows by type/code and, like softflowd's v5, writes ``type << 8 | code``
    into the destination port (echo request 2048, ICMPv6 echo request 32768); its flow times are
    the packets' times to within 10 ms (one packet interval of the generated traffic)."""
    truth = traffic_truth()
    table, _ = decode_captures(DATA / name)
    rows = table_rows(table)
    assert len(rows) == len(truth)
    seen = set()
    for r in rows:
        key = (r["src_addr"], r["dst_addr"], r["src_port"], r["dst_port"], r["proto"])
        if r["proto"] in (1, 58):
            assert r["dst_port"] in (0, 2048, 32768), key
            key = (*key[:3], 0, key[4])
        expected = truth[key]
        seen.add(key)
        assert (r["bytes"], r["packets"]) == (expected["bytes"], expected["packets"]), key
        assert abs(r["start"] - expected["first_ms"]) <= 10 and abs(r["end"] - expected["last_ms"]) <= 10, key
    assert seen == set(truth)
