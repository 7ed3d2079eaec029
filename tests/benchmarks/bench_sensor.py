"""Sensor benchmark: the same generated NetFlow v9 (or IPFIX) stream to nfcapd and to `flowtally sensor netflow`.

    .venv/bin/python -m tests.benchmarks.bench_sensor [--flows 1000000] [--rate 100000] [--format v9|ipfix]
        [--profile DIR] [--spy DIR] [--perf DIR [--perf-dwarf]] [--repeat N] [--no-floor]

Sends the stream once to nfcapd (Debian nfdump) and once to the sensor publishing to a real local
Kafka broker, and prints for both the CPU seconds per million flows (from /proc/PID/stat between
"ready" and "every flow stored/published", split into user and system), flows/s per core, the
sensor/nfcapd ratio and the loss (flows sent vs decoded and published by the sensor vs stored by
nfcapd; must be 0). Goal: sensor <= 1.0x nfcapd's CPU per flow; not acceptable above 2.0x. The
headline ratio is against nfcapd's default (uncompressed files); a second reference, nfcapd ``-y``
(LZ4-compressed files, like for like with the sensor's lz4-compressed Arrow buffers), gets its
own ratio. (nfcapd's CPU is counted until a second after the stream; the last partly filled
block it writes at exit is not, for either reference.)

Each round also measures the transport floor (:mod:`tests.benchmarks.transport_floor`; skip it
with ``--no-floor``): the sensor's batches of the same stream, encoded and published to the same
broker at the pace they filled, by a process that receives and decodes nothing while measured.
It is the part of the sensor's CPU per flow that no receiver or decoder can remove (Arrow IPC,
compression, the Kafka client, the kernel's share of sending), printed with its own ratio to
nfcapd; the sensor's figure minus it is what receiving, decoding and bookkeeping cost. Each
process's wakeups (voluntary context switches) per million flows are printed too.

``--profile DIR`` runs the sensor under cProfile (through a ``sitecustomize`` hook, so the
sensor's code is unchanged; timed in process CPU time), writes DIR/sensor.prof and prints the top functions (cProfile adds
overhead per Python call: read it for shares, not for the ratio); ``--encode-study`` times Arrow IPC encoding of one
decoded batch with each compression codec (CPU vs bytes on the wire).

``--spy DIR`` samples the running sensor with py-spy (a separate process, so the sensor runs at
full speed; DIR/sensor.raw) from healthy to the end of the stream, and prints the sensor's CPU per
million flows split by what the sampled stacks were doing (receiving, decoding, completeness
accounting, Arrow IPC, Kafka, ...; each share of the non-idle samples times the measured CPU).
py-spy also samples the sensor while it is runnable but waiting for a core, which on a busy
machine inflates whatever wakes another process (a send to the broker wakes Kafka): read the
shares with ``--perf``'s on-CPU symbols beside them (250 samples a second: ~250 per CPU-second).

``--perf DIR`` records the sensor with ``perf`` (DIR/perf.data; native and kernel frames: lz4,
memcpy, page faults, system calls, which py-spy cannot see, and only time on a CPU, where py-spy
also counts a runnable thread waiting for one) and prints its top symbols.

``--format ipfix`` sends IPFIX instead (templates with fixed-length fields, a reduced-size one
and the variable-length interfaceName; absolute millisecond times): nfcapd decodes it too.

The machine is small and shared: compare the ratio measured in one run, not absolute numbers.
``--repeat N`` runs N rounds (sensor, nfcapd, nfcapd -y each) on one broker and prints the median
and range of each ratio: one round's can be off by a third.
"""

from __future__ import annotations

import argparse
import json
import os
import pstats
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from flowtally.dev.localkafka import LocalKafka
from flowtally.dev.localstack import Stage, free_port, scrape
from tests.benchmarks.bench_pipeline import TICKS, cpu_seconds


