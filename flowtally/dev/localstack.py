"""Run the pipeline's stages as real `flowtally` subprocesses on this machine.

Used by `flowtally demo`, the end-to-end tests and the benchmarks, so all three start, watch and
stop the stages the same way: each stage gets its settings through ``FLOWTALLY_…`` environment
variables, logs to its own file, and is stopped with SIGTERM (and only killed if it hangs).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port the kernel says is free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def scrape(text: str, metric: str, labels: Mapping[str, str] | None = None) -> float:
    """Sum of the samples of ``metric`` (with matching ``labels``) in Prometheus text format."""
    total = 0.0
    pattern = re.compile(rf"^{re.escape(metric)}(\{{[^}}]*\}})?\s+(\S+)$", re.M)
    for match in pattern.finditer(text):
        sample_labels = dict(re.findall(r'(\w+)="([^"]*)"', match[1] or ""))
        if all(sample_labels.get(k) == v for k, v in (labels or {}).items()):
            total += float(match[2])
    return total


@dataclass
class Stage:
    """One running stage process."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    metrics_port: int
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    stopped: bool = False  # stopped on purpose: its exit is not a failure

    def start(self) -> None:
        """Spawn the process (its output goes to ``log_path``)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "flowtally.cli", *self.argv],
                env=os.environ | self.env, stdout=log, stderr=subprocess.STDOUT,
            )

    def metrics(self) -> str:
        """The stage's /metrics text ('' if not answering yet)."""
        try:
            url = f"http://127.0.0.1:{self.metrics_port}/metrics"
            with urllib.request.urlopen(url, timeout=2) as resp:
                return str(resp.read().decode())
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return ""

    def healthy(self) -> bool:
        """Whether /healthz answers 200."""
        try:
            url = f"http://127.0.0.1:{self.metrics_port}/healthz"
            with urllib.request.urlopen(url, timeout=2) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def metric(self, name: str, labels: Mapping[str, str] | None = None) -> float:
        """Current value of a metric (summed over label sets matching ``labels``)."""
        return scrape(self.metrics(), name, labels)

    def check_alive(self) -> None:
        """Raise with the log's tail if the process has exited without being asked to."""
        if not self.stopped and self.process is not None and self.process.poll() is not None:
            raise StageFailed(f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}")

    def wait_healthy(self, timeout: float = 60.0) -> None:
        """Wait until /healthz says ok."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            if self.healthy():
                return
            time.sleep(0.2)
        raise StageFailed(f"{self.name} not healthy after {timeout:.0f}s:\n{self.log_tail()}")

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, wait up to ``timeout``, SIGKILL if still running; returns the exit code."""
        self.stopped = True
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return int(self.process.returncode)

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the stage's log."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"


class StageFailed(RuntimeError):
    """A stage exited or never became healthy."""


@dataclass
class Pipeline:
    """The three stages wired to one Kafka, one topic prefix and one ClickHouse."""

    bootstrap: str
    state_dir: Path
    topic_prefix: str = "flowtally"
    inventory: Path | None = None
    clickhouse_env: dict[str, str] = field(default_factory=dict)
    extra_env: dict[str, str] = field(default_factory=dict)
    netflow_port: int = 0
    stages: dict[str, Stage] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        """Settings every stage shares."""
        env = {
            "FLOWTALLY_KAFKA_BOOTSTRAP": self.bootstrap,
            "FLOWTALLY_KAFKA_TOPIC_PREFIX": self.topic_prefix,
            "FLOWTALLY_CLICKHOUSE_PATH": str(self.state_dir / "chdb"),
        }
        return env | self.clickhouse_env | self.extra_env

    def start(self, timeout: float = 90.0) -> None:
        """Start sink, enricher and sensor (downstream first) and wait until all are healthy."""
        self.netflow_port = self.netflow_port or free_port(socket.SOCK_DGRAM)
        inventory = ["--inventory", str(self.inventory)] if self.inventory else []
        specs = [
            ("sink", ["sink"], {"FLOWTALLY_GROUP_ID": f"{self.topic_prefix}-sink"}),
            ("enricher", ["enrich", *inventory], {"FLOWTALLY_APP_ID": f"{self.topic_prefix}-enricher",
                                                   "FLOWTALLY_SESSION_TIMEOUT_S": "10"}),
            ("sensor", ["sensor", "netflow", "--listen", f"127.0.0.1:{self.netflow_port}"], {}),
        ]
        for name, argv, env in specs:
            port = free_port()
            stage = Stage(name, [*argv, "--metrics-listen", f"127.0.0.1:{port}"],
                          self.env() | env, self.state_dir / "logs" / f"{name}.log", port)
            stage.start()
            self.stages[name] = stage
        try:
            for stage in self.stages.values():
                stage.wait_healthy(timeout)
        except BaseException:
            self.stop()  # a stage that failed must not leave the others running
            raise

    def rows_inserted(self) -> int:
        """Rows the sink has inserted so far."""
        return int(self.stages["sink"].metric("flowtally_sink_rows_inserted_total"))

    def wait_rows(self, expected: int, timeout: float = 120.0, settle: float = 1.0) -> int:
        """Wait until the sink has inserted ``expected`` rows (or more, or time is up).

        Returns the count, after ``settle`` seconds without change once reached, so an excess
        (a double count) is seen rather than hidden.
        """
        deadline = time.monotonic() + timeout
        rows = 0
        while time.monotonic() < deadline:
            for stage in self.stages.values():
                stage.check_alive()
            rows = self.rows_inserted()
            if rows >= expected:
                time.sleep(settle)
                return self.rows_inserted()
            time.sleep(0.2)
        return rows

    def stop(self, timeout: float = 30.0) -> dict[str, int]:
        """SIGTERM each stage, upstream first so each drains into the next; exit codes."""
        codes: dict[str, int] = {}
        for name in ("sensor", "enricher", "sink"):
            if name in self.stages:
                codes[name] = self.stages[name].stop(timeout)
        return codes
