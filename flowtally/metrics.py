"""The `/metrics` (Prometheus), `/healthz` (readiness) and `/livez` (liveness) endpoints every
stage exposes (what each means: :mod:`flowtally.health`).

Served from a small thread rather than the stage's event loop, so a stage whose loop is busy
decoding a big batch still answers scrapes, and Faust's loop and ours need no coordination.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest

from flowtally.health import KafkaProbe, LoopWatch, combined
from flowtally.lifecycle import StartError
from flowtally.settings import KafkaSettings, parse_hostport

log = logging.getLogger(__name__)

#: Returns (healthy, reason). Called from the server thread: keep it cheap and thread-safe.
HealthCheck = Callable[[], tuple[bool, str]]


def _always_healthy() -> tuple[bool, str]:
    return True, "ok"


class MetricsServer:
    """A component serving ``/metrics``, ``/healthz`` and ``/livez`` on ``listen`` (host:port;
    port 0 = any).

    ``/healthz`` (readiness) is ``health`` and, with ``kafka``, a :class:`~flowtally.health.KafkaProbe`
    of that broker (or ``probe``); ``/livez`` is a :class:`~flowtally.health.LoopWatch` of the
    event loop that runs :meth:`start` (a stage whose work runs on another loop, Faust's, points
    it there with :meth:`watch_loop`).
    """

    name = "metrics-server"

    def __init__(self, listen: str, health: HealthCheck = _always_healthy,
                 registry: CollectorRegistry = REGISTRY, *, kafka: KafkaSettings | None = None,
                 probe: KafkaProbe | None = None, loop_watch: LoopWatch | None = None) -> None:
        self._host, self._port = parse_hostport(listen, what="metrics listen address")
        self._probe = probe or (KafkaProbe(kafka) if kafka is not None else None)
        self._health = combined([self._probe.check, health]) if self._probe is not None else health
        self._loop_watch = loop_watch or LoopWatch()
        self._liveness = self._loop_watch.check
        self._registry = registry
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        """The bound address (useful with port 0)."""
        if self._server is None:
            raise RuntimeError("metrics server not started")
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def watch_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Let ``/livez`` watch ``loop`` instead of the one that ran :meth:`start`."""
        self._loop_watch.watch(loop)

    async def start(self) -> None:
        """Bind and serve in a daemon thread."""
        health, liveness, registry = self._health, self._liveness, self._registry

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._reply(200, generate_latest(registry), CONTENT_TYPE_LATEST)
                elif path in ("/healthz", "/livez"):
                    try:
                        ok, reason = (health if path == "/healthz" else liveness)()
                    except Exception as exc:  # a failing check is an unhealthy stage, not a 500
                        ok, reason = False, f"health check failed: {exc}"
                    self._reply(200 if ok else 503, (reason + "\n").encode(), "text/plain")
                else:
                    self._reply(404, b"not found: try /metrics, /healthz or /livez\n", "text/plain")

            def _reply(self, code: int, body: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass  # scrapes every few seconds would drown the stage's own log

        try:
            self._server = ThreadingHTTPServer((self._host, self._port), Handler)
        except OSError as exc:
            raise StartError(f"cannot serve /metrics and /healthz on {self._host}:{self._port} "
                             f"(metrics_listen): {exc.strerror or exc}") from None
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics", daemon=True)
        self._thread.start()
        if self._probe is not None:
            self._probe.start()
        self._loop_watch.watch(asyncio.get_running_loop())
        log.info("metrics and health on http://%s:%d/metrics", *self.address)

    async def stop(self) -> None:
        """Stop serving (idempotent)."""
        if self._probe is not None:
            await asyncio.to_thread(self._probe.stop)
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class LabelCap:
    """Bounds the distinct values of one Prometheus label (each value is a set of time series
    kept for the life of the process): the first ``max_values`` values seen are used as they
    are, every later one becomes ``other``, so a source of new values (an exporter address,
    anything attacker-controlled) cannot grow ``/metrics`` and memory without bound.

    Not thread-safe: call it from the one thread (the stage's event loop) that updates the
    metrics.
    """

    OTHER = "other"

    def __init__(self, max_values: int) -> None:
        self.max_values = max(0, max_values)
        self._known: set[str] = set()
        self.overflowed = 0  # lookups that got OTHER

    def __call__(self, value: str) -> str:
        """``value`` itself if it already has series or there is room for it, else ``other``."""
        if value in self._known:
            return value
        if len(self._known) < self.max_values and value != self.OTHER:
            self._known.add(value)
            return value
        self.overflowed += 1
        return self.OTHER

    def __len__(self) -> int:
        return len(self._known)
