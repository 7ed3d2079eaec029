"""Process lifecycle: start components in order, stop the started ones in reverse.

A stage is a list of components (e.g. metrics server, Kafka producer, UDP receiver). They start
in list order; if one fails to start, the ones already started are stopped in reverse order. On
SIGTERM/SIGINT, or when a component's own work ends with an error, every started component is
stopped in reverse order, so upstream parts stop before the parts they feed and buffers drain
into still-running downstream parts.

Exit codes, the same for every stage: 0 a clean stop, 1 a failure while running, 2 could not
start (a bad setting, a port in use, an unreadable file: :class:`StartError`, and settings errors
through ``flowtally.cli``). A dependency that is down at start (Kafka, ClickHouse) is waited for,
not a start failure: the stage retries and reports it on ``/healthz`` (see README "Health").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

log = logging.getLogger(__name__)

#: The exit code of a stage that could not start.
EXIT_CANNOT_START = 2


class StartError(Exception):
    """A stage cannot start for a reason a restart cannot fix (a port in use, an unreadable
    file); the message is one line that names the setting or address."""


@runtime_checkable
class Component(Protocol):
    """Something with an explicit start and stop. ``stop`` must drain and be idempotent."""

    name: str

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


@runtime_checkable
class Worker(Component, Protocol):
    """A component with its own long-running work; ``wait`` returns or raises when it ends."""

    async def wait(self) -> None: ...


async def run_components(components: Sequence[Component], *, stop_timeout: float = 30.0) -> int:
    """Run until a signal or a worker's end; returns the process exit code (0 = clean stop)."""
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    started: list[Component] = []
    waiters: dict[asyncio.Future[object], Worker] = {}
    exit_code = 0
    try:
        for component in components:
            try:
                if not await _start_unless_stopped(component, stopping):
                    log.info("signal received while %s was starting, stopping", component.name)
                    break
            except Exception as exc:
                log.error("%s failed to start: %s", component.name, exc)
                exit_code = EXIT_CANNOT_START
                break
            started.append(component)
            log.debug("%s started", component.name)
        else:
            waiters = {asyncio.ensure_future(c.wait()): c for c in started if isinstance(c, Worker)}
            exit_code = await _until_stopped(waiters, stopping)
    finally:
        for component in reversed(started):
            try:
                await asyncio.wait_for(component.stop(), stop_timeout)
                log.debug("%s stopped", component.name)
            except Exception as exc:
                log.error("%s did not stop cleanly: %s", component.name, exc)
                exit_code = 1
        # The waiters end with their components; one still pending now is a component that
        # ignored stop(), and cancelling it is all that is left.
        for task in waiters:
            if not task.done():
                task.cancel()
            elif not task.cancelled() and task.exception() is not None:
                exit_code = 1
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    return exit_code


async def _start_unless_stopped(component: Component, stopping: asyncio.Event) -> bool:
    """Start ``component``; False (its start cancelled) if a stop signal comes first: a start that
    waits for a broker that is down must not make SIGTERM wait with it."""
    start: asyncio.Future[Any] = asyncio.ensure_future(component.start())
    stop_wait: asyncio.Future[Any] = asyncio.ensure_future(stopping.wait())
    try:
        await asyncio.wait([start, stop_wait], return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop_wait.cancel()
    if start.done():
        start.result()  # raises the start's own error
        return True
    start.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await start
    return False


async def _until_stopped(waiters: dict[asyncio.Future[object], Worker], stopping: asyncio.Event) -> int:
    """Wait for a stop signal or the end of a worker; the exit code that end implies.

    The waiters are not cancelled here: cancelling a task that awaits a component's own task
    would cancel that task too, in the middle of work ``stop()`` is meant to finish (a sink's
    insert, a publisher's queue).
    """
    exit_code = 0
    stop_wait: asyncio.Future[object] = asyncio.ensure_future(stopping.wait())
    done, _ = await asyncio.wait([stop_wait, *waiters], return_when=asyncio.FIRST_COMPLETED)
    for task in done:
        if task is stop_wait:
            log.info("signal received, stopping")
            continue
        component = waiters[task]
        exc = task.exception()
        if exc is not None:
            log.error("%s failed: %s", component.name, exc, exc_info=exc)
            exit_code = 1
        else:
            log.info("%s finished", component.name)
    stop_wait.cancel()
    return exit_code
