"""Delivering one Kafka message into ClickHouse under the exactly-once rule, for every feed the
sink consumes (flows in :mod:`sink.service`, completeness records in :mod:`sink.completeness`).

One insert (a message, or a group of messages: :mod:`sink.groups`) with a deduplication token.
The outcome decides what the caller may commit (see :mod:`sink.writer` for how failures are
classified):

* inserted (or a replay the token turned into a no-op): commit it;
* not a batch of the feed's schema, or rejected by ClickHouse: parked in the DLQ with the reason
  and counted, then committed — retrying cannot help;
* ClickHouse unavailable: retried with backoff until it lands or the sink stops; on stop the
  message is *not* delivered and the caller must not commit it (it is replayed after a restart).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import pyarrow as pa
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord
from aiokafka.abc import ConsumerRebalanceListener
from clickhouse_connect.driver.client import Client
from prometheus_client import Counter, Histogram

from flowtally import kafka
from flowtally.wire import WireError, note_header
from sink.settings import SinkSettings
from sink.writer import InsertFailure, Writer, classify

log = logging.getLogger(__name__)

T = TypeVar("T")

#: DLQ header: how many rows the parked message holds (the rows ClickHouse rejected).
DLQ_ROWS_HEADER = "flowtally-dlq-rows"

#: Message -> (rows to insert, deduplication token); raises WireError when it is not a batch.
Decoder = Callable[[ConsumerRecord], tuple[pa.Table, str]]


@dataclass(frozen=True)
class FeedMetrics:
    """The metrics of one feed (separate names per feed, so flow totals stay flow totals)."""

    messages: Counter  # label "outcome": inserted, dlq_<reason>
    rows: Counter
    insert_errors: Counter  # label "reason"
    insert_seconds: Histogram


@dataclass(frozen=True)
class Retry:
    """Backoff of inserts while ClickHouse is unavailable."""

    initial_s: float
    max_s: float


class Stopped(Exception):
    """The sink is stopping while ClickHouse is unavailable: nothing landed, commit nothing."""


class Delivery:
    """Inserts into one table over one connection; parks undeliverable messages in the DLQ."""

    def __init__(self, *, schema_name: str, writer: Writer, dlq: AIOKafkaProducer, dlq_topic: str,
                 metrics: FeedMetrics, retry: Retry, stopping: asyncio.Event,
                 decode: Decoder | None = None) -> None:
        self._schema_name = schema_name
        self._decode = decode
        self._writer = writer
        self._dlq = dlq
        self._dlq_topic = dlq_topic
        self._metrics = metrics
        self._retry = retry
        self._stopping = stopping
        #: monotonic time since which inserts have been failing (None while they succeed)
        self.failing_since: float | None = None

    @property
    def client(self) -> Client:
        """The connection this delivery inserts over (for the caller's own small writes)."""
        return self._writer.client

    async def deliver(self, msg: ConsumerRecord) -> bool:
        """Insert one message; False if the sink is stopping before it could land (do not commit)."""
        assert self._decode is not None, "a feed that delivers message by message has a decoder"
        try:
            rows, token = self._decode(msg)
        except WireError as exc:
            await self.to_dlq(msg, exc)
            return True
        try:
            failure = await self.insert(rows, token)
        except Stopped:
            return False
        if failure is not None:  # this batch can never land: park it, move on
            await self.to_dlq(msg, failure)
            return True
        self._metrics.messages.labels("inserted").inc()
        return True

    async def insert(self, rows: pa.Table, token: str) -> InsertFailure | None:
        """Insert ``rows`` with ``token``, retrying with backoff while ClickHouse is unavailable:
        None once it landed, the failure if ClickHouse rejects the data; raises :class:`Stopped`."""
        try:
            with self._metrics.insert_seconds.time():
                await self.retrying(lambda: asyncio.to_thread(self._writer.insert, rows, token), token)
        except _Rejected as rejected:
            return rejected.failure
        self._metrics.rows.inc(rows.num_rows)
        return None

    async def retrying(self, call: Callable[[], Coroutine[Any, Any, T]], what: str,
                       rejectable: bool = True) -> T:
        """Run ``call`` until it succeeds, with backoff while ClickHouse is unavailable; raises
        :class:`Stopped` when the sink stops meanwhile (``rejectable``: a rejection is final)."""
        delay = self._retry.initial_s
        while True:
            try:
                result = await call()
                self.failing_since = None
                return result
            except Exception as exc:
                failure = classify(exc)
                self._metrics.insert_errors.labels(failure.reason).inc()
                if failure.rejected and rejectable:
                    self.failing_since = None
                    raise _Rejected(failure) from exc
                # unavailable: nothing after it is committed; retried
                if self.failing_since is None:
                    self.failing_since = time.monotonic()
                log.warning("write of %s failed (retrying in %.1fs): %s", what, delay, exc)
                try:
                    await asyncio.wait_for(self._stopping.wait(), delay)
                    raise Stopped() from exc
                except TimeoutError:
                    delay = min(delay * 2, self._retry.max_s)

    async def to_dlq(self, msg: ConsumerRecord, exc: Exception | InsertFailure, *,
                     value: bytes | None = None, rows: int | None = None) -> None:
        """Park ``msg`` in the DLQ with the reason (not a batch, or rejected by ClickHouse), counted.

        ``value``: only part of the message was rejected, this batch of its rejected rows is
        parked instead of the whole message (counted as ``partial_dlq_<reason>``; the rest was
        inserted). ``rows``: how many rows are parked (header ``flowtally-dlq-rows``)."""
        where = f"{msg.topic}/{msg.partition}/{msg.offset}"
        if isinstance(exc, InsertFailure):
            log.error("ClickHouse rejected %s rows of message %s (%s): sent to the DLQ: %s",
                      "all" if rows is None or value is None else rows, where, exc.reason, exc.detail)
            error = f"clickhouse-rejected {exc.reason}: {exc.detail}"
            if exc.in_view:  # a replay of this message would store its rows in the table twice
                error = (f"clickhouse-rejected {exc.reason}: stored in the table (and the views before "
                         f"the one refusing it), not in every view; do not replay: {exc.detail}")
        else:
            log.error("message %s is not an %s batch (%s): sent to the DLQ", where, self._schema_name, exc)
            error = str(exc)
        reason = getattr(exc, "reason", type(exc).__name__)
        self._metrics.messages.labels(f"{'partial_' if value is not None else ''}dlq_{reason}").inc()
        headers = [*(msg.headers or ()), ("flowtally-error", note_header(error)),  # fits the limit
                   ("flowtally-stage", b"sink")]
        if rows is not None:
            headers.append((DLQ_ROWS_HEADER, str(rows).encode()))
        await self._dlq.send_and_wait(self._dlq_topic, msg.value if value is None else value,
                                      key=msg.key, headers=headers)


class _Rejected(Exception):
    def __init__(self, failure: InsertFailure) -> None:
        super().__init__(failure.reason)
        self.failure = failure


class FeedWorker:
    """What every consumer of the sink shares: ClickHouse connections, a DLQ producer, one
    consumer in its own group, the loop task (:meth:`_run`) and the stop sequence."""

    name = "sink-feed"

    def __init__(self, settings: SinkSettings) -> None:
        self._settings = settings
        self._consumer: AIOKafkaConsumer | None = None
        self._dlq: AIOKafkaProducer | None = None
        self._clients: list[Client] = []
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()

    async def _open_dlq(self) -> AIOKafkaProducer:
        self._dlq = kafka.producer(self._settings.kafka)
        await self._dlq.start()
        return self._dlq

    async def _consume(self, topic: str, group_id: str,
                       listener: ConsumerRebalanceListener | None = None) -> None:
        """Join ``group_id`` on ``topic`` and start the loop."""
        s = self._settings
        self._consumer = kafka.consumer(s.kafka, group_id=group_id, **s.group_kwargs())
        self._consumer.subscribe([topic], listener=listener)
        await self._consumer.start()
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        raise NotImplementedError

    async def wait(self) -> None:
        assert self._task is not None
        await self._task

    async def stop(self) -> None:
        """Let the loop finish what it holds (insert + commit), then close everything."""
        self._stopping.set()
        if self._task is not None:
            await asyncio.wait([self._task])
        if self._consumer is not None:
            kafka.leave_group_on_stop(self._consumer)  # hand the partitions over now, even if static
            await self._consumer.stop()
        if self._dlq is not None:
            await self._dlq.stop()
        for client in self._clients:
            await asyncio.to_thread(client.close)
        self._clients = []
