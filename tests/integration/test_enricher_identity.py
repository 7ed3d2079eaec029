"""The identity feed against the real Kafka: records produced to the identity topic are replayed
into the index before flows are enriched, and later records keep applying (IP reused by a pod)."""

from __future__ import annotations

import asyncio
import time
import uuid

import numpy as np

from enricher.enrich import enrich_batch
from enricher.identity import IdentityIndex, OwnerInfo, Version
from enricher.identity_feed import IdentityFeed
from enricher.identity_topic import encode_key, encode_versions
from flowtally import kafka
from flowtally.kafka import TopicSettings
from flowtally.settings import KafkaSettings
from sensors.schema import address16, build_raw_table


def test_feed_replays_then_follows(kafka_bootstrap: str) -> None:
    settings = KafkaSettings(bootstrap=kafka_bootstrap, topic_prefix=f"t{uuid.uuid4().hex[:10]}")
    now = int(time.time() * 1000)
    old = OwnerInfo(name="cart-old", pod_uid="u1", namespace="shop")
    new = OwnerInfo(name="db-new", pod_uid="u2", namespace="shop")
    ip = "10.244.1.7"

    async def scenario() -> tuple[list[str], list[str]]:
        await kafka.ensure_topics(settings, TopicSettings())
        producer = kafka.producer(settings)
        await producer.start()
        topic = settings.topic("identity")
        await producer.send_and_wait(topic, encode_versions([Version(old, now - 600_000)]), key=encode_key(ip))
        index = IdentityIndex()
        feed = IdentityFeed(settings, topic, index, apply_interval_s=0.1)
        task = asyncio.create_task(feed.run())
        await asyncio.wait_for(feed.ready.wait(), 30)
        raw = build_raw_table({"src_addr": np.frombuffer(address16(ip) * 2, np.uint8).reshape(2, 16),
                               "end": np.array([now - 300_000, now - 1000])})
        first = enrich_batch(raw, index).column("src_name").to_pylist()
        # the pod is deleted 2 minutes ago and its IP given to another pod 1 minute ago
        await producer.send_and_wait(topic, encode_versions(
            [Version(old, now - 600_000, now - 120_000), Version(new, now - 60_000)]), key=encode_key(ip))
        await producer.stop()
        deadline = time.monotonic() + 30
        while index.versions < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        second = enrich_batch(raw, index).column("src_name").to_pylist()
        feed.stop()
        await asyncio.wait_for(task, 10)
        return first, second

    first, second = asyncio.run(scenario())
    assert first == ["cart-old", "cart-old"]
    assert second == ["cart-old", "db-new"]
