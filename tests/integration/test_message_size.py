"""No Kafka message is too large by construction: real Kafka, the real enricher and sink, chDB.

Every stage runs with ``kafka.max_message_bytes`` = 64 KiB, so the topics flowtally creates
refuse anything larger (the broker enforces it, checked first). Raw batches fit (the sensor's
:func:`~sensors.publisher.encode_messages` splits them), but enrichment (pod names, workloads,
services, lz4) makes each enriched batch several times larger: the enricher must publish every
batch as pieces (``flowtally-part: i/n``), and the sink must insert every piece — keyed on the
raw origin alone, as before, it would drop pieces 2..n as duplicates of piece 1 and the totals
below would fall short. The enricher is SIGKILLed once mid-stream (with a long commit interval),
so it re-emits batches it had already published — split into more pieces this time, its pods
having been renamed meanwhile: those must be skipped as a whole, not counted twice.

One raw batch is poison: its flows come from a pod whose (random, incompressible) 100 KB name
makes a single enriched row larger than a message. It goes to the DLQ with the reason
``message_too_large``; the enricher does not crash-loop on it and everything else is stored.

The watcher keeps each identity record within the limit too (a second test): an address with too
long a history loses its oldest ended versions, a record that cannot fit at all is refused.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml
from aiokafka.errors import MessageSizeTooLargeError
from prometheus_client import REGISTRY

from enricher.identity import OwnerInfo, Version
from enricher.identity_topic import encode_key, encode_versions
from flowtally import kafka
from flowtally.clickhouse import connect
from flowtally.dev.localstack import Stage, free_port
from flowtally.settings import ClickHouseSettings, KafkaSettings
from flowtally.wire import MESSAGE_OVERHEAD, decode_batch
from sensors.publisher import Publisher, encode_messages
from sensors.schema import RAW_SCHEMA, SCHEMA_NAME, build_raw_table, ipv4_to_mapped
from tests.fake_apiserver import FakeApiServer
from tests.integration.test_exactly_once import _wait_drained
from tests.integration.test_watch_k8s import Watcher, pod, secs
from tests.tables import random_raw_table

LIMIT = 65_536
BATCHES = 24
ROWS = 3_000
PODS = [0x0AF40100 + i for i in range(200)]  # 10.244.1.0/24
POISON_POD = 0x0AF40200  # 10.244.2.0
EXTERNAL = [0x51024500 + i for i in range(50)]  # 81.2.69.x


def _dotted(ip: int) -> str:
    return ".".join(str((ip >> s) & 255) for s in (24, 16, 8, 0))


def _inventory(path: Path, renamed: bool = False) -> None:
    """The pods (``renamed``: with 192 more characters of name each, incompressible)."""
    owners = [{"ip": _dotted(ip), "kind": "pod", "namespace": f"team-{i % 7}-production",
               "name": f"checkout-frontend-{i:03d}-7d9c6f5b8d-{i * 7919 % 100_000:05d}"
                       + (f"-{hashlib.sha256(str(i).encode()).hexdigest() * 3}" if renamed else ""),
               "workload": f"checkout-frontend-{i % 20}", "workload_kind": "Deployment",
               "service": f"checkout-frontend-{i % 20}.team-{i % 7}-production", "node": f"node-{i % 5}"}
              for i, ip in enumerate(PODS)]
    owners.append({"ip": _dotted(POISON_POD), "kind": "pod", "namespace": "poison",
                   "name": base64.b64encode(os.urandom(75_000)).decode(), "node": "node-0"})
    path.write_text(yaml.safe_dump({"owners": owners}))


def _raw_messages(now_ms: int) -> tuple[list[tuple[bytes, bytes]], bytes, tuple[int, int]]:
    """(key, value) of the raw messages of the good batches (split by the sensor's own rule to fit
    LIMIT), the poison message, and the good flows' (count, sum of bytes)."""
    rng = np.random.default_rng(22)
    messages, count, total = [], 0, 0
    for i in range(BATCHES):
        nbytes = rng.integers(40, 10_000_000, ROWS, dtype=np.uint64)
        table = build_raw_table({
            "src_addr": ipv4_to_mapped(rng.choice(np.array(PODS, np.uint32), ROWS)),
            "dst_addr": ipv4_to_mapped(rng.choice(np.array(PODS + EXTERNAL, np.uint32), ROWS)),
            "bytes": nbytes, "packets": rng.integers(1, 10_000, ROWS, dtype=np.uint64),
            "start": np.full(ROWS, now_ms - 5000), "end": np.full(ROWS, now_ms),
            "time_received": np.full(ROWS, now_ms), "src_port": rng.integers(1024, 65535, ROWS),
            "dst_port": rng.choice([53, 80, 443, 8080], ROWS), "proto": np.full(ROWS, 6),
            "version": np.full(ROWS, 10),
        })
        key = f"exporter-{i % 3}".encode()
        messages += [(key, m.value.to_pybytes()) for m in encode_messages(table, key, LIMIT)]
        count += ROWS
        total += int(nbytes.sum())
    poison = build_raw_table({
        "src_addr": ipv4_to_mapped(np.full(5, POISON_POD, np.uint32)),
        "dst_addr": ipv4_to_mapped(np.full(5, EXTERNAL[0], np.uint32)),
        "bytes": np.full(5, 1000), "packets": np.ones(5), "end": np.full(5, now_ms),
        "time_received": np.full(5, now_ms), "proto": np.full(5, 6),
    })
    (poison_message,) = encode_messages(poison, b"exporter-0", LIMIT)
    return messages, poison_message.value.to_pybytes(), (count, total)


