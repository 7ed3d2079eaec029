"""A broken exporter clock and rows ClickHouse refuses, beside a valid stream (issue 22, item 1):
real Kafka, the real sink (in this process, so its chDB is queried while it runs) and chDB.

Before the split, 150 flows whose end times fall on 150 different days made every insert of
their partition fail with ``Code: 252 Too many partitions for single INSERT block`` forever.
Now the sink inserts such a group as day chunks (sink/split.py), and an insert ClickHouse
rejects for its content is cut down until only the refused rows are left for the DLQ.
"""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from prometheus_client import REGISTRY

from enricher.enrich import enrich_batch
from enricher.identity import IdentityIndex
from enricher.schema import ENRICHED_SCHEMA
from enricher.schema import SCHEMA_NAME as ENRICHED
from flowtally import kafka
from flowtally.clickhouse import connect
from flowtally.dev.generator import encode_ipfix_packets, synthetic_cluster, synthetic_flows
from flowtally.dev.localstack import Stage, free_port
from flowtally.settings import ClickHouseSettings, KafkaSettings
from flowtally.wire import ORIGIN_HEADER, decode_batch, encode_batch
from sensors.completeness import COMPLETENESS_SCHEMA, with_additive_defaults
from sensors.completeness import SCHEMA_NAME as COMPLETENESS
from sensors.schema import RAW_SCHEMA, build_raw_table, ipv4_to_mapped
from sensors.schema import SCHEMA_NAME as RAW
from sink import split
from sink.groups import Intent
from sink.rows import flow_rows
from sink.service import SinkWorker, record_intent
from sink.settings import SinkSettings
from sink.writer import Writer
from sql.migrate import migrate
from tests.fixtures.kafka import committed_total

DAY_MS = 86_400_000


