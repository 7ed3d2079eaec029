"""The sensor's decoder state and counters: template store bounds from settings, held data sets
counted on shutdown, every ExporterStats counter exported, unchanged template refreshes."""

from __future__ import annotations

import struct

import pytest
from prometheus_client import REGISTRY
from pydantic import ValidationError

from sensors.netflow import collector
from sensors.netflow.collector import NetflowReceiver, NetflowSettings
from sensors.netflow.decoder import Datagram, decode_datagrams, decode_payloads
from sensors.netflow.stats import DecodeStats, ExporterStats
from sensors.netflow.templates import TemplateStore
from sensors.schema import address16

E = address16("192.0.2.77")
FIELDS = [(8, 4), (12, 4), (7, 2), (11, 2), (4, 1), (1, 4), (2, 4)]
RECORD = struct.pack("!4s4sHHBII", bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]), 1234, 80, 6, 1500, 3)


def _v9(seq: int, *flowsets: bytes, source_id: int = 5) -> bytes:
    return struct.pack("!HHIIII", 9, len(flowsets), 1000, 1_700_000_000, seq, source_id) + b"".join(flowsets)


def _template(template_id: int = 256, fields: list[tuple[int, int]] = FIELDS) -> bytes:
    body = struct.pack("!HH", template_id, len(fields)) + b"".join(struct.pack("!HH", *f) for f in fields)
    return struct.pack("!HH", 0, 4 + len(body)) + body


def _data(template_id: int = 256, n: int = 2) -> bytes:
    return struct.pack("!HH", template_id, 4 + n * len(RECORD)) + RECORD * n


def test_settings_bound_the_template_store() -> None:
    settings = NetflowSettings(max_pending_sets=3, max_pending_bytes=4096, max_pending_age_ms=500)
    receiver = NetflowReceiver(settings, publisher=None)  # type: ignore[arg-type]
    store = receiver._templates
    assert (store.max_pending_sets, store.max_pending_bytes, store.max_pending_age_ms) == (3, 4096, 500)
    with pytest.raises(ValidationError):
        NetflowSettings(max_pending_sets=-1)
    with pytest.raises(ValidationError):
        NetflowSettings(max_pending_age_ms=10 * 3_600_000)
    assert "template" in (NetflowSettings.model_fields["max_pending_sets"].description or "")


def test_shutdown_counts_held_sets() -> None:
    receiver = NetflowReceiver(NetflowSettings(completeness=False), publisher=None)  # type: ignore[arg-type]
    stats = DecodeStats()
    table = decode_payloads(E, [_v9(1, _data()), _v9(2, _data())], [1000, 1001], receiver._templates, stats)
    assert table.num_rows == 0 and receiver._templates.pending_sets() == 2
    label = "192.0.2.77"
    before = REGISTRY.get_sample_value("flowtally_sensor_netflow_decode_errors_total",
                                       {"exporter": label, "reason": "missing_template_expired"}) or 0
    receiver._give_up_pending()
    after = REGISTRY.get_sample_value("flowtally_sensor_netflow_decode_errors_total",
                                      {"exporter": label, "reason": "missing_template_expired"})
    assert after == before + 2
    assert receiver._templates.pending_sets() == 0


def test_every_counter_is_exported() -> None:
    counts = ExporterStats()
    for i, name in enumerate(counts.counters(), 1):
        setattr(counts, name, i)
    label = "198.51.100.9"
    collector._export(label, counts, 10)
    for name, value in counts.counters().items():
        if name in collector._DEDICATED:
            continue
        assert REGISTRY.get_sample_value("flowtally_sensor_netflow_decoder_total",
                                         {"exporter": label, "counter": name}) == value
    assert REGISTRY.get_sample_value("flowtally_sensor_netflow_flows_total", {"exporter": label}) == counts.records
    sample = REGISTRY.get_sample_value("flowtally_sensor_netflow_sequence_resets_total", {"exporter": label})
    assert sample == counts.sequence_resets


def test_unchanged_refresh_keeps_template_and_changed_one_replaces_it() -> None:
    store = TemplateStore()
    stats = DecodeStats()
    decode_payloads(E, [_v9(1, _template(), _data())], [1000], store, stats)
    first = store.get(9, E, 5, 256)
    table = decode_payloads(E, [_v9(2, _template(), _data(n=3))], [1001], store, stats)
    assert store.get(9, E, 5, 256) is first and table.num_rows == 3
    changed = [*FIELDS[:-1], (2, 8)]
    record = RECORD[:-4] + (3).to_bytes(8, "big")
    flowset = struct.pack("!HH", 256, 4 + len(record)) + record
    table = decode_payloads(E, [_v9(3, _template(fields=changed), flowset)], [1002], store, stats)
    assert store.get(9, E, 5, 256) is not first and table.column("packets").to_pylist() == [3]
    assert stats.templates == 3 and stats.errors_by_reason() == {}


def test_decode_payloads_equals_decode_datagrams() -> None:
    payloads = [_v9(1, _template(), _data()), _v9(2, _data(n=5)), b"\x00", b"\x00\x07\x00\x00"]
    received = [1000, 1001, 1002, 1003]
    a_stats, b_stats = DecodeStats(), DecodeStats()
    a = decode_payloads(E, payloads, received, TemplateStore(), a_stats)
    b = decode_datagrams([Datagram(E, ms, p) for p, ms in zip(payloads, received, strict=True)], TemplateStore(),
                         b_stats)
    assert a.equals(b) and a.num_rows == 7
    assert a_stats.as_dict() == b_stats.as_dict()