async def _produce(settings: KafkaSettings, messages: list[tuple[bytes, bytes]], seconds: float) -> None:
    producer = kafka.producer(settings)
    await producer.start()
    try:
        for key, value in messages:
            await producer.send_and_wait(settings.topic("raw"), value, key=key,
                                         headers=[("flowtally-schema", b"raw.v1")])
            await asyncio.sleep(seconds / len(messages))
    finally:
        await producer.stop()


async def _broker_enforces_the_topic_limit(settings: KafkaSettings) -> None:
    """The topics were created with max.message.bytes = LIMIT: a producer allowed more is refused
    by the broker; and a stage configured for more is warned at start that the topics are smaller."""
    producer = kafka.producer(settings, max_request_size=4 * LIMIT)
    await producer.start()
    try:
        with pytest.raises(MessageSizeTooLargeError):
            await producer.send_and_wait(settings.topic("dlq"), os.urandom(LIMIT + 1024))
        await producer.send_and_wait(settings.topic("dlq"), b"x" * 1000)  # the limit is not 0
    finally:
        await producer.stop()

    def warned() -> dict[str, float]:
        return {name: REGISTRY.get_sample_value("flowtally_kafka_topic_limit_too_small_total",
                                                {"topic": settings.topic(name)}) or 0.0
                for name in ("raw", "enriched", "dlq", "identity", "completeness")}

    before = warned()
    bigger = settings.model_copy(update={"max_message_bytes": 2 * LIMIT})
    await kafka.ensure_topics(bigger, kafka.TopicSettings())
    assert {k: v - before[k] for k, v in warned().items()} == dict.fromkeys(before, 1.0)
    await kafka.ensure_topics(settings, kafka.TopicSettings())  # the configured limit: no warning
    assert {k: v - before[k] for k, v in warned().items()} == dict.fromkeys(before, 1.0)


async def _read_dlq(settings: KafkaSettings, group: str, want: int = 2) -> list[tuple[bytes, dict[str, bytes]]]:
    """The enricher's DLQ messages (value, headers), waiting up to 10 s for ``want`` of them."""
    consumer = kafka.consumer(settings, settings.topic("dlq"), group_id=group)
    await consumer.start()
    got: list[tuple[bytes, dict[str, bytes]]] = []
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            for messages in (await consumer.getmany(timeout_ms=500)).values():
                got += [(m.value, dict(m.headers)) for m in messages if m.value is not None]
            if sum(h.get("flowtally-stage") == b"enricher" for _, h in got) >= want:
                break
    finally:
        await consumer.stop()
    return [(v, h) for v, h in got if h.get("flowtally-stage") == b"enricher"]


