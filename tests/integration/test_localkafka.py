"""The local Kafka broker (flowtally.dev.localkafka): a real round trip through it with the clients the
pipeline uses, and its process lifecycle: stop() really ends the JVM, a restart reuses the
formatted storage and its data, a failed start leaves nothing running, and ``flowtally kafka
up|down`` work across processes."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from flowtally.dev.localkafka import (
    KAFKA_VERSION,
    LOG4J_VERSION,
    SCALA_BINARY_VERSION,
    LocalKafka,
    LocalKafkaError,
)

# (partition, key, value, headers): binary values, an empty one and one of 512 KiB (a large Arrow
# batch; the broker's default message.max.bytes is 1 MB), so nothing is lost or reordered.
Message = tuple[int, bytes, bytes, list[tuple[str, bytes]]]


def _messages(partitions: int, per_partition: int) -> list[Message]:
    out: list[Message] = []
    for p in range(partitions):
        for i in range(per_partition):
            value = bytes([p, i % 256, 0, 255]) * (i + 1)
            if i == 3:
                value = b""
            if p == 0 and i == 7:
                value = os.urandom(512 * 1024)
            out.append((p, f"k{p}-{i}".encode(), value, [("flowtally-schema", b"raw.v1")]))
    return out


async def _create_topic(bootstrap: str, topic: str, partitions: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=15_000)
    await admin.start()
    try:
        response = await admin.create_topics([NewTopic(topic, partitions, 1)], timeout_ms=15_000)
        assert [(t, code) for t, code, *_ in response.topic_errors] == [(topic, 0)]
        # The controller answers before every broker's metadata has the topic (seen in CI: an
        # empty list right after): wait for it, bounded.
        deadline = time.monotonic() + 15
        while topic not in await admin.list_topics() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert topic in await admin.list_topics()
    finally:
        await admin.close()


async def _produce(bootstrap: str, topic: str, messages: list[Message]) -> None:
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, enable_idempotence=True, acks="all", request_timeout_ms=15_000
    )
    await producer.start()
    try:
        for partition, key, value, headers in messages:
            meta = await producer.send_and_wait(
                topic, value, key=key, partition=partition, headers=headers
            )
            assert meta.partition == partition
    finally:
        await producer.stop()


async def _consume_and_commit(
    bootstrap: str, topic: str, group: str, count: int, timeout: float = 30
) -> tuple[list[Message], dict[int, int | None]]:
    """Read ``count`` records as member of ``group``, commit, and return them with the committed
    offset of each partition as the broker reports it."""
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, group_id=group, auto_offset_reset="earliest",
        enable_auto_commit=False, max_partition_fetch_bytes=2 * 1024 * 1024,
    )
    await consumer.start()
    try:
        got: list[Message] = []
        deadline = time.monotonic() + timeout
        while len(got) < count and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=500)
            for records in batches.values():
                for r in records:
                    assert r.key is not None and r.value is not None
                    got.append((r.partition, r.key, r.value, list(r.headers)))
        await consumer.commit()
        committed = {
            tp.partition: await consumer.committed(tp) for tp in sorted(consumer.assignment())
        }
        return got, committed
    finally:
        await consumer.stop()


async def _pending(bootstrap: str, topic: str, group: str) -> int:
    """How many records a new member of ``group`` still gets (0 once everything is committed)."""
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, group_id=group, auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        batches = await consumer.getmany(timeout_ms=2000)
        return sum(len(records) for records in batches.values())
    finally:
        await consumer.stop()


def _by_partition(messages: list[Message]) -> dict[int, list[Message]]:
    out: dict[int, list[Message]] = {}
    for m in messages:
        out.setdefault(m[0], []).append(m)
    return out


def _gone(pid: int) -> bool:
    """True once ``pid`` no longer runs (a zombie awaiting its parent counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rpartition(")")[2].split()[0] in ("Z", "X")


def test_round_trip_idempotent_producer_and_consumer_group(kafka_bootstrap: str) -> None:
    topic = f"test.localkafka.{uuid.uuid4().hex}"
    group = f"test-localkafka-{uuid.uuid4().hex}"
    sent = _messages(partitions=2, per_partition=20)

    async def scenario() -> tuple[list[Message], dict[int, int | None], int]:
        await _create_topic(kafka_bootstrap, topic, partitions=2)
        await _produce(kafka_bootstrap, topic, sent)
        got, committed = await _consume_and_commit(kafka_bootstrap, topic, group, len(sent))
        return got, committed, await _pending(kafka_bootstrap, topic, group)

    got, committed, pending = asyncio.run(scenario())
    # Exactly what was sent: per partition in order, nothing more (Kafka orders within a partition).
    assert _by_partition(got) == _by_partition(sent)
    assert committed == {0: 20, 1: 20}
    assert pending == 0


def test_stop_kills_the_broker_and_restart_reuses_storage(tmp_path: Path) -> None:
    state_dir = tmp_path / "kafka"
    topic = "test.localkafka.persisted"
    sent = _messages(partitions=1, per_partition=5)
    first = LocalKafka(state_dir)
    second = LocalKafka(state_dir)
    try:
        bootstrap = first.start()
        pid = first.pid
        assert pid is not None and not _gone(pid)
        cluster_id = first.cluster_id
        assert cluster_id
        meta_mtime = (first.data_dir / "meta.properties").stat().st_mtime_ns

        asyncio.run(_create_topic(bootstrap, topic, partitions=1))
        asyncio.run(_produce(bootstrap, topic, sent))

        # Another object (as `flowtally kafka down` in another process) finds it through state.json.
        other = LocalKafka(state_dir, stop_at_exit=False)
        assert other.pid == pid and other.bootstrap == bootstrap
        with pytest.raises(LocalKafkaError, match="already running"):
            other.start()
        other.stop()
        assert _gone(pid)
        assert json.loads(first.state_path.read_text())["pid"] is None
        first.stop()  # idempotent, and reaps the child
        first.stop()
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)

        second.start()
        assert second.pid not in (None, pid)
        # Same storage: not formatted again, same cluster, the data written before is still there.
        assert second.cluster_id == cluster_id
        assert (second.data_dir / "meta.properties").stat().st_mtime_ns == meta_mtime
        got, _ = asyncio.run(
            _consume_and_commit(second.bootstrap, topic, f"g-{uuid.uuid4().hex}", len(sent))
        )
        assert got == sent
        second_pid = second.pid
        assert second_pid is not None
        second.stop()
        with pytest.raises(ProcessLookupError):
            os.kill(second_pid, 0)
    finally:
        first.stop()
        second.stop()


