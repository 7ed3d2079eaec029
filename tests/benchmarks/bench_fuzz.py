"""Fuzz benchmark of the NetFlow sensor: `python -m tests.benchmarks.bench_fuzz [--rate 10000] [--seconds 30]`.

Starts a local Kafka broker and a real `flowtally sensor netflow`, sends hostile datagrams
(:class:`tests.fuzz_netflow.Mutator`: lying headers, lengths and templates, template collisions
with the valid exporter, random observation domains, truncation, garbage) at ``--rate`` from
``--addresses`` x ``--ports`` source sockets, interleaved with a valid v9 exporter sending
``--valid-flows`` flows over the same time, and prints: the fuzz rate achieved, the valid flows
(bytes, packets) sent and read back from the raw topic, the sensor's RSS and /metrics size
before and after, and its decode errors by reason. Exit code 1 if the valid totals differ.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from flowtally.dev.localkafka import LocalKafka
from tests.fuzz_netflow import run_fuzz


def main(argv: list[str] | None = None) -> int:
    """Run once and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=10_000, help="hostile datagrams per second")
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--valid-flows", type=int, default=100_000)
    parser.add_argument("--addresses", type=int, default=6, help="hostile source addresses (127.0.0.10+)")
    parser.add_argument("--ports", type=int, default=3, help="source ports per hostile address")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--env", action="append", default=[], help="FLOWTALLY_X=value for the sensor")
    args = parser.parse_args(argv)
    env = dict(item.split("=", 1) for item in args.env)
    work = Path(tempfile.mkdtemp(prefix="flowtally-bench-fuzz-"))
    broker = LocalKafka(work / "kafka")
    bootstrap = broker.start()
    try:
        report = run_fuzz(bootstrap, work, hostile_rate=args.rate, seconds=args.seconds,
                          valid_flows=args.valid_flows, addresses=args.addresses, ports_each=args.ports,
                          seed=args.seed, pool=50_000, env=env)
    finally:
        broker.stop()
    for line in report.lines():
        print(line)
    exact = report.valid_stored == (report.valid.flows, report.valid.bytes, report.valid.packets)
    print("valid totals exact" if exact else "VALID TOTALS DIFFER")
    shutil.rmtree(work, ignore_errors=True)
    return 0 if exact else 1


if __name__ == "__main__":
    raise SystemExit(main())