def test_enriched_batches_larger_than_a_message_are_split_and_stored_exactly(
        kafka_bootstrap: str, tmp_path: Path) -> None:
    prefix = f"ms{uuid.uuid4().hex[:10]}"
    settings = KafkaSettings(bootstrap=kafka_bootstrap, topic_prefix=prefix, max_message_bytes=LIMIT)
    asyncio.run(kafka.ensure_topics(settings, kafka.TopicSettings()))
    asyncio.run(_broker_enforces_the_topic_limit(settings))

    inventory = tmp_path / "inventory.yaml"
    _inventory(inventory)
    messages, poison, expected = _raw_messages(int(time.time() * 1000))
    assert all(len(v) < LIMIT for _, v in messages) and len(poison) < LIMIT
    env = {"FLOWTALLY_KAFKA_BOOTSTRAP": kafka_bootstrap, "FLOWTALLY_KAFKA_TOPIC_PREFIX": prefix,
           "FLOWTALLY_KAFKA_MAX_MESSAGE_BYTES": str(LIMIT), "FLOWTALLY_CLICKHOUSE_PATH": str(tmp_path / "chdb")}
    stages = {
        "sink": Stage("sink", ["sink", "--metrics-listen", f"127.0.0.1:{free_port()}"],
                      env | {"FLOWTALLY_GROUP_ID": f"{prefix}-sink"}, tmp_path / "sink.log", 0),
        "enricher": Stage("enricher", ["enrich", "--inventory", str(inventory),
                                       "--metrics-listen", f"127.0.0.1:{free_port()}"],
                          env | {"FLOWTALLY_APP_ID": f"{prefix}-enricher",
                                 # a restarted worker takes its partition back at once
                                 "FLOWTALLY_GROUP_INSTANCE_ID": f"{prefix}-enricher-0",
                                 "FLOWTALLY_SESSION_TIMEOUT_S": "6",
                                 # offsets committed seldom: the kill leaves published pieces uncommitted
                                 "FLOWTALLY_COMMIT_INTERVAL_S": "30"},
                          tmp_path / "enricher.log", 0),
    }
    for stage in stages.values():
        stage.metrics_port = int(stage.argv[-1].rsplit(":", 1)[1])
    groups = {f"{prefix}-enricher": settings.topic("raw"), f"{prefix}-sink": settings.topic("enriched")}
    try:
        for stage in stages.values():
            stage.start()
        for stage in stages.values():
            stage.wait_healthy(60)
        half = len(messages) // 2
        asyncio.run(_produce(settings, [*messages[:half], (b"exporter-0", poison)], seconds=2.0))
        enricher = stages["enricher"]
        deadline = time.monotonic() + 30
        while enricher.metric("flowtally_enricher_batches_total") < half + 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        split = enricher.metric("flowtally_enricher_batches_split_total")
        published = enricher.metric("flowtally_enricher_messages_published_total")
        too_large = enricher.metric("flowtally_enricher_batches_total", {"outcome": "dlq_message_too_large"})
        assert enricher.process is not None
        enricher.process.kill()  # nothing committed yet (30 s interval): all of it is handled again
        enricher.process.wait(10)
        # Meanwhile the pods got longer names: the re-emitted batches split into more pieces,
        # which are no copies of the first pieces by number (the sink keeps the first emission)
        _inventory(inventory, renamed=True)
        enricher.env["FLOWTALLY_COMMIT_INTERVAL_S"] = "1"  # from now on, commit as usual
        enricher.start()
        enricher.wait_healthy(60)
        deadline = time.monotonic() + 30
        while enricher.metric("flowtally_enricher_batches_total") < half + 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        republished = enricher.metric("flowtally_enricher_messages_published_total")
        asyncio.run(_produce(settings, messages[half:], seconds=1.0))
        lag = asyncio.run(_wait_drained(settings, groups, stages, timeout=60))
        assert lag[f"{prefix}-enricher"] == 0 and lag[f"{prefix}-sink"] == 0, lag
        duplicates = stages["sink"].metric("flowtally_sink_messages_total", {"outcome": "duplicate"})
        dlq = asyncio.run(_read_dlq(settings, f"{prefix}-dlq-reader"))
    finally:
        codes = {name: stage.stop(30) for name, stage in stages.items()}
    assert codes == {"sink": 0, "enricher": 0}, codes
    print(f"raw messages {len(messages) + 1}; before the kill: {split:.0f} batches split into "
          f"{published:.0f} enriched messages, re-emitted as {republished:.0f}; enriched messages in the topic "
          f"{lag[settings.topic('enriched') + ' end']}; sink skipped {duplicates:.0f} re-emitted pieces")
    # Before the kill every good batch had been split (each enriched batch > 64 KiB), the poison
    # batch had gone to the DLQ, and the replay after the kill re-emitted pieces the sink skipped.
    assert split == half and published >= 2 * half and too_large == 1
    assert republished > published and duplicates == republished, (published, republished, duplicates)
    enricher_dlq = [(v, h) for v, h in dlq if h.get("flowtally-stage") == b"enricher"]
    assert [v for v, _ in enricher_dlq] == [poison, poison]  # once before the kill, once after
    assert all(h["flowtally-error"].startswith(b"message_too_large: one row encodes to") for _, h in enricher_dlq)

    client = connect(ClickHouseSettings(path=tmp_path / "chdb"))
    try:
        got = client.query("SELECT count(), sum(bytes) FROM flows").result_rows[0]
        assert (int(got[0]), int(got[1])) == expected
        hourly = client.query("SELECT sum(flows), sum(bytes) FROM flows_1h").result_rows[0]
        assert (int(hourly[0]), int(hourly[1])) == expected
    finally:
        client.close()


