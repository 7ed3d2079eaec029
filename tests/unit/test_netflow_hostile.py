"""Hostile input to the NetFlow sensor: every piece of decoder state is bounded with least
recently used eviction (counted), metric labels and completeness rows are capped, a saturated
decoder drops its own exporter's input (counted as decode_overload) and the round robin gives a
well-behaved exporter its turn while a fuzzing one has a backlog."""

from __future__ import annotations

import asyncio
import random
import struct
import time

import numpy as np
import pyarrow as pa
import pytest
from prometheus_client import REGISTRY
from pydantic import ValidationError

from flowtally.metrics import LabelCap
from sensors.completeness import OVERFLOW_DOMAIN, OVERFLOW_EXPORTER, UNKNOWN_EXPORTER, CompletenessAccumulator
from sensors.netflow.collector import NetflowReceiver, NetflowSettings
from sensors.netflow.decoder import decode_payloads
from sensors.netflow.receiver import Run, estimate_records_many, header_bytes
from sensors.netflow.stats import DecodeStats
from sensors.netflow.templates import TemplateStore
from sensors.publisher import Publisher
from sensors.schema import address16
from tests.fuzz_netflow import Mutator, valid_stream

VALID = address16("127.0.0.1")
FUZZ = [address16(f"127.0.0.{10 + i}") for i in range(6)]
FIELDS = [(8, 4), (12, 4), (7, 2), (11, 2), (4, 1), (1, 4), (2, 4)]  # 7 fields, 21 bytes
RECORD = struct.pack("!4s4sHHBII", bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]), 1234, 80, 6, 1500, 3)
NOW = 1_700_000_000_000


