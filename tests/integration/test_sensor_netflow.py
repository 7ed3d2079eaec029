"""The NetFlow sensor's receiving side as a real `flowtally sensor netflow` process with the real
Kafka broker: dual-stack receive, exporter allowlist, the kernel drop counter (SO_RXQ_OVFL),
per-minute completeness records, and bounded memory with counted drops when Kafka is unreachable.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
import uuid
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest

from flowtally import kafka
from flowtally.dev.localstack import Stage, free_port
from flowtally.settings import KafkaSettings
from sensors.netflow.pcap import iter_udp
from sensors.schema import address16, address_text
from tests.oracle import DATA, tshark_decode

V9 = DATA / "softflowd-v9.pcap"
V5 = DATA / "softflowd-v5.pcap"


def _sensor(tmp_path: Path, bootstrap: str, prefix: str, **env: str) -> Stage:
    port = free_port()
    udp = free_port(socket.SOCK_DGRAM)
    listen = env.pop("LISTEN", f"127.0.0.1:{udp}")
    stage = Stage("sensor", ["sensor", "netflow", "--listen", listen, "--metrics-listen", f"127.0.0.1:{port}"],
                  {"FLOWTALLY_KAFKA_BOOTSTRAP": bootstrap, "FLOWTALLY_KAFKA_TOPIC_PREFIX": prefix,
                   "FLOWTALLY_BATCH_MAX_AGE_MS": "200"} | {f"FLOWTALLY_{k}": v for k, v in env.items()},
                  tmp_path / "sensor.log", port)
    stage.start()
    return stage


def _udp_port(stage: Stage, timeout: float = 60) -> None:
    """Wait until the sensor's UDP socket is bound (it logs so after its warm-up: the metrics,
    defined at import, answer earlier, and datagrams sent before the bind are lost)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stage.check_alive()
        if "receiving NetFlow on" in stage.log_path.read_text(errors="replace"):
            return
        time.sleep(0.1)
    raise AssertionError(f"sensor did not come up:\n{stage.log_tail()}")


def _send(payloads: list[bytes], source: tuple[str, int], to: tuple[str, int], family: int = socket.AF_INET,
          pace: int = 50) -> int:
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.bind(source)
        for i, payload in enumerate(payloads, 1):
            sock.sendto(payload, to)
            if pace and i % pace == 0:
                time.sleep(0.001)
    return len(payloads)


def _read(bootstrap: str, topic: str, until: int, timeout: float = 30) -> list[tuple[bytes, pa.Table, dict[str, bytes]]]:
    """Messages of ``topic`` (key, table, headers) until ``until`` rows were read or time is up."""
    settings = KafkaSettings(bootstrap=bootstrap)

    async def read() -> list[tuple[bytes, pa.Table, dict[str, bytes]]]:
        consumer = kafka.consumer(settings, topic, group_id=f"reader-{uuid.uuid4().hex[:8]}")
        await consumer.start()
        got: list[tuple[bytes, pa.Table, dict[str, bytes]]] = []
        rows = 0
        try:
            deadline = time.monotonic() + timeout
            while rows < until and time.monotonic() < deadline:
                for messages in (await consumer.getmany(timeout_ms=500)).values():
                    for m in messages:
                        assert m.value is not None
                        table = pa.ipc.open_stream(m.value).read_all()
                        got.append((m.key or b"", table, dict(m.headers)))
                        rows += table.num_rows
        finally:
            await consumer.stop()
        return got

    return asyncio.run(read())


def test_dual_stack_allowlist_completeness(kafka_bootstrap: str, tmp_path: Path) -> None:
    """[::]:port takes IPv4 and IPv6; a source outside the allowlist is dropped and counted; the
    raw topic and the completeness topic hold exactly what the allowed exporters sent."""
    prefix = f"t{uuid.uuid4().hex[:10]}"
    udp = free_port(socket.SOCK_DGRAM)
    sensor = _sensor(tmp_path, kafka_bootstrap, prefix, LISTEN=f"[::]:{udp}",
                     ALLOW_EXPORTERS="127.0.0.0/24,::1/128", OBSERVER="node-a")
    try:
        sensor.wait_healthy(60)
        v9 = [p.payload for p in iter_udp(str(V9))]
        v5 = [p.payload for p in iter_udp(str(V5))]
        expected_v9 = tshark_decode(V9).totals
        expected_v5 = tshark_decode(V5).totals
        _send(v9, ("127.0.0.41", 0), ("127.0.0.1", udp))
        _send(v5, ("::1", 0), ("::1", udp), socket.AF_INET6)
        denied = _send(v9[:7], ("127.0.1.42", 0), ("127.0.0.1", udp))
        deadline = time.monotonic() + 20
        want = expected_v9[0] + expected_v5[0]
        while sensor.metric("flowtally_sensor_netflow_flows_total") < want and time.monotonic() < deadline:
            time.sleep(0.2)
        assert sensor.metric("flowtally_sensor_netflow_flows_total", {"exporter": "127.0.0.41"}) == expected_v9[0]
        assert sensor.metric("flowtally_sensor_netflow_flows_total", {"exporter": "::1"}) == expected_v5[0]
        assert sensor.metric("flowtally_sensor_netflow_packets_total", {"exporter": "127.0.0.41"}) == len(v9)
        assert sensor.metric("flowtally_sensor_netflow_denied_packets_total") == denied
        assert sensor.metric("flowtally_sensor_netflow_packets_total", {"exporter": "127.0.1.42"}) == 0
        assert sensor.metric("flowtally_sensor_netflow_kernel_drops") == 0
        assert sensor.stop(timeout=20) == 0
    finally:
        sensor.stop()

    raw = _read(kafka_bootstrap, f"{prefix}.flows.raw", want)
    by_exporter: Counter[str] = Counter()
    for key, table, headers in raw:
        assert headers["flowtally-schema"] == b"raw.v1"
        exporters = {address_text(bytes(e)) for e in table.column("exporter").to_pylist()}
        assert exporters == {key.decode()}
        by_exporter[key.decode()] += table.num_rows
    assert by_exporter == {"127.0.0.41": expected_v9[0], "::1": expected_v5[0]}

    rows = _read(kafka_bootstrap, f"{prefix}.sensor.completeness", 2)
    assert rows and all(h["flowtally-schema"] == b"completeness.v1" for _, _, h in rows)
    table = pa.concat_tables([t for _, t, _ in rows])
    totals: dict[bytes, Counter[str]] = {}
    for row in table.to_pylist():
        assert row["observer"] == "node-a"
        counts = totals.setdefault(row["exporter"], Counter())
        for name in ("packets", "records", "bytes", "decode_errors", "dropped_backpressure", "kernel_drops"):
            counts[name] += row[name]
    assert set(totals) == {address16("127.0.0.41"), address16("::1")}
    v9_counts = totals[address16("127.0.0.41")]
    assert (v9_counts["packets"], v9_counts["records"], v9_counts["bytes"]) == (
        len(v9), expected_v9[0], sum(map(len, v9)))
    v5_counts = totals[address16("::1")]
    assert (v5_counts["packets"], v5_counts["records"], v5_counts["bytes"]) == (
        len(v5), expected_v5[0], sum(map(len, v5)))
    assert sum(c["decode_errors"] + c["dropped_backpressure"] + c["kernel_drops"] for c in totals.values()) == 0