@pytest.fixture
def fake_api() -> Iterator[FakeApiServer]:
    with FakeApiServer() as server:
        yield server


def test_the_watcher_trims_an_address_record_to_fit_and_refuses_one_that_cannot(
        kafka_bootstrap: str, fake_api: FakeApiServer, tmp_path: Path) -> None:
    """An address that had 400 short-lived pods in the last hour (its record read back from the
    identity topic, ~60 KB) gets a new pod: the watcher, at a 32 KiB limit, writes its record
    without the versions that ended first. A pod whose own (open) version cannot fit (a 40 KB
    label value) is not written and is counted; the watcher stays healthy and writes the rest."""
    w = Watcher(kafka_bootstrap, fake_api, tmp_path)
    settings = KafkaSettings(bootstrap=kafka_bootstrap, topic_prefix=w.prefix)  # 1 MiB: room for the old record
    asyncio.run(kafka.ensure_topics(settings, kafka.TopicSettings()))
    now = int(time.time() * 1000)
    old = [Version(OwnerInfo(kind="pod", namespace="shop", name=f"batch-job-{i:03d}-x7k2p", workload="batch-job",
                             workload_kind="Job", node="node-1", pod_uid=f"uid-batch-{i:03d}"),
                   secs(now - 2_400_000 + i * 5000), secs(now - 2_400_000 + i * 5000 + 4000)) for i in range(400)]

    async def write_history() -> None:
        producer = kafka.producer(settings)
        await producer.start()
        try:
            await producer.send_and_wait(w.topic, encode_versions(old), key=encode_key("10.244.1.5"))
        finally:
            await producer.stop()

    asyncio.run(write_history())
    record = encode_versions(old)
    assert record is not None and len(record) > 2 * 32_768
    fake_api.put("namespaces", {"metadata": {"name": "shop"}})
    fake_api.put("pods", pod("web-0", "10.244.1.5", now))
    fake_api.put("pods", pod("huge-0", "10.244.1.6", now, labels={"app": "x" * 40_000}))
    fake_api.put("pods", pod("web-1", "10.244.1.7", now))
    w.access = w.access | {"FLOWTALLY_KAFKA_MAX_MESSAGE_BYTES": "32768"}
    stage = w.start()
    try:
        stage.wait_healthy(60)
        topic = w.topic_now()
        trimmed = stage.metric("flowtally_watcher_versions_trimmed_total")
        refused = stage.metric("flowtally_watcher_records_refused_total")
    finally:
        assert stage.stop() == 0
    versions = topic["10.244.1.5"]
    assert versions is not None and versions[-1].open and versions[-1].owner.name == "web-0"
    assert 0 < trimmed == len(old) + 1 - len(versions)
    assert versions[:-1] == old[int(trimmed):]  # the ones that ended first are gone
    assert len(encode_versions(versions) or b"") <= 32_768 - MESSAGE_OVERHEAD
    assert refused == 1 and "10.244.1.6" not in topic
    web1 = topic["10.244.1.7"]
    assert web1 is not None and [v.owner.name for v in web1] == ["web-1"]