def test_failed_start_leaves_nothing_running(tmp_path: Path) -> None:
    kafka = LocalKafka(tmp_path / "kafka")
    # Far too short for a JVM: the start must fail and kill what it spawned. On a loaded machine
    # the storage format step (a JVM of its own) can be the one that runs out of time.
    with pytest.raises(LocalKafkaError, match=r"did not become ready in time|formatting Kafka storage timed out") as err:
        kafka.start(timeout=0.5)
    if "did not become ready" in str(err.value):
        assert str(kafka.log_path) in str(err.value)
    state = json.loads(kafka.state_path.read_text())
    assert state["pid"] is None
    assert kafka.pid is None


def test_requested_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(LocalKafkaError, match=f"port {port} .* in use"):
            LocalKafka(tmp_path / "kafka", port=port).start()


def test_cli_up_and_down(tmp_path: Path) -> None:
    state_dir = tmp_path / "kafka"

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "flowtally.cli", "kafka", *args, "--dir", str(state_dir)],
            capture_output=True, text=True, timeout=180, check=False,
        )

    try:
        up = cli("up")
        assert up.returncode == 0, up.stderr
        match = re.fullmatch(r"FLOWTALLY_KAFKA_BOOTSTRAP=(127\.0\.0\.1:\d+)\n", up.stdout)
        assert match, up.stdout
        bootstrap = match.group(1)
        pid = json.loads((state_dir / "state.json").read_text())["pid"]
        # The broker outlived the command that started it and serves clients.
        asyncio.run(_create_topic(bootstrap, f"test.cli.{uuid.uuid4().hex}", partitions=1))

        again = cli("up")
        assert again.returncode == 0 and again.stdout == up.stdout, again.stderr
        assert "already running" in again.stderr

        down = cli("down")
        assert down.returncode == 0, down.stderr
        assert _gone(pid)
        assert cli("down").returncode == 0  # nothing to stop is fine
    finally:
        LocalKafka(state_dir, stop_at_exit=False).stop()


def test_pom_defaults_match_module_pins() -> None:
    """The pom's default versions are what the module passes to Maven, so running Maven on the pom
    by hand resolves the same jars."""
    pom = (Path(__file__).parents[2] / "flowtally" / "dev" / "localkafka" / "pom.xml").read_text()
    assert f"<kafka.version>{KAFKA_VERSION}</kafka.version>" in pom
    assert f"<log4j.version>{LOG4J_VERSION}</log4j.version>" in pom
    assert f"<scala.binary.version>{SCALA_BINARY_VERSION}</scala.binary.version>" in pom
