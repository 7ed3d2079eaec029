"""The `flowtally` command: one subcommand per stage and tool.

Argument definitions live here; each subcommand imports its stage lazily (Faust alone takes a
second to import) and calls that stage's ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

# Arrow's C++ code allocates from its default pool, chosen once when pyarrow loads (the parser
# below loads it) and not changed by pa.set_memory_pool: with mimalloc, the default, freed
# batches' pages go back to the kernel and are faulted in again for the next batch (the sensor's
# IPC writer, measured with perf in bench_sensor; the enricher's rebuilds, enricher/memory.py).
# Every stage takes the system allocator; an operator's own setting wins.
os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")

from flowtally import __version__
from flowtally.lifecycle import EXIT_CANNOT_START, StartError
from flowtally.settings import SettingsError

# subcommand path -> "module:function"
_TARGETS = {
    ("sensor", "netflow"): "sensors.netflow.collector:run",
    ("sensor", "conntrack"): "sensors.conntrack.service:run",
    ("enrich",): "enricher.app:run",
    ("watch-k8s",): "enricher.k8s.service:run",
    ("sink",): "sink.service:run",
    ("migrate",): "sql.migrate:run",
    ("query",): "sql.queries:run",
    ("decode",): "sensors.netflow.decodefile:run",
    ("generate", "netflow"): "flowtally.dev.generator:run_netflow",
    ("generate", "inventory"): "flowtally.dev.generator:run_inventory",
    ("kafka", "up"): "flowtally.dev.localkafka:run_up",
    ("kafka", "down"): "flowtally.dev.localkafka:run_down",
    ("demo",): "flowtally.dev.demo:run",
}


#: Each stage's section of the settings reference and its own page (paths in the source tree).
CONFIGURATION_DOC = "deploy/docs/configuration.md"
STAGE_DOCS = {
    ("sensor", "netflow"): ("flowtally-sensor-netflow", "deploy/docs/sensor-netflow.md"),
    ("sensor", "conntrack"): ("flowtally-sensor-conntrack", "deploy/docs/sensor-conntrack.md"),
    ("enrich",): ("flowtally-enrich", "deploy/docs/enricher.md"),
    ("watch-k8s",): ("flowtally-watch-k8s", "deploy/docs/watcher.md"),
    ("sink",): ("flowtally-sink-flowtally-migrate-flowtally-query", "deploy/docs/sink.md"),
    ("migrate",): ("flowtally-sink-flowtally-migrate-flowtally-query", "deploy/docs/sink.md"),
    ("query",): ("flowtally-sink-flowtally-migrate-flowtally-query", "deploy/docs/queries.md"),
}


def _stage_epilog(path: tuple[str, ...]) -> str:
    """Where ``flowtally <path> --help`` sends a reader for the settings the flags do not show."""
    anchor, page = STAGE_DOCS[path]
    # Lines of our own (a raw formatter): argparse would wrap the anchor at its hyphens.
    return (f"every setting, with its default and bounds:\n  {CONFIGURATION_DOC}#{anchor}\n"
            "every setting is also a FLOWTALLY_... environment variable (kafka.bootstrap is\n"
            "FLOWTALLY_KAFKA_BOOTSTRAP) and a key of the --config YAML file\n"
            f"more about this command: {page}")


def _stage_parser(sub: argparse._SubParsersAction, path: tuple[str, ...],
                  help_: str) -> argparse.ArgumentParser:
    """The subcommand ``path[-1]`` of ``sub``, with the common options and its settings epilog."""
    p: argparse.ArgumentParser = sub.add_parser(path[-1], help=help_, epilog=_stage_epilog(path),
                                               formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(p)
    return p


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", help="YAML settings file (also FLOWTALLY_CONFIG)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def build_parser(with_generator: bool = True) -> argparse.ArgumentParser:
    """The whole command-line interface (``with_generator=False``: without the options of
    ``generate netflow``, so that parsing any other command never imports the generator)."""
    parser = argparse.ArgumentParser(
        prog="flowtally",
        description="Kubernetes traffic history: sensors -> Kafka -> enricher -> ClickHouse.",
    )
    parser.add_argument("--version", action="version", version=f"flowtally {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sensor = sub.add_parser("sensor", help="run a sensor").add_subparsers(
        dest="sensor", required=True, metavar="KIND"
    )
    nf = _stage_parser(sensor, ("sensor", "netflow"),
                       "receive NetFlow v5/v9/IPFIX over UDP, publish raw batches")
    nf.add_argument("--listen", help="UDP address to receive on, host:port (default 0.0.0.0:2055)")
    nf.add_argument("--metrics-listen", help="host:port of /metrics and /healthz")
    ct = _stage_parser(sensor, ("sensor", "conntrack"),
                       "report the node's conntrack connections (netlink events and dumps) as raw batches")
    ct.add_argument("--stdout", action="store_true", help="print records as JSON lines, publish nothing")
    ct.add_argument("--metrics-listen", help="host:port of /metrics and /healthz (default 0.0.0.0:9464)")

    enrich = _stage_parser(sub, ("enrich",), "run the Faust enrichment stream")
    enrich.add_argument("--inventory", help="static identity inventory (YAML)")
    enrich.add_argument("--metrics-listen", help="host:port of /metrics and /healthz")

    watch = _stage_parser(sub, ("watch-k8s",), "watch the Kubernetes API, write the identity topic")
    watch.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster, else ~/.kube/config)")
    watch.add_argument("--context", help="kubeconfig context (default: its current one)")
    watch.add_argument("--metrics-listen", help="host:port of /metrics and /healthz")

    sink = _stage_parser(sub, ("sink",), "write enriched batches to ClickHouse")
    sink.add_argument("--metrics-listen", help="host:port of /metrics and /healthz")

    migrate = _stage_parser(sub, ("migrate",), "apply the SQL migrations in sql/migrations")
    migrate.add_argument("--status", action="store_true", help="list migrations, apply nothing")
    migrate.add_argument("--render", action="store_true",
                         help="print the DDL (for clickhouse.cluster when set) without connecting")

    query = _stage_parser(sub, ("query",), "run a named query from sql/queries (no name: list them)")
    query.add_argument("name", nargs="?", help="query name (omit to list them)")
    query.add_argument("--param", action="append", default=[], metavar="KEY=VALUE")
    query.add_argument("--format", choices=["table", "json", "csv"], default="table")

    decode = sub.add_parser("decode", help="decode NetFlow packets in pcap/pcapng files to JSON lines")
    decode.add_argument("files", nargs="+", help="pcap or pcapng captures")
    decode.add_argument(
        "--port", action="append", type=int, default=[],
        help="only UDP packets to this destination port (repeatable; default: any port)",
    )
    decode.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])

    gen = sub.add_parser("generate", help="synthetic data").add_subparsers(
        dest="what", required=True, metavar="WHAT"
    )
    netflow_gen = gen.add_parser("netflow", help="send a synthetic NetFlow v9 or IPFIX stream")
    if with_generator:
        # The generator owns its options (benchmarks build the same parser with it); a development
        # tool, imported only when the command is `generate`.
        from flowtally.dev.generator import add_netflow_arguments

        add_netflow_arguments(netflow_gen)
    ginv = gen.add_parser("inventory", help="print the synthetic cluster's inventory (YAML)")
    ginv.add_argument("--seed", type=int, default=1)
    ginv.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])

    kafka = sub.add_parser("kafka", help="a local single-node Kafka broker for development").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    kup = kafka.add_parser("up", help="download (once), format and start the local broker")
    kup.add_argument("--dir", help="state directory (default var/kafka)")
    kup.add_argument("--port", type=int, default=0, help="listener port (0 = a free port)")
    kup.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    kdown = kafka.add_parser("down", help="stop the local broker")
    kdown.add_argument("--dir", help="state directory (default var/kafka)")
    kdown.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])

    demo = sub.add_parser("demo", help="run the whole pipeline locally and print the top talkers")
    demo.add_argument("--flows", type=int, default=200_000)
    demo.add_argument("--rate", type=float, default=50_000)
    demo.add_argument("--dir", default="var/demo", help="where the demo keeps its state")
    demo.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `flowtally` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(with_generator="generate" in argv).parse_args(argv)
    logging.basicConfig(
        level=getattr(args, "log_level", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    path = tuple(
        v for v in (args.command, getattr(args, "sensor", None), getattr(args, "what", None),
                    getattr(args, "action", None)) if v
    )
    module_name, func_name = _TARGETS[path].split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    try:
        return int(func(args) or 0)
    except (SettingsError, StartError) as exc:
        print(f"flowtally {' '.join(path)}: {exc}", file=sys.stderr)
        return EXIT_CANNOT_START
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