def test_a_sensor_message_kafka_refuses_as_too_large_is_dropped_and_counted(kafka_bootstrap: str) -> None:
    """A raw topic whose max.message.bytes is below the sensor's setting (created elsewhere with a
    32 KiB limit): the broker refuses the larger message; the publisher drops it, counted
    with reason message_too_large, and the messages after it still arrive (no endless retry)."""
    prefix = f"ms{uuid.uuid4().hex[:10]}"
    small = KafkaSettings(bootstrap=kafka_bootstrap, topic_prefix=prefix, max_message_bytes=32_768)
    settings = KafkaSettings(bootstrap=kafka_bootstrap, topic_prefix=prefix)  # 1 MiB
    big = encode_messages(random_raw_table(4000, 1), b"exporter-0", settings.max_message_bytes)
    fits = encode_messages(random_raw_table(100, 2), b"exporter-0", settings.max_message_bytes)
    assert len(big) == 1 and len(big[0].value) > 40_000 and len(fits[0].value) < 20_000

    def dropped() -> float:
        return REGISTRY.get_sample_value("flowtally_sensor_flows_dropped_total",
                                         {"reason": "message_too_large"}) or 0.0

    async def scenario() -> int:
        await kafka.ensure_topics(small, kafka.TopicSettings())
        publisher = Publisher(lambda: kafka.producer(settings), settings.topic("raw"), max_queued=8)
        await publisher.start()
        for message in [*fits, *big, *fits]:
            assert publisher.offer(message)
        await publisher.stop()
        consumer = kafka.consumer(settings, settings.topic("raw"), group_id=f"{prefix}-reader")
        await consumer.start()
        flows = 0
        try:
            deadline = time.monotonic() + 10
            while flows < 200 and time.monotonic() < deadline:
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    flows += sum(decode_batch(r.value, r.headers, RAW_SCHEMA, SCHEMA_NAME).num_rows
                                 for r in records)
        finally:
            await consumer.stop()
        return flows

    before = dropped()
    assert asyncio.run(scenario()) == 200
    assert dropped() - before == 4000


def test_the_watcher_survives_a_topic_whose_limit_is_below_its_setting(
        kafka_bootstrap: str, fake_api: FakeApiServer, tmp_path: Path) -> None:
    """The identity topic was created with a 32 KiB limit, the watcher runs with 1 MiB: the broker
    refuses a 40 KB record. The watcher counts it as refused, writes the rest, becomes healthy, and
    writes later changes too (its idempotent producer renewed; else OutOfOrderSequenceNumber)."""
    w = Watcher(kafka_bootstrap, fake_api, tmp_path)
    small = KafkaSettings(bootstrap=kafka_bootstrap, topic_prefix=w.prefix, max_message_bytes=32_768)
    asyncio.run(kafka.ensure_topics(small, kafka.TopicSettings()))
    now = int(time.time() * 1000)
    fake_api.put("namespaces", {"metadata": {"name": "shop"}})
    fake_api.put("pods", pod("web-0", "10.244.1.5", now))
    fake_api.put("pods", pod("huge-0", "10.244.1.6", now, labels={"app": "x" * 40_000}))
    stage = w.start()
    try:
        stage.wait_healthy(60)
        assert stage.metric("flowtally_watcher_records_refused_total") == 1
        # and it said so at start
        assert stage.metric("flowtally_kafka_topic_limit_too_small_total", {"topic": w.topic}) == 1
        fake_api.wait_watching()
        fake_api.put("pods", pod("web-1", "10.244.1.7", now))
        deadline = time.monotonic() + 30
        while "10.244.1.7" not in w.topic_now() and time.monotonic() < deadline:
            stage.check_alive()
            time.sleep(0.2)
        topic = w.topic_now()
    finally:
        assert stage.stop() == 0
    assert sorted(topic) == ["10.244.1.5", "10.244.1.7"]


