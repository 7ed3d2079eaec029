"""Sink benchmark: N enriched rows through `flowtally sink` from a real local Kafka into chDB,
against a native ClickHouse insert of the same rows in the same run.

    .venv/bin/python -m tests.benchmarks.bench_sink [--rows 1000000] [--rows-per-message 8000]
    .venv/bin/python -m tests.benchmarks.bench_sink --views [--rows 400000]

1. Builds N enriched rows (synthetic cluster identities) in batches of --rows-per-message and
   produces them to the enriched topic of a fresh local Kafka (not timed).
2. Starts the real sink subprocess; its rate is measured from the first rows it reports received
   (``flowtally_sink_rows_received_total``) to the last rows it reports inserted (process
   start-up and the consumer-group join excluded), rows/s.
3. Native references on the same rows, each into a fresh database with the same migrations (so
   the views run too, as they do for the sink), one insert of all rows each: ``INSERT INTO flows
   SELECT * FROM file('rows.parquet')`` with ClickHouse's default settings and with the view
   settings the sink uses (``sink.writer.VIEW_SETTINGS``: one-level GROUP BY in the views, no
   collapsing of rollup blocks at insert), and
   one ``insert_arrow`` of the whole table as one record batch with those settings.
4. Reports the ratio sink / each native and sink / the fastest native (goal >= 0.8, first bar
   0.5), and bytes per flow on disk (from system.parts, before and after OPTIMIZE FINAL).

``--views`` instead compares rollup view formulations on the same batches, inserted the way the
sink inserts them (one message per insert, a token each), interleaved batch by batch across
databases that differ only in their views, so machine noise hits each formulation alike.

The sink inserts groups of consecutive messages of a partition (``group_max_rows``, 500,000 by
default; see sink/groups.py for how a group stays exact under replay), so with ``--views`` the
per-insert cost of the view formulations matters less than it did at one message per insert.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from enricher.enrich import enrich_batch
from enricher.identity import IdentityIndex
from enricher.inventory import load_inventory
from enricher.schema import SCHEMA_NAME as ENRICHED
from flowtally import kafka
from flowtally.clickhouse import connect
from flowtally.dev.generator import inventory_yaml, synthetic_cluster
from flowtally.dev.localkafka import LocalKafka
from flowtally.dev.localstack import Stage, free_port
from flowtally.settings import ClickHouseSettings, KafkaSettings
from flowtally.wire import ORIGIN_HEADER, encode_batch
from sensors.schema import build_raw_table, ipv4_to_mapped
from sink.rows import flow_rows
from sink.writer import VIEW_SETTINGS
from sql.migrate import migrate


def build_batches(rows: int, per_message: int, workdir: Path) -> list[pa.Table]:
    """Enriched batches over a synthetic cluster's pod addresses plus some external ones."""
    path = workdir / "inventory.yaml"
    path.write_text(inventory_yaml(synthetic_cluster(1)))
    owners = load_inventory(path).owners
    index = IdentityIndex(owners)
    v4 = [o.ip for o in owners if ":" not in o.ip]
    pool = np.array([int.from_bytes(bytes(int(p) for p in ip.split(".")), "big") for ip in v4]
                    + [0x51024500 + i for i in range(200)], dtype=np.uint32)
    rng = np.random.default_rng(1)
    now = int(time.time() * 1000)
    batches = []
    for start in range(0, rows, per_message):
        n = min(per_message, rows - start)
        ends = np.sort(now - rng.integers(0, 60_000, n))
        raw = build_raw_table({
            "src_addr": ipv4_to_mapped(rng.choice(pool, n)), "dst_addr": ipv4_to_mapped(rng.choice(pool, n)),
            "src_port": rng.integers(1024, 65535, n), "dst_port": rng.choice([53, 80, 443, 5432, 8080], n),
            "proto": rng.choice([6, 17], n), "bytes": rng.integers(40, 1_500_000, n),
            "packets": rng.integers(1, 1000, n), "start": ends - rng.integers(0, 30_000, n), "end": ends,
            "time_received": ends + 200, "version": np.full(n, 9), "exporter": ipv4_to_mapped(np.full(n, 0x0A000001)),
        })
        batches.append(enrich_batch(raw, index))
    return batches


