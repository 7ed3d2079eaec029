"""flowtally.health and the endpoints of flowtally.metrics: liveness follows the event loop
(a blocked loop fails, a waiting one does not), readiness follows the broker probe and the
stage's own check, each with its reason."""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.error
import urllib.request

from flowtally.dev.localstack import free_port
from flowtally.health import KafkaProbe, LoopWatch, combined
from flowtally.metrics import MetricsServer
from flowtally.settings import KafkaSettings


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return int(resp.status), resp.read().decode()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode()


def test_loop_watch_fails_only_while_the_loop_is_blocked() -> None:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    watch = LoopWatch(stall_after_s=0.5, answer_within_s=0.2)
    watch.watch(loop)
    blocked, release = threading.Event(), threading.Event()

    def block() -> None:  # a synchronous step holding the loop
        blocked.set()
        release.wait(30)

    try:
        assert watch.check() == (True, "ok")
        # Waiting (nothing to do, e.g. for Kafka) is live however long it lasts.
        time.sleep(0.8)
        assert watch.check() == (True, "ok")
        loop.call_soon_threadsafe(block)
        assert blocked.wait(10)
        time.sleep(0.8)
        ok, reason = watch.check()
        assert not ok and reason.startswith("event loop has not run for "), reason
        release.set()
        deadline = time.monotonic() + 10
        while watch.check() != (True, "ok"):
            assert time.monotonic() < deadline
    finally:
        release.set()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
    # A closed loop never runs again.
    time.sleep(0.6)
    assert not watch.check()[0]


def test_kafka_probe_reports_an_unreachable_broker() -> None:
    bootstrap = f"127.0.0.1:{free_port()}"  # nothing listens there
    probe = KafkaProbe(KafkaSettings(bootstrap=bootstrap), interval_s=0.1, unready_after_s=0.5)
    probe.start()
    try:
        deadline = time.monotonic() + 20
        while "not reached yet" in probe.check()[1]:
            assert time.monotonic() < deadline, probe.check()
            time.sleep(0.05)
        ok, reason = probe.check()
    finally:
        t0 = time.monotonic()
        probe.stop()
        stopped_in = time.monotonic() - t0
    assert not ok
    assert reason.startswith(f"Kafka at {bootstrap} not answering for "), reason
    assert "Unable to bootstrap" in reason, reason
    assert stopped_in < 10


def test_combined_names_every_failing_check() -> None:
    check = combined([lambda: (False, "a down"), lambda: (True, "ok"), lambda: (False, "b stuck")])
    assert check() == (False, "a down; b stuck")
    assert combined([lambda: (True, "ok")])() == (True, "ok")


def test_endpoints_readiness_and_liveness_are_separate() -> None:
    state = {"ready": (False, "inserts failing for 61s")}

    async def scenario() -> list[tuple[int, str]]:
        server = MetricsServer("127.0.0.1:0", lambda: state["ready"])
        await server.start()
        port = server.address[1]
        try:
            got = [await asyncio.to_thread(_get, port, "/healthz"),
                   await asyncio.to_thread(_get, port, "/livez")]
            state["ready"] = (True, "ok")
            got.append(await asyncio.to_thread(_get, port, "/healthz"))
            got.append(await asyncio.to_thread(_get, port, "/nothing"))
            return got
        finally:
            await server.stop()

    assert asyncio.run(scenario()) == [
        (503, "inserts failing for 61s\n"), (200, "ok\n"), (200, "ok\n"),
        (404, "not found: try /metrics, /healthz or /livez\n")]


def test_enricher_readiness_names_a_stopped_agent_and_a_message_in_hand_too_long() -> None:
    from enricher.app import STUCK_AFTER_S, EnricherState
    from enricher.identity import IdentityIndex

    state = EnricherState(IdentityIndex(()))
    assert state.health() == (False, "starting")
    state.running = True
    assert state.health() == (True, "ok")
    state.current = ("raw/3/17", time.monotonic())  # being handled: normal
    assert state.health() == (True, "ok")
    state.current = ("raw/3/17", time.monotonic() - STUCK_AFTER_S - 5)  # a send retried for a minute
    ok, reason = state.health()
    assert not ok and reason.startswith("raw message raw/3/17 in hand for "), reason
    state.current, state.failure = None, "KafkaError: boom"
    assert state.health() == (False, "agent stopped: KafkaError: boom")
