"""Enrichment benchmark with a production-sized identity table:

    .venv/bin/python -m tests.benchmarks.bench_enrich [--pods 100000] [--versions 1000000] [--flows 2000000]

The table: ``--pods`` pod addresses, each reused by ``versions / pods`` pods over the last hour
(every version a different pod: its own name and UID), plus 2,000 ClusterIP services and 1,000
nodes (each with a hostNetwork pod serving TCP 9100). The flows: 8,192 per batch (the sensor's
batch size), both ends drawn from the pod addresses at times spread over the hour (so lookups
hit old versions too), 10% to public addresses, 30% translated to a ClusterIP (DNAT), observed
by node sensors.

(a) pure: :func:`enricher.enrich.enrich_batch` alone, in this process: flows/s on one core
(process CPU time), and the two-sided identity lookup alone.
(b) stage: the real `flowtally enrich` process with the real local Kafka in and out: the table
is produced to the identity topic (what the watcher does in production) and the raw batches to
the raw topic before the stage starts; the stage replays the identity topic (time and CPU
reported), then the CPU-seconds it spends from healthy until every flow is enriched give flows/s
per core; its peak RSS (VmHWM) is read from /proc.

Reference measured in the same run: decoding each raw message and encoding an enriched batch of
the same size with no enrichment (the Arrow/Kafka floor); ratios stage/pure and stage/floor are
printed. The machine is small and shared: compare ratios between runs, not absolute numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa

from enricher.enrich import EnrichStats, ObservedNodes, enrich_batch
from enricher.identity import IdentityIndex, OwnerInfo, Version
from enricher.identity_topic import encode_key, encode_versions
from enricher.schema import SCHEMA_NAME as ENRICHED
from flowtally import kafka
from flowtally.dev.localkafka import LocalKafka
from flowtally.dev.localstack import Stage, free_port
from flowtally.kafka import TopicSettings
from flowtally.settings import KafkaSettings
from flowtally.wire import decode_batch, encode_batch
from sensors.publisher import encode_messages
from sensors.schema import RAW_SCHEMA, address_text, build_raw_table, ipv4_to_mapped
from sensors.schema import SCHEMA_NAME as RAW

BATCH = 8192
HOUR = 3_600_000
POD_BASE = (10 << 24) | (64 << 16)
SVC_BASE = (10 << 24) | (96 << 16)
NODE_BASE = (10 << 24) | (1 << 16)
N_SERVICES = 2000
N_NODES = 1000


def identity_table(pods: int, versions: int, now_ms: int) -> dict[bytes, list[Version]]:
    """{address: versions}: pod addresses reused ``versions // pods`` times within the last hour,
    services and nodes (with a hostNetwork pod each)."""
    per = max(1, versions // pods)
    span = HOUR // per
    table: dict[bytes, list[Version]] = {}
    addresses = ipv4_to_mapped(np.arange(POD_BASE, POD_BASE + pods, dtype=np.uint32))
    for i in range(pods):
        ns = f"ns-{i % 200}"
        workload = f"app-{i % 5000}"
        node = f"node-{i % N_NODES}"
        vs = []
        for k in range(per):
            start = now_ms - HOUR + k * span
            owner = OwnerInfo(kind="pod", namespace=ns, name=f"{workload}-{i:06x}{k:02x}", workload=workload,
                              workload_kind="Deployment", service=f"svc-{i % N_SERVICES}", node=node,
                              pod_uid=str(uuid.UUID(int=(i << 16) | k, version=4)))  # as Kubernetes: v4
            vs.append(Version(owner, start, start + span - 1000 if k < per - 1 else 2**63 - 1))
        table[addresses[i].tobytes()] = vs
    for s in range(N_SERVICES):
        svc = OwnerInfo(kind="service", namespace=f"ns-{s % 200}", name=f"svc-{s}", service=f"svc-{s}")
        table[ipv4_to_mapped(np.array([SVC_BASE + s], np.uint32))[0].tobytes()] = [Version(svc, 0)]
    for n in range(N_NODES):
        name = f"node-{n}"
        exporter = OwnerInfo(kind="host-network", namespace="monitoring", name=f"node-exporter-{n}",
                             workload="node-exporter", workload_kind="DaemonSet", node=name,
                             host_ports=((6, 9100),))
        table[ipv4_to_mapped(np.array([NODE_BASE + n], np.uint32))[0].tobytes()] = [
            Version(OwnerInfo(kind="node", name=name, node=name), 0), Version(exporter, 0)]
    return table


def raw_batches(pods: int, flows: int, now_ms: int, seed: int = 1) -> list[pa.Table]:
    """``flows`` flows in batches of :data:`BATCH` (the shape is in the module docstring)."""
    rng = np.random.default_rng(seed)
    out = []
    for b in range(max(1, flows // BATCH)):
        n = BATCH
        # a batch is one node's sensor's: the initiators are pods on that node (pod i runs on
        # node i % N_NODES), so the one-observation rule keeps every record
        node = b % N_NODES
        src = POD_BASE + node + N_NODES * rng.integers(0, max(1, pods // N_NODES), n, dtype=np.uint32)
        dst = POD_BASE + rng.integers(0, pods, n, dtype=np.uint32)
        public = rng.random(n) < 0.1
        dst = np.where(public, rng.integers(0x01000000, 0x60000000, n, dtype=np.uint32), dst)
        nat = np.where(rng.random(n) < 0.3, SVC_BASE + rng.integers(0, N_SERVICES, n, dtype=np.uint32), 0)
        end = now_ms - rng.integers(0, HOUR - 60_000, n)
        nat_addr = ipv4_to_mapped(nat.astype(np.uint32))
        nat_addr[nat == 0] = 0
        out.append(build_raw_table({
            "exporter": ipv4_to_mapped(np.full(n, NODE_BASE + node, dtype=np.uint32)),
            "observer": [f"node-{node}"] * n,
            "src_addr": ipv4_to_mapped(src.astype(np.uint32)), "dst_addr": ipv4_to_mapped(dst.astype(np.uint32)),
            "nat_addr": nat_addr, "initiator": np.ones(n, np.uint8),
            "src_port": rng.integers(32768, 61000, n), "dst_port": np.full(n, 8080),
            "proto": np.full(n, 6), "start": end - 1000, "end": end, "time_received": np.full(n, now_ms),
            "bytes": rng.integers(40, 1_500_000, n), "packets": rng.integers(1, 1000, n),
        }))
    return out


def bench_pure(table: dict[bytes, list[Version]], batches: list[pa.Table], now_ms: int) -> dict[str, float]:
    """(a): index build, lookup alone and enrich_batch, in process CPU seconds."""
    t0 = time.process_time()
    index = IdentityIndex()
    index.apply(table)
    index.prune(now_ms)
    build = time.process_time() - t0
    flows = sum(b.num_rows for b in batches)
    from sensors.schema import address_bytes

    t0 = time.process_time()
    for raw in batches:
        times = raw.column("end").chunk(0).cast(pa.int64()).to_numpy()
        proto = raw.column("proto").chunk(0).to_numpy()
        for side in ("src", "dst"):
            index.side(address_bytes(raw.column(f"{side}_addr")), times,
                       raw.column(f"{side}_port").chunk(0).to_numpy(), proto)
    lookup = time.process_time() - t0
    stats = EnrichStats()
    observers = ObservedNodes()
    t0 = time.process_time()
    for raw in batches:
        enrich_batch(raw, index, stats=stats, observers=observers, now_ms=now_ms)
    enrich = time.process_time() - t0
    # Following the topic: a change of 100 addresses (pods starting), one rebuild, as the feed
    # applies what arrived within its interval.
    changes = list(table.items())[:100]
    t0 = time.process_time()
    for _ in range(5):
        index.apply(dict(changes))
    apply_ms = (time.process_time() - t0) / 5 * 1000
    encoded = [encode_messages(raw, b"k", compression="lz4")[0] for raw in batches]
    t0 = time.process_time()
    for message in encoded:
        decoded = decode_batch(message.value, message.headers, RAW_SCHEMA, RAW)
        enriched = enrich_batch(decoded, index, stats=stats, observers=observers, now_ms=now_ms)
        encode_batch(enriched, ENRICHED)
    full = time.process_time() - t0
    # The floor: the same decoding and an encoding of an enriched batch, without enriching.
    t0 = time.process_time()
    for message in encoded:
        decode_batch(message.value, message.headers, RAW_SCHEMA, RAW)
        encode_batch(enriched, ENRICHED)
    floor = time.process_time() - t0
    return {"build": build, "versions": index.versions, "addresses": index.size, "lookup": lookup / flows,
            "enrich": enrich / flows, "full": full / flows, "floor": floor / flows, "apply_ms": apply_ms, "owned": stats.sides["dst"].owned / max(1, stats.sides["dst"].flows)}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc."""
    import os

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident set (VmHWM), MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def produce(settings: KafkaSettings, table: dict[bytes, list[Version]], batches: list[pa.Table]) -> None:
    """The identity table to the identity topic, the raw batches (lz4, as the sensor sends them)
    to the raw topic, keyed by observing node."""
    await kafka.ensure_topics(settings, TopicSettings())
    producer = kafka.producer(settings, linger_ms=20)
    await producer.start()
    try:
        pending = []
        for address, versions in table.items():
            pending.append(await producer.send(settings.topic("identity"), encode_versions(versions),
                                               key=encode_key(address_text(address))))
            if len(pending) >= 5000:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
        for i, raw in enumerate(batches):
            for m in encode_messages(raw, f"node-{i % N_NODES}".encode(), compression="lz4"):
                await producer.send_and_wait(settings.topic("raw"), m.value, key=m.key, headers=list(m.headers))
    finally:
        await producer.stop()


