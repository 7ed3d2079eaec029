"""The identity feed against the real Kafka: records produced to the identity topic are replayed
into the index before flows are enriched, and later records keep applying (IP reused by a pod);
the `flowtally enrich` stage applying the DNAT and one-observation rules end to end."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa

from enricher.enrich import enrich_batch
from enricher.identity import IdentityIndex, OwnerInfo, Version
from enricher.identity_feed import IdentityFeed
from enricher.identity_topic import encode_key, encode_versions
from enricher.schema import ENRICHED_SCHEMA
from enricher.schema import SCHEMA_NAME as ENRICHED
from flowtally import kafka
from flowtally.dev.localstack import Stage, free_port
from flowtally.kafka import TopicSettings
from flowtally.settings import KafkaSettings
from flowtally.wire import decode_batch, encode_batch
from sensors.completeness import COMPLETENESS_SCHEMA, minute_of
from sensors.completeness import SCHEMA_NAME as COMPLETENESS
from sensors.completeness import with_additive_defaults as completeness_defaults
from sensors.schema import SCHEMA_NAME as RAW
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


async def _produce(settings: KafkaSettings, owners: dict[str, OwnerInfo], now: int,
                   batches: list[tuple[str, pa.Table, str]]) -> None:
    """Create the topics, write each address's owner (since 10 minutes before ``now``) to the
    identity topic, then each (topic, table, schema name) batch in order."""
    await kafka.ensure_topics(settings, TopicSettings())
    producer = kafka.producer(settings)
    await producer.start()
    try:
        for address, owner in owners.items():
            await producer.send_and_wait(settings.topic("identity"), encode_versions(
                [Version(owner, now - 600_000)]), key=encode_key(address))
        for topic, table, name in batches:
            value, headers = encode_batch(table, name)
            await producer.send_and_wait(settings.topic(topic), value, key=b"k", headers=list(headers))
    finally:
        await producer.stop()


async def _consume(settings: KafkaSettings, topic: str, schema: pa.Schema, name: str, rows: int,
                   fill: Callable[[pa.Table], pa.Table] | None = None) -> pa.Table:
    """At least ``rows`` rows of ``topic`` (bounded wait), read by a group of their own."""
    consumer = kafka.consumer(settings, topic, group_id=f"{settings.topic_prefix}-{topic}")
    await consumer.start()
    tables: list[pa.Table] = []
    try:
        deadline = time.monotonic() + 60
        while sum(t.num_rows for t in tables) < rows and time.monotonic() < deadline:
            for messages in (await consumer.getmany(timeout_ms=500)).values():
                tables += [decode_batch(m.value, m.headers, schema, name, fill) for m in messages]
    finally:
        await consumer.stop()
    return pa.concat_tables(tables) if tables else schema.empty_table()


def _enricher(kafka_bootstrap: str, prefix: str, tmp_path: Path) -> Stage:
    """A started `flowtally enrich` process on the topics of ``prefix``."""
    port = free_port()
    stage = Stage("enricher", ["enrich", "--metrics-listen", f"127.0.0.1:{port}"],
                  {"FLOWTALLY_KAFKA_BOOTSTRAP": kafka_bootstrap, "FLOWTALLY_KAFKA_TOPIC_PREFIX": prefix,
                   "FLOWTALLY_APP_ID": f"{prefix}-enricher", "FLOWTALLY_SESSION_TIMEOUT_S": "10"},
                  tmp_path / "enricher.log", port)
    stage.start()
    return stage


def test_enrich_stage_dnat_and_one_observation_per_connection(kafka_bootstrap: str, tmp_path: Path) -> None:
    """Through the real `flowtally enrich` process: identities from the topic, a raw batch of
    conntrack records reported by two nodes with DNAT, the enriched batch and the enricher's
    completeness rows read back from Kafka."""
    prefix = f"t{uuid.uuid4().hex[:10]}"
    settings = KafkaSettings(bootstrap=kafka_bootstrap, topic_prefix=prefix)
    now = int(time.time() * 1000)
    ips = {"client": "10.244.1.5", "backend": "10.244.2.7", "api": "10.96.0.10", "node-a": "10.0.0.1",
           "node-b": "10.0.0.2", "unknown": "10.244.9.9"}
    identities = {
        "client": OwnerInfo(namespace="shop", name="web-1", workload="web", node="node-a"),
        "backend": OwnerInfo(namespace="shop", name="api-1", workload="api", service="api,api-v2", node="node-b"),
        "api": OwnerInfo(kind="service", namespace="shop", name="api", service="api"),
        "node-a": OwnerInfo(kind="node", name="node-a", node="node-a"),
        "node-b": OwnerInfo(kind="node", name="node-b", node="node-b"),
    }
    # (src, dst, initiator, observer): node-a's two records of the connection, node-b's two, and a
    # record from node-b of a flow from an unknown address
    records = [("client", "backend", 1, "node-a"), ("backend", "client", 2, "node-a"),
               ("client", "backend", 1, "node-b"), ("backend", "client", 2, "node-b"),
               ("unknown", "backend", 1, "node-b")]

    def a(names: list[str]) -> np.ndarray:
        return np.frombuffer(b"".join(address16(ips[n]) for n in names), np.uint8).reshape(-1, 16)

    raw = build_raw_table({
        "src_addr": a([r[0] for r in records]), "dst_addr": a([r[1] for r in records]),
        "nat_addr": a(["api"] * 4 + ["unknown"]) * np.array([[1]] * 4 + [[0]], np.uint8),
        "exporter": a([r[3] for r in records]), "initiator": np.array([r[2] for r in records]),
        "observer": [r[3] for r in records], "end": np.full(len(records), now - 1000),
        "proto": np.full(len(records), 6), "bytes": np.arange(1, len(records) + 1) * 100,
    })

    asyncio.run(_produce(settings, {ips[n]: o for n, o in identities.items()}, now, [("raw", raw, RAW)]))
    stage = _enricher(kafka_bootstrap, prefix, tmp_path)
    try:
        stage.wait_healthy(90)
        enriched = asyncio.run(_consume(settings, settings.topic("enriched"), ENRICHED_SCHEMA, ENRICHED, 3))
        dropped = stage.metric("flowtally_enricher_duplicates_dropped_total")
        assert stage.stop() == 0, stage.log_tail()
    finally:
        stage.stop()
    out = enriched.to_pydict()
    # node-b's records of the connection node-a opened are dropped; the rest is attributed
    assert out["observer"] == ["node-a", "node-a", "node-b"]
    assert out["bytes"] == [100, 200, 500]
    assert out["dst_name"] == ["api-1", "web-1", "api-1"]
    assert out["dst_service"] == ["api", "", "api,api-v2"]
    assert out["src_service"] == ["", "api", ""]
    assert out["nat_service"] == ["api", "api", ""]
    assert out["src_kind"] == ["pod", "pod", "private"]
    assert dropped == 2
    rows = asyncio.run(_consume(settings, settings.topic("completeness"), COMPLETENESS_SCHEMA, COMPLETENESS, 1,
                                completeness_defaults)).to_pylist()
    assert [(r["stage"], r["exporter"], r["duplicates_dropped"], r["unknown_addresses"]) for r in rows] == [
        ("enricher", address16(ips["node-b"]), 2, 1)]


def test_enrichers_share_the_observed_nodes_through_completeness_rows(kafka_bootstrap: str,
                                                                      tmp_path: Path) -> None:
    """An enricher given only node-b's records (node-a's went to another enricher's partitions)
    still drops node-b's records of connections node-a's pods opened, because node-a's sensor
    wrote completeness rows; a connection opened on node-c, whose sensor is silent, keeps them."""
    prefix = f"t{uuid.uuid4().hex[:10]}"
    settings = KafkaSettings(bootstrap=kafka_bootstrap, topic_prefix=prefix)
    now = int(time.time() * 1000)
    ips = {"client": "10.244.1.5", "far": "10.244.3.3", "backend": "10.244.2.7", "node-a": "10.0.0.1",
           "node-b": "10.0.0.2"}
    identities = {
        "client": OwnerInfo(namespace="shop", name="web-1", node="node-a"),
        "far": OwnerInfo(namespace="batch", name="job-1", node="node-c"),
        "backend": OwnerInfo(namespace="shop", name="api-1", node="node-b"),
    }
    # node-b's records: both directions of client -> backend, both of far -> backend
    records = [("client", "backend", 1), ("backend", "client", 2), ("far", "backend", 1), ("backend", "far", 2)]

    def a(names: list[str]) -> np.ndarray:
        return np.frombuffer(b"".join(address16(ips[n]) for n in names), np.uint8).reshape(-1, 16)

    raw = build_raw_table({
        "src_addr": a([r[0] for r in records]), "dst_addr": a([r[1] for r in records]),
        "exporter": a(["node-b"] * len(records)), "initiator": np.array([r[2] for r in records]),
        "observer": ["node-b"] * len(records), "end": np.full(len(records), now - 1000),
        "proto": np.full(len(records), 6), "bytes": np.arange(1, len(records) + 1) * 100,
    })
    # node-a's sensor reported a minute ago (its completeness row), as did an enricher naming
    # node-c as an observer key: only sensor rows count
    reported = pa.Table.from_pylist([
        {"minute": minute_of(now) - 60_000, "exporter": address16(ips["node-a"]), "observation_domain": 0,
         "observer": "node-a", "stage": "sensor-conntrack", "records": 10},
        {"minute": minute_of(now) - 60_000, "exporter": address16(ips["node-a"]), "observation_domain": 0,
         "observer": "node-c", "stage": "enricher", "records": 0},
    ], schema=COMPLETENESS_SCHEMA)

    asyncio.run(_produce(settings, {ips[n]: o for n, o in identities.items()}, now,
                         [("completeness", reported, COMPLETENESS), ("raw", raw, RAW)]))
    stage = _enricher(kafka_bootstrap, prefix, tmp_path)
    try:
        stage.wait_healthy(90)
        out = asyncio.run(_consume(settings, settings.topic("enriched"), ENRICHED_SCHEMA, ENRICHED, 2)).to_pydict()
        dropped = stage.metric("flowtally_enricher_duplicates_dropped_total")
        observed = stage.metric("flowtally_enricher_observed_nodes")
        assert stage.stop() == 0, stage.log_tail()
    finally:
        stage.stop()
    assert out["bytes"] == [300, 400]  # far -> backend and its reply: node-c has no sensor
    assert out["src_name"] == ["job-1", "api-1"]
    assert dropped == 2
    assert observed == 1  # node-a (node-b is noted from the stream, not from completeness rows)
