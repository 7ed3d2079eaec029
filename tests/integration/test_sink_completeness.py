"""The sink's completeness consumer with the real Kafka and chDB: sensor-style (current and older
writers) and enricher-style completeness batches land in ``completeness`` with exact sums, an
undecodable message goes to the DLQ counted, and a replay of every message adds nothing."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
from clickhouse_connect.driver.client import Client

from enricher.enrich import enrich_batch
from enricher.identity import IdentityIndex
from enricher.schema import SCHEMA_NAME as ENRICHED
from flowtally import kafka
from flowtally.clickhouse import connect
from flowtally.dev.localstack import Stage, free_port
from flowtally.settings import ClickHouseSettings, KafkaSettings
from flowtally.wire import ORIGIN_HEADER, encode_batch
from sensors.completeness import (
    ADDITIVE_COUNTERS,
    ALL_COUNTERS,
    SCHEMA_NAME,
    CompletenessAccumulator,
)
from sensors.schema import address16, build_raw_table
from sink.completeness import METRICS, CompletenessWorker
from sink.settings import SinkSettings
from sql.migrate import migrate
from tests.fixtures.kafka import committed_total

MINUTE = 60_000
T0 = 1_790_000_040_000  # a whole UTC minute (2026-09-21)
EXPORTER_A, EXPORTER_B = address16("192.0.2.1"), address16("2001:db8::7")


def _sensor_batch() -> tuple[pa.Table, dict[tuple[str, int], dict[str, int]]]:
    """A sensor's minute: two exporters, two minutes, kernel drops; and the expected sums."""
    acc = CompletenessAccumulator(observer="node-1", stage="sensor-netflow")
    expected: dict[tuple[str, int], dict[str, int]] = {}
    for minute, exporter, domain, packets, records, nbytes, lost in (
        (T0, EXPORTER_A, 0, 10, 300, 14_000, 2),
        (T0, EXPORTER_B, 5, 7, 91, 9_100, 0),
        (T0 + MINUTE, EXPORTER_A, 0, 12, 360, 16_800, 1),
    ):
        c = acc.counts(minute + 17, exporter, domain)
        c.packets, c.records, c.bytes, c.sequence_lost = packets, records, nbytes, lost
        c.decode_errors = 1
        row = expected.setdefault(("sensor-netflow", minute), dict.fromkeys(ALL_COUNTERS, 0))
        for name, value in zip(("packets", "records", "bytes", "sequence_lost", "decode_errors"),
                               (packets, records, nbytes, lost, 1), strict=True):
            row[name] += value
    acc.add_kernel_drops(T0 + 5, 4)
    expected[("sensor-netflow", T0)]["kernel_drops"] += 4
    return acc.take(), expected


def _older_sensor_batch() -> tuple[pa.Table, dict[tuple[str, int], dict[str, int]]]:
    """The same minute from a sensor that predates the stage column and enricher counters."""
    acc = CompletenessAccumulator(observer="node-2")
    c = acc.counts(T0, EXPORTER_A, 3)
    c.packets, c.records, c.bytes, c.dropped_backpressure = 3, 33, 3_300, 8
    table = acc.take()
    old = table.select([n for n in table.column_names if n != "stage" and n not in ADDITIVE_COUNTERS])
    row = dict.fromkeys(ALL_COUNTERS, 0) | {"packets": 3, "records": 33, "bytes": 3_300, "dropped_backpressure": 8}
    return old, {("sensor-netflow", T0): row}


def _enricher_batch() -> tuple[pa.Table, dict[tuple[str, int], dict[str, int]]]:
    acc = CompletenessAccumulator(observer="enricher-0", stage="enricher")
    c = acc.counts(T0, EXPORTER_A, 0)
    c.records, c.unknown_addresses, c.ignored, c.late, c.duplicates_dropped = 660, 12, 3, 2, 40
    c2 = acc.counts(T0 + MINUTE, EXPORTER_B, 5)
    c2.records, c2.unknown_addresses = 91, 91
    expected = {
        ("enricher", T0): dict.fromkeys(ALL_COUNTERS, 0) | {
            "records": 660, "unknown_addresses": 12, "ignored": 3, "late": 2, "duplicates_dropped": 40},
        ("enricher", T0 + MINUTE): dict.fromkeys(ALL_COUNTERS, 0) | {"records": 91, "unknown_addresses": 91},
    }
    return acc.take(), expected


