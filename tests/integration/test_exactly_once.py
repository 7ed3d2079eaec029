"""Exactly-once with the real Kafka: raw batches -> real enricher (Faust) -> real sink -> chDB,
while both stages are SIGKILLed at random moments and restarted with the same group / app id.

What makes it exact (and what this test proves): every enriched message carries the raw message's
coordinates (``flowtally-origin``). The sink inserts consecutive messages of a partition as one
group (sink/groups.py): it records the group (offsets, token, origins) in ``sink_groups``, inserts
it with that ClickHouse deduplication token, in ``flows`` and
(``deduplicate_blocks_in_dependent_materialized_views``) in each view, and commits only after. So

* a sink killed after recording a group, or after its insert, but before the commit resumes at
  the group's first offset and re-forms exactly that group: same token, a no-op where it landed;
* an enricher killed after producing but before Faust committed re-emits the batch (a duplicate
  in the enriched topic, same origin, new offset): the sink drops it, the origin being in a group
  it recorded (in the same group, or an earlier one, also across a sink restart);
* a sink killed inside an insert leaves either nothing (replayed) or the flows part and maybe
  some views' parts (then the replay is skipped where it landed and fills what is missing, through
  the chained views too, see test_clickhouse.py);
* the sink inserts two partitions at once (insert_concurrency 2, two connections), each in offset
  order and committed only up to what landed in it.

tests/integration/test_sink_groups.py reproduces each of those crash states deterministically.

At the end the totals in ``flows`` and in every rollup equal the source exactly.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import yaml
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from flowtally import kafka
from flowtally.clickhouse import connect
from flowtally.dev.localstack import Stage, free_port
from flowtally.settings import ClickHouseSettings, KafkaSettings
from flowtally.wire import encode_batch
from sensors.schema import build_raw_table, ipv4_to_mapped

BATCHES = 100
ROWS = 2_000
KILLS_PER_STAGE = 3
SESSION_TIMEOUT_S = "6"  # the broker's minimum: how long a killed member holds its partitions

PODS = [0x0AF40100 + i for i in range(40)]  # 10.244.1.0/26: pods of 8 workloads in 3 namespaces
EXTERNAL = [0x51024500 + i for i in range(20)]  # 81.2.69.x


def _inventory(path: Path) -> None:
    owners = []
    for i, ip in enumerate(PODS):
        dotted = ".".join(str((ip >> s) & 255) for s in (24, 16, 8, 0))
        owners.append({"ip": dotted, "kind": "pod", "namespace": f"ns{i % 3}", "name": f"pod-{i}",
                       "workload": f"wl{i % 8}", "workload_kind": "Deployment", "service": f"svc{i % 8}",
                       "node": f"node-{i % 2}"})
    path.write_text(yaml.safe_dump({"owners": owners}))


def _batches(seed: int, now_ms: int) -> tuple[list[bytes], tuple[int, int, int, int]]:
    """The raw messages and their totals (flows, bytes, packets, sampling-scaled bytes)."""
    rng = np.random.default_rng(seed)
    addresses = np.array(PODS + EXTERNAL, dtype=np.uint32)
    values, totals = [], [0, 0, 0, 0]
    for _ in range(BATCHES):
        nbytes = rng.integers(40, 10_000_000, ROWS, dtype=np.uint64)
        packets = rng.integers(1, 10_000, ROWS, dtype=np.uint64)
        sampling = rng.choice(np.array([1, 1, 100], dtype=np.uint32), ROWS)
        ends = now_ms - rng.integers(0, 3 * 3_600_000, ROWS)
        table = build_raw_table({
            "src_addr": ipv4_to_mapped(rng.choice(addresses, ROWS)),
            "dst_addr": ipv4_to_mapped(rng.choice(addresses, ROWS)),
            "bytes": nbytes, "packets": packets, "sampling_rate": sampling,
            "start": ends - 5000, "end": ends, "time_received": np.full(ROWS, now_ms),
            "src_port": rng.integers(1024, 65535, ROWS), "dst_port": rng.choice([53, 80, 443, 8080, 50000], ROWS),
            "proto": rng.choice([6, 17], ROWS), "version": np.full(ROWS, 9),
        })
        values.append(encode_batch(table, "raw.v1")[0])
        totals[0] += ROWS
        totals[1] += int(nbytes.sum())
        totals[2] += int(packets.sum())
        totals[3] += int((nbytes * sampling).sum())
    return values, (totals[0], totals[1], totals[2], totals[3])


async def _produce(settings: KafkaSettings, values: list[bytes], seconds: float) -> None:
    """Send the raw batches spread over ``seconds`` (so kills land while data is moving)."""
    producer = kafka.producer(settings)
    await producer.start()
    try:
        for i, value in enumerate(values):
            await producer.send_and_wait(settings.topic("raw"), value, key=f"exporter-{i % 7}".encode(),
                                         headers=[("flowtally-schema", b"raw.v1")])
            await asyncio.sleep(seconds / len(values))
    finally:
        await producer.stop()


async def _wait_drained(settings: KafkaSettings, groups: dict[str, str], stages: dict[str, Stage],
                        timeout: float) -> dict[str, int]:
    """Wait until every group (id -> topic) has committed its topic's end offsets; returns the
    groups' remaining lag and the topics' end offsets (message counts, duplicates included)."""
    admin = AIOKafkaAdminClient(**settings.client_kwargs())
    consumer = AIOKafkaConsumer(**settings.client_kwargs())
    await admin.start()
    await consumer.start()
    deadline = time.monotonic() + timeout
    try:
        while True:
            out = {}
            for group, topic in groups.items():
                partitions = consumer.partitions_for_topic(topic)
                while not partitions:
                    await consumer._client.force_metadata_update()
                    partitions = consumer.partitions_for_topic(topic)
                tps = [TopicPartition(topic, p) for p in sorted(partitions)]
                ends = await consumer.end_offsets(tps)
                committed = await admin.list_consumer_group_offsets(group, partitions=tps)
                out[group] = sum(ends[tp] - max(committed[tp].offset if tp in committed else 0, 0) for tp in tps)
                out[f"{topic} end"] = sum(ends.values())
            if not any(out[g] for g in groups) or time.monotonic() > deadline:
                return out
            for stage in stages.values():
                stage.check_alive()
            await asyncio.sleep(1.0)
    finally:
        await consumer.stop()
        await admin.close()


def test_sigkill_enricher_and_sink_repeatedly_totals_stay_exact(kafka_bootstrap: str, tmp_path: Path) -> None:
    prefix = f"eo{uuid.uuid4().hex[:10]}"
    settings = KafkaSettings(bootstrap=kafka_bootstrap, topic_prefix=prefix)
    inventory = tmp_path / "inventory.yaml"
    _inventory(inventory)
    env = {"FLOWTALLY_KAFKA_BOOTSTRAP": kafka_bootstrap, "FLOWTALLY_KAFKA_TOPIC_PREFIX": prefix,
           "FLOWTALLY_CLICKHOUSE_PATH": str(tmp_path / "chdb"), "FLOWTALLY_SESSION_TIMEOUT_S": SESSION_TIMEOUT_S}
    groups = {f"{prefix}-enricher": settings.topic("raw"), f"{prefix}-sink": settings.topic("enriched")}
    stages = {
        "sink": Stage("sink", ["sink", "--metrics-listen", f"127.0.0.1:{free_port()}"],
                      env | {"FLOWTALLY_GROUP_ID": f"{prefix}-sink", "FLOWTALLY_MAX_MESSAGES_PER_POLL": "4",
                             # partitions inserted concurrently over two connections
                             "FLOWTALLY_INSERT_CONCURRENCY": "2"},
                      tmp_path / "sink.log", 0),
        "enricher": Stage("enricher", ["enrich", "--inventory", str(inventory),
                                       "--metrics-listen", f"127.0.0.1:{free_port()}"],
                          env | {"FLOWTALLY_APP_ID": f"{prefix}-enricher", "FLOWTALLY_COMMIT_INTERVAL_S": "2"},
                          tmp_path / "enricher.log", 0),
    }
    try:
        for stage in stages.values():
            stage.metrics_port = int(stage.argv[-1].rsplit(":", 1)[1])
            stage.start()
        for stage in stages.values():
            stage.wait_healthy(60)
    except BaseException:
        for stage in stages.values():  # a stage that never came up must not leave the other running
            stage.stop(30)
        raise

    values, expected = _batches(seed=11, now_ms=int(time.time() * 1000))
    producer = threading.Thread(target=asyncio.run, args=(_produce(settings, values, seconds=12.0),))
    rnd = random.Random(5)
    kills: list[tuple[float, str]] = []
    t0 = time.monotonic()
    producer.start()
    try:
        # Kill each stage KILLS_PER_STAGE times, alternating, at random moments while data moves.
        for name in ["enricher", "sink"] * KILLS_PER_STAGE:
            time.sleep(rnd.uniform(1.0, 3.0))
            stage = stages[name]
            assert stage.process is not None
            stage.process.kill()
            stage.process.wait(10)
            kills.append((round(time.monotonic() - t0, 1), name))
            stage.start()  # same group / app id: takes over after the session timeout
        producer.join(60)
        assert not producer.is_alive()
        lag = asyncio.run(_wait_drained(settings, groups, stages, timeout=75))
        assert lag[f"{prefix}-enricher"] == 0 and lag[f"{prefix}-sink"] == 0, (lag, kills)
    finally:
        codes = {name: stage.stop(30) for name, stage in stages.items()}
    assert codes == {"sink": 0, "enricher": 0}, codes
    assert len(kills) == 2 * KILLS_PER_STAGE
    # Re-emitted batches are in the enriched topic (or the kills hit nothing worth proving).
    print(f"kills {kills}; enriched messages {lag[settings.topic('enriched') + ' end']} for {BATCHES} raw")

    client = connect(ClickHouseSettings(path=tmp_path / "chdb"))
    try:
        flows = client.query("SELECT count(), sum(bytes), sum(packets), sum(bytes * sampling_rate) FROM flows").result_rows[0]
        assert tuple(int(v) for v in flows) == expected
        for table in ("flows_1m", "flows_1h", "flows_1d"):
            got = client.query(f"SELECT sum(flows), sum(bytes), sum(packets), sum(scaled_bytes) FROM {table}").result_rows[0]
            assert tuple(int(v) for v in got) == expected, table
        # the per-pod rollup (migration 0009): each named source's flows once, as outbound
        named = client.query("SELECT count(), sum(bytes), sum(packets), sum(bytes * sampling_rate) FROM flows "
                             "WHERE src_name != '' OR src_pod_uid != ''").result_rows[0]
        got = client.query("SELECT sum(flows), sum(bytes), sum(packets), sum(scaled_bytes) FROM pod_traffic_1h "
                           "WHERE direction = 'outbound'").result_rows[0]
        assert got == named and int(named[0]) > 0, (got, named)
    finally:
        client.close()
