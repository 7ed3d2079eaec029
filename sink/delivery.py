"""Delivering one Kafka message into ClickHouse under the exactly-once rule, for every feed the
sink consumes (flows in :mod:`sink.service`, completeness records in :mod:`sink.completeness`).

One message = one insert with a deduplication token. The outcome decides what the caller may
commit (see :mod:`sink.writer` for how failures are classified):

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
from collections.abc import Callable
from dataclasses import dataclass

import pyarrow as pa
from aiokafka import AIOKafkaProducer, ConsumerRecord
from prometheus_client import Counter, Histogram

from flowtally.wire import WireError
from sink.writer import InsertFailure, Writer, classify

log = logging.getLogger(__name__)

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


class Delivery:
    """Inserts messages of one feed, one per insert; parks undeliverable ones in the DLQ."""

    def __init__(self, *, schema_name: str, decode: Decoder, writer: Writer, dlq: AIOKafkaProducer,
                 dlq_topic: str, metrics: FeedMetrics, retry: Retry, stopping: asyncio.Event) -> None:
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

    async def deliver(self, msg: ConsumerRecord) -> bool:
        """Insert one message; False if the sink is stopping before it could land (do not commit)."""
        try:
            rows, token = self._decode(msg)
        except WireError as exc:
            await self._to_dlq(msg, exc)
            return True
        delay = self._retry.initial_s
        while True:
            try:
                with self._metrics.insert_seconds.time():
                    await asyncio.to_thread(self._writer.insert, rows, token)
                break
            except Exception as exc:
                failure = classify(exc)
                self._metrics.insert_errors.labels(failure.reason).inc()
                if failure.rejected:  # this batch can never land: park it, move on
                    await self._to_dlq(msg, failure)
                    self.failing_since = None
                    return True
                # unavailable: the batch stays uncommitted and is retried
                if self.failing_since is None:
                    self.failing_since = time.monotonic()
                log.warning("insert of %s failed (retrying in %.1fs): %s", token, delay, exc)
                try:
                    await asyncio.wait_for(self._stopping.wait(), delay)
                    return False
                except TimeoutError:
                    delay = min(delay * 2, self._retry.max_s)
        self.failing_since = None
        self._metrics.messages.labels("inserted").inc()
        self._metrics.rows.inc(rows.num_rows)
        return True

    async def _to_dlq(self, msg: ConsumerRecord, exc: WireError | InsertFailure) -> None:
        if isinstance(exc, InsertFailure):
            log.error("ClickHouse rejected message %s/%d/%d (%s): sent to the DLQ: %s",
                      msg.topic, msg.partition, msg.offset, exc.reason, exc.detail)
            error = f"clickhouse-rejected {exc.reason}: {exc.detail}"
        else:
            log.error("message %s/%d/%d is not an %s batch (%s): sent to the DLQ",
                      msg.topic, msg.partition, msg.offset, self._schema_name, exc)
            error = str(exc)
        self._metrics.messages.labels(f"dlq_{exc.reason}").inc()
        headers = [*(msg.headers or ()), ("flowtally-error", error.encode()),
                   ("flowtally-stage", b"sink")]
        await self._dlq.send_and_wait(self._dlq_topic, msg.value, key=msg.key, headers=headers)
