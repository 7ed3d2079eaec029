"""Publishing encoded batches to Kafka, shared by every sensor.

A bounded queue sits between the receiving side and the producer: when Kafka is slow or down
the queue fills, and further batches are dropped *and counted* rather than growing memory
without bound (a UDP sensor cannot push back on its exporters). Memory held here is at most
``max_queued + max_in_flight`` messages of at most ``kafka.max_message_bytes`` (batches are split
to fit it by :func:`encode_messages`; a single row that cannot fit is dropped and counted under
``reason="message_too_large"``).

Sends are pipelined: up to ``max_in_flight`` messages are handed to the producer before the
oldest acknowledgement is awaited (the producer is idempotent, so retries neither duplicate nor
reorder a partition). A send that fails is retried with backoff until it succeeds or the
publisher stops; none is given up silently.

Kafka being unreachable at start is not fatal: the sensor keeps receiving (and counting what it
has to drop) while the publisher keeps trying to connect, and ``healthy`` reports the outage.

On stop the queue is drained for at most ``drain_timeout_s``; whatever is still undelivered then
is counted under ``flowtally_sensor_flows_dropped_total{reason="shutdown"}`` and the process exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import pyarrow as pa
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError, MessageSizeTooLargeError
from prometheus_client import Counter, Gauge

from flowtally.settings import DEFAULT_MAX_MESSAGE_BYTES
from flowtally.wire import SCHEMA_HEADER, WRITE_OPTIONS, RowTooLarge, Value, encode_pieces
from sensors.schema import SCHEMA_NAME

log = logging.getLogger(__name__)

PUBLISHED_BATCHES = Counter("flowtally_sensor_batches_published_total", "Batches acknowledged by Kafka",
                            ["topic"])
PUBLISHED_FLOWS = Counter("flowtally_sensor_flows_published_total", "Flows acknowledged by Kafka")
PUBLISHED_BYTES = Counter("flowtally_sensor_message_bytes_published_total",
                          "Bytes of message values acknowledged by Kafka")
DROPPED_FLOWS = Counter("flowtally_sensor_flows_dropped_total", "Flows dropped before Kafka", ["reason"])
DROPPED_BATCHES = Counter("flowtally_sensor_batches_dropped_total", "Messages dropped before Kafka",
                          ["reason"])
PUBLISH_ERRORS = Counter("flowtally_sensor_publish_errors_total", "Failed publish or connect attempts")
QUEUED = Gauge("flowtally_sensor_batches_queued", "Messages waiting for Kafka (queued and in flight)")


@dataclass(frozen=True, slots=True)
class Message:
    """One Kafka message: an encoded batch (``topic`` None = the publisher's default topic).

    ``value`` is the Arrow buffer the batch was written into, handed to the producer as it is
    (aiokafka copies any bytes-like value into its record batch; a ``bytes`` copy first cost a
    second pass over every message). It stays referenced here until Kafka acknowledged it."""

    key: bytes
    value: Value
    headers: list[tuple[str, bytes]]
    flows: int
    topic: str | None = None


#: Arrow IPC buffer compression a sensor may choose. Measured on one 8192-flow raw batch
#: (bench_sensor --encode-study): none 0.02 CPU-s per million flows and 116 bytes/flow, lz4 0.17
#: and 28, zstd 0.38 and 15 (level 1 is no cheaper). Readers decompress any of them transparently.
COMPRESSIONS = ("none", "lz4", "zstd")
#: Buffers are compressed on the calling thread: Arrow's pool would compress the ~20 buffers of
#: a batch in parallel, but handing them over costs more CPU than it saves wall time (lz4: 0.13
#: instead of 0.18 CPU-s per million flows), and the sensor is measured in CPU per flow.
_OPTIONS = {c: pa.ipc.IpcWriteOptions(compression=None if c == "none" else c, use_threads=False)
            for c in COMPRESSIONS}


def encode_messages(table: pa.Table, key: bytes, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                    schema_name: str = SCHEMA_NAME, topic: str | None = None,
                    compression: str | None = None) -> list[Message]:
    """Encode ``table`` as one message, or split it in halves until each fits ``max_bytes``
    (``kafka.max_message_bytes``: the whole Kafka message, see :func:`flowtally.wire.encode_pieces`).

    A table with a row that cannot fit on its own gives no message: its flows are dropped and
    counted (``reason="message_too_large"``) rather than handed to a producer that would refuse
    them. ``compression`` None uses the wire format's default (:func:`flowtally.wire.encode_batch`)."""
    options = WRITE_OPTIONS if compression is None else _OPTIONS[compression]
    try:
        pieces = encode_pieces(table, max_bytes, [(SCHEMA_HEADER, schema_name.encode())], options)
    except RowTooLarge as exc:
        Publisher._drop(Message(key, b"", [], table.num_rows, topic), "message_too_large")
        log.error("dropped a batch of %d rows that cannot be split to fit a message: %s", table.num_rows, exc)
        return []
    return [Message(key, p.value, p.headers, p.num_rows, topic) for p in pieces]


class Publisher:
    """A component that sends queued messages with an idempotent producer.

    ``producer_factory`` makes a fresh (unstarted) producer for every connection attempt;
    ``prepare`` (e.g. creating the topics) runs before each attempt.
    """

    name = "kafka-publisher"

    def __init__(self, producer_factory: Callable[[], AIOKafkaProducer], topic: str, max_queued: int, *,
                 max_in_flight: int = 8, drain_timeout_s: float = 10.0, retry_max_s: float = 10.0,
                 prepare: Callable[[], Awaitable[None]] | None = None) -> None:
        self._factory = producer_factory
        self._producer: AIOKafkaProducer | None = None
        self._topic = topic
        self._queue: asyncio.Queue[Message | None] = asyncio.Queue(maxsize=max_queued)
        self._in_flight: deque[tuple[Message, asyncio.Future[object]]] = deque()
        self._max_in_flight = max(1, max_in_flight)
        self._drain_timeout_s = drain_timeout_s
        self._retry_max_s = retry_max_s
        self._prepare = prepare
        self._task: asyncio.Task[None] | None = None
        self._current: Message | None = None  # taken from the queue, not yet handed to the producer
        self.healthy = False
        self.connected = False

    def offer(self, message: Message) -> bool:
        """Queue a message; False (and counted) when the queue is full."""
        try:
            self._queue.put_nowait(message)
        except asyncio.QueueFull:
            self._drop(message, "backpressure")
            log.warning("Kafka is not keeping up: dropped a message of %d flows", message.flows)
            return False
        QUEUED.set(self._queue.qsize() + len(self._in_flight))
        return True

    @property
    def pending(self) -> int:
        """Messages queued or in flight."""
        return self._queue.qsize() + len(self._in_flight) + (self._current is not None)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def wait(self) -> None:
        assert self._task is not None
        await self._task

    async def stop(self) -> None:
        """Send what is queued within ``drain_timeout_s``, count the rest as dropped, close."""
        task = self._task
        if task is not None and not task.done():
            try:
                self._queue.put_nowait(None)
                await asyncio.wait_for(asyncio.shield(task), self._drain_timeout_s)
            except (asyncio.QueueFull, TimeoutError):
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        lost = 0
        for message, future in self._in_flight:
            if not (future.done() and not future.cancelled() and future.exception() is None):
                self._drop(message, "shutdown")
                lost += message.flows if message.topic is None else 0
        self._in_flight.clear()
        if self._current is not None:
            self._drop(self._current, "shutdown")
            lost += self._current.flows if self._current.topic is None else 0
            self._current = None
        while not self._queue.empty():
            queued = self._queue.get_nowait()
            if queued is not None:
                self._drop(queued, "shutdown")
                lost += queued.flows if queued.topic is None else 0
        if lost:
            log.error("stopping with Kafka unreachable: %d flows not delivered (counted as dropped)", lost)
        QUEUED.set(0)
        if self._producer is not None:
            producer, self._producer = self._producer, None
            try:
                await asyncio.wait_for(producer.stop(), max(1.0, self._drain_timeout_s / 2))
            except Exception as exc:  # closing a producer that never reached Kafka
                log.warning("Kafka producer did not close cleanly: %s", exc)

    @staticmethod
    def _drop(message: Message, reason: str) -> None:
        if message.topic is None:  # flows of the default (raw) topic; others are bookkeeping rows
            DROPPED_FLOWS.labels(reason).inc(message.flows)
        DROPPED_BATCHES.labels(reason).inc()

    async def _connect(self) -> AIOKafkaProducer:
        delay = 0.5
        while True:
            producer = self._factory()
            try:
                if self._prepare is not None:
                    await self._prepare()
                await producer.start()
            except asyncio.CancelledError:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(producer.stop(), 1.0)
                raise
            except Exception as exc:
                PUBLISH_ERRORS.inc()
                log.warning("cannot connect to Kafka (retrying in %.1fs): %s", delay, exc)
                with contextlib.suppress(Exception):
                    await producer.stop()
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._retry_max_s)
                continue
            self.healthy = self.connected = True
            return producer

    async def _run(self) -> None:
        self._producer = await self._connect()
        while True:
            message = await self._queue.get()
            if message is None:
                while self._in_flight:
                    await self._settle_oldest()
                return
            self._current = message
            await self._hand_over(message)
            self._current = None
            while len(self._in_flight) >= self._max_in_flight or (
                    self._in_flight and self._in_flight[0][1].done()):
                await self._settle_oldest()
            QUEUED.set(self._queue.qsize() + len(self._in_flight))

    async def _hand_over(self, message: Message) -> None:
        """Give ``message`` to the producer (which may wait for buffer space or metadata)."""
        delay = 0.5
        assert self._producer is not None
        while True:
            try:
                future = await self._producer.send(message.topic or self._topic, message.value,
                                                   key=message.key, headers=message.headers)
            except Exception as exc:
                if self._refused_as_too_large(message, exc):  # by the client: nothing was sent
                    return
                await self._failed(message, exc, delay)
                delay = min(delay * 2, self._retry_max_s)
                continue
            self._in_flight.append((message, future))
            return

    async def _settle_oldest(self) -> None:
        """Await the oldest in-flight send; on failure send it again until it is acknowledged."""
        message, future = self._in_flight[0]
        delay = 0.5
        while True:
            try:
                await future
                break
            except Exception as exc:
                if self._refused_as_too_large(message, exc):  # by the broker
                    self._in_flight.popleft()
                    await self._renew_producer()
                    return
                await self._failed(message, exc, delay)
                delay = min(delay * 2, self._retry_max_s)
                assert self._producer is not None
                try:
                    future = await self._producer.send(message.topic or self._topic, message.value,
                                                       key=message.key, headers=message.headers)
                except Exception as exc2:
                    future = asyncio.get_running_loop().create_future()
                    future.set_exception(exc2)
                self._in_flight[0] = (message, future)
        self._in_flight.popleft()
        self.healthy = True
        PUBLISHED_BATCHES.labels(message.topic or self._topic).inc()
        if message.topic is None:
            PUBLISHED_FLOWS.inc(message.flows)
        PUBLISHED_BYTES.inc(len(message.value))

    def _refused_as_too_large(self, message: Message, exc: BaseException) -> bool:
        """Whether Kafka refused ``message`` for its size (the client's max_request_size, or a
        topic/broker limit below ``kafka.max_message_bytes``): retrying cannot help, so it is
        dropped and counted (``reason="message_too_large"``) instead of blocking every later one."""
        if not isinstance(exc, MessageSizeTooLargeError):
            return False
        self._drop(message, "message_too_large")
        log.error("Kafka refused a message of %d bytes (%d flows) as too large, dropped: %s; is the "
                  "topic's max.message.bytes below kafka.max_message_bytes?", len(message.value),
                  message.flows, exc)
        return True

    async def _renew_producer(self) -> None:
        """Replace the producer after the broker refused a batch: the refused batch took sequence
        numbers of the idempotent producer that the broker never saw, so it answers every later
        batch of that producer with OutOfOrderSequenceNumber. The new producer has a new producer
        id; the messages still in flight on the old one are sent again on it."""
        old, self._producer = self._producer, None
        if old is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(old.stop(), 5.0)
        loop = asyncio.get_running_loop()
        for i, (message, future) in enumerate(self._in_flight):
            if not future.done():  # the old producer will not settle it any more
                again: asyncio.Future[object] = loop.create_future()
                again.set_exception(KafkaError("sent again on a new producer"))
                self._in_flight[i] = (message, again)
        self._producer = await self._connect()

    async def _failed(self, message: Message, exc: BaseException, delay: float) -> None:
        PUBLISH_ERRORS.inc()
        self.healthy = False
        log.warning("publishing %d flows failed (retrying in %.1fs): %s", message.flows, delay, exc)
        await asyncio.sleep(delay)