def _enriched(ends: np.ndarray, nbytes: np.ndarray, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    n = len(ends)
    raw = build_raw_table({
        "src_addr": ipv4_to_mapped(rng.integers(0x0AF40000, 0x0AF40100, n).astype(np.uint32)),
        "dst_addr": ipv4_to_mapped(np.full(n, 0x510245A0, dtype=np.uint32)),
        "bytes": nbytes, "packets": np.ones(n), "start": ends - 1000, "end": ends,
    })
    return enrich_batch(raw, IdentityIndex(()))


def _sample(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


async def _produce(settings: KafkaSettings, tables: list[pa.Table], pause_s: float = 0.0) -> None:
    producer = kafka.producer(settings)
    await producer.start()
    try:
        for i, table in enumerate(tables):
            value, headers = encode_batch(table, ENRICHED)
            headers.append((ORIGIN_HEADER, f"raw/0/{i}".encode()))
            await producer.send_and_wait(settings.topic("enriched"), value, key=b"k", headers=headers)
            await asyncio.sleep(pause_s)
    finally:
        await producer.stop()


async def _read_dlq(settings: KafkaSettings, group: str, count: int, timeout: float) -> list[tuple[bytes, dict]]:
    consumer = kafka.consumer(settings, settings.topic("dlq"), group_id=group)
    await consumer.start()
    got: list[tuple[bytes, dict]] = []
    try:
        deadline = time.monotonic() + timeout
        while len(got) < count and time.monotonic() < deadline:
            for messages in (await consumer.getmany(timeout_ms=500)).values():
                got += [(m.value, dict(m.headers)) for m in messages]
    finally:
        await consumer.stop()
    return got


async def _completeness_sum(settings: KafkaSettings, column: str) -> dict[tuple[str, int], int]:
    """``column`` summed per (stage, observation domain) over the completeness topic (non-zero only)."""
    consumer = kafka.consumer(settings, settings.topic("completeness"), group_id=f"reader-{uuid.uuid4().hex}")
    await consumer.start()
    sums: dict[tuple[str, int], int] = {}
    try:
        idle = 0
        while idle < 3:
            polled = await consumer.getmany(timeout_ms=1000)
            idle = 0 if polled else idle + 1
            for messages in polled.values():
                for m in messages:
                    table = decode_batch(m.value, m.headers, COMPLETENESS_SCHEMA, COMPLETENESS,
                                         with_additive_defaults)
                    for row in table.to_pylist():
                        if row[column]:
                            key = (row["stage"], row["observation_domain"])
                            sums[key] = sums.get(key, 0) + row[column]
    finally:
        await consumer.stop()
    return sums


def _sink_settings(bootstrap: str, prefix: str, path: Path, **extra: object) -> SinkSettings:
    return SinkSettings(kafka=KafkaSettings(bootstrap=bootstrap, topic_prefix=prefix),
                        clickhouse=ClickHouseSettings(path=path, database="flowtally"),
                        group_id=f"{prefix}-sink", retry_initial_s=0.2, retry_max_s=0.5,
                        metrics_listen="127.0.0.1:0", **({"group_max_wait_s": 1.0} | extra))  # type: ignore[arg-type]


def test_150_days_beside_a_valid_stream_never_stall_the_sink(kafka_bootstrap: str, tmp_path: Path) -> None:
    prefix = f"bc{uuid.uuid4().hex[:10]}"
    settings = _sink_settings(kafka_bootstrap, prefix, tmp_path / "chdb")
    admin = connect(settings.clickhouse)
    migrate(admin)
    now = int(time.time() * 1000)
    valid = [_enriched(now - 1000 - np.arange(2000) * 7, np.full(2000, 100 + i), seed=i) for i in range(24)]
    # 150 flows on 150 different days (a clock running up to five months ahead), in one message
    broken = _enriched(now + (1 + np.arange(150)) * DAY_MS, np.full(150, 7), seed=99)
    tables = [*valid[:12], broken, *valid[12:]]
    day_chunks = _sample("flowtally_sink_split_inserts_total", {"kind": "day"})
    partition_errors = _sample("flowtally_sink_insert_errors_total", {"reason": "TOO_MANY_PARTITIONS"})

    async def scenario() -> tuple[list[bool], float]:
        await kafka.ensure_topics(settings.kafka, settings.topics)
        worker = SinkWorker(settings)
        await worker.start()
        health: list[bool] = []
        try:
            producing = asyncio.create_task(_produce(settings.kafka, tables, pause_s=0.1))
            deadline = time.monotonic() + 45
            while await committed_total(settings.kafka, settings.group_id) < len(tables):
                assert time.monotonic() < deadline, "the sink stalled"
                health.append(worker.health()[0])
                await asyncio.sleep(0.2)
            await producing
            # while the sink runs: the totals are exact already
            took = time.monotonic() - (deadline - 45)
            return health, took
        finally:
            await worker.stop()

    try:
        health, took = asyncio.run(scenario())
        assert all(health), "the sink reported unhealthy while splitting"
        rows = 24 * 2000 + 150
        total_bytes = sum(int(pa.compute.sum(t["bytes"]).as_py()) for t in tables)
        for table, sql in (("flows", "SELECT count(), sum(bytes) FROM flows"),
                           ("flows_1m", "SELECT sum(flows), sum(bytes) FROM flows_1m"),
                           ("flows_1h", "SELECT sum(flows), sum(bytes) FROM flows_1h"),
                           ("flows_1d", "SELECT sum(flows), sum(bytes) FROM flows_1d")):
            assert tuple(int(v) for v in admin.query(sql).result_rows[0]) == (rows, total_bytes), table
        # the broken clock's flows are stored as sent, one on each of 150 days
        assert admin.query("SELECT uniqExact(toYYYYMMDD(flow_end)), count() FROM flows "
                           "WHERE flow_end > now64(3) + INTERVAL 12 HOUR").result_rows == [(150, 150)]
        assert _sample("flowtally_sink_split_inserts_total", {"kind": "day"}) - day_chunks == 2
        # planned, not discovered: no insert was even tried across more than 100 partitions
        assert _sample("flowtally_sink_insert_errors_total", {"reason": "TOO_MANY_PARTITIONS"}) == partition_errors
        print(f"150-day message beside 24 valid ones: all {rows} rows stored in {took:.1f}s")
    finally:
        admin.close()


def test_a_split_group_replayed_after_a_crash_mid_split_lands_once(kafka_bootstrap: str, tmp_path: Path) -> None:
    """The crash state "recorded, first day chunk inserted, not committed" (reproduced with the
    sink stopped): the restarted sink re-forms the recorded group, plans the same chunks with the
    same tokens, so the landed chunk is a no-op and the other one lands; every row once."""
    prefix = f"bx{uuid.uuid4().hex[:10]}"
    settings = _sink_settings(kafka_bootstrap, prefix, tmp_path / "chdb")
    admin = connect(settings.clickhouse)
    migrate(admin)
    now = int(time.time() * 1000)
    tables = [_enriched(now - 1000 - np.arange(3000), np.full(3000, 5), seed=1),
              _enriched(now - (1 + np.arange(150)) * DAY_MS, np.full(150, 7), seed=2),  # 150 days back
              _enriched(now - 1000 - np.arange(3000), np.full(3000, 9), seed=3)]
    reformed = _sample("flowtally_sink_groups_total", {"kind": "reformed"})

    async def produce() -> list[tuple[int, int]]:
        await kafka.ensure_topics(settings.kafka, settings.topics)
        producer = kafka.producer(settings.kafka)
        await producer.start()
        try:
            placed = []
            for i, table in enumerate(tables):
                value, headers = encode_batch(table, ENRICHED)
                meta = await producer.send_and_wait(settings.kafka.topic("enriched"), value, key=b"k",
                                                    headers=[*headers, (ORIGIN_HEADER, f"raw/0/{i}".encode())])
                placed.append((meta.partition, meta.offset))
            return placed
        finally:
            await producer.stop()

    async def run_sink() -> None:
        worker = SinkWorker(settings)
        await worker.start()
        try:
            deadline = time.monotonic() + 30
            while await committed_total(settings.kafka, settings.group_id) < len(tables):
                assert time.monotonic() < deadline, "the sink did not finish the group"
                await asyncio.sleep(0.2)
        finally:
            await worker.stop()

    try:
        placed = asyncio.run(produce())
        assert {p for p, _ in placed} == {placed[0][0]} and [o for _, o in placed] == [0, 1, 2]
        topic = settings.kafka.topic("enriched")
        # what the crashed sink had done: the intent, then the first day chunk of the group
        token = "crashed-mid-split"
        record_intent(admin, Intent(topic, placed[0][0], 0, 2, token, ("raw/0/0", "raw/0/1", "raw/0/2")))
        group = pa.concat_tables([flow_rows(t) for t in tables]).combine_chunks()
        chunks = split.plan_chunks(token, [(i, t.num_rows) for i, t in enumerate(tables)],
                                   split.day_numbers(group.column("flow_end")), 100)
        assert [c.token for c in chunks] == [f"{token}/d0", f"{token}/d1"]
        assert chunks[0].indices is not None
        Writer(admin, "flows", 100).insert(group.take(pa.array(chunks[0].indices)), chunks[0].token)
        assert admin.query("SELECT count() FROM flows").result_rows == [(100,)]  # days 150..51 back
        asyncio.run(run_sink())
        expected = (6150, 3000 * 5 + 150 * 7 + 3000 * 9)
        for table, sql in (("flows", "SELECT count(), sum(bytes) FROM flows"),
                           ("flows_1d", "SELECT sum(flows), sum(bytes) FROM flows_1d"),
                           ("flows_1h", "SELECT sum(flows), sum(bytes) FROM flows_1h")):
            assert tuple(int(v) for v in admin.query(sql).result_rows[0]) == expected, table
        assert _sample("flowtally_sink_groups_total", {"kind": "reformed"}) - reformed == 1
    finally:
        admin.close()


def test_a_group_loses_only_the_rows_clickhouse_refuses(kafka_bootstrap: str, tmp_path: Path) -> None:
    prefix = f"bq{uuid.uuid4().hex[:10]}"
    settings = _sink_settings(kafka_bootstrap, prefix, tmp_path / "chdb", split_min_rows=1, split_max_depth=11)
    admin = connect(settings.clickhouse)
    migrate(admin)
    # A rule the data must satisfy: rows breaking it are refused by ClickHouse on every try.
    admin.command("ALTER TABLE flows ADD CONSTRAINT sane_bytes CHECK bytes < 1000000000000")
    now = int(time.time() * 1000)
    good = [_enriched(now - 1000 - np.arange(2000), np.full(2000, 10 + i), seed=i) for i in range(4)]
    poisoned_bytes = np.full(2000, 50, dtype=np.uint64)
    bad_rows = [3, 1500, 1501]
    poisoned_bytes[bad_rows] = 10**13
    poisoned = _enriched(now - 1000 - np.arange(2000), poisoned_bytes, seed=7)
    tables = [good[0], good[1], poisoned, good[2], good[3]]
    dlq_rows = _sample("flowtally_sink_dlq_rows_total", {"reason": "VIOLATED_CONSTRAINT"})
    partial = _sample("flowtally_sink_messages_total", {"outcome": "partial_dlq_VIOLATED_CONSTRAINT"})
    messages = _sample("flowtally_sink_split_inserts_total", {"kind": "message"})

    async def scenario() -> list[tuple[bytes, dict]]:
        await kafka.ensure_topics(settings.kafka, settings.topics)
        await _produce(settings.kafka, tables)  # one group: produced well within the wait
        worker = SinkWorker(settings)
        await worker.start()
        try:
            deadline = time.monotonic() + 45
            while await committed_total(settings.kafka, settings.group_id) < len(tables):
                assert time.monotonic() < deadline, "the sink stalled"
                await asyncio.sleep(0.2)
            assert worker.health()[0]
        finally:
            await worker.stop()
        return await _read_dlq(settings.kafka, f"{prefix}-dlq", 1, timeout=10)

    try:
        dlq = asyncio.run(scenario())
        expected_rows = 5 * 2000 - 3
        expected_bytes = sum(int(pa.compute.sum(t["bytes"]).as_py()) for t in tables) - 3 * 10**13
        for table, sql in (("flows", "SELECT count(), sum(bytes) FROM flows"),
                           ("flows_1m", "SELECT sum(flows), sum(bytes) FROM flows_1m"),
                           ("flows_1h", "SELECT sum(flows), sum(bytes) FROM flows_1h")):
            got = tuple(int(v) for v in admin.query(sql).result_rows[0])
            assert got == (expected_rows, expected_bytes), table
    finally:
        admin.close()
    assert _sample("flowtally_sink_dlq_rows_total", {"reason": "VIOLATED_CONSTRAINT"}) - dlq_rows == 3
    assert _sample("flowtally_sink_messages_total", {"outcome": "partial_dlq_VIOLATED_CONSTRAINT"}) - partial == 1
    assert _sample("flowtally_sink_split_inserts_total", {"kind": "message"}) - messages == 5
    assert len(dlq) == 1
    value, headers = dlq[0]
    assert headers[ORIGIN_HEADER] == b"raw/0/2"
    assert headers["flowtally-stage"] == b"sink"
    assert headers["flowtally-dlq-rows"] == b"3"
    assert headers["flowtally-error"].startswith(b"clickhouse-rejected VIOLATED_CONSTRAINT")
    parked = decode_batch(value, list(headers.items()), ENRICHED_SCHEMA, ENRICHED)
    expected = poisoned.take(pa.array(bad_rows))
    assert parked.num_rows == 3
    for name in ("bytes", "src_addr", "end"):
        assert parked[name].to_pylist() == expected[name].to_pylist(), name


def test_rows_a_view_refuses_are_parked_whole_never_stored_twice(kafka_bootstrap: str, tmp_path: Path) -> None:
    """A rejection raised inside a materialized view is not atomic: ClickHouse has written the
    insert into ``flows`` already. Splitting it under new tokens would store rows twice, so the
    insert's messages are parked whole (marked as stored), and the sink carries on."""
    prefix = f"bv{uuid.uuid4().hex[:10]}"
    settings = _sink_settings(kafka_bootstrap, prefix, tmp_path / "chdb", group_max_wait_s=3.0)
    admin = connect(settings.clickhouse)
    migrate(admin)
    # An operator's own view over flows that refuses a value (e.g. a sanity check on a rollup).
    admin.command("CREATE TABLE audit (x UInt8) ENGINE = MergeTree ORDER BY x")
    admin.command("CREATE MATERIALIZED VIEW audit_mv TO audit AS SELECT throwIf(bytes = 666, 'bad') AS x FROM flows")
    now = int(time.time() * 1000)
    first = [_enriched(now - 1000 - np.arange(500), np.full(500, 10 + i), seed=i) for i in range(3)]
    poisoned_bytes = np.full(500, 20, dtype=np.uint64)
    poisoned_bytes[42] = 666
    first[1] = _enriched(now - 1000 - np.arange(500), poisoned_bytes, seed=1)
    later = _enriched(now - 1000 - np.arange(500), np.full(500, 30), seed=9)

    async def scenario() -> list[tuple[bytes, dict]]:
        await kafka.ensure_topics(settings.kafka, settings.topics)
        await _produce(settings.kafka, first)  # one group
        worker = SinkWorker(settings)
        await worker.start()
        try:
            deadline = time.monotonic() + 30
            while await committed_total(settings.kafka, settings.group_id) < 3:
                assert time.monotonic() < deadline, "the sink stalled"
                await asyncio.sleep(0.2)
            producer = kafka.producer(settings.kafka)  # a later group lands normally
            await producer.start()
            value, headers = encode_batch(later, ENRICHED)
            await producer.send_and_wait(settings.kafka.topic("enriched"), value, key=b"k",
                                         headers=[*headers, (ORIGIN_HEADER, b"raw/0/3")])
            await producer.stop()
            while await committed_total(settings.kafka, settings.group_id) < 4:
                assert time.monotonic() < deadline, "the sink stalled"
                await asyncio.sleep(0.2)
            assert worker.health()[0]
        finally:
            await worker.stop()
        return await _read_dlq(settings.kafka, f"{prefix}-dlq", 3, timeout=10)

    try:
        dlq = asyncio.run(scenario())
        # every row once in flows: the refused insert's (stored before the view refused it) and the later one
        assert admin.query("SELECT count(), countIf(bytes = 666) FROM flows").result_rows == [(2000, 1)]
    finally:
        admin.close()
    assert sorted(h[ORIGIN_HEADER] for _, h in dlq) == [b"raw/0/0", b"raw/0/1", b"raw/0/2"]
    for value, headers in dlq:
        assert value == encode_batch(first[int(headers[ORIGIN_HEADER][-1:])], ENRICHED)[0]  # parked whole
        assert headers["flowtally-error"].startswith(
            b"clickhouse-rejected FUNCTION_THROW_IF_VALUE_IS_NON_ZERO_IN_VIEW: stored in the table")
        assert headers["flowtally-dlq-rows"] == b"500"
    assert _sample("flowtally_sink_dlq_rows_total", {"reason": "FUNCTION_THROW_IF_VALUE_IS_NON_ZERO_IN_VIEW"}) >= 1500


@pytest.mark.parametrize("policy", ["clamp", "dlq"])
def test_broken_exporter_clock_through_the_pipeline(kafka_bootstrap: str, tmp_path: Path, policy: str) -> None:
    """IPFIX end to end: a valid exporter beside one whose 150 flows end on 150 different days
    (its clock weeks to months behind). The enricher clamps them to their receive time (default
    ``implausible_time: clamp``) or sends them to the DLQ as received (``dlq``), so the sink never
    sees 150 partitions; totals are exact in ClickHouse while everything runs, and the flows with
    an implausible time are counted (metric, completeness rows)."""
    prefix = f"bp{uuid.uuid4().hex[:10]}"
    settings = _sink_settings(kafka_bootstrap, prefix, tmp_path / "chdb")
    admin = connect(settings.clickhouse)
    migrate(admin)
    cluster = synthetic_cluster(5)
    now = int(time.time() * 1000)
    valid = synthetic_flows(cluster, 12_000, seed=5, start_ms=now - 4000, span_ms=2000)
    broken = synthetic_flows(cluster, 150, seed=6, start_ms=now - 4000, span_ms=2000)
    broken["end"] = now - (2 + np.arange(150, dtype=np.int64)) * DAY_MS  # 150 different days, all > 1 day old
    broken["start"] = broken["end"] - 30_000
    datagrams = [
        *encode_ipfix_packets(valid, domain=1, sequence=0, export_secs=now // 1000).packets,
        *encode_ipfix_packets(broken, domain=7, sequence=0, export_secs=now // 1000).packets,
    ]
    rows = 12_000 + (150 if policy == "clamp" else 0)
    total_bytes = int(valid["bytes"].sum()) + (int(broken["bytes"].sum()) if policy == "clamp" else 0)
    netflow_port = free_port(socket.SOCK_DGRAM)
    env = {"FLOWTALLY_KAFKA_BOOTSTRAP": kafka_bootstrap, "FLOWTALLY_KAFKA_TOPIC_PREFIX": prefix,
           "FLOWTALLY_IMPLAUSIBLE_TIME": policy}
    stages = []
    for name, argv, extra in (
        ("enricher", ["enrich"], {"FLOWTALLY_APP_ID": f"{prefix}-enricher", "FLOWTALLY_SESSION_TIMEOUT_S": "6",
                                  "FLOWTALLY_DATA_DIR": str(tmp_path / "faust")}),
        ("sensor", ["sensor", "netflow", "--listen", f"127.0.0.1:{netflow_port}"], {}),
    ):
        port = free_port()
        stages.append(Stage(name, [*argv, "--metrics-listen", f"127.0.0.1:{port}"], env | extra,
                            tmp_path / f"{name}.log", port))
    enricher, sensor = stages
    day_chunks = _sample("flowtally_sink_split_inserts_total", {"kind": "day"})

    async def scenario() -> tuple[int, int, float, float, list[tuple[bytes, dict]]]:
        await kafka.ensure_topics(settings.kafka, settings.topics)
        worker = SinkWorker(settings)
        await worker.start()
        try:
            for stage in stages:
                stage.start()
            for stage in stages:
                await asyncio.to_thread(stage.wait_healthy, 90)
            sent_at = time.monotonic()
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                for i, datagram in enumerate(datagrams):
                    udp.sendto(datagram, ("127.0.0.1", netflow_port))
                    if i % 20 == 19:
                        await asyncio.sleep(0.002)  # paced: no kernel drops on a busy machine
            deadline = time.monotonic() + 60
            stored: tuple[int, int] = (0, 0)
            while stored[0] < rows:
                assert time.monotonic() < deadline, f"stored {stored} of {rows} rows"
                for stage in stages:
                    stage.check_alive()
                assert worker.health()[0]
                await asyncio.sleep(0.3)
                result = await asyncio.to_thread(admin.query, "SELECT count(), sum(bytes) FROM flows")
                stored = tuple(int(v) for v in result.result_rows[0])  # type: ignore[assignment]
            took = time.monotonic() - sent_at
            await asyncio.sleep(1.0)  # nothing more arrives: an excess would show now
            result = await asyncio.to_thread(admin.query, "SELECT count(), sum(bytes) FROM flows")
            count, nbytes = (int(v) for v in result.result_rows[0])
            metric = await asyncio.to_thread(enricher.metric, "flowtally_enricher_flows_implausible_time_total",
                                             {"action": policy})
            # clamp: nothing reaches the DLQ (a few seconds' wait would show it)
            dlq = await _read_dlq(settings.kafka, f"{prefix}-dlq", 1, timeout=10 if policy == "dlq" else 3)
            return count, nbytes, took, metric, dlq
        finally:
            for stage in reversed(stages):
                stage.stop()
            await worker.stop()

    try:
        count, nbytes, took, implausible_metric, dlq = asyncio.run(scenario())
        assert (count, nbytes) == (rows, total_bytes)  # exact, read while the pipeline ran
        for table, sql in (("flows_1m", "SELECT sum(flows), sum(bytes) FROM flows_1m"),
                           ("flows_1h", "SELECT sum(flows), sum(bytes) FROM flows_1h")):
            assert tuple(int(v) for v in admin.query(sql).result_rows[0]) == (rows, total_bytes), table
        # the broken exporter's flows: clamped to their receive time, its flows' duration kept
        clamped = admin.query(
            "SELECT count(), countIf(flow_end = time_received), countIf(flow_end - flow_start = 30), "
            "uniqExact(toYYYYMMDD(flow_end)) FROM flows WHERE observation_domain = 7").result_rows[0]
        if policy == "clamp":
            assert clamped[:3] == (150, 150, 150)
            assert clamped[3] <= 2  # the receive day (two only if the run straddles midnight)
        else:
            assert clamped[0] == 0
        assert _sample("flowtally_sink_split_inserts_total", {"kind": "day"}) == day_chunks  # nothing to split
        print(f"IPFIX, {policy}: {rows} flows stored exactly {took:.1f}s after sending")
    finally:
        admin.close()
    assert implausible_metric == 150
    if policy == "dlq":  # the 150 flows as received, one message, with the reason
        assert len(dlq) == 1
        value, headers = dlq[0]
        assert headers["flowtally-error"] == b"implausible-time" and headers["flowtally-stage"] == b"enricher"
        assert headers["flowtally-dlq-rows"] == b"150"
        parked = decode_batch(value, list(headers.items()), RAW_SCHEMA, RAW)
        assert sorted(parked["end"].cast(pa.int64()).to_pylist()) == sorted(broken["end"].tolist())
        assert int(pa.compute.sum(parked["bytes"]).as_py()) == int(broken["bytes"].sum())
    else:
        assert dlq == []
    assert enricher.stop() == 0 and sensor.stop() == 0
    # the enricher's completeness rows (all published at its shutdown) count them per exporter domain
    implausible = asyncio.run(_completeness_sum(settings.kafka, "implausible_time"))
    assert implausible == {("enricher", 7): 150}