def test_kernel_drops_are_counted(kafka_bootstrap: str, tmp_path: Path) -> None:
    """With a small receive buffer and the sensor paused, a burst overflows the socket: the drops the
    kernel reports (SO_RXQ_OVFL) plus the datagrams received equal the datagrams sent."""
    prefix = f"t{uuid.uuid4().hex[:10]}"
    udp = free_port(socket.SOCK_DGRAM)
    sensor = _sensor(tmp_path, kafka_bootstrap, prefix, LISTEN=f"127.0.0.1:{udp}",
                     RECEIVE_BUFFER_BYTES="65536")
    try:
        sensor.wait_healthy(60)
        payload = b"\x00\x63" + b"\x00" * 1000  # an unknown version: counted, cheap to reject
        assert sensor.process is not None
        os.kill(sensor.process.pid, signal.SIGSTOP)
        try:
            sent = _send([payload] * 2000, ("127.0.0.43", 0), ("127.0.0.1", udp), pace=0)
        finally:
            os.kill(sensor.process.pid, signal.SIGCONT)
        time.sleep(1.0)
        sent += _send([payload], ("127.0.0.43", 0), ("127.0.0.1", udp))  # carries the final count
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            received = sensor.metric("flowtally_sensor_netflow_packets_total", {"exporter": "127.0.0.43"})
            drops = sensor.metric("flowtally_sensor_netflow_kernel_drops")
            if received + drops == sent:
                break
            time.sleep(0.2)
        assert drops > 0
        assert received + drops == sent
        assert sensor.stop(timeout=20) == 0
    finally:
        sensor.stop()


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


@pytest.mark.parametrize("drain_timeout", ["1.5"])
def test_kafka_unreachable_bounded_and_stops(tmp_path: Path, drain_timeout: str) -> None:
    """Kafka never answers: the sensor still receives and decodes, holds at most
    ``max_queued_batches`` batches, counts the rest as dropped, and exits 0 soon after SIGTERM."""
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    udp = free_port(socket.SOCK_DGRAM)
    sensor = _sensor(tmp_path, dead, "tdead", LISTEN=f"127.0.0.1:{udp}", MAX_QUEUED_BATCHES="3",
                     BATCH_MAX_FLOWS="200", DRAIN_TIMEOUT_S=drain_timeout)
    try:
        _udp_port(sensor)
        assert not sensor.healthy()
        v9 = [p.payload for p in iter_udp(str(V9))]
        flows = tshark_decode(V9).totals[0]
        assert sensor.process is not None
        rss0 = _rss_kb(sensor.process.pid)
        rounds = 30
        for i in range(rounds):
            _send(v9, (f"127.0.0.{50 + i % 5}", 0), ("127.0.0.1", udp))
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            decoded = sensor.metric("flowtally_sensor_netflow_flows_total")
            if decoded >= rounds * flows:
                break
            time.sleep(0.2)
        # Exporters 2-5 reuse exporter 1's templates? No: each has its own; the first packets of
        # each carry templates, so everything decodes.
        assert decoded == rounds * flows
        time.sleep(0.5)
        dropped = sensor.metric("flowtally_sensor_flows_dropped_total", {"reason": "backpressure"})
        assert dropped > 0
        assert sensor.metric("flowtally_sensor_batches_queued") <= 3 + 8
        assert _rss_kb(sensor.process.pid) - rss0 < 100_000
        t0 = time.monotonic()
        assert sensor.stop(timeout=20) == 0
        assert time.monotonic() - t0 < float(drain_timeout) + 4
    finally:
        sensor.stop()
    log = sensor.log_path.read_text()
    assert "not delivered (counted as dropped)" in log