def _merge(*parts: dict[tuple[str, int], dict[str, int]]) -> dict[tuple[str, int], dict[str, int]]:
    total: dict[tuple[str, int], dict[str, int]] = {}
    for part in parts:
        for key, row in part.items():
            into = total.setdefault(key, dict.fromkeys(ALL_COUNTERS, 0))
            for name, value in row.items():
                into[name] += value
    return total


def _stored(client: Client) -> dict[tuple[str, int], dict[str, int]]:
    sums = ", ".join(f"sum({n})" for n in ALL_COUNTERS)
    rows = client.query(
        f"SELECT stage, toUnixTimestamp(minute) * 1000, {sums} FROM completeness GROUP BY 1, 2").result_rows
    return {(r[0], int(r[1])): dict(zip(ALL_COUNTERS, map(int, r[2:]), strict=True)) for r in rows}


async def _publish(settings: KafkaSettings, values: list[tuple[bytes, list[tuple[str, bytes]]]]) -> None:
    producer = kafka.producer(settings)
    await producer.start()
    try:
        for value, headers in values:
            await producer.send_and_wait(settings.topic("completeness"), value, key=b"node", headers=headers)
    finally:
        await producer.stop()


async def _consume_all(settings: SinkSettings, until: int, timeout: float = 30.0) -> None:
    """Run a CompletenessWorker until its group has committed ``until`` offsets."""
    worker = CompletenessWorker(settings)
    await worker.start()
    try:
        deadline = time.monotonic() + timeout
        while await committed_total(settings.kafka, f"{settings.group_id}-completeness") < until:
            assert time.monotonic() < deadline, "the completeness consumer did not commit every message"
            await asyncio.sleep(0.3)
        assert worker.health() == (True, "ok")
    finally:
        await worker.stop()


def _dlq_messages(settings: KafkaSettings, group: str, want: int) -> list[dict[str, bytes]]:
    async def read() -> list[dict[str, bytes]]:
        consumer = kafka.consumer(settings, settings.topic("dlq"), group_id=group)
        await consumer.start()
        got: list[dict[str, bytes]] = []
        try:
            deadline = time.monotonic() + 20
            while len(got) < want and time.monotonic() < deadline:
                for messages in (await consumer.getmany(timeout_ms=500)).values():
                    got += [dict(m.headers) for m in messages]
        finally:
            await consumer.stop()
        return got
    return asyncio.run(read())


def test_completeness_sums_exact_dlq_counted_and_replay_counted_once(kafka_bootstrap: str, tmp_path: Path) -> None:
    prefix = f"cm{uuid.uuid4().hex[:10]}"
    ch = ClickHouseSettings(path=tmp_path / "chdb", database="flowtally")
    settings = SinkSettings(kafka=KafkaSettings(bootstrap=kafka_bootstrap, topic_prefix=prefix), clickhouse=ch,
                            group_id=f"{prefix}-sink", metrics_listen="127.0.0.1:0")
    sensor, want_sensor = _sensor_batch()
    older, want_older = _older_sensor_batch()
    enricher, want_enricher = _enricher_batch()
    garbage = (b"not arrow at all", [("flowtally-schema", SCHEMA_NAME.encode())])
    messages = [encode_batch(sensor, SCHEMA_NAME), garbage, encode_batch(older, SCHEMA_NAME),
                encode_batch(enricher, SCHEMA_NAME)]
    expected = _merge(want_sensor, want_older, want_enricher)
    # The sources' own totals, independent of the accumulator's table: what the sum must be.
    assert expected[("sensor-netflow", T0)]["packets"] == 10 + 7 + 3
    assert expected[("sensor-netflow", T0)]["kernel_drops"] == 4

    client = connect(ch)
    try:
        migrate(client)
        dlq_before = METRICS.messages.labels("dlq_not-arrow")._value.get()
        inserted_before = METRICS.rows._value.get()

        async def first_run() -> None:
            await kafka.ensure_topics(settings.kafka, settings.topics)
            await _publish(settings.kafka, messages)
            await _consume_all(settings, until=len(messages))

        asyncio.run(first_run())
        assert _stored(client) == expected
        assert METRICS.messages.labels("dlq_not-arrow")._value.get() - dlq_before == 1
        assert METRICS.rows._value.get() - inserted_before == sensor.num_rows + older.num_rows + enricher.num_rows
        kernel = client.query("SELECT sum(kernel_drops) FROM completeness WHERE exporter = toIPv6('::')").result_rows
        assert kernel == [(4,)]  # the kernel's drops sit on the unknown exporter's row

        # A replay of every message (a consumer group that never committed: the sink crashed after
        # inserting, before committing) inserts nothing: the tokens are the messages' offsets.
        replay = settings.model_copy(update={"group_id": f"{prefix}-replay"})
        asyncio.run(_consume_all(replay, until=len(messages)))
        assert _stored(client) == expected
        assert METRICS.rows._value.get() - inserted_before == 2 * (sensor.num_rows + older.num_rows + enricher.num_rows)
        # ... and parked the garbage in the DLQ again (one record per consumer run), with the reason.
        dlq = _dlq_messages(settings.kafka, f"{prefix}-dlq-reader", want=2)
        assert len(dlq) == 2
        assert all(h["flowtally-error"].startswith(b"not-arrow") and h["flowtally-stage"] == b"sink" for h in dlq)
    finally:
        client.close()