def generate(port: int, flows: int, rate: float, fmt: str = "v9", seed: int = 1) -> dict[str, Any]:
    """Send the synthetic stream (``python -m flowtally.dev.generator``, which has --format);
    returns the sender's JSON report."""
    out = subprocess.run(
        [sys.executable, "-m", "flowtally.dev.generator", "netflow", "--to", f"127.0.0.1:{port}",
         "--flows", str(flows), "--rate", str(rate), "--seed", str(seed), "--format", fmt, "--json"],
        check=True, capture_output=True, text=True,
    )
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def run_nfcapd(flows: int, rate: float, workdir: Path, fmt: str = "v9", lz4: bool = False) -> dict[str, float]:
    """nfcapd receiving the stream: CPU seconds (and user/system) from ready to the end of the
    stream, flows stored. ``lz4``: ``-y``, LZ4-compressed output files (like for like with the
    sensor's lz4-compressed Arrow buffers)."""
    nfcapd = shutil.which("nfcapd")
    if nfcapd is None:
        raise SystemExit("nfcapd (Debian package nfdump) is needed for the reference")
    port = free_port(socket.SOCK_DGRAM)
    flowdir = workdir / ("nfcapd-lz4" if lz4 else "nfcapd")
    flowdir.mkdir()
    proc = subprocess.Popen([nfcapd, "-b", "127.0.0.1", "-p", str(port), "-w", str(flowdir), "-t", "3600",
                             "-B", str(32 * 1024 * 1024), *(["-y"] if lz4 else [])],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.0)
        before = cpu_seconds(proc.pid)
        counters_before = process_counters(proc.pid)
        t0 = time.monotonic()
        sent = generate(port, flows, rate, fmt)
        time.sleep(1.0)  # nfcapd has taken the last datagrams from its socket by now
        used = cpu_seconds(proc.pid) - before
        counters = {name: value - counters_before[name] for name, value in process_counters(proc.pid).items()}
        elapsed = time.monotonic() - t0
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    stored = 0
    summary = subprocess.run(["nfdump", "-R", str(flowdir), "-q", "-o", "fmt:%fl"], capture_output=True, text=True)
    for line in summary.stdout.splitlines():
        if line.strip().isdigit():
            stored += int(line.strip())
    return {"cpu": used, "stored": stored, "sent": sent["flows"], "elapsed": elapsed,
            "user": counters["user"], "system": counters["system"], "wakeups": counters["wakeups"]}


def run_floor(flows: int, rate: float, fmt: str, bootstrap: str, env: dict[str, str]) -> dict[str, float]:
    """The transport floor (:mod:`tests.benchmarks.transport_floor`): the sensor's batches of the
    same stream encoded and published to the same broker, nothing received or decoded; with the
    sensor's batch size, coalescing and compression where ``env`` sets them."""
    extra: list[str] = []
    for option, name in (("--batch-flows", "FLOWTALLY_BATCH_MAX_FLOWS"),
                         ("--coalesce-ms", "FLOWTALLY_RECEIVE_COALESCE_MS"),
                         ("--compression", "FLOWTALLY_COMPRESSION")):
        if name in env:
            extra += [option, env[name]]
    out = subprocess.run(
        [sys.executable, "-m", "tests.benchmarks.transport_floor", "--bootstrap", bootstrap, "--flows", str(flows),
         "--rate", str(rate), "--format", fmt, *extra], check=True, capture_output=True, text=True)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def process_counters(pid: int) -> dict[str, float]:
    """User and system CPU seconds and minor page faults of a process, from /proc/PID/stat, and
    its threads' context switches from /proc/PID/task/*/status: ``wakeups`` (voluntary: the
    thread slept and was woken, e.g. by a datagram or a timer) and ``preempted`` (involuntary)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    out = {"user": int(fields[11]) / TICKS, "system": int(fields[12]) / TICKS, "faults": float(fields[7]),
           "wakeups": 0.0, "preempted": 0.0}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            status = (task / "status").read_text()
        except OSError:  # the thread ended meanwhile
            continue
        for line in status.splitlines():
            if line.startswith("voluntary_ctxt_switches:"):
                out["wakeups"] += float(line.split()[1])
            elif line.startswith("nonvoluntary_ctxt_switches:"):
                out["preempted"] += float(line.split()[1])
    return out


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds per thread name of a process (threads of one name summed), from /proc."""
    out: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended meanwhile
            continue
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / TICKS
    return out


