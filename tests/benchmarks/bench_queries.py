"""Query latency benchmark: every named query in sql/queries/ over N synthetic flows in chDB.

    .venv/bin/python -m tests.benchmarks.bench_queries [--flows 100000000] [--runs 20] [--keep]
    .venv/bin/python -m tests.benchmarks.bench_queries --data DIR   # generate into DIR once, reuse after
    .venv/bin/python -m tests.benchmarks.bench_queries --flows 10000000 --inline-views  # the slow, live-like build

1. A fresh chDB database with the real migrations, then N flows generated inside ClickHouse
   (``INSERT INTO flows … SELECT … FROM numbers()``, chunk by chunk, in time order like a live
   feed), over the last 30 days: 50 namespaces, 500 workloads (10 per namespace, one service
   each, 5 pods each, Zipf-like popularity), 20 nodes; a sparse service graph (each workload talks
   to 6 others, so the map has ~3,000 edges, not 250,000), and 20% of flows leaving the cluster to
   5,000 external addresses in 200 ASNs and 30 countries (4 ASNs per workload).
   The derived tables (flows_1m, flows_1h, flows_1d, pod_traffic_1h, first_seen_external: every
   table a materialized view fills from flows, directly or through another view's table, found in
   system.tables) are built one of two ways:
   - default: the views are DETACHed while the flows are generated (~500-700 k flows/s), then each
     view's own SELECT (``as_select`` from system.tables, not a copy of its SQL) runs as
     ``INSERT INTO <target> <select>`` once per partition of its source (one day of flows; chosen
     with ``additional_table_filters`` on ``_partition_id``, so memory stays bounded), in
     dependency order (flows_1h from the filled flows_1m, flows_1d from flows_1h), then the views
     are ATTACHed again (a DETACH without PERMANENTLY is undone when chDB reopens the directory,
     so an interrupted build does not leave them out). ~110 k flows/s overall at 10 M.
   - ``--inline-views``: through the attached views, as the sink's inserts run them (~20-40 k
     flows/s on 2 cores: each view runs per inserted block). Both ways insert with the sink's
     view settings (``sink.writer.VIEW_SETTINGS``; among them ``optimize_on_insert = 0``: the
     Summing/AggregatingMergeTree targets collapsing every block at insert was 4-5x the cost of
     the view's SELECT, so the collapsing is left to background merges).
   Either way the benchmark then prints (flows, bytes, packets) of the raw flows and of every
   derived table and exits 1 unless they are equal (first_seen_external against the flows its
   view selects: external destinations, not answers). tests/integration/test_bench_queries_backfill.py
   checks that a backfill gives the same merged rows as the inline views.
2. Bytes per flow on disk (system.parts, active parts) for flows and each derived table, and rows
   per table (as stored, merged or not).
3. Each named query run --runs times through ``sql.queries.execute`` with realistic parameters
   (windows of the last hour, 7 days and all time: sql/queries.py picks the rollups for each; an
   existing namespace/service/pod), after one warm-up run: p50 and p95 per query and window, and
   the tables the rendered SQL reads. The goal is p95 <= 300 ms; queries that read raw flows say so.

The data directory is deleted after the run unless --keep or --data (a directory kept between runs:
the flows are generated into it when it holds none, and reused, migrated to the newest schema, when
it does, so queries can be iterated on without regenerating; it holds ~13 GB at 100 M flows);
the benchmark refuses to start when the disk cannot hold an estimate of it.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from clickhouse_connect.driver.client import Client

from flowtally.clickhouse import connect
from flowtally.settings import ClickHouseSettings
from sink.writer import VIEW_SETTINGS
from sql import queries
from sql.migrate import migrate

NAMESPACES = 50
WORKLOADS = 500  # 10 per namespace
PODS_PER_WORKLOAD = 5
NODES = 20
EXTERNAL_SHARE = 20  # percent of flows whose destination is external
EXTERNAL_ADDRESSES = 5000  # 25 per ASN
ASNS = 200
PEERS = 6  # cluster workloads each workload sends to
EXTERNAL_PEERS = 4  # ASNs each workload sends to
COUNTRIES = ("US", "DE", "IE", "NL", "FR", "GB", "JP", "SG", "BR", "IN", "CA", "AU", "SE", "FI", "PL",
             "ES", "IT", "CH", "AT", "BE", "DK", "NO", "KR", "HK", "ZA", "MX", "AR", "CL", "TW", "IL")
#: The tables the migrations' views fill from flows.
DERIVED = ("flows_1m", "flows_1h", "flows_1d", "pod_traffic_1h", "first_seen_external")
SPAN_S = 30 * 86400 - 3600  # 30 days (an hour short, so nothing is at the per-minute rollup's TTL)
CHUNK = 10_000_000
#: Bytes per flow on disk assumed to size the run before it starts (measured at 100 M, backfilled:
#: ~94 in active parts of flows and the derived tables, 130 for the whole directory after the build).
ESTIMATE_BYTES_PER_FLOW = 130

# A workload index skewed toward small ids (a few busy services, a long tail): floor(500 * u^2).
_WORKLOAD = "toUInt32(floor({n} * pow((({h}) % 1000000) / 1000000, 2)))"


def generator_sql(start: int, count: int, total: int, end_ms: int) -> str:
    """``INSERT … SELECT`` of flows ``start`` … ``start + count`` out of ``total``, in time order over
    SPAN_S ending at ``end_ms``; every value derived from the row number (deterministic)."""
    countries = ", ".join(f"'{c}'" for c in COUNTRIES)
    ws = _WORKLOAD.format(n=WORKLOADS, h="h1")
    return f"""
