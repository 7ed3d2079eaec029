"""`flowtally sink`: consume enriched batches, insert them into ClickHouse, then commit.

Order per poll (the exact-totals rule): insert every message of a partition in offset order,
one message per insert, each with a deduplication token naming the raw message it came from;
only after the inserts succeeded, commit the partition's next offset. A crash anywhere replays
from the last commit and the tokens turn the replayed inserts into no-ops (in ``flows`` and in
every rollup). The enricher re-emitting a batch after its own crash gives the same token again.

Throughput (measured with ``python -m tests.benchmarks.bench_sink``): each insert pays a roughly
fixed cost in ClickHouse (planning, one part per table and view, the token bookkeeping), so the
loop keeps ClickHouse busy instead of waiting on Python: the next message of a partition is
decoded in a thread while the current one is being inserted, and with ``insert_concurrency`` > 1
several partitions of a poll are inserted at once, each over its own connection (each partition
still in offset order, each message still one insert with its own token, each partition
committed only after its inserts — so the exactly-once rule is unchanged).

Failures (see :mod:`sink.writer` for the rule): a message that is not a valid batch, or a batch
ClickHouse *rejects* (constraint, unconvertible value…), goes to the DLQ with the reason and is
committed — retrying cannot help. ClickHouse *unavailable* (any other error) is retried with
backoff; nothing after it is committed and the partition's consumption stops meanwhile (the loop
does not poll again), so memory stays bounded by one poll.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time

import pyarrow as pa
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord
from clickhouse_connect.driver.client import Client
from prometheus_client import Counter, Gauge, Histogram

from enricher.schema import ENRICHED_SCHEMA
from enricher.schema import SCHEMA_NAME as ENRICHED
from flowtally import kafka
from flowtally.clickhouse import connect
from flowtally.lifecycle import run_components
from flowtally.metrics import MetricsServer
from flowtally.settings import load_settings
from flowtally.wire import ORIGIN_HEADER, WireError, decode_batch, header
from sink.delivery import Delivery, FeedMetrics, Retry
from sink.rows import flow_rows
from sink.settings import SinkSettings
from sink.writer import Writer
from sql.migrate import migrate

log = logging.getLogger(__name__)

MESSAGES = Counter("flowtally_sink_messages_total", "Enriched messages consumed", ["outcome"])
ROWS = Counter("flowtally_sink_rows_inserted_total", "Flow rows inserted into ClickHouse")
INSERT_ERRORS = Counter("flowtally_sink_insert_errors_total", "Failed insert attempts", ["reason"])
INSERT_SECONDS = Histogram("flowtally_sink_insert_seconds", "Duration of one batch insert")
COMMITTED = Gauge("flowtally_sink_committed_offset", "Last committed offset", ["partition"])


def dedup_token(msg: ConsumerRecord) -> str:
    """The raw message a batch came from (set by the enricher), else this message itself."""
    origin = header(msg.headers, ORIGIN_HEADER)
    return origin.decode() if origin else f"{msg.topic}/{msg.partition}/{msg.offset}"


class SinkWorker:
    """The consume -> insert -> commit loop."""

    name = "sink"

    def __init__(self, settings: SinkSettings) -> None:
        self._settings = settings
        self._topic = settings.kafka.topic("enriched")
        self._consumer: AIOKafkaConsumer | None = None
        self._dlq: AIOKafkaProducer | None = None
        self._clients: list[Client] = []
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        #: one per concurrent partition insert, each over its own connection
        self._deliveries: list[Delivery] = []
        #: messages decoded ahead of their insert: (partition, offset) -> rows and token, or the error
        self._decoded: dict[tuple[int, int], tuple[pa.Table, str] | WireError] = {}

    def health(self) -> tuple[bool, str]:
        """Unhealthy while inserts have been failing for longer than allowed."""
        if self._task is None:
            return False, "starting"
        since = [d.failing_since for d in self._deliveries if d.failing_since is not None]
        if since:
            failing_since = min(since)
            failing = time.monotonic() - failing_since
            if failing > self._settings.unhealthy_after_s:
                return False, f"inserts failing for {failing:.0f}s"
        return True, "ok"

    async def start(self) -> None:
        s = self._settings
        await kafka.ensure_topics(s.kafka, s.topics)
        client = await asyncio.to_thread(connect, s.clickhouse)
        self._clients.append(client)
        if s.migrate_on_start:
            await asyncio.to_thread(migrate, client, s.migration_variables(), s.clickhouse.cluster)
        for _ in range(s.insert_concurrency - 1):
            self._clients.append(await asyncio.to_thread(connect, s.clickhouse))
        self._dlq = kafka.producer(s.kafka)
        await self._dlq.start()
        self._deliveries = [
            Delivery(
                schema_name=ENRICHED, decode=self._take_decoded, writer=Writer(c, s.table), dlq=self._dlq,
                dlq_topic=s.kafka.topic("dlq"), stopping=self._stopping,
                metrics=FeedMetrics(MESSAGES, ROWS, INSERT_ERRORS, INSERT_SECONDS),
                retry=Retry(s.retry_initial_s, s.retry_max_s),
            )
            for c in self._clients
        ]
        self._consumer = kafka.consumer(s.kafka, self._topic, group_id=s.group_id, **s.group_kwargs())
        await self._consumer.start()
        self._task = asyncio.create_task(self._run())

    async def wait(self) -> None:
        assert self._task is not None
        await self._task

    async def stop(self) -> None:
        """Finish the poll in hand (insert + commit), then close everything."""
        self._stopping.set()
        if self._task is not None:
            await asyncio.wait([self._task])
        if self._consumer is not None:
            await self._consumer.stop()
        if self._dlq is not None:
            await self._dlq.stop()
        for client in self._clients:
            await asyncio.to_thread(client.close)
        self._clients, self._deliveries = [], []

    async def _run(self) -> None:
        assert self._consumer is not None
        # Partitions are independent: up to insert_concurrency of them at once, each on a free
        # delivery (connection); a partition is committed up to what landed in it.
        free: asyncio.Queue[Delivery] = asyncio.Queue()
        for delivery in self._deliveries:
            free.put_nowait(delivery)
        while not self._stopping.is_set():
            polled = await self._consumer.getmany(
                timeout_ms=500, max_records=self._settings.max_messages_per_poll
            )
            tps = list(polled)
            landed = await asyncio.gather(*(self._on_free(free, polled[tp]) for tp in tps))
            commits = {tp: offset for tp, offset in zip(tps, landed, strict=True) if offset is not None}
            if commits:
                await self._consumer.commit(commits)
                for tp, offset in commits.items():
                    COMMITTED.labels(str(tp.partition)).set(offset - 1)

    async def _on_free(self, free: asyncio.Queue[Delivery], messages: list[ConsumerRecord]) -> int | None:
        """:meth:`_drain` on the next free delivery."""
        delivery = await free.get()
        try:
            return await self._drain(delivery, messages)
        finally:
            free.put_nowait(delivery)

    async def _drain(self, delivery: Delivery, messages: list[ConsumerRecord]) -> int | None:
        """Insert one partition's messages in offset order, decoding each next message in a thread
        while the current one is inserted; the offset to commit (None if nothing landed)."""
        landed = None
        ahead = asyncio.create_task(asyncio.to_thread(self._decode_ahead, messages[0]))
        try:
            for i, msg in enumerate(messages):
                await ahead
                if i + 1 < len(messages):
                    ahead = asyncio.create_task(asyncio.to_thread(self._decode_ahead, messages[i + 1]))
                if not await delivery.deliver(msg):
                    break  # stopping during retries: commit what landed, replay the rest
                landed = msg.offset + 1
        finally:
            await asyncio.wait([ahead])
            for msg in messages:
                self._decoded.pop((msg.partition, msg.offset), None)
        return landed

    def _decode(self, msg: ConsumerRecord) -> tuple[pa.Table, str]:
        """The flow rows of one enriched message and their deduplication token."""
        table = decode_batch(msg.value, msg.headers, ENRICHED_SCHEMA, ENRICHED)
        return flow_rows(table), dedup_token(msg)

    def _decode_ahead(self, msg: ConsumerRecord) -> None:
        """Decode ``msg`` before its turn (in a worker thread); the delivery picks it up."""
        try:
            self._decoded[(msg.partition, msg.offset)] = self._decode(msg)
        except WireError as exc:
            self._decoded[(msg.partition, msg.offset)] = exc

    def _take_decoded(self, msg: ConsumerRecord) -> tuple[pa.Table, str]:
        """The delivery's decoder: the result decoded ahead (or its WireError), else decode now."""
        done = self._decoded.pop((msg.partition, msg.offset), None)
        if isinstance(done, WireError):
            raise done
        return done if done is not None else self._decode(msg)

def run(args: argparse.Namespace) -> int:
    """`flowtally sink`."""
    settings = load_settings(SinkSettings, args.config, metrics_listen=args.metrics_listen)
    worker = SinkWorker(settings)
    # The completeness consumer (sink/completeness.py) starts after the flows worker has migrated.
    from sink.completeness import CompletenessWorker, all_healthy

    completeness = CompletenessWorker(settings)
    metrics = MetricsServer(settings.metrics_listen, all_healthy(worker.health, completeness.health))
    return asyncio.run(run_components([metrics, worker, completeness]))
