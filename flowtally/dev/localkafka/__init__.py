"""A real single-node Apache Kafka broker (KRaft) on 127.0.0.1, for development, the demo and tests.

There is no Docker on the project's machines, so the broker runs straight from Apache Kafka's jars,
which Maven resolves once from Maven Central into a cache outside the repository
(``~/.cache/flowtally/kafka-<version>/libs``). Java 17+ runs the broker; Maven is only needed for
that first resolution.

Kafka 4.4.0 is the newest release on Maven Central and was checked on this project's machines with
aiokafka 0.14.0 (idempotent producer, consumer groups, admin client) and faust-streaming 0.15.3.
Fallback if a client ever breaks with 4.x: Kafka 3.9.1 with a static ``controller.quorum.voters``
instead of ``--standalone`` formatting, and the ``slf4j-reload4j`` binding instead of log4j2.

Usage::

    with LocalKafka(Path("var/kafka")) as kafka:     # resolves jars, formats, starts, waits
        use(kafka.bootstrap)                          # "127.0.0.1:<port>"

From the shell: ``flowtally kafka up`` (prints ``FLOWTALLY_KAFKA_BOOTSTRAP=…`` and leaves the
broker running in the background) and ``flowtally kafka down``.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import base64
import concurrent.futures
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Coroutine
from importlib import resources
from pathlib import Path
from string import Template
from types import TracebackType
from typing import Any, TypeVar

from flowtally.settings import DEFAULT_MAX_MESSAGE_BYTES

__all__ = [
    "DEFAULT_STATE_DIR",
    "DEPENDENCY_PLUGIN_VERSION",
    "KAFKA_VERSION",
    "LOG4J_VERSION",
    "SCALA_BINARY_VERSION",
    "LocalKafka",
    "LocalKafkaError",
    "cache_root",
    "run_down",
    "run_up",
]

#: Apache Kafka release the local broker runs (see the module docstring for why this one).
KAFKA_VERSION = "4.4.0"
#: Scala binary version of the ``kafka_<scala>`` broker artifact.
SCALA_BINARY_VERSION = "2.13"
#: log4j2 provides the SLF4J binding; without one the broker logs nothing.
LOG4J_VERSION = "2.24.3"
#: maven-dependency-plugin, pinned so ``copy-dependencies`` behaves the same everywhere.
DEPENDENCY_PLUGIN_VERSION = "3.8.1"
#: Oldest Java that runs a Kafka 4.x broker.
MIN_JAVA_MAJOR = 17

#: Where ``flowtally kafka up|down`` keep the broker's state unless ``--dir`` says otherwise.
DEFAULT_STATE_DIR = Path("var/kafka")
#: Environment variable naming the jar cache root (instead of ``~/.cache/flowtally``).
CACHE_ENV = "FLOWTALLY_LOCALKAFKA_CACHE"  # not FLOWTALLY_KAFKA_*: that prefix is the kafka settings group

#: Logged by kafka.server.KafkaRaftServer once the broker serves requests.
STARTED_LINE = "Kafka Server started"
#: The JVM system property that tags our broker processes with their state directory, so a PID
#: read from state.json (or found in /proc) is only ever signalled if it is really our broker.
_TAG_PROPERTY = "flowtally.dev.localkafka.state_dir"
_BROKER_MAIN = "kafka.Kafka"
_JVM_OPTIONS = (
    "-Xms256m",
    "-Xmx512m",
    "-XX:+UseG1GC",
    "-XX:MaxGCPauseMillis=20",
    # A broker that ran out of heap is half-alive; dying makes the failure visible.
    "-XX:+ExitOnOutOfMemoryError",
    "-Djava.awt.headless=true",
)
_MVN_TIMEOUT_S = 900.0
_FORMAT_TIMEOUT_S = 120.0
_TAIL_LINES = 30

log = logging.getLogger(__name__)
T = TypeVar("T")


class LocalKafkaError(RuntimeError):
    """The local broker could not be provisioned, started or stopped; the message says why."""


# --------------------------------------------------------------------------------------------
# Jars


def cache_root(cache_dir: Path | None = None) -> Path:
    """Root of the jar cache: ``cache_dir``, else ``$FLOWTALLY_LOCALKAFKA_CACHE``, else
    ``$XDG_CACHE_HOME/flowtally`` (``~/.cache/flowtally``). Jars go to ``<root>/kafka-<version>/libs``.
    """
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "flowtally"


def _data_file(name: str) -> str:
    return resources.files(__name__).joinpath(name).read_text(encoding="utf-8")


def _jar_spec() -> dict[str, Any]:
    """Everything that decides which jars end up in the cache; a change invalidates it."""
    pom = _data_file("pom.xml")
    return {
        "kafka_version": KAFKA_VERSION,
        "scala_binary_version": SCALA_BINARY_VERSION,
        "log4j_version": LOG4J_VERSION,
        "dependency_plugin_version": DEPENDENCY_PLUGIN_VERSION,
        "pom_sha256": hashlib.sha256(pom.encode()).hexdigest(),
    }


def _find_java() -> str:
    """The ``java`` executable ($JAVA_HOME first, then PATH), checked to be Java 17 or newer."""
    candidates = []
    if os.environ.get("JAVA_HOME"):
        candidates.append(str(Path(os.environ["JAVA_HOME"]) / "bin" / "java"))
    found = shutil.which("java")
    if found:
        candidates.append(found)
    java = next((c for c in candidates if os.access(c, os.X_OK)), None)
    if java is None:
        raise LocalKafkaError(
            f"Java {MIN_JAVA_MAJOR}+ is needed to run the local Kafka broker, but no `java` was found "
            "on PATH or in $JAVA_HOME. Install it (Debian/Ubuntu: apt-get install openjdk-17-jre-headless)."
        )
    try:
        out = subprocess.run(
            [java, "-version"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LocalKafkaError(f"cannot run {java} -version: {exc}") from exc
    # `java -version` prints e.g. 'openjdk version "17.0.15" 2025-04-15' (old ones "1.8.0_392").
    match = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    if match:
        major = int(match.group(1))
        if major == 1 and match.group(2):
            major = int(match.group(2))
        if major < MIN_JAVA_MAJOR:
            raise LocalKafkaError(
                f"{java} is Java {major}; Kafka {KAFKA_VERSION} needs Java {MIN_JAVA_MAJOR}+ "
                "(Debian/Ubuntu: apt-get install openjdk-17-jre-headless, or set JAVA_HOME)."
            )
    return java


# --------------------------------------------------------------------------------------------
# Processes (Linux /proc, with `ps` as a fallback elsewhere)


def _cmdline(pid: int) -> list[str] | None:
    """The arguments of process ``pid``, or None if it does not exist (or is a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        # The state letter follows the parenthesised command name, which may contain spaces.
        if stat.rpartition(")")[2].split()[0] in ("Z", "X"):
            return None
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        return [a.decode(errors="replace") for a in raw.split(b"\0") if a]
    except FileNotFoundError:
        return None
    except OSError:
        pass
    try:
        out = subprocess.run(
            ["ps", "-ww", "-o", "stat=,command=", "-p", str(pid)],
            capture_output=True, text=True, timeout=10, check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    line = out.stdout.strip()
    if out.returncode != 0 or not line or line.startswith("Z"):
        return None
    return line.split()[1:]


def _is_our_broker(pid: int, state_dir: Path) -> bool:
    """True if ``pid`` is alive and is the kafka.Kafka JVM started for ``state_dir``: PIDs get
    reused, and state.json may outlive its broker, so a bare PID is never enough to signal it."""
    args = _cmdline(pid)
    if not args:
        return False
    return _BROKER_MAIN in args and f"-D{_TAG_PROPERTY}={state_dir}" in args


def _scan_for_broker(state_dir: Path) -> int | None:
    """Find our broker for ``state_dir`` among all processes (when state.json is lost)."""
    proc = Path("/proc")
    if not proc.is_dir():
        return None
    for entry in proc.iterdir():
        if entry.name.isdigit() and _is_our_broker(int(entry.name), state_dir):
            return int(entry.name)
    return None


def _free_ports(count: int) -> list[int]:
    """``count`` distinct ports free on 127.0.0.1 right now (all sockets held until all are picked,
    so the kernel cannot hand out the same port twice)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # The JVM binds with SO_REUSEADDR, so a port in TIME_WAIT is usable by the broker too.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _tail(path: Path, lines: int = _TAIL_LINES) -> str:
    """The last ``lines`` lines of ``path`` (empty if it does not exist)."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            data = f.read()
    except OSError:
        return ""
    return "\n".join(data.decode(errors="replace").splitlines()[-lines:])


def _run_coro(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to completion from synchronous code, even if this thread already runs an
    event loop (the demo and async callers): then it runs on a fresh loop in a worker thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="localkafka") as pool:
        return pool.submit(asyncio.run, coro).result()


async def _probe(bootstrap: str, timeout: float) -> None:
    """One metadata round trip through aiokafka: the broker answers on its advertised listener
    and lists itself. Raises if it does not, within ``timeout`` seconds."""
    # Imported here: `flowtally kafka down` and jar resolution do not need a Kafka client.
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap,
        client_id="flowtally-localkafka-probe",
        request_timeout_ms=max(1000, int(timeout * 1000)),
    )
    try:
        await asyncio.wait_for(admin.start(), timeout)
        cluster = await asyncio.wait_for(admin.describe_cluster(), timeout)
        if not cluster.get("brokers"):
            raise LocalKafkaError("metadata lists no broker yet")
    finally:
        with contextlib.suppress(Exception):
            await admin.close()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _new_cluster_id() -> str:
    """A KRaft cluster ID: 16 random bytes, base64url without padding (what Kafka's
    ``Uuid.randomUuid()`` makes). Like Kafka, avoid a leading '-', which a command line would
    take for an option."""
    while True:
        cid = base64.urlsafe_b64encode(os.urandom(16)).rstrip(b"=").decode()
        if not cid.startswith("-"):
            return cid


# --------------------------------------------------------------------------------------------
# The broker


class LocalKafka:
    """One single-node KRaft broker (broker + controller in one JVM) bound to 127.0.0.1.

    ``state_dir`` holds everything of this broker: ``server.properties``, ``log4j2.properties``,
    the data (``data/``), ``broker.log`` (its stdout/stderr; the previous run's is kept as
    ``broker.log.1``) and ``state.json`` (pid and bootstrap, so another process can stop it).

    ``port=0`` picks free ports for the client listener and the controller listener (and reuses the
    previous ones from ``state_dir`` when they are still free, so a restarted broker keeps its
    address). ``cache_dir`` is the jar cache root (see :func:`cache_root`).

    ``max_message_bytes`` is the broker's ``message.max.bytes`` and ``replica.fetch.max.bytes``
    (match ``kafka.max_message_bytes``; ``flowtally kafka up`` reads ``FLOWTALLY_KAFKA_MAX_MESSAGE_BYTES``).

    With ``stop_at_exit=True`` (the default) a started broker is also stopped when this Python
    process exits normally; ``flowtally kafka up`` turns that off to leave the broker running.
    """

    def __init__(
        self,
        state_dir: Path,
        port: int = 0,
        cache_dir: Path | None = None,
        *,
        stop_at_exit: bool = True,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        if not 0 <= port <= 65535:
            raise ValueError(f"port {port} is not in 0-65535")
        self.max_message_bytes = max_message_bytes
        # Absolute and canonical: it is written into the config and into the broker's command line
        # (where stop() looks for it, from whatever cwd), and the JVM runs with cwd=state_dir.
        self.state_dir = Path(state_dir).expanduser().resolve()
        self.port = port
        self.cache_dir = cache_root(cache_dir)
        self.stop_at_exit = stop_at_exit
        self._proc: subprocess.Popen[bytes] | None = None
        self._bootstrap: str | None = None

    # -- paths and state ----------------------------------------------------------------------

    @property
    def kafka_home(self) -> Path:
        """``<cache root>/kafka-<version>``: this version's pom, jars and completeness marker."""
        return self.cache_dir / f"kafka-{KAFKA_VERSION}"

    @property
    def libs_dir(self) -> Path:
        """Directory of the broker's jars."""
        return self.kafka_home / "libs"

    @property
    def data_dir(self) -> Path:
        """The broker's ``log.dirs`` (topic data and the KRaft metadata log)."""
        return self.state_dir / "data"

    @property
    def log_path(self) -> Path:
        """The broker's stdout and stderr."""
        return self.state_dir / "broker.log"

    @property
    def state_path(self) -> Path:
        """``state.json``: pid, bootstrap and ports of the running broker."""
        return self.state_dir / "state.json"

    @property
    def bootstrap(self) -> str:
        """``127.0.0.1:<port>`` of the running broker (also of one started by another process)."""
        if self._bootstrap:
            return self._bootstrap
        state = self.running_state()
        if state is None:
            raise LocalKafkaError(f"no local Kafka broker is running from {self.state_dir}")
        return str(state["bootstrap"])

    @property
    def pid(self) -> int | None:
        """PID of the running broker JVM, or None."""
        if self._proc is not None and self._proc.poll() is None:
            return self._proc.pid
        state = self.running_state()
        return int(state["pid"]) if state else None

    @property
    def cluster_id(self) -> str | None:
        """The KRaft cluster ID the storage was formatted with, or None if not formatted."""
        meta = self.data_dir / "meta.properties"
        if not meta.is_file():
            return None
        for line in meta.read_text().splitlines():
            key, _, value = line.partition("=")
            if key.strip() == "cluster.id":
                return value.strip()
        return None

    def _read_state(self) -> dict[str, Any]:
        """state.json as written (``{}`` if missing or unreadable); ``pid`` is None once stopped."""
        try:
            state = json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            return {}
        return state if isinstance(state, dict) else {}

    def running_state(self) -> dict[str, Any] | None:
        """The contents of state.json if the broker it names is alive and really ours, else None."""
        state = self._read_state()
        pid = state.get("pid")
        if isinstance(pid, int) and _is_our_broker(pid, self.state_dir):
            return state
        return None

    # -- jars ---------------------------------------------------------------------------------

    def ensure_jars(self) -> Path:
        """Make sure the broker's jars are in the cache and return their directory.

        Runs Maven only when the cache is incomplete: a marker written after a successful copy
        lists the jars and what decided them (versions, pom hash), so an interrupted download or a
        changed pin is redone. A file lock keeps concurrent sessions from resolving at once.
        """
        spec = _jar_spec()
        marker = self.kafka_home / "libs.complete.json"
        if self._jars_complete(marker, spec):
            return self.libs_dir
        self.kafka_home.mkdir(parents=True, exist_ok=True)
        with (self.kafka_home / ".lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be resolving right now
            if self._jars_complete(marker, spec):
                return self.libs_dir
            self._resolve_jars(marker, spec)
        return self.libs_dir

    def _jars_complete(self, marker: Path, spec: dict[str, Any]) -> bool:
        try:
            recorded = json.loads(marker.read_text())
        except (OSError, ValueError):
            return False
        jars = recorded.get("jars") if isinstance(recorded, dict) else None
        if not jars or any(recorded.get(k) != v for k, v in spec.items()):
            return False
        return all((self.libs_dir / name).is_file() for name in jars)

    def _resolve_jars(self, marker: Path, spec: dict[str, Any]) -> None:
        mvn = shutil.which("mvn")
        if mvn is None:
            raise LocalKafkaError(
                f"Kafka {KAFKA_VERSION}'s jars are not in {self.libs_dir} yet, and Maven (`mvn`) is "
                "needed once to fetch them from Maven Central. Install it (Debian/Ubuntu: "
                "apt-get install maven) and Java 17+ (apt-get install openjdk-17-jre-headless)."
            )
        _find_java()  # Maven needs it as well; this gives the clearer message
        marker.unlink(missing_ok=True)
        pom = self.kafka_home / "pom.xml"
        pom.write_text(_data_file("pom.xml"), encoding="utf-8")
        staging = self.kafka_home / "libs.partial"
        shutil.rmtree(staging, ignore_errors=True)
        cmd = [
            mvn, "-q", "-B", "-f", str(pom),
            f"org.apache.maven.plugins:maven-dependency-plugin:{DEPENDENCY_PLUGIN_VERSION}:copy-dependencies",
            "-DincludeScope=runtime",
            f"-DoutputDirectory={staging}",
            # The module's constants are the pins; the pom's own values are only defaults.
            f"-Dkafka.version={KAFKA_VERSION}",
            f"-Dscala.binary.version={SCALA_BINARY_VERSION}",
            f"-Dlog4j.version={LOG4J_VERSION}",
        ]
        log.info("resolving Kafka %s jars from Maven Central into %s (once)", KAFKA_VERSION, self.libs_dir)
        t0 = time.monotonic()
        try:
            out = subprocess.run(
                cmd, cwd=self.kafka_home, stdin=subprocess.DEVNULL, capture_output=True,
                text=True, timeout=_MVN_TIMEOUT_S, check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise LocalKafkaError(
                f"Maven did not finish resolving Kafka's jars within {_MVN_TIMEOUT_S:.0f} s: {' '.join(cmd)}"
            ) from exc
        jars = sorted(p.name for p in staging.glob("*.jar")) if staging.is_dir() else []
        broker_jar = f"kafka_{SCALA_BINARY_VERSION}-{KAFKA_VERSION}.jar"
        if out.returncode != 0 or broker_jar not in jars:
            output = "\n".join((out.stdout + out.stderr).strip().splitlines()[-_TAIL_LINES:])
            raise LocalKafkaError(
                f"Maven failed to resolve Kafka {KAFKA_VERSION}'s jars (exit {out.returncode}). "
                "It needs Maven Central (or a mirror in ~/.m2/settings.xml).\n"
                f"command: {' '.join(cmd)}\n{output}"
            )
        # Swap the complete set in, then write the marker: an interruption anywhere before the
        # marker exists leaves the cache "incomplete", and the next call starts over.
        shutil.rmtree(self.libs_dir, ignore_errors=True)
        os.replace(staging, self.libs_dir)
        _write_atomic(marker, json.dumps({**spec, "jars": jars}, indent=2) + "\n")
        log.info("resolved %d jars in %.1f s", len(jars), time.monotonic() - t0)

    # -- start --------------------------------------------------------------------------------

    def start(self, timeout: float = 60) -> str:
        """Start the broker (resolving jars and formatting storage first if needed) and return its
        bootstrap address ``127.0.0.1:<port>`` once it is ready: it logged "Kafka Server started"
        and answered a metadata request from aiokafka.

        ``timeout`` bounds formatting plus startup; a cold jar resolution is not counted.
        On failure the JVM is killed and :class:`LocalKafkaError` carries the last lines of its log.
        """
        if self._proc is not None and self._proc.poll() is None and self._bootstrap:
            return self._bootstrap
        self.state_dir.mkdir(parents=True, exist_ok=True)
        running = self.running_state()
        other = running["pid"] if running else _scan_for_broker(self.state_dir)
        if other is not None:
            where = f" at {running['bootstrap']}" if running else ""
            raise LocalKafkaError(
                f"a local Kafka broker from {self.state_dir} is already running{where} (pid {other}); "
                f"stop it first: flowtally kafka down --dir {self.state_dir}"
            )
        if self.port and not _port_is_free(self.port):
            raise LocalKafkaError(f"port {self.port} on 127.0.0.1 is already in use; pick another --port")
        libs = self.ensure_jars()
        java = _find_java()
        deadline = time.monotonic() + timeout
        # Ports we picked ourselves can be taken by someone else before the JVM binds them; then
        # pick again. A port the caller asked for is not second-guessed.
        attempts = 3 if self.port == 0 else 1
        for attempt in range(1, attempts + 1):
            port, controller_port = self._choose_ports(fresh=attempt > 1)
            try:
                return self._start_once(java, libs, port, controller_port, deadline)
            except _PortTaken as exc:
                if attempt == attempts:
                    raise LocalKafkaError(str(exc)) from None
                log.warning(
                    "port %s or %s was taken before the broker bound it; retrying", port, controller_port
                )
        raise AssertionError("unreachable")

    def _choose_ports(self, *, fresh: bool) -> tuple[int, int]:
        previous = self._read_state()
        prev_port, prev_controller = previous.get("port"), previous.get("controller_port")
        port = self.port
        if port == 0 and not fresh and isinstance(prev_port, int) and _port_is_free(prev_port):
            port = prev_port
        controller = (
            prev_controller
            if not fresh and isinstance(prev_controller, int) and prev_controller != port
            and _port_is_free(prev_controller)
            else 0
        )
        while port == 0 or controller == 0 or port == controller:
            a, b = _free_ports(2)
            port = port or a
            controller = b if b != port else a
        return port, controller

    def _write_config(self, port: int, controller_port: int) -> Path:
        config = Template(_data_file("server.properties")).substitute(
            port=port, controller_port=controller_port, log_dir=self.data_dir,
            max_message_bytes=self.max_message_bytes,
        )
        path = self.state_dir / "server.properties"
        _write_atomic(path, config)
        _write_atomic(self.state_dir / "log4j2.properties", _data_file("log4j2.properties"))
        return path

    def _classpath(self, libs: Path) -> str:
        return str(libs / "*")  # a JVM classpath wildcard, expanded by java itself

    def _format(self, java: str, libs: Path, config: Path, deadline: float) -> None:
        """Format the storage once (KRaft needs a cluster ID and the voter set before first
        start). ``meta.properties`` is Kafka's own sign of a formatted directory."""
        if (self.data_dir / "meta.properties").is_file():
            return
        # A format that died halfway leaves files the next one would refuse to overwrite.
        shutil.rmtree(self.data_dir, ignore_errors=True)
        cluster_id = _new_cluster_id()
        cmd = [
            java, "-Xmx256m", f"-Dlog4j2.configurationFile={self.state_dir / 'log4j2.properties'}",
            "-cp", self._classpath(libs), "kafka.tools.StorageTool", "format",
            "-t", cluster_id, "-c", str(config), "--standalone",
        ]
        log.info("formatting Kafka storage in %s (cluster id %s)", self.data_dir, cluster_id)
        try:
            out = subprocess.run(
                cmd, cwd=self.state_dir, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                timeout=max(5.0, min(_FORMAT_TIMEOUT_S, deadline - time.monotonic())), check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise LocalKafkaError(f"formatting Kafka storage timed out: {' '.join(cmd)}") from exc
        (self.state_dir / "format.log").write_text(out.stdout + out.stderr)
        if out.returncode != 0 or not (self.data_dir / "meta.properties").is_file():
            output = "\n".join((out.stdout + out.stderr).strip().splitlines()[-_TAIL_LINES:])
            raise LocalKafkaError(f"formatting Kafka storage failed (exit {out.returncode}):\n{output}")

    def _start_once(
        self, java: str, libs: Path, port: int, controller_port: int, deadline: float
    ) -> str:
        config = self._write_config(port, controller_port)
        self._format(java, libs, config, deadline)
        bootstrap = f"127.0.0.1:{port}"
        if self.log_path.exists():
            os.replace(self.log_path, self.log_path.with_name("broker.log.1"))
        cmd = [
            java, *_JVM_OPTIONS,
            f"-D{_TAG_PROPERTY}={self.state_dir}",
            f"-Dlog4j2.configurationFile={self.state_dir / 'log4j2.properties'}",
            "-cp", self._classpath(libs), _BROKER_MAIN, str(config),
        ]
        t0 = time.monotonic()
        with self.log_path.open("wb") as out:
            # Its own session: a Ctrl-C meant for the caller's terminal does not reach the broker
            # (stop() shuts it down cleanly), and `flowtally kafka up` can leave it running.
            self._proc = subprocess.Popen(
                cmd, cwd=self.state_dir, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True, close_fds=True,
            )
        state = {
            "pid": self._proc.pid,
            "bootstrap": bootstrap,
            "port": port,
            "controller_port": controller_port,
            "kafka_version": KAFKA_VERSION,
            "log": str(self.log_path),
            "status": "starting",
            "started_at": time.time(),
        }
        # Written before waiting, so that a `flowtally kafka down` can stop a broker whose
        # starter was killed while it waited.
        _write_atomic(self.state_path, json.dumps(state, indent=2) + "\n")
        if self.stop_at_exit:
            atexit.register(self._stop_at_exit)
        try:
            self._wait_ready(bootstrap, deadline)
        except BaseException:
            self._kill_now()
            raise
        self._bootstrap = bootstrap
        _write_atomic(self.state_path, json.dumps({**state, "status": "running"}, indent=2) + "\n")
        log.info(
            "Kafka %s broker ready at %s in %.1f s (pid %d, log %s)",
            KAFKA_VERSION, bootstrap, time.monotonic() - t0, self._proc.pid, self.log_path,
        )
        return bootstrap

    def _wait_ready(self, bootstrap: str, deadline: float) -> None:
        assert self._proc is not None
        seen_started = False
        offset, carry = 0, ""
        last_probe_error: BaseException | None = None
        while True:
            rc = self._proc.poll()
            if rc is not None:
                tail = _tail(self.log_path)
                if "Address already in use" in tail and self.port == 0:
                    raise _PortTaken(f"the broker could not bind its ports:\n{tail}")
                raise LocalKafkaError(
                    f"the Kafka broker exited with code {rc} while starting; last lines of "
                    f"{self.log_path}:\n{tail}"
                )
            if not seen_started:
                # Read only what is new; keep a short overlap for a marker split between reads.
                with self.log_path.open("rb") as f:
                    f.seek(offset)
                    chunk = f.read()
                offset += len(chunk)
                text = carry + chunk.decode(errors="replace")
                seen_started = STARTED_LINE in text
                carry = text[-len(STARTED_LINE):]
            remaining = deadline - time.monotonic()
            if seen_started and remaining > 0:
                # The log line says the JVM thinks it is up; the probe checks that a client gets
                # through the advertised listener and finds a registered broker.
                try:
                    _run_coro(_probe(bootstrap, timeout=min(5.0, max(0.5, remaining))))
                    return
                except Exception as exc:
                    last_probe_error = exc
                remaining = deadline - time.monotonic()
            if remaining <= 0:
                what = (
                    f"it logged {STARTED_LINE!r} but aiokafka could not get metadata from {bootstrap}: "
                    f"{last_probe_error!r}"
                    if seen_started
                    else f"it never logged {STARTED_LINE!r}"
                )
                raise LocalKafkaError(
                    f"the Kafka broker did not become ready in time ({what}); last lines of "
                    f"{self.log_path}:\n{_tail(self.log_path)}"
                )
            time.sleep(0.1)

    # -- stop ---------------------------------------------------------------------------------

    def stop(self, timeout: float = 20) -> None:
        """Stop the broker: SIGTERM to its PID (Kafka then shuts down cleanly), SIGKILL if it is
        still alive after ``timeout`` seconds. Works on a broker started by another process
        (found through state.json, and only if that PID really is our broker). Idempotent."""
        pid: int | None = None
        if self._proc is not None and self._proc.poll() is None:
            pid = self._proc.pid
        else:
            state = self.running_state()
            pid = state["pid"] if state else _scan_for_broker(self.state_dir)
        if pid is not None:
            self._terminate(pid, timeout)
        self._forget()

    def _terminate(self, pid: int, timeout: float) -> None:
        log.info("stopping the Kafka broker (pid %d)", pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        if self._wait_gone(pid, timeout):
            return
        log.warning("Kafka broker pid %d ignored SIGTERM for %.0f s; killing it", pid, timeout)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        if not self._wait_gone(pid, 10):
            raise LocalKafkaError(f"Kafka broker pid {pid} survived SIGKILL")

    def _wait_gone(self, pid: int, timeout: float) -> bool:
        """Wait until ``pid`` has exited (reaping it if it is our child)."""
        if self._proc is not None and self._proc.pid == pid:
            try:
                self._proc.wait(timeout)
                return True
            except subprocess.TimeoutExpired:
                return False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if _cmdline(pid) is None:
                return True
            time.sleep(0.05)
        return _cmdline(pid) is None

    def _kill_now(self) -> None:
        """Kill a broker that failed to start: there is nothing to shut down cleanly."""
        if self._proc is not None and self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(10)
        self._forget()

    def _forget(self) -> None:
        """Mark the broker stopped in state.json, keeping its ports for the next start."""
        state = self._read_state()
        if state and self.running_state() is None:
            keep = {k: state[k] for k in ("port", "controller_port") if k in state}
            _write_atomic(self.state_path, json.dumps({"pid": None, **keep}, indent=2) + "\n")
        self._bootstrap = None
        atexit.unregister(self._stop_at_exit)

    def _stop_at_exit(self) -> None:
        with contextlib.suppress(Exception):
            self.stop(timeout=10)

    # -- context manager ----------------------------------------------------------------------

    def __enter__(self) -> LocalKafka:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"LocalKafka(state_dir={str(self.state_dir)!r}, port={self.port}, pid={self.pid})"


class _PortTaken(Exception):
    """The broker died because a port we picked was taken in the meantime; pick again."""


# --------------------------------------------------------------------------------------------
# CLI: flowtally kafka up | down


def _state_dir(args: argparse.Namespace) -> Path:
    return Path(getattr(args, "dir", None) or DEFAULT_STATE_DIR)


def run_up(args: argparse.Namespace) -> int:
    """``flowtally kafka up``: start the broker in the background (or find it running) and print
    ``FLOWTALLY_KAFKA_BOOTSTRAP=127.0.0.1:<port>`` on stdout, for ``eval``/``export``."""
    port = int(getattr(args, "port", 0) or 0)
    limit = os.environ.get("FLOWTALLY_KAFKA_MAX_MESSAGE_BYTES", "")
    if limit and not limit.isdigit():
        print(f"flowtally kafka up: FLOWTALLY_KAFKA_MAX_MESSAGE_BYTES={limit!r} is not a number of bytes",
              file=sys.stderr)
        return 2
    kafka = LocalKafka(_state_dir(args), port=port, stop_at_exit=False,
                       max_message_bytes=int(limit) if limit else DEFAULT_MAX_MESSAGE_BYTES)
    state = kafka.running_state()
    if state is not None:
        if port and state.get("port") != port:
            print(
                f"flowtally kafka up: the broker from {kafka.state_dir} already runs at "
                f"{state['bootstrap']}, not on port {port}; run `flowtally kafka down` first",
                file=sys.stderr,
            )
            return 1
        log.info("Kafka broker already running at %s (pid %d)", state["bootstrap"], state["pid"])
        bootstrap = str(state["bootstrap"])
    else:
        try:
            bootstrap = kafka.start()
        except LocalKafkaError as exc:
            print(f"flowtally kafka up: {exc}", file=sys.stderr)
            return 1
        log.info(
            "broker log: %s; stop it with: flowtally kafka down --dir %s", kafka.log_path, kafka.state_dir
        )
    print(f"FLOWTALLY_KAFKA_BOOTSTRAP={bootstrap}", flush=True)
    return 0


def run_down(args: argparse.Namespace) -> int:
    """``flowtally kafka down``: stop the broker; 0 if it stopped or was not running."""
    kafka = LocalKafka(_state_dir(args), stop_at_exit=False)
    pid = kafka.pid or _scan_for_broker(kafka.state_dir)
    try:
        kafka.stop()
    except LocalKafkaError as exc:
        print(f"flowtally kafka down: {exc}", file=sys.stderr)
        return 1
    if pid is None:
        log.info("no Kafka broker running from %s", kafka.state_dir)
    else:
        log.info("stopped the Kafka broker (pid %d)", pid)
    return 0