def test_enriched_messages_the_broker_refuses_go_to_the_dlq_without_a_crash_loop(
        kafka_bootstrap: str, tmp_path: Path) -> None:
    """The topics were created with a 64 KiB limit, the enricher runs with the default 1 MiB: its
    enriched batches (~400 KB, one piece each) are refused by the broker. Each raw message goes to
    the DLQ (reason message_too_large, which pieces were refused), the enricher keeps running and
    handles every message once."""
    prefix = f"ms{uuid.uuid4().hex[:10]}"
    small = KafkaSettings(bootstrap=kafka_bootstrap, topic_prefix=prefix, max_message_bytes=LIMIT)
    asyncio.run(kafka.ensure_topics(small, kafka.TopicSettings()))
    inventory = tmp_path / "inventory.yaml"
    _inventory(inventory)
    messages = _raw_messages(int(time.time() * 1000))[0][:3]
    port = free_port()
    enricher = Stage("enricher", ["enrich", "--inventory", str(inventory), "--metrics-listen", f"127.0.0.1:{port}"],
                     {"FLOWTALLY_KAFKA_BOOTSTRAP": kafka_bootstrap, "FLOWTALLY_KAFKA_TOPIC_PREFIX": prefix,
                      "FLOWTALLY_APP_ID": f"{prefix}-enricher"}, tmp_path / "enricher.log", port)
    enricher.start()
    try:
        enricher.wait_healthy(60)
        asyncio.run(_produce(small, messages, seconds=0.3))
        dlq: list[tuple[bytes, dict[str, bytes]]] = []
        deadline = time.monotonic() + 30
        while len(dlq) < 3 and time.monotonic() < deadline:
            enricher.check_alive()
            dlq = asyncio.run(_read_dlq(small, f"{prefix}-dlq-{len(dlq)}", want=3))
        metrics = (enricher.metric("flowtally_enricher_batches_total", {"outcome": "dlq_message_too_large"}),
                   enricher.metric("flowtally_enricher_batches_total", {"outcome": "enriched"}),
                   enricher.metric("flowtally_kafka_topic_limit_too_small_total"))
        enricher.check_alive()
        assert enricher.healthy()
    finally:
        assert enricher.stop(30) == 0
    assert [v for v, _ in dlq] == [v for _, v in messages]
    assert all(h["flowtally-error"].startswith(b"message_too_large: ") and h["flowtally-parts-refused"] == b"1/1"
               for _, h in dlq)
    assert metrics == (3, 0, 5)  # and at start it said that the five topics are too small


def test_a_raw_message_too_large_for_the_dlq_is_parked_without_its_value(kafka_bootstrap: str,
                                                                         tmp_path: Path) -> None:
    """Misaligned settings: the raw topic takes 1 MiB messages, the enricher is limited to 64 KiB.
    A raw message of ~250 KB with a poison row (its enriched row alone exceeds 64 KiB) cannot go
    to the DLQ whole either: it is parked without its value (marked), and the enricher goes on."""
    prefix = f"ms{uuid.uuid4().hex[:10]}"
    settings = KafkaSettings(bootstrap=kafka_bootstrap, topic_prefix=prefix)
    asyncio.run(kafka.ensure_topics(settings, kafka.TopicSettings()))
    inventory = tmp_path / "inventory.yaml"
    _inventory(inventory)
    rng = np.random.default_rng(3)
    n = 40_000
    src = rng.choice(np.array(PODS, np.uint32), n)
    src[17] = POISON_POD
    now = int(time.time() * 1000)
    table = build_raw_table({"src_addr": ipv4_to_mapped(src), "dst_addr": ipv4_to_mapped(rng.choice(
        np.array(EXTERNAL, np.uint32), n)), "bytes": rng.integers(40, 10_000, n), "packets": np.ones(n),
        "end": np.full(n, now), "time_received": np.full(n, now), "src_port": rng.integers(1024, 65535, n)})
    (raw,) = encode_messages(table, b"exporter-0", settings.max_message_bytes)
    assert len(raw.value) > 2 * LIMIT
    good = _raw_messages(now)[0][:1]
    port = free_port()
    enricher = Stage("enricher", ["enrich", "--inventory", str(inventory), "--metrics-listen", f"127.0.0.1:{port}"],
                     {"FLOWTALLY_KAFKA_BOOTSTRAP": kafka_bootstrap, "FLOWTALLY_KAFKA_TOPIC_PREFIX": prefix,
                      "FLOWTALLY_APP_ID": f"{prefix}-enricher", "FLOWTALLY_KAFKA_MAX_MESSAGE_BYTES": str(LIMIT)},
                     tmp_path / "enricher.log", port)
    enricher.start()
    try:
        enricher.wait_healthy(60)
        asyncio.run(_produce(settings, [(b"exporter-0", raw.value.to_pybytes()), *good], seconds=0.2))
        dlq = asyncio.run(_read_dlq(settings, f"{prefix}-dlq", want=1))
        deadline = time.monotonic() + 20
        while enricher.metric("flowtally_enricher_batches_total", {"outcome": "enriched"}) < 1 \
                and time.monotonic() < deadline:
            time.sleep(0.2)
        enriched = enricher.metric("flowtally_enricher_batches_total", {"outcome": "enriched"})
        enricher.check_alive()
    finally:
        assert enricher.stop(30) == 0
    assert len(dlq) == 1 and dlq[0][0] == b""
    headers = dlq[0][1]
    assert headers["flowtally-error"].startswith(b"message_too_large: one row encodes to")
    assert headers["flowtally-value-dropped"].startswith(f"{len(raw.value)} bytes".encode())
    assert enriched == 1  # the good message after it