def bench_stage(args: argparse.Namespace, table: dict[bytes, list[Version]], batches: list[pa.Table],
                pure: dict[str, float]) -> int:
    """(b): the `flowtally enrich` process between a real Kafka's raw and enriched topics."""
    flows = sum(b.num_rows for b in batches)
    work = Path(tempfile.mkdtemp(prefix="flowtally-bench-enrich-"))
    broker = LocalKafka(work / "kafka")
    stage: Stage | None = None
    try:
        bootstrap = broker.start()
        settings = KafkaSettings(bootstrap=bootstrap, topic_prefix="bench")
        t0 = time.perf_counter()
        asyncio.run(produce(settings, table, batches))
        print(f"(b) stage: produced {len(table):,} identity records and {flows:,} raw flows in "
              f"{time.perf_counter() - t0:.1f} s")
        table.clear()
        batches.clear()
        port = free_port()
        stage = Stage("enricher", ["enrich", "--metrics-listen", f"127.0.0.1:{port}"],
                      {"FLOWTALLY_KAFKA_BOOTSTRAP": bootstrap, "FLOWTALLY_KAFKA_TOPIC_PREFIX": "bench",
                       "FLOWTALLY_APP_ID": "bench-enricher"}, work / "enricher.log", port)
        t0 = time.perf_counter()
        stage.start()
        assert stage.process is not None
        pid = stage.process.pid
        stage.wait_healthy(900)
        replay_s, replay_cpu = time.perf_counter() - t0, cpu_seconds(pid)
        replay_rss = peak_rss_mb(pid)
        done0, cpu0, t1 = stage.metric("flowtally_enricher_flows_total"), cpu_seconds(pid), time.perf_counter()
        done = done0
        deadline = time.monotonic() + max(600.0, flows / 2000)
        dropped = 0.0
        while done + dropped < flows and time.monotonic() < deadline:
            stage.check_alive()
            time.sleep(0.2)
            done = stage.metric("flowtally_enricher_flows_total")
            dropped = stage.metric("flowtally_enricher_duplicates_dropped_total")
        cpu, elapsed = cpu_seconds(pid) - cpu0, time.perf_counter() - t1
        rss = peak_rss_mb(pid)
        code = stage.stop()
    finally:
        if stage is not None:
            stage.stop()
        broker.stop()
    measured = done - done0
    per_m = cpu * 1e6 / max(measured, 1)
    print(f"    identity replay: {replay_s:.1f} s, {replay_cpu:.1f} CPU-s (start-up included), "
          f"peak RSS by then {replay_rss:.0f} MB")
    print(f"    enriched {int(done):,} of {flows:,} flows ({int(dropped):,} duplicates dropped), exit {code}; "
          f"measured {int(measured):,} flows in {elapsed:.1f} s")
    print(f"    {measured / max(cpu, 1e-9):>12,.0f} flows/s/core ({per_m:.2f} CPU-s per M); peak RSS {rss:.0f} MB")
    print(f"    ratios: stage/pure enrich_batch {per_m / (pure['enrich'] * 1e6):.2f}x, "
          f"stage/(decode + enrich + encode) {per_m / (pure['full'] * 1e6):.2f}x, "
          f"stage/(decode + encode) {per_m / (pure['floor'] * 1e6):.2f}x")
    if args.keep:
        print(f"kept {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if done + dropped >= flows and code == 0 else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pods", type=int, default=100_000)
    parser.add_argument("--versions", type=int, default=1_000_000)
    parser.add_argument("--flows", type=int, default=2_000_000)
    parser.add_argument("--pure-only", action="store_true", help="skip the stage measurement (b)")
    parser.add_argument("--keep", action="store_true", help="keep the working directory")
    args = parser.parse_args()
    now_ms = int(time.time() * 1000)
    t0 = time.perf_counter()
    table = identity_table(args.pods, args.versions, now_ms)
    batches = raw_batches(args.pods, args.flows, now_ms)
    print(f"generated {sum(len(v) for v in table.values()):,} versions of {len(table):,} addresses and "
          f"{sum(b.num_rows for b in batches):,} flows in {time.perf_counter() - t0:.1f} s")
    pure = bench_pure(table, batches, now_ms)
    print(f"(a) pure: index of {pure['addresses']:,} addresses / {pure['versions']:,} versions built in "
          f"{pure['build']:.2f} CPU-s; dst owned {pure['owned']:.0%}; a change of 100 addresses applied "
          f"in {pure['apply_ms']:.0f} CPU-ms")
    for name in ("lookup", "enrich", "full", "floor"):
        label = {"lookup": "two-sided lookup", "enrich": "enrich_batch",
                 "full": "decode + enrich_batch + encode", "floor": "reference: decode + encode only"}[name]
        print(f"    {label:<32} {1 / pure[name]:>12,.0f} flows/s/core ({pure[name] * 1e6:.2f} CPU-s per M)")
    if args.pure_only:
        return 0
    return bench_stage(args, table, batches, pure)


if __name__ == "__main__":
    sys.exit(main())
