"""The sink when ClickHouse fails: unavailable for a while (retry, no commit, nothing lost or
doubled) and rejecting a batch as invalid (DLQ with the reason, counted, the sink moves on).

chDB runs inside the sink's process, so it cannot be stopped from outside; the outage here is a
real ClickHouse failure instead: the ``flows`` table is renamed away (UNKNOWN_TABLE on every
insert) while a real SinkWorker consumes from the real Kafka, then renamed back.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa

from enricher.enrich import enrich_batch
from enricher.identity import IdentityIndex
from enricher.schema import SCHEMA_NAME as ENRICHED
from flowtally import kafka
from flowtally.clickhouse import connect
from flowtally.dev.localstack import Stage, free_port
from flowtally.settings import ClickHouseSettings, KafkaSettings
from flowtally.wire import ORIGIN_HEADER, encode_batch
from sensors.schema import build_raw_table, ipv4_to_mapped
from sink.service import SinkWorker
from sink.settings import SinkSettings
from sql.migrate import migrate
from tests.fixtures.kafka import committed_total


def _enriched(n: int, nbytes: int, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    now = int(time.time() * 1000)
    raw = build_raw_table({
        "src_addr": ipv4_to_mapped(rng.integers(0x0AF40000, 0x0AF40100, n).astype(np.uint32)),
        "dst_addr": ipv4_to_mapped(np.full(n, 0x510245A0, dtype=np.uint32)),
        "bytes": np.full(n, nbytes), "packets": np.ones(n), "end": np.full(n, now - 1000),
    })
    return enrich_batch(raw, IdentityIndex(()))


async def _produce(settings: KafkaSettings, tables: list[pa.Table | bytes]) -> None:
    """One message per table (bytes: a message that is not a batch, with the enriched header)."""
    producer = kafka.producer(settings)
    await producer.start()
    try:
        for i, table in enumerate(tables):
            if isinstance(table, bytes):
                value, headers = table, [("flowtally-schema", ENRICHED.encode())]
            else:
                value, headers = encode_batch(table, ENRICHED)
            headers.append((ORIGIN_HEADER, f"raw/0/{i}".encode()))
            await producer.send_and_wait(settings.topic("enriched"), value, key=b"k", headers=headers)
    finally:
        await producer.stop()


def test_clickhouse_unavailable_for_a_while_loses_nothing(kafka_bootstrap: str, tmp_path: Path) -> None:
    prefix = f"un{uuid.uuid4().hex[:10]}"
    ch = ClickHouseSettings(path=tmp_path / "chdb", database="flowtally")
    settings = SinkSettings(kafka=KafkaSettings(bootstrap=kafka_bootstrap, topic_prefix=prefix), clickhouse=ch,
                            group_id=f"{prefix}-sink", retry_initial_s=0.2, retry_max_s=0.5,
                            metrics_listen="127.0.0.1:0")
    admin_client = connect(ch)
    migrate(admin_client)
    admin_client.command("RENAME TABLE flows TO flows_away")  # ClickHouse "down" for the sink
    tables = [_enriched(500, 10 + i, seed=i) for i in range(12)]

    async def scenario() -> tuple[int, int]:
        await kafka.ensure_topics(settings.kafka, settings.topics)
        await _produce(settings.kafka, tables)
        worker = SinkWorker(settings)
        await worker.start()
        try:
            await asyncio.sleep(4.0)  # inserts fail and are retried meanwhile
            committed_during_outage = await committed_total(settings.kafka, settings.group_id)
            healthy, _ = worker.health()
            assert healthy  # failing for less than unhealthy_after_s
            await asyncio.to_thread(admin_client.command, "RENAME TABLE flows_away TO flows")
            deadline = time.monotonic() + 30
            while await committed_total(settings.kafka, settings.group_id) < len(tables):
                assert time.monotonic() < deadline, "the sink did not recover"
                await asyncio.sleep(0.5)
            return committed_during_outage, await committed_total(settings.kafka, settings.group_id)
        finally:
            await worker.stop()

    try:
        during, after = asyncio.run(scenario())
        assert during == 0  # nothing committed while ClickHouse was unavailable
        assert after == len(tables)
        expected = (sum(t.num_rows for t in tables), sum(int(pa.compute.sum(t["bytes"]).as_py()) for t in tables))
        for table, sql in (("flows", "SELECT count(), sum(bytes) FROM flows"),
                           ("flows_1m", "SELECT sum(flows), sum(bytes) FROM flows_1m"),
                           ("flows_1h", "SELECT sum(flows), sum(bytes) FROM flows_1h")):
            got = tuple(int(v) for v in admin_client.query(sql).result_rows[0])
            assert got == expected, table
    finally:
        admin_client.close()


def test_a_batch_clickhouse_rejects_goes_to_the_dlq_and_the_sink_moves_on(kafka_bootstrap: str, tmp_path: Path) -> None:
    prefix = f"rj{uuid.uuid4().hex[:10]}"
    settings = KafkaSettings(bootstrap=kafka_bootstrap, topic_prefix=prefix)
    client = connect(ClickHouseSettings(path=tmp_path / "chdb", database="flowtally"))
    try:
        migrate(client)
        # A rule the data must satisfy: a batch breaking it is invalid for ClickHouse, not "down".
        client.command("ALTER TABLE flows ADD CONSTRAINT sane_bytes CHECK bytes < 1000000000000")
    finally:
        client.close()
    good = [_enriched(300, 100, seed=1), _enriched(300, 200, seed=2)]
    bad = _enriched(5, 10**13, seed=3)
    port = free_port()
    # The four messages form one insert group (produced well within the wait): the group is
    # rejected, then its messages are inserted one by one and only the bad one is rejected.
    sink = Stage("sink", ["sink", "--metrics-listen", f"127.0.0.1:{port}"],
                 {"FLOWTALLY_KAFKA_BOOTSTRAP": kafka_bootstrap, "FLOWTALLY_KAFKA_TOPIC_PREFIX": prefix,
                  "FLOWTALLY_CLICKHOUSE_PATH": str(tmp_path / "chdb"), "FLOWTALLY_GROUP_ID": f"{prefix}-sink",
                  "FLOWTALLY_GROUP_MAX_WAIT_S": "5"},
                 tmp_path / "sink.log", port)
    sink.start()

    async def produce_and_read_dlq() -> list[tuple[bytes, dict[str, bytes]]]:
        # a message that is not a batch, right after a rejected one, reaches the DLQ too
        await _produce(settings, [good[0], bad, b"not an arrow stream", good[1]])
        consumer = kafka.consumer(settings, settings.topic("dlq"), group_id=f"{prefix}-dlq-reader")
        await consumer.start()
        got: list[tuple[bytes, dict[str, bytes]]] = []
        try:
            deadline = time.monotonic() + 40
            while len(got) < 2 and time.monotonic() < deadline:
                for messages in (await consumer.getmany(timeout_ms=1000)).values():
                    got += [(m.value, dict(m.headers)) for m in messages]
        finally:
            await consumer.stop()
        return got

    try:
        sink.wait_healthy(60)
        dlq = asyncio.run(produce_and_read_dlq())
        deadline = time.monotonic() + 30
        while sink.metric("flowtally_sink_rows_inserted_total") < 600 and time.monotonic() < deadline:
            time.sleep(0.3)
        assert sink.metric("flowtally_sink_rows_inserted_total") == 600
        assert sink.metric("flowtally_sink_messages_total", {"outcome": "dlq_VIOLATED_CONSTRAINT"}) == 1
        # the group's insert, then the bad message's own
        assert sink.metric("flowtally_sink_insert_errors_total", {"reason": "VIOLATED_CONSTRAINT"}) == 2
        assert sink.metric("flowtally_sink_groups_total", {"kind": "new"}) == 1
        assert sink.metric("flowtally_sink_messages_total", {"outcome": "dlq_not-arrow"}) == 1
        assert asyncio.run(committed_total(settings, f"{prefix}-sink")) == 4
    finally:
        assert sink.stop() == 0
    assert len(dlq) == 2
    by_origin = {headers[ORIGIN_HEADER]: (value, headers) for value, headers in dlq}
    assert by_origin[b"raw/0/2"][0] == b"not an arrow stream"
    value, headers = by_origin[b"raw/0/1"]
    assert value == encode_batch(bad, ENRICHED)[0]
    assert headers["flowtally-stage"] == b"sink"
    assert headers["flowtally-error"].startswith(b"clickhouse-rejected VIOLATED_CONSTRAINT")
    assert headers[ORIGIN_HEADER] == b"raw/0/1"
    client = connect(ClickHouseSettings(path=tmp_path / "chdb", database="flowtally"))
    try:
        assert client.query("SELECT count(), sum(bytes) FROM flows").result_rows[0] == (600, 300 * 100 + 300 * 200)
    finally:
        client.close()
