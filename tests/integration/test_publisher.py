"""The sensors' publisher with the real Kafka broker: messages whose value is an Arrow buffer (not
bytes) arrive byte for byte as encoded, in order, with their keys and headers, and are counted as
published only once acknowledged."""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import time
import uuid

import pyarrow as pa
import pytest
from prometheus_client import REGISTRY

from flowtally import kafka
from flowtally.kafka import TopicSettings
from flowtally.settings import KafkaSettings
from flowtally.wire import SCHEMA_HEADER, decode_batch
from sensors.publisher import Publisher, encode_messages
from sensors.schema import RAW_SCHEMA, SCHEMA_NAME
from tests.tables import random_raw_table


def _published_flows() -> float:
    return REGISTRY.get_sample_value("flowtally_sensor_flows_published_total") or 0.0


def test_arrow_buffer_values_reach_kafka_byte_for_byte(kafka_bootstrap: str) -> None:
    settings = KafkaSettings(bootstrap=kafka_bootstrap, topic_prefix=f"t{uuid.uuid4().hex[:10]}")
    topic = settings.topic("raw")
    tables = [random_raw_table(n, seed) for seed, n in enumerate((1, 700, 16_384, 3000))]
    messages = [m for i, t in enumerate(tables)
                for m in encode_messages(t, f"exporter-{i % 2}".encode(), compression="lz4")]
    assert all(isinstance(m.value, pa.Buffer) for m in messages)
    sent = [(m.key, bytes(m.value)) for m in messages]  # independent copies of what is sent
    before = _published_flows()

    async def scenario() -> list[tuple[bytes, bytes, dict[str, bytes]]]:
        await kafka.ensure_topics(settings, TopicSettings())
        publisher = Publisher(lambda: kafka.producer(settings), topic, max_queued=16, max_in_flight=2)
        await publisher.start()
        for message in messages:
            assert publisher.offer(message)
        await publisher.stop()  # drains: every message acknowledged
        consumer = kafka.consumer(settings, topic, group_id=f"reader-{uuid.uuid4().hex[:8]}")
        await consumer.start()
        got: list[tuple[bytes, bytes, dict[str, bytes]]] = []
        try:
            deadline = time.monotonic() + 30
            while len(got) < len(messages) and time.monotonic() < deadline:
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    got.extend((r.key or b"", r.value or b"", dict(r.headers)) for r in records)
        finally:
            await consumer.stop()
        return got

    got = asyncio.run(scenario())
    assert sorted((key, value) for key, value, _ in got) == sorted(sent)
    for key in {k for k, _ in sent}:  # one partition per key: the order of sending
        assert [v for k, v, _ in got if k == key] == [v for k, v in sent if k == key]
    assert all(headers == {SCHEMA_HEADER: SCHEMA_NAME.encode()} for _, _, headers in got)
    decoded = [decode_batch(value, list(headers.items()), RAW_SCHEMA, SCHEMA_NAME) for _, value, headers in got]
    assert sum(t.num_rows for t in decoded) == sum(t.num_rows for t in tables)
    assert _published_flows() - before == sum(t.num_rows for t in tables)


def test_connect_retries_back_off_doubling(caplog: pytest.LogCaptureFixture) -> None:
    """With no broker listening, each connection attempt fails, is counted, and the next waits
    twice as long as the last, up to ``retry_max_s``; stopping gives up cleanly."""
    with socket.socket() as probe:  # a port nothing listens on (bound, then released)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = KafkaSettings(bootstrap=f"127.0.0.1:{port}")
    errors_before = REGISTRY.get_sample_value("flowtally_sensor_publish_errors_total") or 0.0

    async def scenario() -> None:
        publisher = Publisher(lambda: kafka.producer(settings, request_timeout_ms=1000), "t", max_queued=4,
                              retry_max_s=2.0, drain_timeout_s=0.5)
        await publisher.start()
        deadline = time.monotonic() + 20
        while len(_connect_delays(caplog)) < 4:
            assert time.monotonic() < deadline, _connect_delays(caplog)
            await asyncio.sleep(0.05)
        assert not publisher.connected
        await publisher.stop()

    with caplog.at_level(logging.WARNING, logger="sensors.publisher"):
        asyncio.run(scenario())
    assert _connect_delays(caplog)[:4] == [0.5, 1.0, 2.0, 2.0]
    errors = (REGISTRY.get_sample_value("flowtally_sensor_publish_errors_total") or 0.0) - errors_before
    assert errors >= 4


def _connect_delays(caplog: pytest.LogCaptureFixture) -> list[float]:
    """The waits the publisher announced before reconnecting, in order."""
    found = (re.search(r"cannot connect to Kafka \(retrying in ([0-9.]+)s\)", r.getMessage()) for r in caplog.records)
    return [float(m.group(1)) for m in found if m]
