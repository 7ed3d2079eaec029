"""Readiness and liveness, the same design for every stage (served by :mod:`flowtally.metrics`).

* **Readiness** (``/healthz``): the stage can do its job *now*. 503 with the reason while the
  Kafka broker has not answered for ``unready_after_s`` (:class:`KafkaProbe`), or while the
  stage's own check fails (inserts failing, identity not replayed yet, a batch stuck…). A
  readiness failure takes a pod out of service and shows on dashboards; it never restarts it.
* **Liveness** (``/livez``): the process's event loop is alive — it ran within
  ``stall_after_s`` (:class:`LoopWatch`). A stage waiting for Kafka or ClickHouse, or
  retrying a batch, is *legitimately waiting*: it stays live, so a liveness probe never restarts
  it into the same outage or the same poison batch. Only a loop that stopped running (blocked,
  deadlocked, its thread gone) fails liveness, and a restart is the cure for that.

How "broker unreachable" is detected: a tiny metadata request of our own every ``interval_s``,
from a thread with its own event loop, over the stage's Kafka settings (same bootstrap, security
and credentials). Chosen over reading the stage's own clients because (1) it works the same for
the aiokafka stages and for Faust, whose consumer and producer state is internal and differs by
version, (2) it notices an outage while the stage is idle (no input, nothing to send: a client
that sends nothing never fails), and (3) it cannot be held up by a busy stage loop. Its cost is
one small request every few seconds. The bound: readiness fails at most ``unready_after_s`` after
the broker's last answer, and is back within about ``interval_s`` of the broker answering again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence

from aiokafka.client import AIOKafkaClient

from flowtally.settings import KafkaSettings

log = logging.getLogger(__name__)

#: Returns (ok, reason). Called from the metrics server's thread: keep it cheap and thread-safe.
Check = Callable[[], tuple[bool, str]]

#: Seconds without an answer from the broker after which a stage is not ready.
UNREADY_AFTER_S = 10.0
#: Seconds between two metadata requests of the probe.
PROBE_INTERVAL_S = 2.0
#: Seconds the event loop may not run before the process is not live (a CPU-bound step, e.g. a
#: large identity replay or batch, holds the loop for a few seconds at most).
STALL_AFTER_S = 60.0


def combined(checks: Sequence[Check]) -> Check:
    """One check failing when any of ``checks`` fails, with every failing reason ("; ")."""
    def check() -> tuple[bool, str]:
        reasons = []
        for one in checks:
            ok, why = one()
            if not ok:
                reasons.append(why)
        return (False, "; ".join(reasons)) if reasons else (True, "ok")
    return check


class KafkaProbe:
    """Whether the Kafka broker answers (see the module docstring); ``check`` is readiness."""

    def __init__(self, kafka: KafkaSettings, *, interval_s: float = PROBE_INTERVAL_S,
                 unready_after_s: float = UNREADY_AFTER_S) -> None:
        self._kwargs = kafka.client_kwargs()
        self._bootstrap = kafka.bootstrap
        self._interval_s = interval_s
        self._unready_after_s = unready_after_s
        #: the request timeout: an answer later than the readiness bound is no answer
        self._timeout_s = min(unready_after_s, kafka.request_timeout_ms / 1000)
        self._last_ok: float | None = None
        self._error = "not reached yet"
        self._started = time.monotonic()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None

    def check(self) -> tuple[bool, str]:
        """Ready while the broker answered within ``unready_after_s``."""
        last = self._last_ok
        now = time.monotonic()
        if last is not None and now - last <= self._unready_after_s:
            return True, "ok"
        since = now - (last if last is not None else self._started)
        return False, f"Kafka at {self._bootstrap} not answering for {since:.0f}s ({self._error})"

    def start(self) -> None:
        """Probe from a daemon thread until :meth:`stop`."""
        ready = threading.Event()

        def main() -> None:
            loop = asyncio.new_event_loop()
            self._loop, self._stop = loop, asyncio.Event()
            ready.set()
            try:
                loop.run_until_complete(self._run(self._stop))
            finally:
                loop.close()

        self._thread = threading.Thread(target=main, name="kafka-probe", daemon=True)
        self._thread.start()
        ready.wait(5)

    def stop(self) -> None:
        """Stop probing (idempotent)."""
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop just closed
                self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(self._timeout_s + 5)
            self._thread = None

    async def _run(self, stop: asyncio.Event) -> None:
        client: AIOKafkaClient | None = None
        try:
            while not stop.is_set():
                try:
                    if client is None:
                        client = AIOKafkaClient(**self._kwargs)
                        await asyncio.wait_for(client.bootstrap(), self._timeout_s)
                    await asyncio.wait_for(client.fetch_all_metadata(), self._timeout_s)
                except Exception as exc:
                    if self._error == "ok" or self._last_ok is None:
                        log.debug("Kafka probe failed: %s", exc)
                    self._error = str(exc) or type(exc).__name__
                    if client is not None:  # start afresh: the broker may come back elsewhere
                        with contextlib.suppress(Exception):
                            await asyncio.wait_for(client.close(), self._timeout_s)
                        client = None
                else:
                    self._last_ok, self._error = time.monotonic(), "ok"
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self._interval_s)
        finally:
            if client is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(client.close(), self._timeout_s)


class LoopWatch:
    """Liveness of one event loop, asked from another thread (the metrics server's).

    Each :meth:`check` schedules a no-op on the loop and waits up to ``answer_within_s`` for it
    to run; the loop is live while it ran one within ``stall_after_s`` (counted from creation
    before the first, so a loop that never starts fails too). Nothing runs on the loop between
    checks (no timer task: Faust starts its timers only once its consumer is assigned, and a
    stage waiting for its first assignment is waiting legitimately).
    """

    def __init__(self, *, stall_after_s: float = STALL_AFTER_S, answer_within_s: float = 1.0) -> None:
        self._stall_after_s = stall_after_s
        self._answer_within_s = answer_within_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._last = time.monotonic()

    def watch(self, loop: asyncio.AbstractEventLoop) -> None:
        """Watch ``loop`` from now on (e.g. Faust's, once its worker exists)."""
        self._loop = loop

    def check(self) -> tuple[bool, str]:
        """Live while the loop ran a scheduled no-op within ``stall_after_s``."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            ran = threading.Event()

            def mark() -> None:
                self._last = time.monotonic()
                ran.set()

            with contextlib.suppress(RuntimeError):  # closed meanwhile
                loop.call_soon_threadsafe(mark)
                ran.wait(self._answer_within_s)
        idle = time.monotonic() - self._last
        if idle > self._stall_after_s:
            return False, f"event loop has not run for {idle:.0f}s"
        return True, "ok"