def _enriched(n: int, nbytes: int) -> pa.Table:
    end = int(time.time() * 1000) - 1000
    raw = build_raw_table({"src_addr": np.tile(np.frombuffer(address16("10.1.2.3"), np.uint8), (n, 1)),
                           "dst_addr": np.tile(np.frombuffer(address16("8.8.8.8"), np.uint8), (n, 1)),
                           "bytes": np.full(n, nbytes), "packets": np.ones(n), "end": np.full(n, end)})
    return enrich_batch(raw, IdentityIndex(()))


def test_flowtally_sink_runs_the_completeness_consumer(kafka_bootstrap: str, tmp_path: Path) -> None:
    """The `flowtally sink` process consumes the completeness topic next to the flows topic: both
    feeds insert concurrently into the one embedded engine, each total exact."""
    prefix = f"cs{uuid.uuid4().hex[:10]}"
    settings = KafkaSettings(bootstrap=kafka_bootstrap, topic_prefix=prefix)
    sensor, one = _sensor_batch()
    rounds = 15
    want = {key: {name: value * rounds for name, value in row.items()} for key, row in one.items()}
    flows = [_enriched(2000, 10 + i) for i in range(rounds)]

    async def publish_both() -> None:
        producer = kafka.producer(settings)
        await producer.start()
        try:
            for i, table in enumerate(flows):
                value, headers = encode_batch(table, ENRICHED)
                headers.append((ORIGIN_HEADER, f"raw/0/{i}".encode()))
                await producer.send(settings.topic("enriched"), value, key=b"k", headers=headers)
                value, headers = encode_batch(sensor, SCHEMA_NAME)
                await producer.send(settings.topic("completeness"), value, key=b"node", headers=headers)
            await producer.flush()
        finally:
            await producer.stop()

    port = free_port()
    sink = Stage("sink", ["sink", "--metrics-listen", f"127.0.0.1:{port}"],
                 {"FLOWTALLY_KAFKA_BOOTSTRAP": kafka_bootstrap, "FLOWTALLY_KAFKA_TOPIC_PREFIX": prefix,
                  "FLOWTALLY_CLICKHOUSE_PATH": str(tmp_path / "chdb"), "FLOWTALLY_GROUP_ID": f"{prefix}-sink"},
                 tmp_path / "sink.log", port)
    sink.start()
    try:
        sink.wait_healthy(60)
        asyncio.run(publish_both())
        deadline = time.monotonic() + 60
        while (sink.metric("flowtally_sink_completeness_rows_inserted_total") < rounds * sensor.num_rows
               or sink.metric("flowtally_sink_rows_inserted_total") < rounds * 2000):
            assert time.monotonic() < deadline, sink.log_tail()
            time.sleep(0.3)
        assert sink.metric("flowtally_sink_completeness_rows_inserted_total") == rounds * sensor.num_rows
        assert sink.metric("flowtally_sink_rows_inserted_total") == rounds * 2000
    finally:
        assert sink.stop() == 0
    assert asyncio.run(committed_total(settings, f"{prefix}-sink-completeness")) == rounds
    client = connect(ClickHouseSettings(path=tmp_path / "chdb", database="flowtally"))
    try:
        assert _stored(client) == want
        assert client.query("SELECT count(), sum(bytes) FROM flows").result_rows == [
            (rounds * 2000, sum(2000 * (10 + i) for i in range(rounds)))]
    finally:
        client.close()
