"""Readiness (``/healthz``) against liveness (``/livez``) of the real stage processes while their
own Kafka broker is stopped and started again (a broker of this test's own, not the session's
shared one), and of the sink while ClickHouse inserts fail.

During the outage every stage must turn not ready within the bound, saying why, and stay live
(a liveness probe would otherwise restart it into the same outage); once the broker is back,
every stage is ready again without a restart.
"""

from __future__ import annotations

import asyncio
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np

from enricher.enrich import enrich_batch
from enricher.identity import IdentityIndex
from enricher.schema import SCHEMA_NAME as ENRICHED
from flowtally import kafka
from flowtally.clickhouse import connect
from flowtally.dev.localkafka import LocalKafka
from flowtally.dev.localstack import Stage, free_port
from flowtally.health import UNREADY_AFTER_S
from flowtally.metrics import MetricsServer
from flowtally.settings import ClickHouseSettings, KafkaSettings
from flowtally.wire import ORIGIN_HEADER, encode_batch
from sensors.schema import build_raw_table, ipv4_to_mapped
from sink.service import SinkWorker
from sink.settings import SinkSettings
from sql.migrate import migrate
from tests.fake_apiserver import FakeApiServer

#: Not ready at most this long after the broker stopped: the probe's bound plus room for a
#: loaded machine (this bounds a protocol, it is not a benchmark).
NOT_READY_WITHIN_S = UNREADY_AFTER_S + 20
#: The broker restarts and every stage is ready again within this.
READY_AGAIN_WITHIN_S = 90.0