def run_sensor(flows: int, rate: float, workdir: Path, bootstrap: str, env: dict[str, str],
               profile: Path | None, fmt: str, spy: Path | None = None,
               perf: Path | None = None, perf_dwarf: bool = False) -> dict[str, Any]:
    """The sensor receiving the stream and publishing to Kafka: CPU seconds from healthy to the
    moment every decoded flow is acknowledged by Kafka."""
    udp = free_port(socket.SOCK_DGRAM)
    mport = free_port()
    if profile is not None:
        profile.mkdir(parents=True, exist_ok=True)
        env = env | _profile_env(profile, workdir)
    stage = Stage("sensor", ["sensor", "netflow", "--listen", f"127.0.0.1:{udp}", "--metrics-listen",
                             f"127.0.0.1:{mport}"],
                  {"FLOWTALLY_KAFKA_BOOTSTRAP": bootstrap, "FLOWTALLY_KAFKA_TOPIC_PREFIX": f"b{int(time.time())}",
                   "FLOWTALLY_COMPLETENESS": "true"} | env,
                  workdir / "sensor.log", mport)
    stage.start()
    try:
        stage.wait_healthy(60)
        assert stage.process is not None
        pid = stage.process.pid
        before = cpu_seconds(pid)
        threads_before = thread_cpu(pid)
        counters_before = process_counters(pid)
        sampler = _start_spy(pid, spy, flows / rate + 3) if spy is not None else None
        recorder = _start_perf(pid, perf, flows / rate + 3, perf_dwarf) if perf is not None else None
        t0 = time.monotonic()
        sent = generate(udp, flows, rate, fmt)
        deadline = time.monotonic() + max(60.0, flows / 5000)
        published = decoded = 0.0
        while time.monotonic() < deadline:
            stage.check_alive()
            text = stage.metrics()
            decoded = scrape(text, "flowtally_sensor_netflow_flows_total")
            published = scrape(text, "flowtally_sensor_flows_published_total")
            if published >= sent["flows"]:
                break
            time.sleep(0.5)  # scrapes cost the sensor CPU: not too often
        used = cpu_seconds(pid) - before
        elapsed = time.monotonic() - t0
        if sampler is not None:
            sampler.wait(60)
        if recorder is not None:
            recorder.wait(60)
        threads = {name: cpu - threads_before.get(name, 0.0) for name, cpu in thread_cpu(pid).items()}
        counters = {name: value - counters_before[name] for name, value in process_counters(pid).items()}
        text = stage.metrics()
        wire_bytes = scrape(text, "flowtally_sensor_message_bytes_published_total")
        dropped = scrape(text, "flowtally_sensor_flows_dropped_total")
        kernel = scrape(text, "flowtally_sensor_netflow_kernel_drops")
        code = stage.stop(30)
    finally:
        stage.stop()
    if profile is not None:
        _print_profile(profile / "sensor.prof")
    return {"cpu": used, "decoded": decoded, "published": published, "sent": sent["flows"],
            "elapsed": elapsed, "wire_bytes": wire_bytes, "dropped": dropped, "kernel_drops": kernel,
            "exit": code, "payload_bytes": sent["payload_bytes"], "threads": threads, "counters": counters}


# CPU time, not wall time: on a shared machine wall time mostly measures waiting for a core.
_SITECUSTOMIZE = """
import atexit, cProfile, os, time
_profiler = cProfile.Profile(time.process_time)
_profiler.enable()
atexit.register(lambda: (_profiler.disable(), _profiler.dump_stats(os.environ["FLOWTALLY_BENCH_PROFILE"])))
"""


def _profile_env(profile: Path, workdir: Path) -> dict[str, str]:
    """Environment that makes the sensor process profile itself with cProfile (a sitecustomize
    module on PYTHONPATH) and write the stats to ``profile/sensor.prof`` when it exits."""
    hook = workdir / "profile-hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    path = os.pathsep.join(p for p in (str(hook), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, "FLOWTALLY_BENCH_PROFILE": str(profile / "sensor.prof")}


def _print_profile(path: Path, top: int = 30) -> None:
    if not path.exists():
        print(f"no profile written at {path}")
        return
    print(f"profile of the sensor (cProfile, whole process incl. start-up): {path}")
    pstats.Stats(str(path)).sort_stats("tottime").print_stats(top)


