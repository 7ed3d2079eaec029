"""Recovery after ``kill -9``: the real enricher and sink processes against the real broker are
killed and started again with the same group (and the same static group instance id, as a pod's
container restarting in place keeps its pod name); each must be ready and processing again in
well under ``BOUND_S``. Also a stage stopped (SIGTERM) and replaced by one with another instance
id, as in a rollout: the stopped static member must leave the group rather than hold it.

Without static membership the dead member keeps its partitions until the broker's session
timeout expires it (here ``SESSION_TIMEOUT_S``; the defaults are 10 s), and nothing is consumed
meanwhile; so does a static member stopped without leaving the group. ``BOUND_S`` bounds that protocol timeout, it is not a benchmark: the
measured numbers are printed (``pytest -s``) and are a few seconds.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from enricher.enrich import enrich_batch
from enricher.identity import IdentityIndex
from enricher.schema import SCHEMA_NAME as ENRICHED
from flowtally import kafka
from flowtally.dev.localstack import Stage, free_port
from flowtally.settings import KafkaSettings
from flowtally.wire import ORIGIN_HEADER, encode_batch
from sensors.schema import build_raw_table, ipv4_to_mapped

#: Restart to ready and to the first batch handled, at most (a session timeout is 10-30 s).
BOUND_S = 10.0
#: Far above BOUND_S, so that waiting for a session to expire cannot pass (the defaults are 10 s).
SESSION_TIMEOUT_S = "30"
#: Cut-off of every wait in the test (so a failure reports its measured time instead of hanging).
WAIT_S = 60.0


def _raw(seed: int, n: int = 200) -> bytes:
    rng = np.random.default_rng(seed)
    now = int(time.time() * 1000)
    table = build_raw_table({
        "src_addr": ipv4_to_mapped(rng.integers(0x0AF40000, 0x0AF40100, n).astype(np.uint32)),
        "dst_addr": ipv4_to_mapped(np.full(n, 0x510245A0, dtype=np.uint32)),
        "bytes": np.full(n, 100), "packets": np.ones(n), "end": np.full(n, now - 1000),
        "start": np.full(n, now - 2000), "time_received": np.full(n, now),
    })
    return encode_batch(table, "raw.v1")[0]


async def _send(settings: KafkaSettings, topic: str, values: list[bytes], headers: list[tuple[str, bytes]]) -> None:
    producer = kafka.producer(settings)
    await producer.start()
    try:
        for i, value in enumerate(values):
            # every partition gets one: whichever the restarted member owns has work waiting
            await producer.send_and_wait(topic, value, key=f"k{i}".encode(), partition=i % 4,
                                         headers=[*headers, (ORIGIN_HEADER, f"raw/{i % 4}/{time.time_ns()}".encode())])
    finally:
        await producer.stop()


def _until(what: str, stage: Stage, check: object, t0: float) -> float:
    """Seconds from ``t0`` until ``check()`` is true (bounded by WAIT_S)."""
    assert callable(check)
    while not check():
        stage.check_alive()
        assert time.monotonic() - t0 < WAIT_S, f"{stage.name}: {what} not after {WAIT_S:.0f}s:\n{stage.log_tail()}"
        time.sleep(0.1)
    return time.monotonic() - t0


def _kill_and_restart(stage: Stage, metric: str, labels: dict[str, str] | None,
                      send: object, replaced_by: str | None = None) -> tuple[float, float]:
    """Kill -9 a running stage that has handled work (``replaced_by``: SIGTERM it, and start
    one with that group instance id instead, as a rollout does), start it again, send new work;
    seconds from the restart to /healthz 200 and to the first handled work."""
    assert stage.process is not None and callable(send)
    if replaced_by is None:
        stage.process.kill()
        stage.process.wait(10)
    else:
        assert stage.stop() == 0
        stage.stopped = False
        stage.env["FLOWTALLY_GROUP_INSTANCE_ID"] = replaced_by
    t0 = time.monotonic()
    stage.start()
    send()  # work waits in every partition while the new process comes up
    healthy = _until("/healthz 200", stage, stage.healthy, t0)
    handled = _until("first batch handled", stage, lambda: stage.metric(metric, labels) >= 1, t0)
    return healthy, handled


@pytest.mark.parametrize("how", ["kill -9", "stopped and replaced"])
def test_enricher_recovers_from_kill_9_within_bound(kafka_bootstrap: str, tmp_path: Path, how: str) -> None:
    """kill -9 and restart with the same instance id; or SIGTERM and a successor with another
    (a rollout: the stopped static member must leave the group, not hold it for the session)."""
    prefix = f"rc{uuid.uuid4().hex[:10]}"
    settings = KafkaSettings(bootstrap=kafka_bootstrap, topic_prefix=prefix)
    port = free_port()
    enricher = Stage("enricher", ["enrich", "--metrics-listen", f"127.0.0.1:{port}"],
                     {"FLOWTALLY_KAFKA_BOOTSTRAP": kafka_bootstrap, "FLOWTALLY_KAFKA_TOPIC_PREFIX": prefix,
                      "FLOWTALLY_APP_ID": f"{prefix}-enricher", "FLOWTALLY_DATA_DIR": str(tmp_path / "faust"),
                      "FLOWTALLY_GROUP_INSTANCE_ID": "enricher-0", "FLOWTALLY_SESSION_TIMEOUT_S": SESSION_TIMEOUT_S},
                     tmp_path / "enricher.log", port)

    def send() -> None:
        asyncio.run(_send(settings, settings.topic("raw"), [_raw(i) for i in range(4)],
                          [("flowtally-schema", b"raw.v1")]))

    enriched = {"outcome": "enriched"}
    enricher.start()
    try:
        enricher.wait_healthy(WAIT_S)
        send()
        _until("first batch", enricher, lambda: enricher.metric("flowtally_enricher_batches_total", enriched) >= 4,
               time.monotonic())
        healthy, handled = _kill_and_restart(enricher, "flowtally_enricher_batches_total", enriched, send,
                                             None if how == "kill -9" else "enricher-1")
    finally:
        enricher.stop()
    print(f"enricher {how}: /healthz 200 in {healthy:.1f}s, first batch in {handled:.1f}s")
    assert handled < BOUND_S, (healthy, handled)


@pytest.mark.parametrize("how", ["kill -9", "stopped and replaced"])
def test_sink_recovers_from_kill_9_within_bound(kafka_bootstrap: str, tmp_path: Path, how: str) -> None:
    """As for the enricher (both consumer groups of the sink take part)."""
    prefix = f"rs{uuid.uuid4().hex[:10]}"
    settings = KafkaSettings(bootstrap=kafka_bootstrap, topic_prefix=prefix)
    port = free_port()
    sink = Stage("sink", ["sink", "--metrics-listen", f"127.0.0.1:{port}"],
                 {"FLOWTALLY_KAFKA_BOOTSTRAP": kafka_bootstrap, "FLOWTALLY_KAFKA_TOPIC_PREFIX": prefix,
                  "FLOWTALLY_CLICKHOUSE_PATH": str(tmp_path / "chdb"), "FLOWTALLY_GROUP_ID": f"{prefix}-sink",
                  "FLOWTALLY_GROUP_MAX_WAIT_S": "0.2", "FLOWTALLY_GROUP_INSTANCE_ID": "sink-0",
                  "FLOWTALLY_SESSION_TIMEOUT_S": SESSION_TIMEOUT_S},
                 tmp_path / "sink.log", port)
    table = enrich_batch(build_raw_table({
        "src_addr": ipv4_to_mapped(np.full(50, 0x0AF40001, dtype=np.uint32)),
        "dst_addr": ipv4_to_mapped(np.full(50, 0x510245A0, dtype=np.uint32)),
        "bytes": np.full(50, 100), "packets": np.ones(50), "end": np.full(50, int(time.time() * 1000)),
    }), IdentityIndex(()))
    value = encode_batch(table, ENRICHED)[0]

    def send() -> None:
        asyncio.run(_send(settings, settings.topic("enriched"), [value] * 4, [("flowtally-schema", ENRICHED.encode())]))

    sink.start()
    try:
        sink.wait_healthy(WAIT_S)
        send()
        _until("first insert", sink, lambda: sink.metric("flowtally_sink_rows_inserted_total") >= 200,
               time.monotonic())
        healthy, handled = _kill_and_restart(sink, "flowtally_sink_rows_inserted_total", None, send,
                                             None if how == "kill -9" else "sink-1")
    finally:
        sink.stop()
    print(f"sink {how}: /healthz 200 in {healthy:.1f}s, first insert in {handled:.1f}s")
    assert handled < BOUND_S, (healthy, handled)
