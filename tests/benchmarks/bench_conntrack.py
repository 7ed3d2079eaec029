"""Conntrack sensor benchmark: the same burst of short connections read by `flowtally sensor
conntrack` (publishing to a real local Kafka) and by Debian's `conntrack -E -o extended`.

    .venv/bin/python -m tests.benchmarks.bench_conntrack [--connections 200000] [--dump-entries 100000]
        [--rate CONNECTIONS_PER_S] [--profile sensor.prof]

In a network namespace of its own (a veth pair, so the connections are not loopback), one
UDP datagram to each of N distinct destinations makes N conntrack entries; they expire after
1 s (nf_conntrack_udp_timeout) and the rest are flushed, so each gives a NEW and a DESTROY
event. Both readers run at the same time with the same receive buffer; printed: CPU seconds per
million events of each (from /proc/PID/stat, between "ready" and "every event read"), the
ratio (goal <= 1.5x conntrack-tools, not acceptable above 5x), the overruns each had while the
burst came at its rate and at the final flush (which ends every remaining connection at once),
and that the sensor's published records equal the connections.

Then the cost of one full dump of ``--dump-entries`` live entries: the sensor's dump path
(netlink read, decode, tracker, records) timed in this process, against `conntrack -L -o
extended` of the same table, then the same dump again with nothing changed (every row already
reported). Entries beyond nf_conntrack_max (machine-wide) raise it for the measurement and
restore it afterwards. The machine is small and shared: compare ratios of one run.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from flowtally.dev.localkafka import LocalKafka
from flowtally.dev.localstack import scrape
from flowtally.process import apply as apply_memory_policy
from sensors.conntrack.filters import make_filter
from sensors.conntrack.messages import Rows, decode
from sensors.conntrack.netlink import DumpSocket
from sensors.conntrack.records import build_table
from sensors.conntrack.service import MEMORY
from sensors.conntrack.tracker import Deltas, Tracker
from tests.benchmarks.bench_pipeline import cpu_seconds
from tests.netns import PortBridge, Topology, in_netns, sh

METRICS_PORT = 9464
BUFFER = 16 << 20


def _burst(ns: str, n: int, first: int = 0, rate: float = 0.0) -> float:
    """One UDP datagram to each of ``n`` distinct addresses of 10.99.0.0/16 (ports 9000+): n
    conntrack entries, at ``rate`` per second (0: as fast as this process can). Returns the
    seconds it took."""

    def send() -> float:
        t0 = time.monotonic()
        step = 500
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for chunk in range(first, first + n, step):
                for i in range(chunk, min(chunk + step, first + n)):
                    s.sendto(b"x", (f"10.99.{(i >> 8) & 255}.{i & 255}", 9000 + (i >> 16)))
                if rate:
                    ahead = t0 + (chunk + step - first) / rate - time.monotonic()
                    if ahead > 0:
                        time.sleep(ahead)
        return time.monotonic() - t0

    return in_netns(ns, send)


def _lines(path: Path) -> int:
    """Events of the burst conntrack -E printed (one "dst=10.99." per line; the benchmark's own
    loopback connections -- Kafka, metrics scrapes -- are not counted)."""
    with open(path, "rb") as f:
        data = f.read()
    return data.count(b"dst=10.99.")


def run_events(ns: str, n: int, bootstrap: str, work: Path, *, rate: float = 0.0,
               profile: str | None = None) -> dict[str, float]:
    """The burst read by the sensor (to Kafka) and by conntrack -E at the same time
    (``profile``: the sensor runs under cProfile, its statistics written there at exit)."""
    sh("sysctl", "-q", "-w", "net.netfilter.nf_conntrack_udp_timeout=1", ns=ns)
    host, port = bootstrap.rsplit(":", 1)
    bridge = PortBridge(ns, ("127.0.0.1", int(port)), None, (host, int(port)))
    metrics = PortBridge(None, ("127.0.0.1", 0), ns, ("127.0.0.1", METRICS_PORT))
    env = {"FLOWTALLY_KAFKA_BOOTSTRAP": f"127.0.0.1:{port}", "FLOWTALLY_KAFKA_TOPIC_PREFIX": f"b{int(time.time())}",
           "FLOWTALLY_RECEIVE_BUFFER_BYTES": str(BUFFER), "FLOWTALLY_OBSERVER": "bench"}
    log = open(work / "sensor.log", "wb")  # noqa: SIM115
    python = [sys.executable, *(["-m", "cProfile", "-o", profile] if profile else [])]
    sensor = subprocess.Popen(["ip", "netns", "exec", ns, *python, "-m", "flowtally.cli", "sensor",
                               "conntrack", "--metrics-listen", f"127.0.0.1:{METRICS_PORT}"],
                              env=os.environ | env, stdout=log, stderr=log)
    ct_out = work / "conntrack-E.txt"
    with open(ct_out, "wb") as out:
        ct = subprocess.Popen(["ip", "netns", "exec", ns, "conntrack", "-E", "-o", "extended", "-b", str(BUFFER)],
                              stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{metrics.address[1]}"

    def text(path: str = "/metrics") -> str:
        try:
            with urllib.request.urlopen(url + path, timeout=2) as r:
                return str(r.read().decode())
        except OSError:
            return ""

    try:
        deadline = time.monotonic() + 90
        while text("/healthz").strip() != "ok":
            if sensor.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"sensor did not become healthy: {(work / 'sensor.log').read_text()[-2000:]}")
            time.sleep(0.2)
        time.sleep(1.0)
        s0, c0 = cpu_seconds(sensor.pid), cpu_seconds(ct.pid)
        ct_lines0 = _lines(ct_out)
        t0 = time.monotonic()
        burst_s = _burst(ns, n, rate=rate)
        time.sleep(2.0)  # expiry (1 s) ...
        # Overruns while the burst came at its rate (the flush below ends tens of thousands of
        # connections at once, more DESTROYs than any receive buffer of this size holds).
        overruns_burst = scrape(text(), "flowtally_sensor_conntrack_overruns_total")
        enobufs_burst = ct_out.read_text(errors="replace").count("ENOBUFS")
        sh("conntrack", "-F", ns=ns, check=False)  # ... and the stragglers the GC has not reached
        deadline = time.monotonic() + max(120.0, n / 2000)
        s_done = c_done = None
        events = published = records = 0.0
        seen, still_since = -1, time.monotonic()
        while time.monotonic() < deadline and (s_done is None or c_done is None):
            now = time.monotonic()
            m = text()
            events = scrape(m, "flowtally_sensor_conntrack_events_total")
            records = scrape(m, "flowtally_sensor_conntrack_delta_records_total")
            published = scrape(m, "flowtally_sensor_flows_published_total")
            destroys = scrape(m, "flowtally_sensor_conntrack_events_total", {"type": "destroy"})
            if s_done is None and destroys >= n and published >= records >= n:
                s_done = (cpu_seconds(sensor.pid) - s0, now - t0)
            lines = _lines(ct_out) - ct_lines0
            if lines != seen:
                seen, still_since = lines, now
            # conntrack -E has no redelivery: after an overrun it never sees every event, so it
            # is done when its output stops growing for 3 s.
            if c_done is None and (lines >= 2 * n or (s_done is not None and now - still_since >= 3)):
                c_done = (cpu_seconds(ct.pid) - c0, still_since - t0)
            time.sleep(0.5)
        m = text()
        result = {
            "burst_s": burst_s,
            "sensor_cpu": s_done[0] if s_done else float("nan"),
            "sensor_elapsed": s_done[1] if s_done else float("nan"),
            "conntrack_cpu": c_done[0] if c_done else float("nan"),
            "conntrack_elapsed": c_done[1] if c_done else float("nan"),
            "sensor_events": events,
            "sensor_records": records,
            "sensor_published": published,
            "sensor_overruns": scrape(m, "flowtally_sensor_conntrack_overruns_total"),
            "sensor_overruns_burst": overruns_burst,
            "conntrack_enobufs_burst": float(enobufs_burst),
            "sensor_dumps": scrape(m, "flowtally_sensor_conntrack_dumps_total"),
            "conntrack_lines": float(_lines(ct_out) - ct_lines0),
            "conntrack_enobufs": float(ct_out.read_text(errors="replace").count("ENOBUFS")),
        }
    finally:
        for proc in (sensor, ct):
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()
        bridge.close()
        metrics.close()
    return result


def run_dump(ns: str, entries: int) -> dict[str, float]:
    """CPU of one full dump of ``entries`` live entries: the sensor's path vs conntrack -L."""
    sh("sysctl", "-q", "-w", "net.netfilter.nf_conntrack_udp_timeout=600", ns=ns)
    sh("conntrack", "-F", ns=ns, check=False)
    _burst(ns, entries, first=1 << 20)
    count = int(sh("conntrack", "-C", ns=ns).strip())

    tracker = Tracker()

    def sensor_dump() -> tuple[float, float, int, int]:
        """The service's dump path: a wakeup's chunks decoded at once, filtered, tracked, made
        into records."""
        t0, w0 = time.thread_time(), time.monotonic()
        skip = make_filter()
        tracker.begin_dump(time.monotonic())
        sock = DumpSocket(1)
        rows = records = 0
        try:
            while True:
                select.select([sock], [], [], 10.0)
                data, ends = sock.read(32)  # as ConntrackSensor reads a dump
                if not ends:
                    continue
                batch = decode(data, ends, dump=True)
                rows += batch.messages
                keep, skipped = skip(batch.rows)
                kept = batch.rows.take(keep) if skipped else batch.rows
                deltas = tracker.update(kept, time.monotonic())
                if deltas.positions:
                    records += build_table(kept, deltas, 0, "bench").num_rows
                if batch.done or batch.errors:
                    break
        finally:
            sock.close()
        tracker.end_dump(time.monotonic())
        return time.thread_time() - t0, time.monotonic() - w0, rows, records

    apply_memory_policy(MEMORY)  # as the sensor's process does, and as its start warms pyarrow up:
    build_table(Rows.empty(), Deltas([], []), 0, "bench")
    cpu, wall, rows, records = in_netns(ns, sensor_dump)
    # Again, nothing having changed: every row is a connection already reported.
    cpu2, _, rows2, records2 = in_netns(ns, sensor_dump)
    proc = subprocess.Popen(["ip", "netns", "exec", ns, "conntrack", "-L", "-o", "extended"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    sh("conntrack", "-F", ns=ns, check=False, timeout=120)  # before nf_conntrack_max is restored
    return {"entries": count, "sensor_cpu": cpu, "sensor_wall": wall, "rows": rows, "records": records,
            "sensor_cpu_unchanged": cpu2, "rows_unchanged": rows2, "records_unchanged": records2,
            "conntrack_cpu": usage.ru_utime + usage.ru_stime}


@contextlib.contextmanager
def table_room(entries: int) -> Iterator[None]:
    """nf_conntrack_max (machine-wide, root namespace) raised for ``entries`` while the block
    runs, and restored afterwards."""
    path = Path("/proc/sys/net/netfilter/nf_conntrack_max")
    before = int(path.read_text())
    wanted = entries + entries // 4 + 10_000
    if wanted > before:
        path.write_text(str(wanted))
    try:
        yield
    finally:
        if wanted > before:
            path.write_text(str(before))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--connections", type=int, default=200_000)
    p.add_argument("--dump-entries", type=int, default=100_000, help="0 = no dump measurement")
    p.add_argument("--rate", type=float, default=0.0, help="connections per second of the burst (0 = as fast "
                   "as one Python sender can)")
    p.add_argument("--profile", help="run the sensor under cProfile, statistics to this file")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="flowtally-bench-conntrack-"))
    topo = Topology()
    broker = LocalKafka(work / "kafka")
    bootstrap = broker.start()
    try:
        ns = topo.add_namespace(f"ftbench-{topo.run_id}")
        # A veth pair inside the namespace and a gateway with a static (unused) MAC: the datagrams
        # leave d0 and d1 drops them (not its MAC), after conntrack has confirmed each one.
        sh("ip", "link", "add", "d0", "type", "veth", "peer", "name", "d1", ns=ns)
        for dev in ("d0", "d1"):
            sh("ip", "link", "set", dev, "up", ns=ns)
        sh("ip", "addr", "add", "10.98.0.1/24", "dev", "d0", ns=ns)
        sh("ip", "neigh", "add", "10.98.0.2", "lladdr", "02:00:00:00:00:99", "dev", "d0", ns=ns)
        sh("ip", "route", "add", "10.99.0.0/16", "via", "10.98.0.2", "dev", "d0", ns=ns)
        sh("iptables", "-A", "OUTPUT", "-m", "conntrack", "--ctstate", "NEW", "-j", "ACCEPT", ns=ns)
        for sysctl in ("nf_conntrack_acct", "nf_conntrack_timestamp"):  # as the sensor sets them
            sh("sysctl", "-q", "-w", f"net.netfilter.{sysctl}=1", ns=ns)
        ev = run_events(ns, args.connections, bootstrap, work, rate=args.rate,
                        profile=args.profile) if args.connections else None
        dump = None
        if args.dump_entries:
            with table_room(args.dump_entries):
                dump = run_dump(ns, args.dump_entries)
    finally:
        topo.destroy()
        broker.stop()
    ok = True
    if ev is not None:
        n_events = 2 * args.connections
        s_per_m = ev["sensor_cpu"] / n_events * 1e6
        c_per_m = ev["conntrack_cpu"] / max(ev["conntrack_lines"], 1) * 1e6  # per event it printed
        print(f"burst: {args.connections:,} connections ({n_events:,} NEW+DESTROY events) sent in "
              f"{ev['burst_s']:.1f} s ({args.connections / ev['burst_s']:,.0f} connections/s)")
        print(f"sensor:          {s_per_m:6.2f} CPU-s per million events ({ev['sensor_elapsed']:.1f} s to read "
              f"and publish all), overruns {ev['sensor_overruns_burst']:.0f} during the burst + "
              f"{ev['sensor_overruns'] - ev['sensor_overruns_burst']:.0f} at the flush, dumps {ev['sensor_dumps']:.0f}, events "
              f"{ev['sensor_events']:,.0f}, records {ev['sensor_records']:,.0f}, "
              f"published {ev['sensor_published']:,.0f}")
        print(f"conntrack -E:    {c_per_m:6.2f} CPU-s per million events ({ev['conntrack_elapsed']:.1f} s), "
              f"{ev['conntrack_lines']:,.0f} lines (events it printed; CPU per printed event), "
              f"ENOBUFS warnings {ev['conntrack_enobufs_burst']:.0f} during the burst + "
              f"{ev['conntrack_enobufs'] - ev['conntrack_enobufs_burst']:.0f} at the flush")
        print(f"ratio sensor / conntrack -E: {s_per_m / c_per_m:.2f}x (goal <= 1.5x, limit 5x)")
        lost = args.connections - ev["sensor_records"]
        print(f"sensor records vs connections: {ev['sensor_records']:,.0f} / {args.connections:,} "
              f"(difference {lost:,.0f})")
        ok = lost == 0 and ev["sensor_published"] >= ev["sensor_records"]
    if dump is not None:
        ct = max(dump["conntrack_cpu"], 1e-9)
        print(f"full dump of {dump['entries']:,} entries: sensor path {dump['sensor_cpu']:.2f} CPU-s "
              f"({dump['sensor_wall']:.2f} s wall, {dump['rows']:,} rows, {dump['records']:,} records), "
              f"conntrack -L -o extended {dump['conntrack_cpu']:.2f} CPU-s, ratio {dump['sensor_cpu'] / ct:.2f}x; "
              f"again unchanged: {dump['sensor_cpu_unchanged']:.2f} CPU-s ({dump['rows_unchanged']:,} rows, "
              f"{dump['records_unchanged']:,} records), ratio {dump['sensor_cpu_unchanged'] / ct:.2f}x")
        ok = ok and dump["rows"] == dump["records"] == dump["entries"] and dump["records_unchanged"] == 0
    return 0 if ok else 1

if __name__ == "__main__":
    sys.exit(main())
