"""`flowtally demo`: the whole pipeline on this machine, on the embedded defaults.

Starts the local Kafka broker, the sink (chDB), the enricher (with the synthetic cluster's
inventory) and the NetFlow sensor; sends a synthetic NetFlow v9 stream; waits until every flow
is in ClickHouse; stops the stages cleanly; prints the top talkers read back from ClickHouse and
checks the totals against what the generator sent.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from flowtally.clickhouse import connect
from flowtally.dev.localkafka import LocalKafka
from flowtally.dev.localstack import Pipeline, StageFailed
from flowtally.settings import ClickHouseSettings
from sql.queries import execute, format_table

log = logging.getLogger(__name__)


def run(args: argparse.Namespace) -> int:
    """Run the demo; 0 when ClickHouse holds exactly what was sent."""
    from flowtally.dev.generator import inventory_yaml, synthetic_cluster

    state = Path(args.dir).resolve()
    if state.exists():
        shutil.rmtree(state)  # every demo run starts from empty topics and an empty database
    state.mkdir(parents=True)
    inventory = state / "inventory.yaml"
    inventory.write_text(inventory_yaml(synthetic_cluster(1)))

    broker = LocalKafka(state / "kafka")
    log.info("starting the local Kafka broker (the first run downloads it from Maven Central)")
    bootstrap = broker.start()
    pipeline = Pipeline(bootstrap=bootstrap, state_dir=state, inventory=inventory)
    try:
        log.info("starting sink, enricher and sensor")
        pipeline.start()
        log.info("sending %d synthetic NetFlow v9 flows at %.0f flows/s", args.flows, args.rate)
        sent = _generate(pipeline.netflow_port, args.flows, args.rate)
        rows = pipeline.wait_rows(sent["flows"], timeout=max(120.0, args.flows / 2000))
        log.info("sink inserted %d of %d flows", rows, sent["flows"])
    except StageFailed as exc:
        log.error("%s", exc)
        pipeline.stop()
        broker.stop()
        return 1
    codes = pipeline.stop()
    broker.stop()
    if any(codes.values()):
        log.error("stages did not exit cleanly: %s (logs in %s)", codes, state / "logs")
        return 1

    client = connect(ClickHouseSettings(path=state / "chdb"))
    try:
        columns, rows_ = execute(client, "top_talkers", {"minutes": "0", "limit": "15"})
        total = client.query("SELECT count(), sum(bytes), sum(packets) FROM flows").result_rows[0]
    finally:
        client.close()
    print("\nTop talkers (namespace/workload -> namespace/workload, from ClickHouse):\n")
    print(format_table(columns, rows_))
    flows, bytes_, packets = (int(v) for v in total)
    exact = (flows, bytes_, packets) == (sent["flows"], sent["bytes"], sent["packets"])
    print(f"\nsent     {sent['flows']:>12,} flows {sent['bytes']:>16,} bytes {sent['packets']:>13,} packets")
    print(f"stored   {flows:>12,} flows {bytes_:>16,} bytes {packets:>13,} packets"
          f"   {'exact' if exact else 'MISMATCH'}")
    print(f"\nstate kept in {state} (logs in {state / 'logs'}); query it with:\n"
          f"  FLOWTALLY_CLICKHOUSE_PATH={shlex.quote(str(state / 'chdb'))} {flowtally_command()} "
          f"query top_talkers --param minutes=0")
    return 0 if exact else 1


def flowtally_command(cwd: Path | None = None) -> str:
    """A shell command that runs this flowtally from ``cwd`` (default: the current directory).

    The demo runs from the venv that command 1 creates, which is not on PATH: the console script
    next to this interpreter (relative when it is under ``cwd``, as ``.venv/bin/flowtally``), else
    this interpreter with ``-m flowtally.cli``."""
    here = Path.cwd() if cwd is None else cwd
    # sys.executable, not its resolved target: a venv's python is a symlink to the system one,
    # whose directory has no flowtally script.
    script = Path(sys.executable).parent / "flowtally"
    if not script.is_file():
        return f"{shlex.quote(sys.executable)} -m flowtally.cli"
    try:
        return shlex.quote(str(script.relative_to(here)))
    except ValueError:
        return shlex.quote(str(script))


def _generate(port: int, flows: int, rate: float) -> dict[str, int]:
    started = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "flowtally.cli", "generate", "netflow", "--to", f"127.0.0.1:{port}",
         "--flows", str(flows), "--rate", str(rate), "--json"],
        check=True, capture_output=True, text=True,
    )
    sent = json.loads(out.stdout.strip().splitlines()[-1])
    log.info("generator sent %s in %.1fs", sent, time.monotonic() - started)
    return {k: int(sent[k]) for k in ("flows", "bytes", "packets")}
