"""`flowtally enrich`: the Faust app that turns raw batches into enriched batches.

One Faust event is one Kafka message is one whole batch: the agent decodes the Arrow batch,
enriches it with vectorised lookups (enricher.enrich) and publishes the enriched batch, waiting
for the broker's acknowledgement before taking the next event, so Faust only commits an input
offset whose output is durable. The enriched message carries the raw message's coordinates in
``flowtally-origin``; the sink deduplicates on them, so a batch the enricher re-processes after a
crash cannot be counted twice.

An enriched batch larger than ``kafka.max_message_bytes`` (enrichment adds names and labels to
every row) is published as several pieces (:func:`flowtally.wire.encode_pieces`, each with a
``flowtally-part: i/n`` header the sink keys its deduplication on), all acknowledged before the
raw offset may be committed. A raw message that still cannot be published (one row too large, or
Kafka refusing a piece: a topic limit below the setting) goes to the DLQ with the reason
``message_too_large`` instead of failing the agent over and over on the same message.

Identity: the static inventory (if any) seeds the index; an :class:`IdentityFeed` task replays
the identity topic to its end before the agent handles its first batch, then keeps applying
changes while the stream runs. MaxMind files (if configured) are re-checked between batches.

Second observations of a connection are dropped (``dedup_connections``, the rule in
:mod:`enricher.enrich`; the nodes whose sensors report are learnt from the raw stream and, shared
by every enricher, from the sensors' completeness rows: :mod:`enricher.observer_feed`), and the
batch's counts go to metrics and to per-minute completeness rows (stage ``enricher``), published to
``<prefix>.sensor.completeness`` once their minute has passed and at shutdown.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import faust
import pyarrow as pa
from aiokafka.errors import MessageSizeTooLargeError
from faust.exceptions import ProducerSendError
from prometheus_client import Counter, Gauge, Histogram

from enricher.enrich import EnrichStats, ObservedNodes, enrich_batch
from enricher.geo import GeoIP
from enricher.identity import IdentityIndex
from enricher.identity_feed import IdentityFeed
from enricher.inventory import load_inventory
from enricher.memory import MEMORY
from enricher.observer_feed import ObserverFeed
from enricher.schema import SCHEMA_NAME as ENRICHED
from enricher.settings import EnricherSettings
from flowtally import kafka
from flowtally.metrics import MetricsServer
from flowtally.process import apply as apply_memory_policy
from flowtally.process import release_free_memory
from flowtally.settings import load_settings
from flowtally.wire import (
    EMISSION_HEADER,
    ORIGIN_HEADER,
    SCHEMA_HEADER,
    Piece,
    RowTooLarge,
    WireError,
    decode_batch,
    encode_batch,
    encode_pieces,
    note_header,
)
from sensors.completeness import SCHEMA_NAME as COMPLETENESS
from sensors.completeness import CompletenessAccumulator, minute_of
from sensors.schema import RAW_SCHEMA, with_additive_defaults
from sensors.schema import SCHEMA_NAME as RAW

log = logging.getLogger(__name__)

BATCHES = Counter("flowtally_enricher_batches_total", "Raw batches handled", ["outcome"])
FLOWS = Counter("flowtally_enricher_flows_total", "Flows enriched and published")
SECONDS = Histogram("flowtally_enricher_batch_seconds", "Decode + enrich + encode time per batch")
OWNERS = Gauge("flowtally_enricher_identity_owners", "Addresses in the identity index")
VERSIONS = Gauge("flowtally_enricher_identity_versions", "Owner versions in the identity index")
IDENTITY_CHANGES = Counter("flowtally_enricher_identity_changes_total",
                           "Addresses changed by identity records")
LOOKUPS = Counter("flowtally_enricher_lookups_total",
                  "Flow ends by identity outcome (owned, ignored, unknown_private, external, late)",
                  ["side", "outcome"])
GEO = Counter("flowtally_enricher_geo_total", "GeoIP work (addresses, distinct, cache_misses, found)",
              ["what"])
DUPLICATES = Counter("flowtally_enricher_duplicates_dropped_total",
                     "Records dropped as a second observation of a connection (not at the initiator's node)")
NAT_SERVICE = Counter("flowtally_enricher_nat_service_total",
                      "Flows attributed to the service their initiator addressed (DNAT)")
FLOW_COUNTS = Counter("flowtally_enricher_flow_counts_total",
                      "Flows with an unknown private address, an ignored end or a late end", ["what"])
GEO_RELOADS = Counter("flowtally_enricher_geoip_reloads_total", "mmdb reloads", ["outcome"])
IMPLAUSIBLE = Counter("flowtally_enricher_flows_implausible_time_total",
                      "Flows whose end was outside the plausible window around their receive time, by "
                      "action (clamp: kept at the receive time; dlq: sent to the DLQ as received)",
                      ["action"])
SPLIT = Counter("flowtally_enricher_batches_split_total",
                "Enriched batches published as several messages to fit kafka.max_message_bytes")
PUBLISHED = Counter("flowtally_enricher_messages_published_total",
                    "Enriched messages acknowledged by Kafka (a split batch counts each piece)")
OBSERVED = Gauge("flowtally_enricher_observed_nodes",
                 "Nodes whose sensors reported within the observer window (from completeness rows)")

#: Seconds one raw message may be in hand (decoded, enriched, its output sent and acknowledged)
#: before the enricher is not ready: only a send retried that long (Kafka refusing the output)
#: takes more than a fraction of a second.
STUCK_AFTER_S = 60.0


def encode_enriched(table: pa.Table, compression: str, origin: str, limit: int) -> list[Piece]:
    """One enriched batch as messages of at most ``limit`` bytes (the wire format with the chosen
    buffer compression), each naming its raw ``origin``; pieces of a split batch also name this
    emission (a fresh id: the sink keeps the first emission of a raw message whole, see
    :mod:`sink.groups`). Raises :class:`RowTooLarge`."""
    headers = [(SCHEMA_HEADER, ENRICHED.encode()), (ORIGIN_HEADER, origin.encode())]
    pieces = encode_pieces(table, limit, headers, pa.ipc.IpcWriteOptions(compression=compression))
    if len(pieces) > 1:
        emission = uuid.uuid4().hex[:12].encode()
        for piece in pieces:
            piece.headers.append((EMISSION_HEADER, emission))
    return pieces


class EnricherState:
    """What the agent needs besides its streams; also answers the health check."""

    def __init__(self, index: IdentityIndex, geo: GeoIP | None = None,
                 feed: IdentityFeed | None = None, observers: ObservedNodes | None = None,
                 completeness: CompletenessAccumulator | None = None,
                 observer_feed: ObserverFeed | None = None) -> None:
        self.index = index
        self.observer_feed = observer_feed
        self.geo = geo
        self.feed = feed
        self.observers = observers
        self.completeness = completeness
        self.running = False
        self.last_batch: float | None = None
        #: the raw message being handled and since when (monotonic), None between messages
        self.current: tuple[str, float] | None = None
        #: why the agent's loop ended (it is restarted by Faust; cleared when it runs again)
        self.failure: str | None = None

    def health(self) -> tuple[bool, str]:
        """Readiness besides the broker (the metrics server adds its Kafka probe): identity
        replayed, the agent running, and no message stuck (a send retried for longer than
        :data:`STUCK_AFTER_S`, e.g. a poison batch) — never a reason to restart, see /livez."""
        if self.feed is not None and not self.feed.ready.is_set():
            return False, "replaying the identity topic"
        if self.observer_feed is not None and not self.observer_feed.ready.is_set():
            return False, "reading the observing nodes from the completeness topic"
        if self.failure is not None:
            return False, f"agent stopped: {self.failure}"
        current = self.current
        if current is not None and (busy := time.monotonic() - current[1]) > STUCK_AFTER_S:
            return False, f"raw message {current[0]} in hand for {busy:.0f}s"
        return (True, "ok") if self.running else (False, "starting")


def _count(stats: EnrichStats) -> None:
    for side, lookup in stats.sides.items():
        for outcome in ("owned", "ignored", "unknown_private", "external", "late"):
            value = getattr(lookup, outcome)
            if value:
                LOOKUPS.labels(side, outcome).inc(value)
    for what in ("addresses", "distinct", "cache_misses", "found"):
        value = getattr(stats.geo, what)
        if value:
            GEO.labels(what).inc(value)
    for what in ("unknown_addresses", "ignored", "late"):
        value = getattr(stats, what)
        if value:
            FLOW_COUNTS.labels(what).inc(value)
    if stats.duplicates_dropped:
        DUPLICATES.inc(stats.duplicates_dropped)
    if stats.nat_service:
        NAT_SERVICE.inc(stats.nat_service)
    for action, count in stats.implausible_time.items():
        IMPLAUSIBLE.labels(action).inc(count)


def create_app(settings: EnricherSettings, state: EnricherState) -> faust.App:
    """The Faust app, its topics and its agent."""
    brokers = [f"kafka://{server}" for server in settings.kafka.bootstrap.split(",")]
    settings.data_dir.mkdir(parents=True, exist_ok=True)  # Faust creates only the last level
    app = faust.App(
        settings.app_id,
        broker=brokers,
        broker_client_id=settings.kafka.client_id,
        broker_session_timeout=settings.session_timeout_s,
        # Static membership: a worker killed and restarted with the same id takes its partitions
        # back at once (no rebalance) instead of waiting for the dead member's session to expire.
        consumer_group_instance_id=kafka.group_instance_id(settings.group_instance_id),
        broker_heartbeat_interval=min(3.0, settings.session_timeout_s / 3),
        broker_commit_interval=settings.commit_interval_s,
        topic_disable_leader=True,
        topic_allow_declare=False,  # topics are created by flowtally with our partition counts
        web_enabled=False,
        store="memory://",
        datadir=str(settings.data_dir),  # not Faust's default "<app id>-data" in the working directory
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        producer_max_request_size=settings.kafka.max_message_bytes,
        # Per partition: one message's worth (a batch is one message); more is memory held in
        # fetch buffers while the identity replay blocks the agent.
        consumer_max_fetch_size=settings.kafka.max_message_bytes,
        # Each event is a whole batch (up to 1 MB): a few in flight is plenty, and each buffered
        # one is resident memory.
        stream_buffer_maxsize=4,
    )
    raw_topic = app.topic(settings.kafka.topic("raw"), value_type=bytes, key_type=bytes,
                          value_serializer="raw", key_serializer="raw")
    enriched_topic = app.topic(settings.kafka.topic("enriched"), value_type=bytes, key_type=bytes,
                               value_serializer="raw", key_serializer="raw")
    dlq_topic = app.topic(settings.kafka.topic("dlq"), value_type=bytes, key_type=bytes,
                          value_serializer="raw", key_serializer="raw")
    completeness_topic = app.topic(settings.kafka.topic("completeness"), value_type=bytes, key_type=bytes,
                                   value_serializer="raw", key_serializer="raw")

    async def publish_completeness(before_ms: int | None) -> None:
        """Send the completeness rows of minutes before ``before_ms`` (None: all)."""
        acc = state.completeness
        if acc is None or not len(acc):
            return
        table = acc.take(before_ms)
        if table.num_rows:
            for piece in encode_pieces(table, settings.kafka.max_message_bytes,
                                       [(SCHEMA_HEADER, COMPLETENESS.encode())]):
                await completeness_topic.send(key=settings.app_id.encode(), value=piece.value.to_pybytes(),
                                              headers=piece.headers)

    @app.timer(interval=10.0)
    async def closed_minutes() -> None:
        await publish_completeness(minute_of(int(time.time() * 1000)))

    @app.on_before_shutdown.connect  # type: ignore[arg-type]
    async def last_minutes(app: faust.App, **kwargs: Any) -> None:
        # The consumer has stopped: nothing more is counted; the producer is still up.
        # The Kafka consumer itself closes after this: leave the group then, even if static.
        kafka.leave_group_on_stop(getattr(getattr(app.consumer, "_thread", None), "_consumer", None))
        await publish_completeness(None)

    if state.feed is not None:
        feed = state.feed

        @app.task
        async def follow_identity() -> None:
            await feed.run()  # cancelled by Faust at shutdown; run() closes its consumer

    if state.observer_feed is not None:
        observer_feed = state.observer_feed

        @app.task
        async def follow_observers() -> None:
            await observer_feed.run()  # cancelled by Faust at shutdown; run() closes its consumer

    @app.agent(raw_topic)
    async def enrich(stream: Any) -> None:
        if state.feed is not None:
            await state.feed.ready.wait()
        if state.observer_feed is not None:
            await state.observer_feed.ready.wait()
        state.running, state.failure = True, None
        try:
            await _handle(stream)
        except Exception as exc:  # Faust logs it and restarts the agent; not ready meanwhile
            state.failure = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            state.current = None

    async def in_hand(stream: Any) -> AsyncIterator[Any]:
        """``stream.events()``, noting which message is in hand until the next is asked for
        (whichever way the loop body ends: published, to the DLQ, skipped)."""
        async for event in stream.events():
            message = event.message
            state.current = (f"{message.topic}/{message.partition}/{message.offset}", time.monotonic())
            yield event
            state.current = None

    time_window = settings.time_window()

    async def publish(key: bytes | None, pieces: list[Piece]) -> list[tuple[int, str]]:
        """Send ``pieces`` and wait for every acknowledgement; returns the (1-based) pieces Kafka
        refused as too large, with the error (any other failure raises: the agent restarts)."""
        futures: list[Any] = []
        refused: list[tuple[int, str]] = []
        for i, piece in enumerate(pieces, start=1):
            try:
                futures.append((i, await enriched_topic.send(key=key, value=piece.value.to_pybytes(),
                                                             headers=piece.headers)))
            except Exception as exc:  # the client's own check (max_request_size)?
                if not _too_large(exc):
                    raise
                refused.append((i, str(exc)))
        for i, future in futures:
            try:
                await future
            except Exception as exc:  # the broker's (the topic's max.message.bytes)?
                if not _too_large(exc):
                    raise
                refused.append((i, str(exc)))
            else:
                PUBLISHED.inc()
        return sorted(refused)

    async def to_dlq(event: Any, reason: str, error: str,
                     extra: list[tuple[str, bytes]] | None = None) -> None:
        """Send the raw message of ``event`` to the DLQ with why, and count it. A raw message too
        large for a message of this enricher's limit (a sensor configured with a larger one) is
        parked without its value, marked so, rather than failing the agent on it forever."""
        BATCHES.labels(f"dlq_{reason}").inc()
        headers = [*_pairs(event.headers), ("flowtally-error", note_header(error)),
                   ("flowtally-stage", b"enricher"), *(extra or [])]
        try:
            await (await dlq_topic.send(key=event.key, value=event.value, headers=headers))
        except Exception as exc:
            if not _too_large(exc):
                raise
            log.error("raw message of %d bytes does not fit a DLQ message (%s): parked without its value",
                      len(event.value or b""), exc)
            headers.append(("flowtally-value-dropped", note_header(
                f"{len(event.value or b'')} bytes, more than kafka.max_message_bytes allows: {exc}")))
            await (await dlq_topic.send(key=event.key, value=b"", headers=headers))

    async def _handle(stream: Any) -> None:
        async for event in in_hand(stream):
            message = event.message
            origin = f"{message.topic}/{message.partition}/{message.offset}"
            started = time.perf_counter()
            try:
                raw = decode_batch(event.value, event.headers, RAW_SCHEMA, RAW, with_additive_defaults)
            except WireError as exc:
                log.error("raw message %s is not a %s batch (%s): sent to the DLQ", origin, RAW, exc)
                await to_dlq(event, exc.reason, str(exc))
                continue
            stats = EnrichStats()
            geo = state.geo.current() if state.geo is not None else None
            enriched = enrich_batch(raw, state.index, geo, stats, observers=state.observers,
                                    completeness=state.completeness, now_ms=int(time.time() * 1000),
                                    time_window=time_window)
            _count(stats)
            for rejected in stats.implausible_rows:  # as received, before the batch's output
                log.warning("raw message %s: %d flows with an implausible time sent to the DLQ", origin,
                            rejected.num_rows)
                value, headers = encode_batch(rejected, RAW)
                headers += [(ORIGIN_HEADER, origin.encode()), ("flowtally-error", b"implausible-time"),
                            ("flowtally-stage", b"enricher"),
                            ("flowtally-dlq-rows", str(rejected.num_rows).encode())]
                await (await dlq_topic.send(key=event.key, value=value, headers=headers))
            try:
                pieces = encode_enriched(enriched, settings.compression, origin,
                                         settings.kafka.max_message_bytes)
            except RowTooLarge as exc:
                log.error("raw message %s: %s: sent to the DLQ", origin, exc)
                await to_dlq(event, "message_too_large", f"message_too_large: {exc}")
                continue
            SECONDS.observe(time.perf_counter() - started)
            if len(pieces) > 1:
                SPLIT.inc()
            # Wait for the broker's acks: the offset of this event is committed only after.
            refused = await publish(event.key, pieces)
            if refused:
                log.error("raw message %s: Kafka refused %d of its %d enriched pieces as too large "
                          "(a topic or broker limit below kafka.max_message_bytes?): sent to the DLQ",
                          origin, len(refused), len(pieces))
                await to_dlq(event, "message_too_large", f"message_too_large: {refused[0][1]}",
                             [("flowtally-parts-refused",
                               note_header(",".join(f"{i}/{len(pieces)}" for i, _ in refused)))])
                continue
            BATCHES.labels("enriched").inc()
            FLOWS.inc(enriched.num_rows)
            state.last_batch = time.monotonic()

    return app


def _too_large(exc: BaseException) -> bool:
    """Whether Kafka refused a message for its size (Faust wraps the client's own refusal in a
    ProducerSendError; the broker's arrives as it is)."""
    return isinstance(exc, MessageSizeTooLargeError) or (
        isinstance(exc, ProducerSendError) and isinstance(exc.__cause__, MessageSizeTooLargeError))


def _pairs(headers: Any) -> list[tuple[str, bytes]]:
    if not headers:
        return []
    if isinstance(headers, dict):
        return list(headers.items())
    return list(headers)


def run(args: argparse.Namespace) -> int:
    """`flowtally enrich`: create topics, load identity, run the Faust worker until SIGTERM."""
    apply_memory_policy(MEMORY)
    settings = load_settings(
        EnricherSettings, args.config, inventory=args.inventory, metrics_listen=args.metrics_listen
    )
    owners = load_inventory(settings.inventory).owners if settings.inventory else ()
    index = IdentityIndex(owners, history_ms=int(settings.identity_history_s * 1000),
                          release_memory=release_free_memory, private_networks=settings.private_cidrs)
    OWNERS.set(index.size)
    VERSIONS.set(index.versions)
    log.info("identity: %d owners from %s", index.size, settings.inventory or "(none)")
    geo = None
    if settings.geoip_asn_path or settings.geoip_city_path:
        geo = GeoIP(settings.geoip_asn_path, settings.geoip_city_path,
                    check_interval_s=settings.geoip_check_interval_s, cache_size=settings.geoip_cache_size,
                    on_reload=lambda outcome: GEO_RELOADS.labels(outcome).inc())
    feed = None
    if settings.identity_topic:
        def applied(changes: int, versions: int) -> None:
            IDENTITY_CHANGES.inc(changes)
            OWNERS.set(index.size)
            VERSIONS.set(versions)

        feed = IdentityFeed(settings.kafka, settings.kafka.topic("identity"), index,
                            apply_interval_s=settings.identity_apply_interval_s, on_apply=applied)
    observers = observer_feed = None
    if settings.dedup_connections:
        observers = ObservedNodes(int(settings.observer_window_s * 1000))
        nodes = observers

        def noted(_: int) -> None:
            OBSERVED.set(len(nodes.active(int(time.time() * 1000))))

        observer_feed = ObserverFeed(settings.kafka, settings.kafka.topic("completeness"), observers,
                                     on_note=noted)
    completeness = CompletenessAccumulator(observer="", stage="enricher") if settings.completeness else None
    state = EnricherState(index, geo, feed, observers, completeness, observer_feed)
    metrics = MetricsServer(settings.metrics_listen, state.health, kafka=settings.kafka)

    async def prepare() -> bool:
        # /healthz and /metrics first: while the stage waits for a broker that is down, its
        # readiness says so (and /livez watches this loop, which is running). A stop signal
        # during the wait is a clean stop, as in the other stages.
        await metrics.start()
        loop = asyncio.get_running_loop()
        waiting = asyncio.ensure_future(kafka.ensure_topics(settings.kafka, settings.topics))
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, waiting.cancel)
        try:
            await waiting
            return True
        except asyncio.CancelledError:
            return False
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

    try:
        if not asyncio.run(prepare()):
            log.info("signal received while waiting for Kafka, stopping")
            return 0
        app = create_app(settings, state)
        worker = faust.Worker(app, loglevel=args.log_level.lower(), quiet=True)
        metrics.watch_loop(worker.loop)  # /livez: Faust's loop, where the enricher's work runs
        worker.execute_from_commandline()  # returns only through SystemExit
    except SystemExit as exc:
        return int(exc.code or 0)
    finally:
        asyncio.run(metrics.stop())
    return 0
