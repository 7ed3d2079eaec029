"""Keeps an :class:`IdentityIndex` in step with the identity topic (the shell around it).

:meth:`IdentityFeed.run` first *replays* the topic: it notes the partitions' end offsets, reads
from the beginning up to them, applies everything in one batch and sets :attr:`ready` (the
enricher's agent waits for it before its first flow batch). It then *follows* the topic, collecting
changes and applying them every ``apply_interval_s`` (one index rebuild per interval, not per
record), and prunes versions older than the history window once a minute.

A plain aiokafka consumer without a group (every enricher reads the whole topic; nothing to
commit: it always replays from the beginning). Faust's GlobalTable would do the same with more
machinery and its recovery caveats with several workers (READING.md section 5).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from enricher.identity import IdentityIndex, Version
from enricher.identity_topic import IdentityRecordError, decode_record
from flowtally.kafka import replay
from flowtally.settings import KafkaSettings

log = logging.getLogger(__name__)

PRUNE_INTERVAL_S = 60.0
#: Addresses collected during the replay before they are moved into the index's arrays, and
#: records taken per poll: their Python objects (decoded versions, fetched values) are the
#: replay's transient memory (measured on 1M versions: 5,000/10,000 -> 1,000/1,000 lowered the
#: resident set before the rebuild from 345 to 258 MB).
REPLAY_CHUNK = 1_000
REPLAY_POLL_RECORDS = 1_000


def _memory_mb() -> str:
    """The process's resident set now and at its peak (VmRSS, VmHWM) for the replay's log
    lines: the replay and its rebuild are the enricher's memory peak."""
    try:
        status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines()
                      if line.startswith(("VmRSS", "VmHWM")))
        return (f"resident {int(status['VmRSS'].split()[0]) // 1024} MB, "
                f"peak {int(status['VmHWM'].split()[0]) // 1024} MB")
    except (OSError, KeyError, ValueError):
        return "resident n/a"


class IdentityFeed:
    """Replays, then follows, the identity topic into ``index``."""

    def __init__(self, kafka: KafkaSettings, topic: str, index: IdentityIndex, *,
                 apply_interval_s: float = 0.5, wall_ms: Callable[[], int] = lambda: int(time.time() * 1000),
                 on_apply: Callable[[int, int], None] | None = None) -> None:
        self.kafka = kafka
        self.topic = topic
        self.index = index
        self.apply_interval_s = apply_interval_s
        self.ready = asyncio.Event()
        self.records = 0
        self.bad_records = 0
        self._wall_ms = wall_ms
        self._on_apply = on_apply
        self._consumer: AIOKafkaConsumer | None = None
        self._stopping = False

    def _collect(self, batch: dict[bytes, list[Version] | None], key: bytes | None,
                 value: bytes | None) -> None:
        self.records += 1
        try:
            address, versions = decode_record(key, value)
        except IdentityRecordError as exc:
            self.bad_records += 1
            log.warning("identity topic: skipped a record: %s", exc)
            return
        batch[address] = versions  # a later record for the same address replaces an earlier one

    def _apply(self, batch: dict[bytes, list[Version] | None]) -> None:
        if batch:
            self.index.apply(batch)
            if self._on_apply is not None:
                self._on_apply(len(batch), self.index.versions)
            batch.clear()

    async def run(self) -> None:
        """Replay to the end, set :attr:`ready`, then follow until :meth:`stop`."""
        consumer = AIOKafkaConsumer(**self.kafka.client_kwargs(), enable_auto_commit=False,
                                    auto_offset_reset="earliest", isolation_level="read_committed")
        self._consumer = consumer
        await consumer.start()
        try:
            # The identity topic has exactly one partition (TopicSettings.identity_partitions).
            tps = [TopicPartition(self.topic, 0)]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            ends = await consumer.end_offsets(tps)
            log.info("identity: replaying %s up to offset %d (%s)", self.topic, ends[tps[0]], _memory_mb())
            t0 = time.monotonic()
            batch: dict[bytes, list[Version] | None] = {}
            changed = 0

            def take(records: list[ConsumerRecord]) -> None:
                nonlocal changed
                for m in records:
                    self._collect(batch, m.key, m.value)
                if len(batch) >= REPLAY_CHUNK:
                    # Into the index's arrays now (one sort at the end): holding a whole topic of
                    # Version objects would cost more memory than the index itself.
                    changed += len(batch)
                    self.index.apply(batch, rebuild=False)
                    batch.clear()

            await replay(consumer, ends, take, max_records=REPLAY_POLL_RECORDS)
            changed += len(batch)
            self.index.apply(batch, rebuild=False)
            log.debug("identity: replay read, rebuilding (%s)", _memory_mb())
            self.index.rebuild()
            if self._on_apply is not None and changed:
                self._on_apply(changed, self.index.versions)
            batch.clear()
            self.index.prune(self._wall_ms())
            log.info("identity: replayed %d records in %.2f s: %d addresses, %d versions (%s)",
                     self.records, time.monotonic() - t0, self.index.size, self.index.versions, _memory_mb())
            self.ready.set()
            last_apply = last_prune = time.monotonic()
            while not self._stopping:
                got = await consumer.getmany(timeout_ms=int(self.apply_interval_s * 1000))
                for messages in got.values():
                    for m in messages:
                        self._collect(batch, m.key, m.value)
                now = time.monotonic()
                if batch and now - last_apply >= self.apply_interval_s:
                    self._apply(batch)
                    last_apply = now
                if now - last_prune >= PRUNE_INTERVAL_S:
                    self.index.prune(self._wall_ms())
                    last_prune = now
        finally:
            self._consumer = None
            await consumer.stop()

    def stop(self) -> None:
        """Ask :meth:`run` to return after its current poll."""
        self._stopping = True
