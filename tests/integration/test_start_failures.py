"""How the real stage processes start when something is wrong, the same for every stage:

* a bad setting or environment (a port in use, an inventory that is a directory, a corrupt mmdb,
  a misspelt ``FLOWTALLY_…`` variable) ends the process at once with exit code 2 and one line
  naming the setting or address, never a traceback;
* a dependency that is down (Kafka, ClickHouse) is waited for: the stage keeps running, says what
  it waits for on ``/healthz`` (503) while ``/livez`` stays 200, and SIGTERM still stops it
  cleanly (exit 0) in the middle of that wait;
* a one-shot command (``migrate``) against an unreachable ClickHouse fails with one line that
  names the server and never its password.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from flowtally.dev.localstack import Stage, free_port
from tests.integration.test_health import get

#: Bounds for a loaded CI machine; a protocol bound, not a benchmark.
START_S = 60.0
STOP_S = 15.0


def _run(argv: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "flowtally.cli", *argv], env=os.environ | env,
                          capture_output=True, text=True, timeout=START_S, cwd=cwd)


@contextmanager
def _listening_tcp() -> Iterator[int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


def _one_line_exit_2(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    for needle in needles:
        assert needle in last, last
    return last


def test_enricher_start_failures_are_one_line_exit_2(tmp_path: Path) -> None:
    unused_kafka = {"FLOWTALLY_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}"}
    with _listening_tcp() as port:
        _one_line_exit_2(_run(["enrich", "--metrics-listen", f"127.0.0.1:{port}"], unused_kafka, tmp_path),
                         f"127.0.0.1:{port}", "metrics_listen", "in use")
    _one_line_exit_2(_run(["enrich", "--inventory", str(tmp_path)], unused_kafka, tmp_path),
                     f"inventory file {tmp_path}", "Is a directory")
    corrupt = tmp_path / "GeoLite2-ASN.mmdb"
    corrupt.write_bytes(os.urandom(4096))
    _one_line_exit_2(_run(["enrich"], unused_kafka | {"FLOWTALLY_GEOIP_ASN_PATH": str(corrupt)}, tmp_path),
                     f"GeoIP database {corrupt}")


@pytest.mark.parametrize("argv", [["sink"], ["enrich"], ["sensor", "netflow", "--listen", "127.0.0.1:0"]])
def test_a_port_in_use_names_the_address(tmp_path: Path, argv: list[str]) -> None:
    with _listening_tcp() as port:
        proc = _run([*argv, "--metrics-listen", f"127.0.0.1:{port}"],
                    {"FLOWTALLY_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}",
                     "FLOWTALLY_CLICKHOUSE_PATH": str(tmp_path / "chdb")}, tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert f"cannot serve /metrics and /healthz on 127.0.0.1:{port} (metrics_listen)" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_misspelt_variable_stops_every_stage(tmp_path: Path) -> None:
    for argv in (["sink"], ["enrich"], ["sensor", "netflow"], ["watch-k8s"], ["migrate"]):
        last = _one_line_exit_2(_run(argv, {"FLOWTALLY_BATCH_MAX_FLOW": "1000"}, tmp_path),
                                "FLOWTALLY_BATCH_MAX_FLOW", "did you mean FLOWTALLY_BATCH_MAX_FLOWS?")
        assert last.startswith(f"flowtally {' '.join(argv)}: "), last


def _wait_not_ready(stage: Stage, reason: str) -> str:
    deadline = time.monotonic() + START_S
    body = ""
    while time.monotonic() < deadline:
        stage.check_alive()
        status, body = get(stage.metrics_port, "/healthz")
        if status == 503 and reason in body:
            return body
        time.sleep(0.3)
    raise AssertionError(f"{stage.name}: /healthz never said {reason!r} (last: {body!r})\n{stage.log_tail()}")


def _stop_within(stage: Stage, seconds: float) -> int:
    assert stage.process is not None
    t0 = time.monotonic()
    stage.process.send_signal(signal.SIGTERM)
    code = stage.process.wait(seconds)
    assert time.monotonic() - t0 < seconds
    return code


@pytest.mark.parametrize("name,argv", [("sink", ["sink"]), ("enricher", ["enrich"]),
                                       ("sensor", ["sensor", "netflow", "--listen", "127.0.0.1:0"])])
def test_kafka_down_at_start_is_waited_for(tmp_path: Path, name: str, argv: list[str]) -> None:
    """Every stage the same way: running, not ready saying why, live, and stoppable."""
    bootstrap = f"127.0.0.1:{free_port()}"  # nothing listens there
    port = free_port()
    stage = Stage(name, [*argv, "--metrics-listen", f"127.0.0.1:{port}"],
                  {"FLOWTALLY_KAFKA_BOOTSTRAP": bootstrap, "FLOWTALLY_CLICKHOUSE_PATH": str(tmp_path / "chdb"),
                   "FLOWTALLY_DATA_DIR": str(tmp_path / "faust")}, tmp_path / f"{name}.log", port)
    stage.start()
    try:
        _wait_not_ready(stage, f"Kafka at {bootstrap} not answering")
        # Retrying, and saying so (the first attempt can take seconds on a loaded machine).
        deadline = time.monotonic() + START_S
        while f"Kafka at {bootstrap} is unreachable" not in stage.log_path.read_text():
            assert time.monotonic() < deadline, stage.log_tail()
            stage.check_alive()
            time.sleep(0.3)
        stage.check_alive()
        assert get(port, "/livez") == (200, "ok\n")
    finally:
        code = _stop_within(stage, STOP_S)
    assert code == 0, stage.log_tail()


def test_clickhouse_down_at_start_is_waited_for(kafka_bootstrap: str, tmp_path: Path) -> None:
    port = free_port()
    dead = free_port()
    stage = Stage("sink", ["sink", "--metrics-listen", f"127.0.0.1:{port}"],
                  {"FLOWTALLY_KAFKA_BOOTSTRAP": kafka_bootstrap, "FLOWTALLY_KAFKA_TOPIC_PREFIX": f"sf{dead}",
                   "FLOWTALLY_CLICKHOUSE_URL": f"http://flowtally:hunter2@127.0.0.1:{dead}"},
                  tmp_path / "sink.log", port)
    stage.start()
    try:
        deadline = time.monotonic() + START_S
        while f"cannot reach ClickHouse at 127.0.0.1:{dead}" not in stage.log_path.read_text():
            assert time.monotonic() < deadline, stage.log_tail()
            stage.check_alive()
            time.sleep(0.3)
        assert get(port, "/healthz")[0] == 503
        assert get(port, "/livez") == (200, "ok\n")
    finally:
        code = _stop_within(stage, STOP_S)
    assert code == 0, stage.log_tail()
    assert "hunter2" not in stage.log_path.read_text()


def test_migrate_against_an_unreachable_server_is_one_line(tmp_path: Path) -> None:
    dead = free_port()
    proc = _run(["migrate"], {"FLOWTALLY_CLICKHOUSE_URL": f"http://flowtally:hunter2@127.0.0.1:{dead}"}, tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "hunter2" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"flowtally migrate: cannot reach ClickHouse at 127.0.0.1:{dead}")
