"""Kafka clients built the same way by every stage, and the topics they agree on.

Producers are idempotent with ``acks=all`` so a retried send cannot duplicate a batch; consumers
never auto-commit, because a stage commits its input only after its output is durable.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, TopicAlreadyExistsError
from pydantic import Field

from flowtally.settings import Group, KafkaSettings

log = logging.getLogger(__name__)

#: A batch is one message; keep well under the broker's default message.max.bytes (1 MiB).
MAX_MESSAGE_BYTES = 1_000_000


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
        "max_request_size": MAX_MESSAGE_BYTES + 64_000,
    }
    return AIOKafkaProducer(**(kwargs | overrides))


def consumer(kafka: KafkaSettings, *topics: str, group_id: str, **overrides: Any) -> AIOKafkaConsumer:
    """A consumer in ``group_id`` that never commits on its own."""
    kwargs = kafka.client_kwargs() | {
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "isolation_level": "read_committed",
        "max_partition_fetch_bytes": 4 * MAX_MESSAGE_BYTES,
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
    flow = {"retention.ms": retention, "max.message.bytes": str(MAX_MESSAGE_BYTES + 64_000)}
    rf = topics.replication_factor
    return [
        NewTopic(kafka.topic("raw"), topics.raw_partitions, rf, topic_configs=flow),
        NewTopic(kafka.topic("enriched"), topics.enriched_partitions, rf, topic_configs=flow),
        NewTopic(kafka.topic("dlq"), topics.dlq_partitions, rf, topic_configs=flow),
        # Compacted: only the latest identity record per key matters after a replay.
        NewTopic(kafka.topic("identity"), topics.identity_partitions, rf,
                 topic_configs={"cleanup.policy": "compact"}),
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
        wanted = [t for t in topic_specs(kafka, topics) if t.name not in existing]
        for spec in wanted:
            try:
                await admin.create_topics([spec])
                log.info("created topic %s (%d partitions)", spec.name, spec.num_partitions)
            except TopicAlreadyExistsError:
                pass  # another stage won the race
    finally:
        await admin.close()


class KafkaUnavailable(RuntimeError):
    """The broker could not be reached within the allowed time."""
