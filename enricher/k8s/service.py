"""`flowtally watch-k8s`: one per cluster, writes who owns each address to the identity topic.

Start: create the topics if missing (the identity topic compacted, one partition); read the
identity topic back (``continue_history``) so a restarted watcher continues every address's
version list instead of starting it again; start a list/watch thread per resource
(:mod:`enricher.k8s.watcher`). Their lists and events go through one asyncio queue into the
pure :class:`~enricher.k8s.objects.ClusterState`; every ``flush_interval_s`` the changed
addresses (and, every ``prune_interval_s``, those whose old versions were pruned) are written,
one record per address with its whole version list (a tombstone for a forgotten one), with the
idempotent producer. Nothing is written before every resource has been listed once: a partial
picture would close the versions of everything not listed yet.

``/healthz`` is healthy once the initial lists of every resource have been written. SIGTERM:
the watch threads stop, the events already received are flushed and written, exit 0. A write
that fails keeps its addresses pending; the next flush writes their then-current lists.

Every record fits ``kafka.max_message_bytes``: an address whose list would not fit is written
without its oldest ended versions (``flowtally_watcher_versions_trimmed_total``); one that does
not fit even so is not written (``flowtally_watcher_records_refused_total``, logged) rather than
failing every flush.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import time
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError, MessageSizeTooLargeError
from prometheus_client import Counter, Gauge, Histogram

from enricher.identity import Version
from enricher.identity_topic import (
    IdentityRecordError,
    IdentityRecordTooLarge,
    decode_record,
    encode_key,
    fit_versions,
)
from enricher.k8s.objects import RESOURCES, ClusterState
from enricher.k8s.settings import WatcherSettings
from enricher.k8s.watcher import (
    Changed,
    Item,
    Listed,
    ResourceWatcher,
    api_client,
    list_functions,
    start_watchers,
)
from flowtally import kafka
from flowtally.lifecycle import run_components
from flowtally.metrics import MetricsServer
from flowtally.settings import KafkaSettings, load_settings
from sensors.schema import address_text

log = logging.getLogger(__name__)

RECORDS = Counter("flowtally_watcher_records_written_total", "Identity records written",
                  ["record"])  # versions | tombstone
WRITE_ERRORS = Counter("flowtally_watcher_write_errors_total", "Failed writes of identity records")
ADDRESSES = Gauge("flowtally_watcher_addresses", "Addresses with a version history")
VERSIONS = Gauge("flowtally_watcher_versions", "Versions held over all addresses")
OBJECTS = Gauge("flowtally_watcher_objects", "Objects held", ["resource"])
PENDING = Gauge("flowtally_watcher_pending_addresses", "Changed addresses not written yet")
TRIMMED = Counter("flowtally_watcher_versions_trimmed_total",
                  "Ended versions left out of identity records to fit kafka.max_message_bytes")
REFUSED = Counter("flowtally_watcher_records_refused_total",
                  "Identity records not written: too large for kafka.max_message_bytes even trimmed")
FLUSH_SECONDS = Histogram("flowtally_watcher_flush_seconds", "Computing the changes of one flush")

REPLAY_TIMEOUT_S = 300.0


async def read_history(settings: KafkaSettings, topic: str, *,
                       timeout: float = REPLAY_TIMEOUT_S) -> dict[str, list[Version]]:
    """The identity topic's current version list of every address (its last record per key)."""
    consumer = AIOKafkaConsumer(**settings.client_kwargs(), enable_auto_commit=False,
                                auto_offset_reset="earliest", isolation_level="read_committed")
    await consumer.start()
    history: dict[str, list[Version]] = {}
    try:
        tp = TopicPartition(topic, 0)  # the identity topic has one partition
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)

        def take(records: list[ConsumerRecord]) -> None:
            for m in records:
                try:
                    address, versions = decode_record(m.key, m.value)
                except IdentityRecordError as exc:
                    log.warning("identity topic: skipped a record: %s", exc)
                    continue
                if versions:
                    history[address_text(address)] = versions
                else:
                    history.pop(address_text(address), None)

        await kafka.replay(consumer, await consumer.end_offsets([tp]), take, max_records=10_000,
                           timeout=timeout)
    finally:
        await consumer.stop()
    return history


