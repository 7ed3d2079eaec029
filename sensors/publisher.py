"""Publishing raw batches to Kafka, shared by every sensor.

A bounded queue sits between the receiving side and the producer: when Kafka is slow or down
the queue fills, and further batches are dropped *and counted* rather than growing memory
without bound (a UDP sensor cannot push back on its exporters). On stop the queue is drained
before the producer closes.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import pyarrow as pa
from aiokafka import AIOKafkaProducer
from prometheus_client import Counter, Gauge

from flowtally.kafka import MAX_MESSAGE_BYTES
from flowtally.wire import encode_batch
from sensors.schema import SCHEMA_NAME

log = logging.getLogger(__name__)

PUBLISHED_BATCHES = Counter("flowtally_sensor_batches_published_total", "Raw batches acknowledged by Kafka")
PUBLISHED_FLOWS = Counter("flowtally_sensor_flows_published_total", "Flows acknowledged by Kafka")
DROPPED_FLOWS = Counter("flowtally_sensor_flows_dropped_total", "Flows dropped before Kafka", ["reason"])
PUBLISH_ERRORS = Counter("flowtally_sensor_publish_errors_total", "Failed publish attempts")
QUEUED = Gauge("flowtally_sensor_batches_queued", "Batches waiting for Kafka")


@dataclass(frozen=True, slots=True)
class Message:
    """One Kafka message: an encoded batch."""

    key: bytes
    value: bytes
    headers: list[tuple[str, bytes]]
    flows: int


def encode_messages(table: pa.Table, key: bytes, max_bytes: int = MAX_MESSAGE_BYTES) -> list[Message]:
    """Encode ``table`` as one message, or split it in halves until each fits ``max_bytes``."""
    value, headers = encode_batch(table, SCHEMA_NAME)
    if len(value) <= max_bytes or table.num_rows <= 1:
        return [Message(key, value, headers, table.num_rows)]
    half = table.num_rows // 2
    return encode_messages(table.slice(0, half), key, max_bytes) + encode_messages(
        table.slice(half), key, max_bytes
    )


class Publisher:
    """A component that sends queued messages to ``topic`` with an idempotent producer."""

    name = "kafka-publisher"

    def __init__(self, producer: AIOKafkaProducer, topic: str, max_queued: int,
                 retry_max_s: float = 10.0) -> None:
        self._producer = producer
        self._topic = topic
        self._queue: asyncio.Queue[Message | None] = asyncio.Queue(maxsize=max_queued)
        self._task: asyncio.Task[None] | None = None
        self._retry_max_s = retry_max_s
        self.healthy = True

    def offer(self, message: Message) -> bool:
        """Queue a message; False (and counted) when the queue is full."""
        try:
            self._queue.put_nowait(message)
        except asyncio.QueueFull:
            DROPPED_FLOWS.labels("backpressure").inc(message.flows)
            log.warning("Kafka is not keeping up: dropped a batch of %d flows", message.flows)
            return False
        QUEUED.set(self._queue.qsize())
        return True

    async def start(self) -> None:
        await self._producer.start()
        self._task = asyncio.create_task(self._run())

    async def wait(self) -> None:
        assert self._task is not None
        await self._task

    async def stop(self) -> None:
        """Send everything queued, then close the producer."""
        if self._task is not None and not self._task.done():
            await self._queue.put(None)
            await self._task
        await self._producer.stop()

    async def _run(self) -> None:
        while True:
            message = await self._queue.get()
            QUEUED.set(self._queue.qsize())
            if message is None:
                return
            await self._send(message)

    async def _send(self, message: Message) -> None:
        delay = 0.5
        while True:
            try:
                await self._producer.send_and_wait(
                    self._topic, message.value, key=message.key, headers=message.headers
                )
                break
            except Exception as exc:  # broker down, timeouts: keep the batch and retry
                PUBLISH_ERRORS.inc()
                self.healthy = False
                log.warning("publishing %d flows failed (retrying in %.1fs): %s", message.flows, delay, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._retry_max_s)
        self.healthy = True
        PUBLISHED_BATCHES.inc()
        PUBLISHED_FLOWS.inc(message.flows)
