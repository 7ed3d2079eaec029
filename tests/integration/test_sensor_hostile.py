"""The NetFlow sensor under hostile traffic, as a real `flowtally sensor netflow` process with the
real Kafka broker: six fuzzing exporters (18 source sockets; every header, length and template
field lying, template collisions with the valid exporter, random observation domains,
truncation) interleaved with a valid v9 exporter whose flows, bytes and packets, read back from
the raw topic, must be exact; the sensor's memory, /metrics and state stay within their bounds.
"""

from __future__ import annotations

from pathlib import Path

from tests.fuzz_netflow import run_fuzz

#: Tight bounds, so that the run reaches them (the defaults are sized for production).
BOUNDS = {
    "FLOWTALLY_MAX_EXPORTER_LABELS": "4",
    "FLOWTALLY_MAX_DOMAINS_PER_EXPORTER": "16",
    "FLOWTALLY_MAX_TEMPLATE_FIELDS": "40000",
    "FLOWTALLY_MAX_COMPLETENESS_ROWS": "64",
}


def test_fuzz_beside_a_valid_exporter(kafka_bootstrap: str, tmp_path: Path) -> None:
    report = run_fuzz(kafka_bootstrap, tmp_path, hostile_rate=4000, seconds=20, valid_flows=60_000,
                      addresses=6, ports_each=3, seed=11, pool=30_000, env=BOUNDS)
    print("\n".join(report.lines()))
    assert report.hostile_sent >= 70_000
    # Every flow of the valid exporter reached Kafka once, with its exact bytes and packets.
    assert report.valid_stored == (report.valid.flows, report.valid.bytes, report.valid.packets)
    assert report.metric("flowtally_sensor_flows_dropped_total") == 0
    # The hostile input was seen and counted by reason; the bounds were reached and held.
    errors = report.errors_by_reason()
    assert sum(errors.values()) > 20_000 and {"bad_template", "bad_flowset_length", "truncated_header",
                                               "unknown_version", "bad_message_length"} <= set(errors)
    assert report.metric("flowtally_sensor_netflow_state_evicted_total", {"kind": "domains"}) > 0
    assert report.metric("flowtally_sensor_netflow_templates_evicted_total") > 0
    assert report.metric("flowtally_sensor_netflow_state", {"kind": "template_fields"}) <= 40_000
    assert report.metric("flowtally_sensor_netflow_state", {"kind": "domains"}) <= 7 * 16
    assert report.metric("flowtally_sensor_netflow_state", {"kind": "completeness_rows"}) <= 64 + 1
    # Labels: the valid exporter (heard first) and three fuzzers by address, the rest "other".
    assert report.metric("flowtally_sensor_netflow_flows_total", {"exporter": "127.0.0.1"}) == report.valid.flows
    assert report.metric("flowtally_sensor_netflow_packets_total", {"exporter": "other"}) > 0
    exporters = {line.split('exporter="', 1)[1].split('"', 1)[0] for line in report.metrics.splitlines()
                 if line.startswith("flowtally_sensor_netflow_packets_total{")}
    assert len(exporters) == 5 and "127.0.0.1" in exporters and "other" in exporters
    # Memory and /metrics bounded: no growth with the hostile datagrams sent.
    assert report.metrics_after < 40_000, report.metrics_after
    assert report.rss_after_kb - report.rss_before_kb < 64 * 1024
    assert report.rss_after_kb - report.rss_at(0.5) < 16 * 1024
    # Nothing is logged per hostile datagram (a log is a disk to fill).
    assert len(report.log_lines) < 20, report.log_lines[:20]