async def produce(settings: KafkaSettings, batches: list[pa.Table]) -> int:
    await kafka.ensure_topics(settings, kafka.TopicSettings())
    producer = kafka.producer(settings)
    await producer.start()
    largest = 0
    try:
        for i, table in enumerate(batches):
            value, headers = encode_batch(table, ENRICHED)
            largest = max(largest, len(value))
            headers.append((ORIGIN_HEADER, f"bench/0/{i}".encode()))
            await producer.send(settings.topic("enriched"), value, key=f"k{i % 16}".encode(), headers=headers)
        await producer.flush()
    finally:
        await producer.stop()
    return largest


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_sink(bootstrap: str, prefix: str, chdb: Path, rows: int, logs: Path,
             env: dict[str, str] | None = None) -> tuple[float, int, float]:
    """Rows/s of the real sink from its first received to its last inserted rows, and its CPU
    seconds over the same span (the process's, chDB's threads included)."""
    port = free_port()
    sink = Stage("sink", ["sink", "--metrics-listen", f"127.0.0.1:{port}"],
                 {"FLOWTALLY_KAFKA_BOOTSTRAP": bootstrap, "FLOWTALLY_KAFKA_TOPIC_PREFIX": prefix,
                  "FLOWTALLY_CLICKHOUSE_PATH": str(chdb), "FLOWTALLY_GROUP_ID": f"{prefix}-sink",
                  **(env or {})},
                 logs / "sink.log", port)
    sink.start()
    try:
        sink.wait_healthy(120)
        assert sink.process is not None
        first_t = first_cpu = 0.0
        deadline = time.monotonic() + 600
        done = 0
        while time.monotonic() < deadline:
            sink.check_alive()
            now = time.monotonic()
            if not first_t and sink.metric("flowtally_sink_rows_received_total"):
                first_t, first_cpu = now, _cpu_seconds(sink.process.pid)
            done = int(sink.metric("flowtally_sink_rows_inserted_total"))
            if done >= rows:
                break
            time.sleep(0.02)
        elapsed = time.monotonic() - first_t
        return done / max(elapsed, 1e-9), done, _cpu_seconds(sink.process.pid) - first_cpu
    finally:
        sink.stop()


#: The native references: name -> (source, settings).
NATIVE: dict[str, tuple[str, dict[str, int]]] = {
    "INSERT … SELECT FROM file(parquet), default settings": ("file", {}),
    "INSERT … SELECT FROM file(parquet), the sink's view settings": ("file", VIEW_SETTINGS),
    "insert_arrow (one record batch), the sink's view settings": ("arrow", VIEW_SETTINGS),
}


def native(chdb: Path, table: pa.Table, workdir: Path) -> dict[str, tuple[float, float]]:
    """rows/s and CPU seconds of each native reference (:data:`NATIVE`), one insert of all rows
    each, into fresh databases with the same schema and views (chDB runs in this process)."""
    parquet = workdir / "rows.parquet"
    pq.write_table(table, parquet)
    table = table.combine_chunks()
    results = {}
    for i, (name, (source, settings)) in enumerate(NATIVE.items()):
        client = connect(ClickHouseSettings(path=chdb, database=f"native_{i}"))
        try:
            migrate(client)
            cols = ", ".join(table.column_names)
            started, cpu = time.perf_counter(), time.process_time()
            if source == "file":
                client.command(f"INSERT INTO flows ({cols}) SELECT {cols} FROM file('{parquet}', Parquet)",
                               settings=settings)
            else:
                client.insert_arrow("flows", table, settings={"max_insert_block_size": 2 * table.num_rows,
                                                               **settings})
            results[name] = (table.num_rows / (time.perf_counter() - started), time.process_time() - cpu)
            assert client.query("SELECT count() FROM flows").result_rows[0][0] == table.num_rows
        finally:
            client.close()
    return results


#: The per-hour view of migration 0006 fed from ``flows`` instead of ``flows_1m`` (not chained).
_HOURLY_FROM_FLOWS = """
CREATE MATERIALIZED VIEW flows_1h_mv TO flows_1h AS
SELECT toStartOfHour(f.flow_end) AS time,
       src_namespace, src_workload, src_service, src_kind, dst_namespace, dst_workload, dst_service, dst_kind,
       proto, if(f.dst_port < 32768, f.dst_port, 0) AS dst_port,
       direction, src_asn, src_country, dst_asn, dst_country,
       sum(f.bytes) AS bytes, sum(f.packets) AS packets, count() AS flows,
       sum(f.bytes * f.sampling_rate) AS scaled_bytes, sum(f.packets * f.sampling_rate) AS scaled_packets
FROM flows AS f
GROUP BY ALL
"""

#: Formulation -> (whether migration 0006 is applied, statements run after all migrations).
#: Other views on ``flows`` (later migrations) are there in every formulation alike.
VIEW_FORMULATIONS: dict[str, tuple[bool, list[str]]] = {
    "no rollup views (floor)": (True, ["DROP VIEW flows_1h_mv", "DROP VIEW flows_1m_mv"]),
    "1m and 1h over flows, 0006 keys": (True, ["DROP VIEW flows_1h_mv", _HOURLY_FROM_FLOWS]),
    "0006: 1h chained on 1m": (True, []),
    "1m view only, 0006 keys": (True, ["DROP VIEW flows_1h_mv"]),
}


