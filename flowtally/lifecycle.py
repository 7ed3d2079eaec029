"""Process lifecycle: start components in order, stop the started ones in reverse.

A stage is a list of components (e.g. metrics server, Kafka producer, UDP receiver). They start
in list order; if one fails to start, the ones already started are stopped in reverse order. On
SIGTERM/SIGINT, or when a component's own work ends with an error, every started component is
stopped in reverse order, so upstream parts stop before the parts they feed and buffers drain
into still-running downstream parts.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

log = logging.getLogger(__name__)


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
                await component.start()
            except Exception as exc:
                log.error("%s failed to start: %s", component.name, exc)
                exit_code = 1
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
