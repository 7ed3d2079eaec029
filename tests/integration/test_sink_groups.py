"""Insert groups with the real Kafka and chDB (a real SinkWorker): a group replayed after a crash
is inserted once, whether it had landed or not, and messages the enricher re-emitted (same raw
origin, new offset) are dropped and counted — within a group, after a group, after a restart.

The crashes are reproduced as the state they leave behind, with the sink stopped:

* "inserted, not committed": the group's committed offset is moved back to its first offset;
* "intent recorded, not inserted": the intent is written to ``sink_groups`` and nothing else.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import pyarrow as pa
from aiokafka import AIOKafkaConsumer, TopicPartition
from prometheus_client import REGISTRY

from enricher.schema import SCHEMA_NAME as ENRICHED
from flowtally import kafka
from flowtally.clickhouse import connect
from flowtally.settings import ClickHouseSettings, KafkaSettings
from flowtally.wire import ORIGIN_HEADER, encode_batch
from sink.groups import Intent
from sink.service import SinkWorker, record_intent
from sink.settings import SinkSettings
from sql.migrate import migrate
from tests.fixtures.kafka import committed_total
from tests.integration.test_sink_failures import _enriched


def _metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def _produce(settings: KafkaSettings, messages: list[tuple[str, pa.Table]]) -> list[tuple[int, int]]:
    """One message per (origin, table), all with one key; their partitions and offsets."""
    producer = kafka.producer(settings)
    await producer.start()
    offsets = []
    try:
        for origin, table in messages:
            value, headers = encode_batch(table, ENRICHED)
            headers.append((ORIGIN_HEADER, origin.encode()))
            meta = await producer.send_and_wait(settings.topic("enriched"), value, key=b"exporter-1",
                                                headers=headers)
            offsets.append((meta.partition, meta.offset))
    finally:
        await producer.stop()
    return offsets


async def _sink_until(settings: SinkSettings, committed: int, timeout: float = 40.0) -> None:
    """Run a SinkWorker until the group has committed ``committed`` offsets in total."""
    worker = SinkWorker(settings)
    await worker.start()
    try:
        deadline = time.monotonic() + timeout
        while await committed_total(settings.kafka, settings.group_id) < committed:
            assert time.monotonic() < deadline, "the sink did not commit in time"
            await asyncio.sleep(0.3)
    finally:
        await worker.stop()


async def _commit(settings: SinkSettings, tp: TopicPartition, offset: int) -> None:
    """Set the (idle) group's committed offset, as a sink that died before committing left it."""
    consumer = AIOKafkaConsumer(**settings.kafka.client_kwargs(), group_id=settings.group_id,
                                enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign([tp])
        await consumer.commit({tp: offset})
    finally:
        await consumer.stop()


def test_a_replayed_group_lands_once_and_re_emitted_batches_are_dropped(kafka_bootstrap: str, tmp_path: Path) -> None:
    prefix = f"gr{uuid.uuid4().hex[:10]}"
    ch = ClickHouseSettings(path=tmp_path / "chdb", database="flowtally")
    # Everything produced before the sink starts arrives in one poll and makes one group.
    settings = SinkSettings(kafka=KafkaSettings(bootstrap=kafka_bootstrap, topic_prefix=prefix), clickhouse=ch,
                            group_id=f"{prefix}-sink", group_max_wait_s=1.0, metrics_listen="127.0.0.1:0")
    tables = [_enriched(400 + 100 * i, 10 + i, seed=i) for i in range(6)]
    admin = connect(ch)
    migrate(admin)

    def totals() -> dict[str, tuple[int, ...]]:
        return {table: tuple(int(v) for v in admin.query(sql).result_rows[0]) for table, sql in (
            ("flows", "SELECT count(), sum(bytes) FROM flows"),
            ("flows_1m", "SELECT sum(flows), sum(bytes) FROM flows_1m"),
            ("flows_1h", "SELECT sum(flows), sum(bytes) FROM flows_1h"),
            ("flows_1d", "SELECT sum(flows), sum(bytes) FROM flows_1d"),
        )}

    def expected(indexes: range) -> dict[str, tuple[int, ...]]:
        rows = sum(tables[i].num_rows for i in indexes)
        nbytes = sum(int(pa.compute.sum(tables[i]["bytes"]).as_py()) for i in indexes)
        return dict.fromkeys(("flows", "flows_1m", "flows_1h", "flows_1d"), (rows, nbytes))

    async def scenario() -> None:
        await kafka.ensure_topics(settings.kafka, settings.topics)
        duplicates = _metric("flowtally_sink_messages_total", outcome="duplicate")
        reformed = _metric("flowtally_sink_groups_total", kind="reformed")

        # 1. Four batches and a re-emit of the second inside the same group: one group [0, 4].
        placed = await _produce(settings.kafka, [(f"raw/0/{i}", tables[i]) for i in range(4)]
                                + [("raw/0/1", tables[1])])
        tp = TopicPartition(settings.kafka.topic("enriched"), placed[0][0])
        assert placed == [(tp.partition, offset) for offset in range(5)]
        await _sink_until(settings, 5)
        assert totals() == expected(range(4))
        assert _metric("flowtally_sink_messages_total", outcome="duplicate") - duplicates == 1
        groups = admin.query("SELECT first_offset, last_offset, token, origins FROM sink_groups").result_rows
        assert [(g[0], g[1], list(g[3])) for g in groups] == [(0, 4, [f"raw/0/{i}" for i in range(4)])]

        # 2. The sink died after that insert, before its commit: the replay re-forms [0, 4]
        #    with its token, ClickHouse drops it (in flows and in every view).
        await _commit(settings, tp, 0)
        await _sink_until(settings, 5)
        assert _metric("flowtally_sink_groups_total", kind="reformed") - reformed == 1
        assert totals() == expected(range(4))

        # 3. A sink recorded the intent of [5, 6] and died before inserting: the next one inserts
        #    exactly that group. Re-emits of batches from both groups follow (offsets 7, 8): the
        #    restarted sink knows their origins from sink_groups and drops them.
        placed = await _produce(settings.kafka, [("raw/0/4", tables[4]), ("raw/0/5", tables[5]),
                                                 ("raw/0/2", tables[2]), ("raw/0/5", tables[5])])
        assert placed == [(tp.partition, offset) for offset in range(5, 9)]
        record_intent(admin, Intent(tp.topic, tp.partition, 5, 6, "crashed-before-insert", ("raw/0/4", "raw/0/5")))
        duplicates = _metric("flowtally_sink_messages_total", outcome="duplicate")
        await _sink_until(settings, 9)
        assert _metric("flowtally_sink_groups_total", kind="reformed") - reformed == 2
        assert _metric("flowtally_sink_messages_total", outcome="duplicate") - duplicates == 2
        assert totals() == expected(range(6))
        tokens = [r[0] for r in admin.query("SELECT token FROM sink_groups ORDER BY first_offset").result_rows]
        assert tokens[1] == "crashed-before-insert" and len(tokens) == 2  # no group for [7, 8]: nothing to insert

    try:
        asyncio.run(scenario())
    finally:
        admin.close()
