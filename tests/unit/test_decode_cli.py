"""`flowtally decode`: JSON lines from captures, checked against tshark."""

from __future__ import annotations

import ipaddress
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from flowtally.cli import main
from sensors.netflow import decodefile
from sensors.schema import DETAIL_COLUMNS
from tests.oracle import DATA, REPO_ROOT, FlowKey, shared_testdata, tshark_decode

ISO_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
FIELDS = {"exporter", "version", "observation_domain", "time_received", "src_addr", "dst_addr", "src_port",
          "dst_port", "proto", "bytes", "packets", "start", "end", "sampling_rate", "tcp_flags", "in_if",
          "out_if", *DETAIL_COLUMNS}
AKVORADO = ("netflow-pcaps", "akvorado")


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[dict], str]:
    code = main(["decode", *args])
    out, err = capsys.readouterr()
    return code, [json.loads(line) for line in out.splitlines()], err


def keys(records: list[dict]) -> list[FlowKey]:
    return [FlowKey(r["src_addr"], r["dst_addr"], r["src_port"], r["dst_port"], r["proto"], r["bytes"],
                    r["packets"]) for r in records]


@pytest.mark.parametrize("name", ["softflowd-v5.pcap", "softflowd-v9.pcap", "pmacctd-v9.pcap"])
def test_golden_capture_to_json_lines_matches_tshark(capsys: pytest.CaptureFixture[str], name: str) -> None:
    path = DATA / name
    code, records, err = run(capsys, str(path))
    assert code == 0
    oracle = tshark_decode(path)
    assert (len(records), sum(r["bytes"] for r in records), sum(r["packets"] for r in records)) == oracle.totals
    assert sorted(keys(records)) == sorted(oracle.records)
    printed = [tuple(r[name] for name in DETAIL_COLUMNS) for r in records]
    assert sorted(zip(keys(records), printed, strict=True)) == sorted(zip(oracle.records, oracle.details, strict=True))
    for r in records:
        assert set(r) == FIELDS
        assert r["exporter"] == "127.0.0.1"  # IPv4-mapped addresses print as plain IPv4
        assert ISO_MS.match(r["start"]) and ISO_MS.match(r["end"]) and ISO_MS.match(r["time_received"])
        assert r["start"] <= r["end"]
        ipaddress.ip_address(r["src_addr"])
    assert f"{oracle.totals[0]} flow records" in err and "errors: none" in err


def test_times_print_in_utc_with_milliseconds(capsys: pytest.CaptureFixture[str]) -> None:
    # softflowd -A milli exports flowStart/EndMilliseconds: the printed times are the traffic's.
    _, records, _ = run(capsys, str(DATA / "softflowd-v9-abstime.pcap"))
    tcp = next(r for r in records if r["src_port"] == 40001)
    assert (tcp["start"], tcp["end"]) == ("2024-01-02T03:04:05.010Z", "2024-01-02T03:04:05.480Z")
    assert any(":" in r["src_addr"] for r in records)  # IPv6 flows print as IPv6


def test_template_in_one_file_decodes_data_in_the_next(capsys: pytest.CaptureFixture[str]) -> None:
    template, data = shared_testdata(*AKVORADO, "template.pcap"), shared_testdata(*AKVORADO, "data.pcap")
    code, records, err = run(capsys, str(template), str(data))
    assert code == 0 and len(records) == 4
    assert sorted(keys(records)) == sorted(tshark_decode([template, data]).records)
    code, records, err = run(capsys, str(data))
    assert code == 0 and records == [] and "missing_template_expired=1" in err


def test_template_and_data_in_one_chunk_and_across_chunks(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = DATA / "softflowd-v9.pcap"  # one template packet, then data packets
    _, whole, _ = run(capsys, str(path))
    monkeypatch.setattr(decodefile, "CHUNK", 1)
    _, chunked, _ = run(capsys, str(path))
    assert sorted(keys(chunked)) == sorted(keys(whole)) and len(whole) == 72


def test_port_filter(capsys: pytest.CaptureFixture[str]) -> None:
    path = shared_testdata(*AKVORADO, "nfv5.pcap")  # sent to port 9990
    _, records, _ = run(capsys, "--port", "2055", str(path))
    assert records == []
    _, records, _ = run(capsys, "--port", "2055", "--port", "9990", str(path))
    assert len(records) == 29


def test_ipfix_decodes_and_other_udp_is_counted(capsys: pytest.CaptureFixture[str]) -> None:
    code, records, err = run(capsys, str(DATA / "softflowd-ipfix.pcap"), str(DATA / "traffic.pcap"))
    assert code == 0 and len(records) == 72 and {r["version"] for r in records} == {10}
    # The traffic capture's UDP is not NetFlow; its TCP/ICMP is skipped.
    assert "unknown_version=" in err and "non_udp=" in err


def test_not_a_capture_exits_1_with_a_clear_message(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    bad = tmp_path / "notes.txt"
    bad.write_text("hello")
    code, records, err = run(capsys, str(DATA / "softflowd-v5.pcap"), str(bad))
    assert code == 1 and records == []  # checked before anything is printed
    assert f"{bad}: not a pcap or pcapng capture" in err
    code, _, err = run(capsys, str(tmp_path / "missing.pcap"))
    assert code == 1 and "missing.pcap" in err


def test_console_entry_point() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "flowtally.cli", "decode", str(DATA / "softflowd-v5.pcap")],
        capture_output=True, text=True, cwd=REPO_ROOT, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) == 68
    assert "68 flow records" in proc.stderr