def _v9(seq: int, *flowsets: bytes, source_id: int = 5) -> bytes:
    return struct.pack("!HHIIII", 9, len(flowsets), 1000, NOW // 1000, seq, source_id) + b"".join(flowsets)


def _template(template_id: int, fields: list[tuple[int, int]] = FIELDS) -> bytes:
    body = struct.pack("!HH", template_id, len(fields)) + b"".join(struct.pack("!HH", *f) for f in fields)
    return struct.pack("!HH", 0, 4 + len(body)) + body


def _data(template_id: int = 256, n: int = 2) -> bytes:
    return struct.pack("!HH", template_id, 4 + n * len(RECORD)) + RECORD * n


def _decode(store: TemplateStore, exporter: bytes, *payloads: bytes) -> pa.Table:
    return decode_payloads(exporter, list(payloads), [NOW] * len(payloads), store, DecodeStats())


def test_templates_per_domain_evict_least_recently_used() -> None:
    store = TemplateStore(max_templates_per_domain=3)
    _decode(store, VALID, *(_v9(i, _template(256 + i)) for i in range(3)))
    _decode(store, VALID, _v9(3, _template(256)))  # an unchanged refresh: 256 is the most recent now
    _decode(store, VALID, _v9(4, _template(300)))
    assert len(store) == 3 and store.templates_evicted == {"domain_limit": 1}
    assert store.get(9, VALID, 5, 257) is None  # the least recently used went
    assert store.get(9, VALID, 5, 256) is not None and store.get(9, VALID, 5, 300) is not None
    table = _decode(store, VALID, _v9(5, _data(256)))
    assert table.num_rows == 2


def test_template_fields_bounded_per_exporter_and_in_total() -> None:
    """Beyond the total, the exporter holding the most fields loses its least recently used
    templates (a flood never evicts the small exporter beside it); beyond its own budget, an
    exporter's least recently used templates go."""
    store = TemplateStore(max_template_fields_per_exporter=21, max_template_fields=30)
    _decode(store, VALID, _v9(0, _template(256), _template(257)))  # 14 fields
    _decode(store, FUZZ[0], _v9(0, _template(256), _template(257), _template(258)))  # 35 in all
    assert store.templates_evicted == {"total_fields": 1} and store.template_fields() == 28
    assert store.get(9, FUZZ[0], 5, 256) is None and store.get(9, FUZZ[0], 5, 258) is not None
    _decode(store, FUZZ[0], _v9(1, _template(259), _template(260), _template(261)))
    assert store.templates_evicted == {"total_fields": 4} and store.template_fields() == 28
    assert [t for t in range(256, 262) if store.get(9, FUZZ[0], 5, t)] == [260, 261]
    huge = [(t, 1) for t in range(1, 30)]  # 29 fields: more than an exporter may hold
    _decode(store, FUZZ[2], _v9(0, _template(256, huge)))
    assert store.templates_evicted["exporter_fields"] == 1 and store.get(9, FUZZ[2], 5, 256) is None
    assert store.get(9, VALID, 5, 256) is not None and store.get(9, VALID, 5, 257) is not None
    assert store.template_fields() == 28


def test_domains_per_exporter_evict_the_least_recently_used_with_all_state() -> None:
    store = TemplateStore(max_domains_per_exporter=4)
    _decode(store, FUZZ[0], _v9(1, _template(256), source_id=7))  # the exporter's steady domain
    for i in range(20):
        # Invented domains, and the steady one between them: it stays recent, they evict each other.
        _decode(store, FUZZ[0], _v9(i, _template(256), _data(), source_id=1000 + i))
        _decode(store, FUZZ[0], _v9(2 + i, _data(), source_id=7))
    assert store.domain_count() == 4 and store.evicted["domains"] == 17
    assert len([k for k in store.sequences if k[1] == FUZZ[0]]) == 4
    assert store.get(9, FUZZ[0], 7, 256) is not None and store.sequences[(9, FUZZ[0], 7)] == 22
    assert len(store) == 4 and store.templates_evicted["domain_evicted"] == 17
    assert store.get(9, FUZZ[0], 1000, 256) is None


def test_exporters_bounded_least_recently_used_first() -> None:
    store = TemplateStore(max_exporters=3)
    for i in range(5):
        _decode(store, VALID, _v9(i, _template(256)))  # the valid exporter stays the most recent
        _decode(store, FUZZ[i], _v9(0, _template(256)))
    assert store.exporter_count() == 3 and store.evicted["exporters"] == 3
    assert store.get(9, VALID, 5, 256) is not None and store.get(9, FUZZ[4], 5, 256) is not None
    assert store.get(9, FUZZ[0], 5, 256) is None and (9, FUZZ[0], 5) not in store.sequences


def test_pending_sets_bounded_in_total() -> None:
    store = TemplateStore(max_pending_total_bytes=200)
    stats = DecodeStats()
    payloads = [_v9(i, _data(256 + i, 2), source_id=i) for i in range(10)]  # 46-byte sets, no templates
    decode_payloads(FUZZ[0], payloads, [NOW] * 10, store, stats)
    assert store.pending_bytes() <= 200 and store.pending_sets() == 4
    assert stats.errors_by_reason() == {"missing_template_expired": 6}


def test_fuzz_keeps_state_bounded_and_the_valid_exporter_exact() -> None:
    """Six exporters fuzzing (every kind of mutation, template collisions with the valid
    exporter's IDs and domain included) between the valid exporter's datagrams: every bound
    holds, and the valid exporter decodes to exactly what it sent."""
    valid = valid_stream(3000, seed=3)
    mutator = Mutator(5, valid.payloads)
    store = TemplateStore(max_exporters=16, max_domains_per_exporter=8, max_templates_per_domain=16,
                          max_template_fields_per_exporter=4000, max_template_fields=12_000,
                          max_pending_total_bytes=1 << 16)
    flows = size = packets = 0
    rng = random.Random(5)
    evicted = 0
    for payload in valid.payloads:
        for exporter in FUZZ:
            batch = [mutator.next() for _ in range(rng.randint(5, 40))]
            _decode(store, exporter, *batch)
            assert store.template_fields() <= 12_000
            assert len(store.sequences) <= 16 * 8 and store.domain_count() <= 16 * 8
            assert store.pending_bytes() <= 1 << 16
        table = _decode(store, VALID, payload)
        flows += table.num_rows
        size += int(pa.compute.sum(table.column("bytes")).as_py() or 0)
        packets += int(pa.compute.sum(table.column("packets")).as_py() or 0)
        evicted = sum(store.templates_evicted.values())
    assert (flows, size, packets) == (valid.flows, valid.bytes, valid.packets)
    assert evicted > 0 and store.evicted["domains"] > 0  # the bounds were reached, not just generous
    assert all(len([k for k in store.sequences if k[1] == e]) <= 8 for e in FUZZ)


def test_label_cap() -> None:
    cap = LabelCap(2)
    assert [cap(v) for v in ("a", "b", "c", "a", "other", "d", "b")] == ["a", "b", "other", "a", "other",
                                                                        "other", "b"]
    assert len(cap) == 2 and cap.overflowed == 3


def test_collector_caps_exporter_labels_but_keys_messages_by_address() -> None:
    settings = NetflowSettings(max_exporter_labels=2, completeness=False)
    receiver = NetflowReceiver(settings, publisher=None)  # type: ignore[arg-type]
    assert [receiver._label(e) for e in (VALID, FUZZ[0], FUZZ[1], FUZZ[2], VALID)] == [
        "127.0.0.1", "127.0.0.10", "other", "other", "127.0.0.1"]
    assert len(receiver._labels) == 2


def test_completeness_rows_capped_per_exporter_and_per_minute() -> None:
    acc = CompletenessAccumulator(max_rows_per_minute=10, max_domains_per_exporter=3)
    total = 0
    for exporter in [VALID, *FUZZ]:
        for domain in range(5):
            acc.counts(NOW, exporter, domain).packets += 1
            total += 1
    acc.add_kernel_drops(NOW, 7)  # exempt: always its own row
    acc.counts(NOW + 60_000, FUZZ[0], 99).packets += 1  # the next minute starts afresh
    table = acc.take(NOW - NOW % 60_000 + 60_000)
    rows = table.to_pylist()
    assert len(rows) == 10 + 1
    assert sum(r["packets"] for r in rows) == total
    keys = {(r["exporter"], r["observation_domain"]) for r in rows}
    assert (VALID, 0) in keys and (VALID, OVERFLOW_DOMAIN) in keys  # 3 domains, then its overflow row
    assert (OVERFLOW_EXPORTER, OVERFLOW_DOMAIN) in keys and (UNKNOWN_EXPORTER, 0) in keys
    assert next(r for r in rows if r["exporter"] == VALID and r["observation_domain"] == OVERFLOW_DOMAIN
                )["packets"] == 2
    assert len(acc) == 1


def _run(exporter: bytes, payloads: list[bytes]) -> Run:
    run = Run(exporter)
    run.payloads = payloads
    lengths = np.fromiter(map(len, payloads), dtype=np.int64, count=len(payloads))
    heads = header_bytes(payloads)
    run.lengths, run.heads = [lengths], [heads]
    run.records = int(estimate_records_many(heads, lengths).sum())
    return run


def _sample(name: str, labels: dict[str, str]) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_a_full_backlog_drops_only_that_exporters_input_counted() -> None:
    settings = NetflowSettings(decode_backlog_bytes=65_536, batch_max_flows=1_000_000)
    receiver = NetflowReceiver(settings, publisher=None, completeness_topic="c")  # type: ignore[arg-type]
    fuzz, valid = address16("127.0.0.30"), address16("127.0.0.31")
    receiver._exporters.update({fuzz: fuzz, valid: valid})
    labels = {"exporter": "127.0.0.30", "reason": "decode_overload"}
    before = _sample("flowtally_sensor_netflow_decode_errors_total", labels)
    packets_before = _sample("flowtally_sensor_netflow_packets_total", {"exporter": "127.0.0.30"})
    big = [bytes(1000)] * 100  # 100 x (1000 + 128) bytes: 58 fit the 64 KiB backlog
    receiver._on_datagrams([_run(fuzz, big), _run(valid, [bytes(1000)] * 10)], NOW)
    receiver._on_datagrams([_run(fuzz, big)], NOW)
    assert len(receiver._pending[fuzz].payloads) == 58 and receiver._pending[fuzz].bytes <= 65_536
    assert len(receiver._pending[valid].payloads) == 10
    assert _sample("flowtally_sensor_netflow_decode_errors_total", labels) == before + 142
    assert _sample("flowtally_sensor_netflow_packets_total", {"exporter": "127.0.0.30"}) == packets_before + 142
    assert _sample("flowtally_sensor_netflow_decode_errors_total",
                   {"exporter": "127.0.0.31", "reason": "decode_overload"}) == 0
    row = receiver._completeness.counts(NOW, fuzz, 0)
    assert (row.packets, row.decode_errors, row.bytes) == (142, 142, 142_000)
    assert receiver._backlog == sum(p.bytes for p in receiver._pending.values())


def test_round_robin_gives_the_valid_exporter_its_turn_during_a_fuzz_backlog() -> None:
    """A fuzzing exporter's backlog of expensive datagrams (huge templates) is decoded a turn
    at a time; the valid exporter's batch, due later, is published after one of its turns, long
    before the fuzzer's backlog is through."""
    valid = valid_stream(600, seed=2)
    mutator = Mutator(9, valid.payloads)
    hostile = [mutator.huge_template() for _ in range(400)]  # ~1 ms each to decode

    async def scenario() -> tuple[int, int, float, list[bytes]]:
        publisher = Publisher(lambda: None, "raw", 1000)  # type: ignore[arg-type,return-value]
        settings = NetflowSettings(decode_quantum_ms=5, batch_max_flows=1, completeness=False)
        receiver = NetflowReceiver(settings, publisher)
        receiver._exporters.update({FUZZ[0]: FUZZ[0], VALID: VALID})
        task = asyncio.create_task(receiver._decode_loop())
        receiver._on_datagrams([_run(FUZZ[0], hostile)], NOW)
        await asyncio.sleep(0.01)
        started = time.perf_counter()
        receiver._on_datagrams([_run(VALID, valid.payloads)], NOW)
        keys: list[bytes] = []
        while not keys:
            await asyncio.sleep(0)
            while not publisher._queue.empty():
                message = publisher._queue.get_nowait()
                assert message is not None
                keys.append(message.key)
        waited = time.perf_counter() - started
        left = len(receiver._pending[FUZZ[0]].payloads) if FUZZ[0] in receiver._pending else 0
        flows = sum(1 for _ in keys)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return left, flows, waited, keys

    left, _, waited, keys = asyncio.run(scenario())
    assert keys == [b"127.0.0.1"]  # the fuzzer's rows (none decodable) never made a message
    assert left > 200, "the valid exporter waited for the fuzzer's whole backlog"
    assert waited < 0.2


def test_settings_reject_unbounded_values() -> None:
    for name in ("max_exporters", "max_domains_per_exporter", "max_templates_per_domain",
                 "max_template_fields", "max_exporter_labels", "decode_backlog_bytes"):
        with pytest.raises(ValidationError):
            NetflowSettings(**{name: 0})
        assert NetflowSettings.model_fields[name].description