class WatchStage:
    """The watcher as a lifecycle component (see the module docstring)."""

    name = "watch-k8s"

    def __init__(self, settings: WatcherSettings) -> None:
        self._settings = settings
        self._topic = settings.kafka.topic("identity")
        self._state: ClusterState | None = None
        self._producer: AIOKafkaProducer | None = None
        self._watchers: list[ResourceWatcher] = []
        self._queue: asyncio.Queue[Item] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._threads_stopped = asyncio.Event()
        self._listed: set[str] = set()
        self._pending: set[str] = set()
        self._synced = False

    def health(self) -> tuple[bool, str]:
        """Healthy once the first lists of every resource are written."""
        if self._synced:
            return True, "ok"
        missing = sorted(set(RESOURCES) - self._listed)
        return False, f"initial lists not written yet (not listed: {', '.join(missing) or 'none'})"

    async def start(self) -> None:
        s = self._settings
        # First, so that unreadable credentials fail the start before anything is opened.
        functions = list_functions(api_client(s))
        await kafka.ensure_topics(s.kafka, s.topics)
        history = await read_history(s.kafka, self._topic) if s.continue_history else {}
        log.info("continuing %d addresses from %s", len(history), self._topic)
        self._state = ClusterState(history_ms=int(s.identity_history_s * 1000), history=history,
                                   pod_labels=s.pod_labels)
        self._producer = kafka.producer(s.kafka)
        await self._producer.start()
        loop = asyncio.get_running_loop()

        def emit(item: Item) -> None:  # called from the watch threads
            loop.call_soon_threadsafe(self._queue.put_nowait, item)

        self._watchers = await asyncio.to_thread(start_watchers, s, functions, emit)
        self._task = asyncio.create_task(self._run())

    async def wait(self) -> None:
        assert self._task is not None
        await self._task

    async def stop(self) -> None:
        """Stop the watch threads, then write what they delivered."""
        watchers, self._watchers = self._watchers, []
        await asyncio.gather(*(asyncio.to_thread(w.stop) for w in watchers))
        self._threads_stopped.set()
        if self._task is not None:
            await asyncio.wait([self._task])
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None

    def _take(self, item: Item) -> None:
        assert self._state is not None
        if isinstance(item, Listed):
            self._state.replace(item.resource, item.items)
            self._listed.add(item.resource)
        elif isinstance(item, Changed):
            self._state.apply(item.resource, item.type, item.object)

    async def _run(self) -> None:
        s = self._settings
        last_flush = last_prune = time.monotonic()
        while True:
            done = self._threads_stopped.is_set()
            with contextlib.suppress(TimeoutError):  # nothing new: flush what there is
                self._take(await asyncio.wait_for(self._queue.get(), s.flush_interval_s))
            while not self._queue.empty():
                self._take(self._queue.get_nowait())
            now = time.monotonic()
            if self._listed >= set(RESOURCES) and (done or now - last_flush >= s.flush_interval_s):
                prune = now - last_prune >= s.prune_interval_s
                await self._flush(prune=prune)
                last_flush = now
                if prune:
                    last_prune = now
            if done and self._queue.empty():
                if self._pending:
                    log.warning("stopping with %d identity records not written", len(self._pending))
                return

    async def _flush(self, *, prune: bool) -> None:
        assert self._state is not None and self._producer is not None
        now_ms = int(time.time() * 1000)
        with FLUSH_SECONDS.time():
            changes = self._state.flush(now_ms)
            if prune:
                changes |= self._state.prune(now_ms)
        self._pending |= changes.keys()
        if self._pending:
            await self._write()
        if not self._synced and not self._pending:
            self._synced = True
            log.info("initial lists written: %d addresses", self._state.addresses)
        ADDRESSES.set(self._state.addresses)
        VERSIONS.set(self._state.versions_total)
        PENDING.set(len(self._pending))
        for r in RESOURCES:
            OBJECTS.labels(r).set(self._state.count(r))

    async def _write(self) -> None:
        assert self._state is not None and self._producer is not None
        addresses = sorted(self._pending)
        limit = self._settings.kafka.max_message_bytes
        sent: list[tuple[str, bool, asyncio.Future[Any]]] = []  # address, tombstone, ack
        done: set[str] = set()  # written or refused: no longer pending
        failure: BaseException | None = None
        try:
            for address in addresses:
                versions = self._state.versions(address)
                key = encode_key(address)
                try:
                    value, trimmed = fit_versions(versions or None, key, limit)
                except IdentityRecordTooLarge as exc:
                    self._refuse(address, str(exc), done)
                    continue
                if trimmed:
                    TRIMMED.inc(trimmed)
                    log.warning("identity record of %s: left out its %d oldest ended versions to fit "
                                "%d bytes", address, trimmed, limit)
                try:
                    future = await self._producer.send(self._topic, value, key=key)
                except MessageSizeTooLargeError as exc:  # cannot be, fit_versions used the same limit
                    self._refuse(address, f"Kafka refused it: {exc}", done)
                    continue
                sent.append((address, not versions, future))
        except KafkaError as exc:
            failure = exc
        results = await asyncio.gather(*(future for _, _, future in sent), return_exceptions=True)
        renew = False
        for (address, tombstone, _), result in zip(sent, results, strict=True):
            if isinstance(result, MessageSizeTooLargeError):  # the topic's limit is below ours
                self._refuse(address, f"Kafka refused it: {result}", done)
                renew = True
            elif isinstance(result, KafkaError):
                failure = failure or result
            elif isinstance(result, BaseException):
                raise result
            else:
                done.add(address)
                RECORDS.labels("tombstone" if tombstone else "versions").inc()
        self._pending.difference_update(done)
        if failure is not None:
            WRITE_ERRORS.inc()
            log.warning("writing %d identity records failed (retried at the next flush): %s",
                        len(set(addresses) - done), failure)
        if renew:
            await self._renew_producer()

    def _refuse(self, address: str, why: str, done: set[str]) -> None:
        """Give up on writing ``address``'s record (until it changes again), counted."""
        REFUSED.inc()
        done.add(address)
        log.error("identity record of %s not written: %s", address, why)

    async def _renew_producer(self) -> None:
        """A new producer after the broker refused a record: the refused batch left a gap in the
        idempotent producer's sequence numbers, and the broker would answer every later batch
        of it with OutOfOrderSequenceNumber (the addresses they held stay pending)."""
        old, self._producer = self._producer, kafka.producer(self._settings.kafka)
        if old is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(old.stop(), 5.0)
        await self._producer.start()


def run(args: argparse.Namespace) -> int:
    """`flowtally watch-k8s`."""
    settings = load_settings(WatcherSettings, args.config, metrics_listen=args.metrics_listen,
                             kubeconfig=args.kubeconfig, kube_context=args.context)
    stage = WatchStage(settings)
    metrics = MetricsServer(settings.metrics_listen, stage.health, kafka=settings.kafka)
    return asyncio.run(run_components([metrics, stage]))