INSERT INTO flows (time_received, exporter, observation_domain, observer, version, flow_start, flow_end,
    src_addr, dst_addr, src_port, dst_port, proto, bytes, packets, sampling_rate, tcp_flags,
    src_kind, src_namespace, src_name, src_workload, src_workload_kind, src_service, src_node,
    dst_kind, dst_namespace, dst_name, dst_workload, dst_workload_kind, dst_service, dst_node,
    src_pod_uid, dst_pod_uid, dst_asn, dst_as_org, dst_country, direction)
SELECT
    fromUnixTimestamp64Milli(end_ms + 500, 'UTC') AS time_received,
    toIPv6('::ffff:10.0.0.1'), 0, 'bench', 9,
    fromUnixTimestamp64Milli(end_ms - toInt64(h3 % 60000), 'UTC') AS flow_start,
    fromUnixTimestamp64Milli(end_ms, 'UTC') AS flow_end,
    toIPv6(IPv4NumToString(toUInt32(0x0AF40000 + src_pod))) AS src_addr,
    if(external, toIPv6(IPv4NumToString(toUInt32(0x51000000 + ext))),
       toIPv6(IPv4NumToString(toUInt32(0x0AF40000 + dst_pod)))) AS dst_addr,
    toUInt16(32768 + h3 % 28000) AS src_port,
    if(external, 443, [80, 443, 5432, 6379, 8080, 9090, 53][1 + wd % 7]) AS dst_port,
    if(dst_port = 53, 17, 6) AS proto,
    toUInt64(40 + bitShiftRight(h3, 20) % 2000000) AS bytes,
    toUInt64(1 + bytes / 1200) AS packets,
    1, 24,
    'pod', concat('ns-', toString(ws % {NAMESPACES})), concat('wl-', toString(ws), '-', toString(src_pod % {PODS_PER_WORKLOAD})),
    concat('wl-', toString(ws)), 'Deployment', concat('svc-', toString(ws)), concat('node-', toString(src_pod % {NODES})),
    if(external, 'external', 'pod'),
    if(external, '', concat('ns-', toString(wd % {NAMESPACES}))),
    if(external, '', concat('wl-', toString(wd), '-', toString(dst_pod % {PODS_PER_WORKLOAD}))),
    if(external, '', concat('wl-', toString(wd))), if(external, '', 'Deployment'),
    if(external, '', concat('svc-', toString(wd))), if(external, '', concat('node-', toString(dst_pod % {NODES}))),
    concat('uid-', toString(src_pod)), if(external, '', concat('uid-', toString(dst_pod))),
    if(external, toUInt32(64500 + intDiv(ext, {EXTERNAL_ADDRESSES // ASNS})), 0),
    if(external, concat('AS', toString(64500 + intDiv(ext, {EXTERNAL_ADDRESSES // ASNS}))), ''),
    if(external, [{countries}][1 + intDiv(ext, {EXTERNAL_ADDRESSES // ASNS}) % {len(COUNTRIES)}], ''),
    if(external, 'egress', 'pod-to-pod')
FROM
(
    SELECT
        number,
        toInt64({end_ms - SPAN_S * 1000}) + toInt64(intDiv(number * {SPAN_S * 1000}, {total})) AS end_ms,
        intHash64(number) AS h1, intHash64(number + 0x9E3779B97F4A7C15) AS h2, cityHash64(number) AS h3,
        {ws} AS ws,
        -- a sparse service graph: each workload talks to {PEERS} others and to {EXTERNAL_PEERS} ASNs
        (ws * 37 + 1 + (bitShiftRight(h2, 8) % {PEERS}) * 101) % {WORKLOADS} AS wd,
        ws * {PODS_PER_WORKLOAD} + bitShiftRight(h1, 40) % {PODS_PER_WORKLOAD} AS src_pod,
        wd * {PODS_PER_WORKLOAD} + bitShiftRight(h2, 40) % {PODS_PER_WORKLOAD} AS dst_pod,
        bitShiftRight(h2, 24) % 100 < {EXTERNAL_SHARE} AS external,
        ((ws * 7 + bitShiftRight(h3, 8) % {EXTERNAL_PEERS}) % {ASNS}) * {EXTERNAL_ADDRESSES // ASNS}
            + bitShiftRight(h3, 16) % {EXTERNAL_ADDRESSES // ASNS} AS ext
    FROM numbers({start}, {count})
)
SETTINGS insert_deduplicate = 0
"""


def generate(client: Client, total: int) -> float:
    """Insert ``total`` flows; returns flows/s."""
    end_ms = int(client.query("SELECT toUnixTimestamp64Milli(now64(3))").result_rows[0][0])
    started = time.perf_counter()
    for start in range(0, total, CHUNK):
        count = min(CHUNK, total - start)
        client.command(generator_sql(start, count, total, end_ms), settings=VIEW_SETTINGS)
        done = start + count
        rate = done / (time.perf_counter() - started)
        print(f"  generated {done:,} flows ({rate:,.0f}/s)", flush=True)
    return total / (time.perf_counter() - started)


@dataclass(frozen=True)
class View:
    """A materialized view of the migrations: it reads ``source`` and inserts ``select``'s rows into ``target``."""

    name: str
    source: str
    target: str
    select: str


def views(client: Client) -> list[View]:
    """The materialized views fed (directly or through another view's table) from ``flows``, in
    dependency order, read from system.tables: the SQL is the views' own, not a copy of it."""
    rows = client.query(
        "SELECT name, engine, dependencies_table, as_select, create_table_query FROM system.tables "
        "WHERE database = currentDatabase()").result_rows
    readers = {name: list(deps) for name, _, deps, _, _ in rows}  # table -> the views that read it
    found = {name: (select, create) for name, engine, _, select, create in rows if engine == "MaterializedView"}
    out: list[View] = []
    pending = ["flows"]
    while pending:  # breadth first from flows: a view's source is filled before the view runs
        table = pending.pop(0)
        for name in sorted(readers.get(table, [])):
            select, create = found[name]
            target = re.search(r"\bTO\s+(?:`?\w+`?\.)?`?(\w+)`?", create)
            if target is None:
                raise RuntimeError(f"view {name} has no TO table (an inner table is not supported): {create}")
            out.append(View(name, table, target.group(1), select))
            pending.append(target.group(1))
    return out


def detach_views(client: Client, found: list[View]) -> None:
    """Take the views out of the insert path (DETACH keeps their definition on disk)."""
    for view in found:
        client.command(f"DETACH TABLE {view.name}")


def attach_views(client: Client, found: list[View]) -> None:
    """Put detached views back (a no-op for one that is attached)."""
    attached = {r[0] for r in client.query(
        "SELECT name FROM system.tables WHERE database = currentDatabase()").result_rows}
    for view in found:
        if view.name not in attached:
            client.command(f"ATTACH TABLE {view.name}")


def backfill(client: Client, found: list[View]) -> dict[str, float]:
    """Fill each view's target by running the view's own SELECT as ``INSERT INTO target SELECT …``,
    one partition of its source at a time (``additional_table_filters`` on ``_partition_id``, so
    the view's SQL is not rewritten and memory stays bounded by one day of flows), views in
    dependency order (flows_1h from the filled flows_1m, flows_1d from flows_1h). Rollups are
    summed on read and merged by their engines, so rows split across chunks stay exact, as they do
    across the sink's inserts. Returns seconds per view."""
    database = client.query("SELECT currentDatabase()").result_rows[0][0]
    seconds: dict[str, float] = {}
    for view in found:
        started = time.perf_counter()
        partitions = [r[0] for r in client.query(
            "SELECT DISTINCT partition_id FROM system.parts WHERE database = currentDatabase() "
            "AND table = {t:String} AND active ORDER BY partition_id", parameters={"t": view.source}).result_rows]
        for partition in partitions:
            only = f"{{'{database}.{view.source}': '_partition_id = \\'{partition}\\''}}"
            client.command(f"INSERT INTO {view.target} {view.select} "
                           f"SETTINGS additional_table_filters = {only}, insert_deduplicate = 0",
                           settings=VIEW_SETTINGS)
        seconds[view.name] = time.perf_counter() - started
        print(f"  backfilled {view.target} from {view.source} ({len(partitions)} partitions) "
              f"in {seconds[view.name]:.1f} s", flush=True)
    return seconds


#: (what, SQL of (flows, bytes, packets)): every derived table against the raw flows it derives from.
TOTALS = (
    ("flows", "SELECT count(), sum(bytes), sum(packets) FROM flows"),
    ("flows_1m", "SELECT sum(flows), sum(bytes), sum(packets) FROM flows_1m"),
    ("flows_1h", "SELECT sum(flows), sum(bytes), sum(packets) FROM flows_1h"),
    ("flows_1d", "SELECT sum(flows), sum(bytes), sum(packets) FROM flows_1d"),
    ("pod_traffic_1h outbound", "SELECT sum(flows), sum(bytes), sum(packets) FROM pod_traffic_1h "
                                "WHERE direction = 'outbound'"),
    # every generated flow has a source pod, so each is counted once outbound; first_seen_external
    # holds the initiator's external destinations only (its view's WHERE)
    ("flows to external", "SELECT count(), sum(bytes), sum(packets) FROM flows "
                          "WHERE dst_kind = 'external' AND initiator != 2"),
    ("first_seen_external", "SELECT sum(flows), sum(bytes), sum(packets) FROM first_seen_external"),
)


def check_totals(client: Client) -> bool:
    """Print (flows, bytes, packets) of the raw flows and of every derived table; True when each
    derived table equals the raw totals it derives from."""
    got = {what: tuple(int(v) for v in client.query(sql).result_rows[0]) for what, sql in TOTALS}
    for what, value in got.items():
        print(f"  totals {what:24s} flows {value[0]:>14,} bytes {value[1]:>20,} packets {value[2]:>16,}")
    equal = (len({got[t] for t in ("flows", "flows_1m", "flows_1h", "flows_1d", "pod_traffic_1h outbound")}) == 1
             and got["flows to external"] == got["first_seen_external"])
    print("  rollup totals == raw totals: " + ("yes" if equal else "NO"))
    return equal


def storage(client: Client) -> list[tuple[str, int, int, float]]:
    """(table, rows, bytes on disk, bytes per flow) for flows and the rollups."""
    flows = int(client.query("SELECT count() FROM flows").result_rows[0][0])
    out = []
    for table in ("flows", *DERIVED):
        rows, size = client.query(
            "SELECT sum(rows), sum(bytes_on_disk) FROM system.parts "
            f"WHERE database = currentDatabase() AND table = '{table}' AND active").result_rows[0]
        out.append((table, int(rows), int(size), int(size) / max(flows, 1)))
    return out


def parameter_sets(client: Client) -> dict[str, list[dict[str, str]]]:
    """Realistic parameters per named query: windows of an hour (per-minute rollup), 7 days
    (per-hour rollup) and all time, for a busy namespace/service/pod that exists in the data."""
    ns, svc, pod, uid = client.query(
        "SELECT dst_namespace, dst_service, dst_name, dst_pod_uid FROM flows "
        "WHERE dst_kind = 'pod' AND flow_end >= now() - INTERVAL 1 HOUR LIMIT 1").result_rows[0]
    day_ago = client.query("SELECT toString(now() - INTERVAL 1 DAY)").result_rows[0][0]
    windows = [{"minutes": "60"}, {"minutes": str(7 * 1440)}, {"minutes": "0"}]
    known: dict[str, list[dict[str, str]]] = {
        "service_peers": [{"namespace": ns, "service": svc} | w for w in windows],
        "pod_peers": [{"namespace": ns, "pod": pod} | w for w in windows],
        "pod_history": [{"uid": uid} | w for w in windows],
        "first_seen_external": [{"since": day_ago}],
    }
    out = {}
    for name in queries.names():
        declared = queries.load(name).defaults
        if name in known:
            out[name] = known[name]
        elif "minutes" in declared:
            out[name] = windows
        else:
            out[name] = [{}]
    return out


def source(name: str, params: dict[str, str]) -> str:
    """Which tables a named query reads with ``params`` (from its rendered SQL)."""
    query = queries.load(name)
    sql = queries.render(query, query.defaults | params)
    read = set(re.findall(r"\bFROM\s+(\w+)", sql))
    tables = [t.removeprefix("flows_") for t in (*DERIVED, "completeness") if t in read]
    if "flows" in read:
        tables.append("flows (raw)")
    return "+".join(tables) or "?"


def baseline_query(revision: str, name: str) -> queries.NamedQuery | None:
    """Query ``name`` as it was at git ``revision`` (None if it did not exist or needs rendering)."""
    shown = subprocess.run(["git", "show", f"{revision}:sql/queries/{name}.sql"], capture_output=True, text=True,
                           cwd=Path(__file__).resolve().parents[2], check=False)
    if shown.returncode != 0 or re.search(r"\{[a-z_]+\}", shown.stdout):
        return None
    return queries.parse(name, shown.stdout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flows", type=int, default=100_000_000)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--budget-s", type=float, default=30.0,
                        help="stop repeating a query after this long (at least 3 runs)")
    parser.add_argument("--dir", type=Path, default=Path("/work"),
                        help="where the temporary data directory goes (default /work)")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--baseline", default="",
                        help="a git revision: also run its version of each query, interleaved, and compare")
    parser.add_argument("--only", default="", help="comma-separated query names to run (default: all)")
    parser.add_argument("--data", type=Path, default=None,
                        help="a data directory kept between runs (generated into when empty, else reused)")
    parser.add_argument("--inline-views", action="store_true",
                        help="generate through the attached views, as inserts do live (slow: ~17 k flows/s), "
                             "instead of generating flows alone and backfilling the views' tables")
    args = parser.parse_args()

    reuse = args.data is not None and (args.data / "chdb").exists()
    free = shutil.disk_usage(args.data.parent if args.data else args.dir).free
    need = args.flows * ESTIMATE_BYTES_PER_FLOW
    print(f"disk free at {args.dir}: {free / 1e9:.1f} GB; estimate for {args.flows:,} flows: {need / 1e9:.1f} GB")
    if need > free * 0.5 and not reuse:
        print("not enough disk for that many flows (keeping half the disk free); use --flows", file=sys.stderr)
        return 2
    if args.data is not None:
        args.data.mkdir(parents=True, exist_ok=True)
        work = args.data
    else:
        work = Path(tempfile.mkdtemp(prefix="flowtally-bench-queries-", dir=args.dir))
    client = connect(ClickHouseSettings(path=work / "chdb"))
    try:
        migrate(client)
        if reuse:
            args.flows = int(client.query("SELECT count() FROM flows").result_rows[0][0])
            print(f"reusing the {args.flows:,} flows in {work}")
        elif args.inline_views:
            print(f"generating {args.flows:,} flows through the migrations' views (inline)")
            started = time.perf_counter()
            rate = generate(client, args.flows)
            print(f"built in {time.perf_counter() - started:.1f} s: {rate:,.0f} flows/s, views included")
        else:
            found = views(client)
            print(f"generating {args.flows:,} flows with the views detached, then backfilling "
                  + ", ".join(f"{v.target} (from {v.source})" for v in found))
            started = time.perf_counter()
            detach_views(client, found)
            try:
                rate = generate(client, args.flows)
                print(f"  flows alone: {rate:,.0f} flows/s")
                backfill(client, found)
            finally:
                attach_views(client, found)
            print(f"built in {time.perf_counter() - started:.1f} s "
                  f"({args.flows / (time.perf_counter() - started):,.0f} flows/s, rollups included)")
        if not check_totals(client):
            print("rollup totals differ from the raw totals", file=sys.stderr)
            return 1
        print("\nstorage (active parts)")
        for table, stored, size, per_flow in storage(client):
            print(f"  {table:20s} {stored:14,} rows {size / 1e6:10,.1f} MB  {per_flow:6.2f} B per flow")
        print(f"\nquery latency over {args.flows:,} flows, {args.runs} runs each after a warm-up (ms)")
        head = f"  {'query':22s} {'params':42s} {'reads':28s} {'rows':>6s} {'runs':>4s} {'p50':>8s} {'p95':>8s}"
        if args.baseline:
            head += f"  {'base p50':>8s} {'base p95':>8s} {'p95 ratio':>9s} same rows"
        print(head)
        worst_rollup = worst = 0.0
        only = {n for n in args.only.split(",") if n}
        for name, sets in parameter_sets(client).items():
            if only and name not in only:
                continue
            base = baseline_query(args.baseline, name) if args.baseline else None
            for params in sets:
                _, result = queries.execute(client, name, params)  # warm-up
                base_params = {k: v for k, v in params.items() if base and k in base.defaults}
                if base:
                    base_rows = [tuple(r) for r in client.query(
                        base.sql, parameters=base.defaults | base_params).result_rows]
                times: list[float] = []
                base_times: list[float] = []
                budget = time.monotonic() + args.budget_s
                while len(times) < args.runs and (len(times) < 3 or time.monotonic() < budget):
                    started = time.perf_counter()
                    queries.execute(client, name, params)
                    times.append((time.perf_counter() - started) * 1000)
                    if base:  # interleaved, so both see the same load
                        started = time.perf_counter()
                        client.query(base.sql, parameters=base.defaults | base_params)
                        base_times.append((time.perf_counter() - started) * 1000)
                p50, p95 = np.percentile(times, [50, 95])
                reads = source(name, params)
                worst = max(worst, float(p95))
                if "raw" not in reads:
                    worst_rollup = max(worst_rollup, float(p95))
                shown = ",".join(f"{k}={v}" for k, v in params.items())[:42]
                line = f"  {name:22s} {shown:42s} {reads:28s} {len(result):6d} {len(times):4d} {p50:8.1f} {p95:8.1f}"
                if base:
                    b50, b95 = np.percentile(base_times, [50, 95])
                    line += f"  {b50:8.1f} {b95:8.1f} {p95 / b95:9.2f} {'yes' if base_rows == result else 'no'}"
                print(line, flush=True)
        print(f"\nworst p95: {worst:.1f} ms; of the runs that read no raw flows: {worst_rollup:.1f} ms "
              "(goal <= 300 ms)")
    finally:
        client.close()
        if args.keep or args.data is not None:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
