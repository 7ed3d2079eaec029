"""Which nodes' sensors are reporting, for every enricher alike: read from the completeness topic
(the shell around :class:`enricher.enrich.ObservedNodes`).

Why: the one-observation rule drops a record made away from the initiator's node only when that
node's own sensor reports the connection too. An enricher sees only its share of the raw
partitions, so the observers in its own stream are not all the observers: with several enrichers
(the Helm chart runs two), each would keep its side of a connection between two observed nodes
and the connection would be counted twice. Every sensor writes per-minute completeness rows naming
its observer to ``<prefix>.sensor.completeness``; every enricher reads all of them, so they share
one view of the observed nodes.

A plain aiokafka consumer without a group (every enricher reads every partition; nothing to
commit). At start it reads the last observer window of the topic (``offsets_for_times``) and sets
:attr:`ObserverFeed.ready`, which the agent waits for before its first batch; then it follows.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import numpy as np
import pyarrow as pa
from aiokafka import AIOKafkaConsumer, ConsumerRecord

from enricher.enrich import ObservedNodes
from flowtally.kafka import replay
from flowtally.settings import KafkaSettings
from flowtally.wire import WireError, decode_batch
from sensors.completeness import COMPLETENESS_SCHEMA, MINUTE_MS, STAGES, with_additive_defaults
from sensors.completeness import SCHEMA_NAME as COMPLETENESS

log = logging.getLogger(__name__)

#: The stages whose rows name an observing sensor (the enricher's own rows do not).
SENSOR_STAGES = frozenset(s for s in STAGES if s.startswith("sensor-"))
#: How long the start waits for the topic's partitions (ensure_topics created it before).
ASSIGN_TIMEOUT_S = 30.0


def reporting_observers(table: pa.Table) -> dict[str, int]:
    """Observer name -> end of the latest minute it reported in, from sensor rows of a
    completeness batch (pure)."""
    stage = table.column("stage").to_numpy(zero_copy_only=False)
    observer = table.column("observer").to_numpy(zero_copy_only=False)
    minute = table.column("minute").cast(pa.int64()).to_numpy()
    keep = np.isin(stage, list(SENSOR_STAGES)) & (observer != "")
    out: dict[str, int] = {}
    for name, start in zip(observer[keep].tolist(), minute[keep].tolist(), strict=True):
        out[name] = max(out.get(name, 0), int(start) + MINUTE_MS)
    return out


class ObserverFeed:
    """Notes into ``observers`` every sensor observer the completeness topic names."""

    def __init__(self, kafka: KafkaSettings, topic: str, observers: ObservedNodes, *,
                 wall_ms: Callable[[], int] = lambda: int(time.time() * 1000),
                 on_note: Callable[[int], None] | None = None) -> None:
        self.kafka = kafka
        self.topic = topic
        self.observers = observers
        self.ready = asyncio.Event()
        self.bad_messages = 0
        self._wall_ms = wall_ms
        self._on_note = on_note
        self._stopping = False

    def _take(self, message: ConsumerRecord) -> None:
        try:
            table = decode_batch(message.value, message.headers, COMPLETENESS_SCHEMA, COMPLETENESS,
                                 with_additive_defaults)
        except WireError as exc:
            self.bad_messages += 1
            log.warning("completeness topic: skipped message %d/%d: %s",
                        message.partition, message.offset, exc)
            return
        seen = reporting_observers(table)
        now = self._wall_ms()
        for name, until in seen.items():
            # A minute's row arrives after the minute: note it at its end, never in the future.
            self.observers.note([name], min(until, now))
        if self._on_note is not None and seen:
            self._on_note(len(seen))

    def _take_all(self, messages: list[ConsumerRecord]) -> None:
        for message in messages:
            self._take(message)

    async def run(self) -> None:
        """Read the last window, set :attr:`ready`, then follow until :meth:`stop`."""
        # Subscribed without a group: the consumer assigns itself every partition of the topic.
        consumer = AIOKafkaConsumer(self.topic, **self.kafka.client_kwargs(), group_id=None,
                                    enable_auto_commit=False, auto_offset_reset="latest")
        await consumer.start()
        try:
            deadline = time.monotonic() + ASSIGN_TIMEOUT_S
            while not consumer.assignment() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            tps = sorted(consumer.assignment())
            if not tps:
                log.warning("completeness topic %s has no partitions after %.0f s: observers come from the "
                            "raw stream only", self.topic, ASSIGN_TIMEOUT_S)
                return
            since = self._wall_ms() - self.observers.window_ms
            starts = await consumer.offsets_for_times({tp: since for tp in tps})
            for tp in tps:
                found = starts.get(tp)
                if found is None:
                    await consumer.seek_to_end(tp)
                else:
                    consumer.seek(tp, found.offset)
            await replay(consumer, await consumer.end_offsets(tps), self._take_all)
            log.info("observers: %d nodes reporting in the last %.0f s",
                     len(self.observers.active(self._wall_ms())), self.observers.window_ms / 1000)
            self.ready.set()
            while not self._stopping:
                for messages in (await consumer.getmany(timeout_ms=1000)).values():
                    self._take_all(messages)
        finally:
            self.ready.set()  # a failed feed must not hold the agent forever (the raw stream still counts)
            await consumer.stop()

    def stop(self) -> None:
        """Make :meth:`run` return after its current poll."""
        self._stopping = True