def _start_spy(pid: int, spy: Path, seconds: float) -> subprocess.Popen[bytes]:
    """py-spy sampling ``pid`` for ``seconds`` into ``spy/sensor.raw`` (collapsed stacks)."""
    exe = shutil.which("py-spy", path=os.pathsep.join([str(Path(sys.executable).parent),
                                                       os.environ.get("PATH", "")]))
    if exe is None:
        raise SystemExit("--spy needs py-spy (pip install py-spy)")
    spy.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([exe, "record", "--pid", str(pid), "--rate", "250", "--duration",
                             str(int(seconds) + 1), "--format", "raw", "--nonblocking", "--output",
                             str(spy / "sensor.raw")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _start_perf(pid: int, perf: Path, seconds: float, dwarf: bool = False) -> subprocess.Popen[bytes]:
    """``perf record`` of ``pid`` (kernel and native frames: lz4, memcpy, system calls, which
    py-spy cannot see) for ``seconds`` into ``perf/perf.data``; ``dwarf`` unwinds native
    callers without frame pointers (libc's memmove, malloc), at a higher cost per sample."""
    exe = shutil.which("perf")
    if exe is None:
        raise SystemExit("--perf needs perf (Debian package linux-perf)")
    perf.mkdir(parents=True, exist_ok=True)
    graph = ["-F", "499", "--call-graph", "dwarf,16384"] if dwarf else ["-F", "997", "-g"]
    return subprocess.Popen([exe, "record", *graph, "-p", str(pid), "-o", str(perf / "perf.data"),
                             "--", "sleep", str(int(seconds) + 1)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def perf_report(data: Path, top: int = 25) -> str:
    """The ``top`` symbols by self time (shared object and symbol) of a ``perf record`` file."""
    out = subprocess.run(["perf", "report", "-i", str(data), "--no-children", "--sort", "dso,sym",
                          "--stdio", "-g", "none", "--percent-limit", "0.7"],
                         capture_output=True, text=True, check=False)
    lines = [line for line in out.stdout.splitlines() if line.strip() and not line.startswith("#")]
    return "\n".join(lines[:top])


#: What a sampled stack was doing: the first rule (in this order) that names one of its frames.
#: Samples waiting in the selector are idle (py-spy --nonblocking cannot always tell).
_SPY_RULES = (
    ("select (selectors", "idle: waiting in the event loop's selector"),
    ("encode_messages (", "Arrow IPC + lz4 (encode_messages)"),
    ("domains_many (", "completeness: datagram headers"),
    ("_account_rows (", "completeness: decoded rows"),
    ("_account (", "completeness: datagrams"),
    ("decode_payloads (", "decode (incl. build_raw_table)"),
    ("with_observer (", "observer column"),
    ("_export (", "Prometheus counters"),
    ("_flush (", "flush: other"),
    ("_read_multi (", "receive: recvmmsg and payload slices"),
    ("_on_datagrams (", "receive: filing per exporter"),
    ("UdpReceiver", "receive: other"),
    ("aiokafka", "Kafka: aiokafka"),
    ("publisher.py", "Kafka: publisher"),
    ("_tick (", "ticker"),
    ("metrics.py", "metrics server"),
    ("asyncio", "event loop"),
)


def spy_shares(raw: Path, cpu_per_million: float) -> list[tuple[str, float, float]]:
    """(what, share of the non-idle samples, CPU-s per million flows) from py-spy's collapsed
    stacks, the measured CPU split by the shares; idle samples get share and CPU 0."""
    counts: dict[str, int] = {}
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        frames = stack.split(";")
        what = next((name for key, name in _SPY_RULES if any(key in f for f in frames)),
                    "other: " + frames[-1])
        counts[what] = counts.get(what, 0) + int(n)
    idle = _SPY_RULES[0][1]
    busy = sum(n for what, n in counts.items() if what != idle) or 1
    rows = [(what, 0.0 if what == idle else n / busy, 0.0 if what == idle else n / busy * cpu_per_million)
            for what, n in counts.items()]
    return sorted(rows, key=lambda r: -r[2])


def encode_study(flows: int) -> None:
    """CPU and bytes of Arrow IPC encoding of one decoded 8192-flow batch, per codec."""
    import pyarrow as pa

    from flowtally.dev.generator import encode_packets, synthetic_cluster, synthetic_flows
    from sensors.netflow.decoder import Datagram, decode_datagrams
    from sensors.netflow.stats import DecodeStats
    from sensors.netflow.templates import TemplateStore
    from sensors.schema import address16

    cluster = synthetic_cluster(1)
    now = int(time.time() * 1000)
    enc = encode_packets(synthetic_flows(cluster, 8192, (1, 0), now - 1000, span_ms=1000), source_id=1,
                         sequence=0, unix_secs=now // 1000, uptime_ms=3_600_000, template_first=True)
    exporter = address16("127.0.0.1")
    table = decode_datagrams([Datagram(exporter, now, p) for p in enc.packets], TemplateStore(), DecodeStats())
    print(f"encode study: one batch of {table.num_rows} flows ({table.nbytes:,} bytes in memory)")
    for codec in (None, "lz4", "zstd"):
        options = pa.ipc.IpcWriteOptions(compression=codec)
        t0 = time.process_time()
        n = 50
        for _ in range(n):
            sink = pa.BufferOutputStream()
            with pa.ipc.new_stream(sink, table.schema, options=options) as writer:
                writer.write_table(table)
            size = len(sink.getvalue())
        per_m = (time.process_time() - t0) / n / table.num_rows * 1_000_000
        print(f"  {codec or 'none':>5}: {per_m:6.3f} CPU-s per million flows, {size / table.num_rows:6.1f} bytes/flow")


def report(args: argparse.Namespace, sensor: dict[str, Any], nf: dict[str, float] | None,
           nf_lz4: dict[str, float] | None, floor: dict[str, float] | None = None) -> tuple[bool, list[float]]:
    """Print one round (the sensor, then the nfcapd references, then the transport floor);
    whether every flow arrived everywhere, and the ratios sensor/nfcapd, sensor/nfcapd -y and
    (with ``floor``) floor/nfcapd."""
    sent = int(sensor["sent"])
    s_per_m = sensor["cpu"] * 1_000_000 / max(sent, 1)
    print(f"format {args.format}, {args.flows:,} flows at {args.rate:,.0f} flows/s")
    print(f"sensor: {sent:,} flows sent, {int(sensor['decoded']):,} decoded, {int(sensor['published']):,} "
          f"published (loss {sent - int(sensor['published'])}; dropped {int(sensor['dropped'])}, kernel drops "
          f"{int(sensor['kernel_drops'])}), exit code {int(sensor['exit'])}")
    print(f"  {s_per_m:.3f} CPU-s per million flows; {sent / max(sensor['cpu'], 1e-9):,.0f} flows/s per core; "
          f"Kafka {sensor['wire_bytes'] / max(sent, 1):.1f} bytes/flow "
          f"(NetFlow {sensor['payload_bytes'] / max(sent, 1):.1f} bytes/flow)")
    counters = sensor["counters"]
    print(f"  user {counters['user'] * 1_000_000 / max(sent, 1):.3f} + system "
          f"{counters['system'] * 1_000_000 / max(sent, 1):.3f} CPU-s per million flows; "
          f"{counters['faults'] * 1_000_000 / max(sent, 1):,.0f} minor page faults per million flows")
    print(f"  {counters['wakeups'] * 1_000_000 / max(sent, 1):,.0f} wakeups (voluntary context switches) and "
          f"{counters['preempted'] * 1_000_000 / max(sent, 1):,.0f} preemptions per million flows")
    per_thread = sorted(sensor["threads"].items(), key=lambda kv: -kv[1])
    print("  CPU by thread: " + ", ".join(f"{name} {cpu * 1_000_000 / max(sent, 1):.3f}"
                                          for name, cpu in per_thread if cpu > 0))
    if args.spy is not None and (args.spy / "sensor.raw").exists():
        print(f"  CPU by activity (py-spy samples, {args.spy / 'sensor.raw'}):")
        for what, share, cpu in spy_shares(args.spy / "sensor.raw", s_per_m):
            if cpu >= 0.005 or share == 0.0:
                print(f"    {cpu:6.3f} CPU-s/M ({share:5.1%})  {what}")
    if args.perf is not None and (args.perf / "perf.data").exists():
        print(f"  top symbols by self time (perf, {args.perf / 'perf.data'}):")
        print("    " + perf_report(args.perf / "perf.data").replace("\n", "\n    "))
    ok = sent == int(sensor["published"]) and sensor["exit"] == 0
    ratios: list[float] = []
    if nf is not None and nf_lz4 is not None:
        for name, ref in (("nfcapd", nf), ("nfcapd -y (LZ4 files)", nf_lz4)):
            n_sent, stored = int(ref["sent"]), max(int(ref["stored"]), 1)
            n_per_m = ref["cpu"] * 1_000_000 / stored
            print(f"{name}: {n_sent:,} flows sent, {int(ref['stored']):,} stored (loss {n_sent - int(ref['stored'])})")
            print(f"  {n_per_m:.3f} CPU-s per million flows (user {ref['user'] * 1_000_000 / stored:.3f} + system "
                  f"{ref['system'] * 1_000_000 / stored:.3f}); {stored / max(ref['cpu'], 1e-9):,.0f} flows/s per core; "
                  f"{ref['wakeups'] * 1_000_000 / stored:,.0f} wakeups per million flows")
            ratios.append(s_per_m / max(n_per_m, 1e-9))
            ok = ok and n_sent == int(ref["stored"])
        print(f"ratio sensor/nfcapd CPU per flow: {ratios[0]:.2f}x (goal <= 1.0, limit 2.0)")
        print(f"ratio sensor/nfcapd -y (LZ4, like for like with the sensor's lz4): {ratios[1]:.2f}x")
    if floor is not None:
        f_per_m = (floor["user"] + floor["system"]) * 1_000_000 / max(floor["flows"], 1)
        encode = floor["encode"] * 1_000_000 / max(floor["flows"], 1)
        print(f"transport floor (the same batches encoded and published, nothing received or decoded): "
              f"{f_per_m:.3f} CPU-s per million flows (Arrow IPC {encode:.3f}, Kafka client and kernel "
              f"{f_per_m - encode:.3f}); {floor['wire_bytes'] / max(floor['flows'], 1):.1f} bytes/flow in "
              f"{int(floor['batches'])} messages")
        print(f"  the sensor's receiving, decoding and bookkeeping: {s_per_m - f_per_m:.3f} CPU-s per million flows")
        if nf is not None:
            n_per_m = nf["cpu"] * 1_000_000 / max(int(nf["stored"]), 1)
            ratios.append(f_per_m / max(n_per_m, 1e-9))
            print(f"ratio floor/nfcapd: {ratios[-1]:.2f}x (what the sensor would cost if receiving and "
                  f"decoding were free)")
    return ok, ratios


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flows", type=int, default=1_000_000)
    parser.add_argument("--rate", type=float, default=100_000, help="flows/s the generator sends")
    parser.add_argument("--format", choices=["v9", "ipfix"], default="v9", help="what the generator sends")
    parser.add_argument("--profile", type=Path, help="profile the sensor with cProfile into this directory")
    parser.add_argument("--spy", type=Path, help="sample the sensor with py-spy into this directory and "
                        "print its CPU per flow split by activity")
    parser.add_argument("--perf", type=Path, help="record the sensor with perf (native and kernel frames) "
                        "into this directory and print its top symbols")
    parser.add_argument("--perf-dwarf", action="store_true", help="with --perf: DWARF call graphs (who "
                        "calls memmove/malloc), heavier")
    parser.add_argument("--encode-study", action="store_true", help="also time Arrow encoding per codec")
    parser.add_argument("--skip-nfcapd", action="store_true", help="only the sensor (for profiling)")
    parser.add_argument("--env", action="append", default=[], metavar="FLOWTALLY_X=V",
                        help="extra sensor settings (repeatable)")
    parser.add_argument("--repeat", type=int, default=1, help="rounds (sensor, nfcapd, nfcapd -y each "
                        "round, one broker): the machine is noisy, so print the median ratio too")
    parser.add_argument("--no-floor", action="store_true", help="skip the transport floor (the same "
                        "batches encoded and published without the sensor)")
    parser.add_argument("--keep", action="store_true", help="keep the working directory")
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    env = dict(item.split("=", 1) for item in args.env)

    work = Path(tempfile.mkdtemp(prefix="flowtally-bench-sensor-"))
    broker = LocalKafka(work / "kafka")
    bootstrap = broker.start()
    ok = True
    ratios: list[list[float]] = []
    try:
        for round_ in range(args.repeat):
            if args.repeat > 1:
                print(f"--- round {round_ + 1} of {args.repeat}")
            rdir = work / f"round{round_}"
            rdir.mkdir()
            sensor = run_sensor(args.flows, args.rate, rdir, bootstrap, env, args.profile, args.format, args.spy,
                                args.perf, args.perf_dwarf)
            nf = None if args.skip_nfcapd else run_nfcapd(args.flows, args.rate, rdir, args.format)
            nf_lz4 = None if args.skip_nfcapd else run_nfcapd(args.flows, args.rate, rdir, args.format, lz4=True)
            floor = None if args.no_floor else run_floor(args.flows, args.rate, args.format, bootstrap, env)
            round_ok, round_ratios = report(args, sensor, nf, nf_lz4, floor)
            ok = ok and round_ok
            ratios.append(round_ratios)
    finally:
        broker.stop()
    if args.encode_study:
        encode_study(args.flows)
    if args.repeat > 1 and not args.skip_nfcapd:
        names = ["sensor/nfcapd", "sensor/nfcapd -y"] + ([] if args.no_floor else ["floor/nfcapd"])
        for i, name in enumerate(names):
            values = sorted(r[i] for r in ratios)
            print(f"ratio {name} over {len(values)} rounds: median {statistics.median(values):.2f}x "
                  f"(min {values[0]:.2f}, max {values[-1]:.2f}; each: "
                  + ", ".join(f"{r[i]:.2f}" for r in ratios) + ")")
    if args.keep:
        print(f"kept {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
