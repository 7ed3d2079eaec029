"""`flowtally enrich`: the Faust app that turns raw batches into enriched batches.

One Faust event is one Kafka message is one whole batch: the agent decodes the Arrow batch,
enriches it with vectorised lookups (enricher.enrich) and publishes the enriched batch, waiting
for the broker's acknowledgement before taking the next event, so Faust only commits an input
offset whose output is durable. The enriched message carries the raw message's coordinates in
``flowtally-origin``; the sink deduplicates on them, so a batch the enricher re-processes after a
crash cannot be counted twice.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from typing import Any

import faust
from prometheus_client import Counter, Gauge, Histogram

from enricher.enrich import enrich_batch
from enricher.identity import IdentityIndex
from enricher.inventory import load_inventory
from enricher.schema import SCHEMA_NAME as ENRICHED
from enricher.settings import EnricherSettings
from flowtally import kafka
from flowtally.metrics import MetricsServer
from flowtally.settings import load_settings
from flowtally.wire import ORIGIN_HEADER, WireError, decode_batch, encode_batch
from sensors.schema import RAW_SCHEMA
from sensors.schema import SCHEMA_NAME as RAW

log = logging.getLogger(__name__)

BATCHES = Counter("flowtally_enricher_batches_total", "Raw batches handled", ["outcome"])
FLOWS = Counter("flowtally_enricher_flows_total", "Flows enriched and published")
SECONDS = Histogram("flowtally_enricher_batch_seconds", "Decode + enrich + encode time per batch")
OWNERS = Gauge("flowtally_enricher_identity_owners", "Addresses in the identity index")


class EnricherState:
    """What the agent needs besides its streams; also answers the health check."""

    def __init__(self, index: IdentityIndex) -> None:
        self.index = index
        self.running = False
        self.last_batch: float | None = None

    def health(self) -> tuple[bool, str]:
        return (True, "ok") if self.running else (False, "starting")


def create_app(settings: EnricherSettings, state: EnricherState) -> faust.App:
    """The Faust app, its topics and its agent."""
    brokers = [f"kafka://{server}" for server in settings.kafka.bootstrap.split(",")]
    app = faust.App(
        settings.app_id,
        broker=brokers,
        broker_client_id=settings.kafka.client_id,
        broker_session_timeout=settings.session_timeout_s,
        broker_heartbeat_interval=min(3.0, settings.session_timeout_s / 3),
        broker_commit_interval=settings.commit_interval_s,
        topic_disable_leader=True,
        topic_allow_declare=False,  # topics are created by flowtally with our partition counts
        web_enabled=False,
        store="memory://",
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        producer_max_request_size=kafka.MAX_MESSAGE_BYTES + 64_000,
        consumer_max_fetch_size=4 * kafka.MAX_MESSAGE_BYTES,
        stream_buffer_maxsize=16,  # each event is a whole batch: a few in flight is plenty
    )
    raw_topic = app.topic(settings.kafka.topic("raw"), value_type=bytes, key_type=bytes,
                          value_serializer="raw", key_serializer="raw")
    enriched_topic = app.topic(settings.kafka.topic("enriched"), value_type=bytes, key_type=bytes,
                               value_serializer="raw", key_serializer="raw")
    dlq_topic = app.topic(settings.kafka.topic("dlq"), value_type=bytes, key_type=bytes,
                          value_serializer="raw", key_serializer="raw")

    @app.agent(raw_topic)
    async def enrich(stream: Any) -> None:
        state.running = True
        async for event in stream.events():
            message = event.message
            origin = f"{message.topic}/{message.partition}/{message.offset}"
            started = time.perf_counter()
            try:
                raw = decode_batch(event.value, event.headers, RAW_SCHEMA, RAW)
            except WireError as exc:
                log.error("raw message %s is not a %s batch (%s): sent to the DLQ", origin, RAW, exc)
                BATCHES.labels(f"dlq_{exc.reason}").inc()
                headers = [*_pairs(event.headers), ("flowtally-error", str(exc).encode()),
                           ("flowtally-stage", b"enricher")]
                await (await dlq_topic.send(key=event.key, value=event.value, headers=headers))
                continue
            enriched = enrich_batch(raw, state.index)
            value, headers = encode_batch(enriched, ENRICHED)
            headers.append((ORIGIN_HEADER, origin.encode()))
            SECONDS.observe(time.perf_counter() - started)
            # Wait for the broker's ack: the offset of this event is committed only after.
            await (await enriched_topic.send(key=event.key, value=value, headers=headers))
            BATCHES.labels("enriched").inc()
            FLOWS.inc(enriched.num_rows)
            state.last_batch = time.monotonic()

    return app


def _pairs(headers: Any) -> list[tuple[str, bytes]]:
    if not headers:
        return []
    if isinstance(headers, dict):
        return list(headers.items())
    return list(headers)


def run(args: argparse.Namespace) -> int:
    """`flowtally enrich`: create topics, load identity, run the Faust worker until SIGTERM."""
    settings = load_settings(
        EnricherSettings, args.config, inventory=args.inventory, metrics_listen=args.metrics_listen
    )
    owners = load_inventory(settings.inventory).owners if settings.inventory else ()
    state = EnricherState(IdentityIndex(owners))
    OWNERS.set(state.index.size)
    log.info("identity: %d owners from %s", state.index.size, settings.inventory or "(none)")
    asyncio.run(kafka.ensure_topics(settings.kafka, settings.topics))
    app = create_app(settings, state)
    metrics = MetricsServer(settings.metrics_listen, state.health)
    asyncio.run(metrics.start())
    try:
        worker = faust.Worker(app, loglevel=args.log_level.lower(), quiet=True)
        worker.execute_from_commandline()  # returns only through SystemExit
    except SystemExit as exc:
        return int(exc.code or 0)
    finally:
        asyncio.run(metrics.stop())
    return 0
