"""The whole pipeline at 250,000 flows/s offered, for 2,000,000 flows: every flow stored, once.

The real sensor, enricher and sink processes on the session's broker and a chDB of their own;
the generator sends the synthetic cluster's NetFlow v9 at the rate. At this rate the enriched
messages of a raw batch outgrow the Kafka message limit (they carry names the raw ones do not):
the enricher must split them to fit (``kafka.max_message_bytes``) rather than crash-loop on one
raw message, and the sink must keep the split pieces apart in its exactly-once bookkeeping. The
totals are exact (rows, bytes and packets against what the generator says it sent), no stage
drops or parks anything, and every stage stops cleanly. A bound on time, not a benchmark:
``tests/benchmarks/bench_pipeline.py`` measures the same run.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

from flowtally.clickhouse import connect
from flowtally.dev.generator import inventory_yaml, synthetic_cluster
from flowtally.dev.localstack import Pipeline
from flowtally.settings import ClickHouseSettings

FLOWS = 2_000_000
RATE = 250_000
#: Sending takes 8 s; storing lags it by seconds. The bound is for a loaded CI machine.
STORED_WITHIN_S = 300.0


def _dlq_count(metrics: str, name: str) -> float:
    """Messages a stage sent to the DLQ, whatever the reason (outcome="dlq_<reason>", or
    "partial_dlq_<reason>" in the sink)."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
               if line.startswith(name + "{") and 'dlq_' in line.split("}", 1)[0])


def test_two_million_flows_at_250k_per_second_are_all_stored(kafka_bootstrap: str, tmp_path: Path) -> None:
    inventory = tmp_path / "inventory.yaml"
    inventory.write_text(inventory_yaml(synthetic_cluster(1)))
    pipe = Pipeline(bootstrap=kafka_bootstrap, state_dir=tmp_path, inventory=inventory,
                    topic_prefix=f"rate{uuid.uuid4().hex[:8]}")
    try:
        pipe.start()
        out = subprocess.run(
            [sys.executable, "-m", "flowtally.cli", "generate", "netflow", "--to", f"127.0.0.1:{pipe.netflow_port}",
             "--flows", str(FLOWS), "--rate", str(RATE), "--seed", "7", "--json"],
            check=True, capture_output=True, text=True, timeout=120)
        sent = json.loads(out.stdout.strip().splitlines()[-1])
        assert sent["complete"] and sent["flows"] == FLOWS
        assert sent["rate"] > 0.8 * RATE, sent  # the offered rate really was near 250k/s
        rows = pipe.wait_rows(FLOWS, timeout=STORED_WITHIN_S, settle=2.0)
        sensor, enricher, sink = (pipe.stages[n] for n in ("sensor", "enricher", "sink"))
        dropped = (sensor.metric("flowtally_sensor_flows_dropped_total")
                   + sensor.metric("flowtally_sensor_netflow_kernel_drops"))
        dlq = (_dlq_count(enricher.metrics(), "flowtally_enricher_batches_total")
               + _dlq_count(sink.metrics(), "flowtally_sink_messages_total"))
        split = enricher.metric("flowtally_enricher_batches_split_total")
        codes = pipe.stop()
    finally:
        pipe.stop()
    assert rows == FLOWS, f"{rows:,} of {FLOWS:,} stored (sensor dropped {dropped:,.0f})"
    assert dropped == 0 and dlq == 0
    assert codes == {"sensor": 0, "enricher": 0, "sink": 0}
    print(f"{FLOWS:,} flows sent at {sent['rate']:,.0f}/s, all stored; {split:.0f} enriched batches split")

    client = connect(ClickHouseSettings(path=tmp_path / "chdb"))
    try:
        count, total_bytes, total_packets = client.query(
            "SELECT count(), sum(bytes), sum(packets) FROM flows").result_rows[0]
    finally:
        client.close()
    assert (count, total_bytes, total_packets) == (FLOWS, sent["bytes"], sent["packets"])