def compare_views(chdb: Path, batches: list[pa.Table]) -> None:
    """Median wall and CPU time per insert of each view formulation (see the module doc)."""
    from sink.writer import Writer
    from sql.migrate import available

    rows = [flow_rows(b) for b in batches]
    client = connect(ClickHouseSettings(path=chdb, database="views_setup"))
    try:
        writers = {}
        for i, (name, (with_0006, extra)) in enumerate(VIEW_FORMULATIONS.items()):
            client.command(f"CREATE DATABASE IF NOT EXISTS views_{i}")
            client.database = f"views_{i}"
            for m in available():
                if m.version != 6 or with_0006:
                    for statement in m.statements():
                        client.command(statement)
            for statement in extra:
                client.command(statement)
            writers[name] = (f"views_{i}", Writer(client, "flows"))
        wall: dict[str, list[float]] = {name: [] for name in writers}
        cpu: dict[str, list[float]] = {name: [] for name in writers}
        for j, batch in enumerate(rows):
            for name, (db, writer) in writers.items():
                client.database = db
                t, c = time.perf_counter(), time.process_time()  # chDB runs in this process
                writer.insert(batch, f"views/{j}")
                wall[name].append(time.perf_counter() - t)
                cpu[name].append(time.process_time() - c)
        per = rows[0].num_rows
        print(f"view formulations: {len(rows)} inserts of {per:,} rows each, interleaved; median per insert")
        for name, (db, _) in writers.items():
            client.database = db
            rollup = client.query("SELECT count() FROM flows_1m").result_rows[0][0]
            w, c = float(np.median(wall[name])), float(np.median(cpu[name]))
            print(f"  {name:40s} {w * 1000:7.1f} ms wall {c * 1000:7.1f} ms CPU  {per / w:10,.0f} rows/s"
                  f"  (flows_1m rows {rollup:,})")
    finally:
        client.close()


def bytes_per_flow(chdb: Path) -> tuple[float, float, int]:
    client = connect(ClickHouseSettings(path=chdb))
    try:
        sql = ("SELECT sum(bytes_on_disk) / sum(rows), count() FROM system.parts "
               "WHERE database = 'flowtally' AND table = 'flows' AND active")
        before, parts = client.query(sql).result_rows[0]
        client.command("OPTIMIZE TABLE flows FINAL")
        after, _ = client.query(sql).result_rows[0]
        return float(before), float(after), int(parts)
    finally:
        client.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--rows-per-message", type=int, default=8000)
    parser.add_argument("--insert-concurrency", type=int, default=None,
                        help="the sink's insert_concurrency (partitions inserted at once; default: its own)")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--views", action="store_true", help="compare rollup view formulations instead")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="flowtally-bench-sink-"))
    if args.views:
        try:
            compare_views(work / "chdb", build_batches(args.rows, args.rows_per_message, work))
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return 0
    broker = LocalKafka(work / "kafka")
    bootstrap = broker.start()
    prefix = f"bs{uuid.uuid4().hex[:8]}"
    try:
        batches = build_batches(args.rows, args.rows_per_message, work)
        largest = asyncio.run(produce(KafkaSettings(bootstrap=bootstrap, topic_prefix=prefix), batches))
        env = {} if args.insert_concurrency is None else {"FLOWTALLY_INSERT_CONCURRENCY": str(args.insert_concurrency)}
        sink_rate, stored, sink_cpu = run_sink(bootstrap, prefix, work / "chdb", args.rows, work, env)
    finally:
        broker.stop()
    before, after, parts = bytes_per_flow(work / "chdb")
    all_rows = flow_rows(pa.concat_tables(batches))
    natives = native(work / "chdb", all_rows, work)

    print(f"rows {args.rows:,} in {len(batches)} messages of {args.rows_per_message:,} (largest {largest:,} B)")
    print(f"sink:   {sink_rate:12,.0f} rows/s  {sink_cpu:5.1f} CPU-s (stored {stored:,})")
    for name, (rate, cpu) in natives.items():
        print(f"native: {rate:12,.0f} rows/s  {cpu:5.1f} CPU-s  {name}; ratio sink/native {sink_rate / rate:.2f}, "
              f"CPU native/sink {cpu / sink_cpu:.2f}")
    fastest = max(rate for rate, _ in natives.values())
    print(f"ratio sink/fastest native = {sink_rate / fastest:.2f} (goal >= 0.8, first bar 0.5)")
    print(f"bytes per flow on disk: {before:.1f} ({parts} parts as inserted), {after:.1f} after OPTIMIZE FINAL")
    if args.keep:
        print(f"kept {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if stored == args.rows else 1


if __name__ == "__main__":
    sys.exit(main())