def get(port: int, path: str) -> tuple[int, str]:
    """Status and body of ``GET path`` on a stage's metrics port (0: not answering)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=3) as resp:
            return int(resp.status), resp.read().decode()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0, ""


def test_broker_outage_is_not_ready_but_live_in_every_stage(tmp_path: Path) -> None:
    broker = LocalKafka(tmp_path / "kafka", port=free_port())
    bootstrap = broker.start(timeout=120)
    prefix = f"ho{uuid.uuid4().hex[:10]}"
    env = {"FLOWTALLY_KAFKA_BOOTSTRAP": bootstrap, "FLOWTALLY_KAFKA_TOPIC_PREFIX": prefix}
    stages: list[Stage] = []
    with FakeApiServer() as fake:
        fake.put("namespaces", {"metadata": {"name": "shop"}})
        specs = [
            ("sink", ["sink"], {"FLOWTALLY_CLICKHOUSE_PATH": str(tmp_path / "chdb"),
                                "FLOWTALLY_GROUP_ID": f"{prefix}-sink"}),
            ("enricher", ["enrich"], {"FLOWTALLY_APP_ID": f"{prefix}-enricher",
                                      "FLOWTALLY_DATA_DIR": str(tmp_path / "faust")}),
            ("sensor", ["sensor", "netflow", "--listen", "127.0.0.1:0"], {}),
            ("watch-k8s", ["watch-k8s"], {"FLOWTALLY_KUBECONFIG": str(fake.write_kubeconfig(tmp_path / "kubeconfig")),
                                          "FLOWTALLY_FLUSH_INTERVAL_S": "0.2"}),
        ]
        try:
            for name, argv, extra in specs:
                port = free_port()
                stage = Stage(name, [*argv, "--metrics-listen", f"127.0.0.1:{port}"], env | extra,
                              tmp_path / f"{name}.log", port)
                stage.start()
                stages.append(stage)
            for stage in stages:
                stage.wait_healthy(90)
                assert get(stage.metrics_port, "/livez") == (200, "ok\n"), stage.name

            broker.stop()
            t0 = time.monotonic()
            not_ready: dict[str, tuple[float, str]] = {}
            while len(not_ready) < len(stages) and time.monotonic() - t0 < NOT_READY_WITHIN_S + 10:
                for stage in stages:
                    stage.check_alive()
                    assert get(stage.metrics_port, "/livez")[0] == 200, (stage.name, stage.log_tail())
                    status, body = get(stage.metrics_port, "/healthz")
                    if status == 503 and stage.name not in not_ready:
                        not_ready[stage.name] = (time.monotonic() - t0, body)
                time.sleep(0.2)
            print({name: (round(at, 1), body.strip()) for name, (at, body) in not_ready.items()})
            assert sorted(not_ready) == sorted(s.name for s in stages), not_ready
            for name, (at, body) in not_ready.items():
                assert at < NOT_READY_WITHIN_S, (name, at)
                assert f"Kafka at {bootstrap} not answering" in body, (name, body)
            # Still live well past the bound: waiting for Kafka is not a reason to restart.
            while time.monotonic() - t0 < NOT_READY_WITHIN_S + 5:
                for stage in stages:
                    stage.check_alive()
                    assert get(stage.metrics_port, "/livez")[0] == 200, stage.name
                    assert get(stage.metrics_port, "/healthz")[0] == 503, stage.name
                time.sleep(1.0)

            assert broker.start(timeout=120) == bootstrap  # same address: the stages reconnect
            t1 = time.monotonic()
            for stage in stages:
                stage.wait_healthy(READY_AGAIN_WITHIN_S - (time.monotonic() - t1))
            print(f"ready again {time.monotonic() - t1:.1f}s after the broker answered")
        finally:
            codes = {stage.name: stage.stop(30) for stage in reversed(stages)}
            broker.stop()
    assert set(codes.values()) == {0}, codes


def _enriched_value(n: int) -> bytes:
    rng = np.random.default_rng(1)
    now = int(time.time() * 1000)
    raw = build_raw_table({
        "src_addr": ipv4_to_mapped(rng.integers(0x0AF40000, 0x0AF40100, n).astype(np.uint32)),
        "dst_addr": ipv4_to_mapped(np.full(n, 0x510245A0, dtype=np.uint32)),
        "bytes": np.full(n, 10), "packets": np.ones(n), "end": np.full(n, now - 1000),
    })
    return encode_batch(enrich_batch(raw, IdentityIndex(())), ENRICHED)[0]


def test_sink_with_inserts_failing_is_not_ready_but_live(kafka_bootstrap: str, tmp_path: Path) -> None:
    """ClickHouse failing (its flows table renamed away: UNKNOWN_TABLE on every insert): not
    ready once inserts failed for ``unhealthy_after_s``, with the reason; live throughout; ready
    again once the inserts land."""
    prefix = f"hi{uuid.uuid4().hex[:10]}"
    ch = ClickHouseSettings(path=tmp_path / "chdb", database="flowtally")
    settings = SinkSettings(kafka=KafkaSettings(bootstrap=kafka_bootstrap, topic_prefix=prefix), clickhouse=ch,
                            group_id=f"{prefix}-sink", retry_initial_s=0.2, retry_max_s=0.5,
                            unhealthy_after_s=2.0, metrics_listen="127.0.0.1:0")
    admin_client = connect(ch)
    migrate(admin_client)
    admin_client.command("RENAME TABLE flows TO flows_away")

    async def scenario() -> tuple[str, int]:
        await kafka.ensure_topics(settings.kafka, settings.topics)
        producer = kafka.producer(settings.kafka)
        await producer.start()
        try:
            await producer.send_and_wait(settings.kafka.topic("enriched"), _enriched_value(100), key=b"k",
                                         headers=[("flowtally-schema", ENRICHED.encode()),
                                                  (ORIGIN_HEADER, b"raw/0/0")])
        finally:
            await producer.stop()
        worker = SinkWorker(settings)
        metrics = MetricsServer("127.0.0.1:0", worker.health, kafka=settings.kafka)
        await metrics.start()
        port = metrics.address[1]
        await worker.start()
        try:
            deadline = time.monotonic() + 30
            while (status := await asyncio.to_thread(get, port, "/healthz"))[0] != 503:
                assert status[0] == 200 and time.monotonic() < deadline, status
                assert (await asyncio.to_thread(get, port, "/livez"))[0] == 200
                await asyncio.sleep(0.2)
            reason = status[1]
            assert (await asyncio.to_thread(get, port, "/livez")) == (200, "ok\n")
            await asyncio.to_thread(admin_client.command, "RENAME TABLE flows_away TO flows")
            deadline = time.monotonic() + 30
            while (await asyncio.to_thread(get, port, "/healthz"))[0] != 200:
                assert time.monotonic() < deadline, "not ready again after ClickHouse came back"
                await asyncio.sleep(0.2)
            return reason, int(admin_client.query("SELECT count() FROM flows").result_rows[0][0])
        finally:
            await worker.stop()
            await metrics.stop()

    try:
        reason, rows = asyncio.run(scenario())
    finally:
        admin_client.close()
    assert reason.startswith("inserts failing for "), reason
    assert rows == 100
