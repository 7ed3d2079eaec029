"""End-to-end benchmark: N generated flows through sensor -> Kafka -> enricher -> Kafka -> sink -> chDB.

    .venv/bin/python -m tests.benchmarks.bench_pipeline [--flows 1000000] [--rate 100000]

Prints end-to-end throughput, CPU seconds per million flows for each stage (measured from the
stage's /proc counters between "ready" and "all rows inserted", so start-up is excluded), the
latency from a flow's end time (= when the generator sent it) to the moment it became queryable
(``inserted_at``), and two ratios against references measured in the same run on the same data:
nfcapd receiving the same stream (sensor CPU / nfcapd CPU) and one native ``insert_arrow`` of
the same rows into an empty copy of the table (sink CPU / native insert CPU).

The machine is small and shared: compare ratios between runs, not absolute numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from flowtally.clickhouse import connect
from flowtally.dev.generator import inventory_yaml, synthetic_cluster
from flowtally.dev.localkafka import LocalKafka
from flowtally.dev.localstack import Pipeline
from flowtally.settings import ClickHouseSettings

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def generate(port: int, flows: int, rate: float, seed: int = 1) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-m", "flowtally.cli", "generate", "netflow", "--to", f"127.0.0.1:{port}",
         "--flows", str(flows), "--rate", str(rate), "--seed", str(seed), "--json"],
        check=True, capture_output=True, text=True,
    )
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def native_insert_reference(chdb: Path) -> tuple[float, int]:
    """CPU seconds of one insert_arrow of every stored row into an empty copy of ``flows``."""
    client = connect(ClickHouseSettings(path=chdb))
    try:
        rows = client.query_arrow("SELECT * EXCEPT inserted_at FROM flows")
        client.command("CREATE TABLE flows_reference AS flows")
        started = time.process_time()
        client.insert_arrow("flows_reference", rows)
        used = time.process_time() - started
        return used, rows.num_rows
    finally:
        client.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flows", type=int, default=1_000_000)
    parser.add_argument("--rate", type=float, default=100_000, help="flows/s the generator sends")
    parser.add_argument("--keep", action="store_true", help="keep the working directory")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="flowtally-bench-"))
    broker = LocalKafka(work / "kafka")
    bootstrap = broker.start()
    inventory = work / "inventory.yaml"
    inventory.write_text(inventory_yaml(synthetic_cluster(1)))
    pipe = Pipeline(bootstrap=bootstrap, state_dir=work, inventory=inventory)
    try:
        pipe.start()
        pids = {name: stage.process.pid for name, stage in pipe.stages.items() if stage.process}
        cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        t0 = time.monotonic()
        sent = generate(pipe.netflow_port, args.flows, args.rate)
        rows = pipe.wait_rows(int(sent["flows"]), timeout=max(300.0, args.flows / 1000), settle=0.0)
        elapsed = time.monotonic() - t0
        cpu = {name: cpu_seconds(pid) - cpu_before[name] for name, pid in pids.items()}
        received = pipe.stages["sensor"].metric("flowtally_sensor_netflow_flows_total")
        codes = pipe.stop()
    finally:
        pipe.stop()
        broker.stop()

    client = connect(ClickHouseSettings(path=work / "chdb"))
    try:
        p50, p99, stored = client.query(
            "SELECT quantile(0.5)(lat), quantile(0.99)(lat), count() FROM "
            "(SELECT toUnixTimestamp64Milli(inserted_at) - toUnixTimestamp64Milli(flow_end) AS lat FROM flows)"
        ).result_rows[0]
    finally:
        client.close()
    native_cpu, native_rows = native_insert_reference(work / "chdb")
    from tests.benchmarks.bench_sensor import run_nfcapd  # imports this module: import late

    nfcapd = run_nfcapd(args.flows, args.rate, work)
    nfcapd_cpu, nfcapd_flows = nfcapd["cpu"], int(nfcapd["stored"])

    per_m = 1_000_000 / max(rows, 1)
    print(f"flows sent {int(sent['flows']):,} at {sent['rate']:,.0f}/s; sensor decoded {int(received):,}; "
          f"stored {stored:,} (exit codes {codes})")
    print(f"end to end: {rows / elapsed:,.0f} flows/s ({elapsed:.1f} s from first send to last insert)")
    for name in ("sensor", "enricher", "sink"):
        print(f"  {name:<9} {cpu[name] * per_m:7.2f} CPU-s per million flows")
    print(f"  total     {sum(cpu.values()) * per_m:7.2f} CPU-s per million flows")
    print(f"latency flow end -> queryable: p50 {p50 / 1000:.2f} s, p99 {p99 / 1000:.2f} s")
    nf_per_m = nfcapd_cpu * 1_000_000 / max(nfcapd_flows, 1)
    print(f"reference nfcapd: {nf_per_m:.2f} CPU-s per million flows ({nfcapd_flows:,} stored); "
          f"sensor/nfcapd = {cpu['sensor'] * per_m / max(nf_per_m, 1e-9):.1f}x")
    native_per_m = native_cpu * 1_000_000 / max(native_rows, 1)
    print(f"reference native insert_arrow: {native_per_m:.2f} CPU-s per million rows; "
          f"sink/native = {cpu['sink'] * per_m / max(native_per_m, 1e-9):.1f}x")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"kept {work}")
    return 0 if rows == int(sent["flows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
