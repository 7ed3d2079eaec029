"""Kafka clients built the same way by every stage, and the topics they agree on.

Producers are idempotent with ``acks=all`` so a retried send cannot duplicate a batch; consumers
never auto-commit, because a stage commits its input only after its output is durable.

One setting, ``kafka.max_message_bytes``, bounds every message: producers split what they emit
to fit it (:func:`flowtally.wire.encode_pieces`), their ``max_request_size`` is it, the topics
flowtally creates get it as ``max.message.bytes``, and consumers fetch at least that much. An
existing topic whose limit is smaller is logged and counted at start
(``flowtally_kafka_topic_limit_too_small_total``): the broker would refuse messages that fit
the setting.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable, Mapping
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaConnectionError, KafkaError, TopicAlreadyExistsError
from prometheus_client import Counter
from pydantic import Field

from flowtally.settings import Group, KafkaSettings

log = logging.getLogger(__name__)

TOPIC_LIMIT_TOO_SMALL = Counter(
    "flowtally_kafka_topic_limit_too_small_total",
    "Existing topics found at start with max.message.bytes below kafka.max_message_bytes", ["topic"])
#: Consumers fetch this much per request at least (aiokafka's default fetch_max_bytes, 50 MiB).
_FETCH_MAX_BYTES = 52_428_800


class TopicSettings(Group):
    """Partition counts of the topics a stage may create (all must agree across stages)."""

    raw_partitions: int = Field(4, ge=1, le=1024)
    enriched_partitions: int = Field(4, ge=1, le=1024)
    dlq_partitions: int = Field(1, ge=1, le=64)
    identity_partitions: int = Field(1, ge=1, le=1)  # one partition: every enricher reads it all
    replication_factor: int = Field(1, ge=1, le=5)
    retention_hours: int = Field(24, ge=1, description="Retention of the flow topics")


def producer(kafka: KafkaSettings, **overrides: Any) -> AIOKafkaProducer:
    """An idempotent producer for batch messages."""
    kwargs = kafka.client_kwargs() | {
        "enable_idempotence": True,
        "acks": "all",
        "linger_ms": 5,
        # aiokafka compares a record's size estimate (value, key, headers, framing) with this;
        # the pieces are cut to fit it with room to spare (wire.MESSAGE_OVERHEAD).
        "max_request_size": kafka.max_message_bytes,
    }
    return AIOKafkaProducer(**(kwargs | overrides))


def consumer(kafka: KafkaSettings, *topics: str, group_id: str, **overrides: Any) -> AIOKafkaConsumer:
    """A consumer in ``group_id`` that never commits on its own."""
    kwargs = kafka.client_kwargs() | {
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "isolation_level": "read_committed",
        # A few messages per partition and fetch (the broker returns a larger one alone anyway).
        "max_partition_fetch_bytes": 4 * kafka.max_message_bytes,
        "fetch_max_bytes": max(_FETCH_MAX_BYTES, 4 * kafka.max_message_bytes),
    }
    return AIOKafkaConsumer(*topics, **(kwargs | overrides))


def group_instance_id(template: str) -> str | None:
    """A consumer's static group membership id (Kafka ``group.instance.id``) from a setting:
    ``{hostname}`` is replaced by this host's name (a pod's name in Kubernetes, a container's
    id in compose: stable across restarts of the same pod or container); "" = dynamic membership."""
    return template.replace("{hostname}", socket.gethostname()) or None


def leave_group_on_stop(consumer: object) -> bool:
    """Make a static group member send LeaveGroup when it is stopped, as a dynamic one does.

    aiokafka (as KIP-345 intends) sends none for a static member, so that a member restarting
    keeps its partitions; but then a member *stopped* (SIGTERM: a rollout, a scale-down) holds
    them for the whole session timeout, and its successor, with another pod name, waits that
    long. Call this when the stage is stopping cleanly, before the consumer stops. A ``kill -9``
    sends nothing either way, and the member restarted with the same id takes its partitions
    back at once. It sets aiokafka's private coordinator state (tests/integration/test_recovery.py
    catches an aiokafka that changes it); returns whether there was a static member to change.
    """
    coordinator = getattr(consumer, "_coordinator", None)
    if coordinator is None or getattr(coordinator, "_group_instance_id", None) is None:
        return False
    coordinator._group_instance_id = None
    return True


def topic_specs(kafka: KafkaSettings, topics: TopicSettings) -> list[NewTopic]:
    """Every flowtally topic with its partitions and configuration."""
    retention = str(topics.retention_hours * 3600 * 1000)
    limit = {"max.message.bytes": str(kafka.max_message_bytes)}
    flow = {"retention.ms": retention} | limit
    rf = topics.replication_factor
    return [
        NewTopic(kafka.topic("raw"), topics.raw_partitions, rf, topic_configs=flow),
        NewTopic(kafka.topic("enriched"), topics.enriched_partitions, rf, topic_configs=flow),
        NewTopic(kafka.topic("dlq"), topics.dlq_partitions, rf, topic_configs=flow),
        # Compacted: only the latest identity record per key matters after a replay.
        NewTopic(kafka.topic("identity"), topics.identity_partitions, rf,
                 topic_configs={"cleanup.policy": "compact"} | limit),
        # Small (one row per exporter and minute): one partition keeps each sensor's minutes in order.
        NewTopic(kafka.topic("completeness"), 1, rf, topic_configs=flow),
    ]


async def ensure_topics(kafka: KafkaSettings, topics: TopicSettings, *, timeout: float | None = None) -> None:
    """Create the flowtally topics that do not exist yet (explicitly, so partition counts are ours
    and not the broker's auto-create default).

    Waits for the broker: up to ``timeout`` seconds, or with None (what every stage does at start)
    until it answers, retrying with a doubling delay up to 30 s and one warning per attempt. A
    broker that is late (a rollout, a cluster starting in any order) is not a reason to exit and
    be restarted in a loop; ``/healthz`` says what the stage waits for meanwhile.
    """
    admin = AIOKafkaAdminClient(**kafka.client_kwargs())
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    delay, attempt = 1.0, 0
    while True:
        try:
            await admin.start()
            break
        except KafkaConnectionError as exc:
            attempt += 1
            if deadline is not None and loop.time() > deadline:
                raise KafkaUnavailable(f"Kafka at {kafka.bootstrap} is unreachable: {exc}") from exc
            if deadline is None:
                log.warning("Kafka at %s is unreachable (attempt %d), retrying in %.0f s: %s",
                            kafka.bootstrap, attempt, delay, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
            else:
                await asyncio.sleep(1.0)
    try:
        existing = set(await admin.list_topics())
        specs = topic_specs(kafka, topics)
        wanted = [t for t in specs if t.name not in existing]
        await _check_limits(admin, [t.name for t in specs if t.name in existing], kafka.max_message_bytes)
        for spec in wanted:
            try:
                await admin.create_topics([spec])
                log.info("created topic %s (%d partitions)", spec.name, spec.num_partitions)
            except TopicAlreadyExistsError:
                pass  # another stage won the race
    finally:
        await admin.close()


async def _check_limits(admin: AIOKafkaAdminClient, names: list[str], limit: int) -> dict[str, int]:
    """Log and count each of the existing topics ``names`` whose ``max.message.bytes`` (its own or
    the broker's default) is below ``limit``; returns every topic's limit that could be read."""
    if not names:
        return {}
    resources = [ConfigResource(ConfigResourceType.TOPIC, name, configs={"max.message.bytes": None})
                 for name in names]
    try:
        responses = await admin.describe_configs(resources)
    except KafkaError as exc:  # e.g. no DescribeConfigs permission: the start goes on
        log.warning("could not read the message limits of the topics: %s", exc)
        return {}
    limits = topic_limits(responses)
    for name, got in sorted(limits.items()):
        if got < limit:
            TOPIC_LIMIT_TOO_SMALL.labels(name).inc()
            log.error("topic %s accepts messages of at most %d bytes (max.message.bytes), less than "
                      "kafka.max_message_bytes = %d: Kafka will refuse messages that fit the setting; "
                      "raise the topic's max.message.bytes or lower the setting", name, got, limit)
    return limits


def topic_limits(responses: list[Any]) -> dict[str, int]:
    """``max.message.bytes`` per topic from DescribeConfigs responses."""
    out: dict[str, int] = {}
    for response in responses:
        for resource in response.resources:
            error_code, _, _, name, entries = resource[:5]
            if error_code:
                continue
            for entry in entries:
                if entry[0] == "max.message.bytes" and entry[1] is not None:
                    out[name] = int(entry[1])
    return out


class KafkaUnavailable(RuntimeError):
    """The broker could not be reached within the allowed time."""


async def replay(consumer: AIOKafkaConsumer, ends: Mapping[TopicPartition, int],
                 take: Callable[[list[ConsumerRecord]], None], *, max_records: int | None = None,
                 timeout: float | None = None) -> None:
    """Read the partitions of ``ends`` from the consumer's current positions up to those end
    offsets (noted by the caller before: what was there when the replay began), handing each
    poll's records of a partition to ``take``.

    The start of every stage that rebuilds its state from a topic (the identity topic in the
    enricher and the watcher, the completeness topic's last window in the enricher) before it
    follows the topic in its own way. ``timeout``: raise TimeoutError past it.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    tps = list(ends)
    while [tp for tp in tps if await consumer.position(tp) < ends[tp]]:
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"reading {', '.join(sorted({tp.topic for tp in tps}))} back took longer "
                               f"than {timeout:.0f} s")
        got = await consumer.getmany(*tps, timeout_ms=500, max_records=max_records)
        for records in got.values():
            take(records)
