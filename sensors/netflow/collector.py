"""`flowtally sensor netflow`: receive NetFlow over UDP, decode in batches, publish raw batches.

The receive path does as little as possible per datagram (stamp it, file it under its exporter);
decoding happens per exporter when its pending datagrams reach ``batch_max_flows`` (estimated
from the header counts) or ``batch_max_age_ms``, so the decoder works on whole batches.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import time

from prometheus_client import Counter
from pydantic import Field

from flowtally import kafka
from flowtally.kafka import TopicSettings
from flowtally.lifecycle import run_components
from flowtally.metrics import MetricsServer
from flowtally.settings import KafkaSettings, StageSettings, load_settings, parse_hostport
from sensors.netflow.decoder import Datagram, DecodeStats, decode_datagrams
from sensors.netflow.templates import TemplateStore
from sensors.publisher import Publisher, encode_messages
from sensors.schema import address16, address_text, with_observer

log = logging.getLogger(__name__)

_SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)  # Linux; missing from Python's socket module

PACKETS = Counter("flowtally_sensor_netflow_packets_total", "Datagrams received", ["exporter"])
FLOWS = Counter("flowtally_sensor_netflow_flows_total", "Flow records decoded", ["exporter"])
TEMPLATES = Counter("flowtally_sensor_netflow_templates_total", "Templates received", ["exporter"])
ERRORS = Counter("flowtally_sensor_netflow_decode_errors_total", "Datagrams or flowsets not decoded",
                 ["exporter", "reason"])


class NetflowSettings(StageSettings):
    """Settings of the NetFlow sensor."""

    kafka: KafkaSettings = KafkaSettings()
    topics: TopicSettings = TopicSettings()
    listen: str = Field("0.0.0.0:2055", description="UDP host:port to receive NetFlow on")
    metrics_listen: str = "0.0.0.0:9461"
    observer: str = Field("", description="Name of this observation point (e.g. the node name)")
    batch_max_flows: int = Field(8192, ge=1, le=1_000_000)
    batch_max_age_ms: int = Field(1000, ge=10, le=60_000)
    max_queued_batches: int = Field(256, ge=1, description="Batches held while Kafka is slow")
    receive_buffer_bytes: int = Field(32 * 1024 * 1024, ge=65536)

    def listen_address(self) -> tuple[str, int]:
        return parse_hostport(self.listen, what="listen address")


def _estimate_records(payload: bytes) -> int:
    """Header record count (v5 flows; v9 records incl. templates; IPFIX: by length)."""
    if len(payload) >= 4:
        version = int.from_bytes(payload[0:2], "big")
        if version in (5, 9):
            return int.from_bytes(payload[2:4], "big")
        if version == 10:
            return max(1, int.from_bytes(payload[2:4], "big") // 50)
    return 1


class NetflowReceiver(asyncio.DatagramProtocol):
    """The UDP socket and the per-exporter pending datagrams (a lifecycle component)."""

    name = "netflow-receiver"

    def __init__(self, settings: NetflowSettings, publisher: Publisher) -> None:
        self._settings = settings
        self._publisher = publisher
        self._templates = TemplateStore()
        self._pending: dict[bytes, list[Datagram]] = {}
        self._pending_records: dict[bytes, int] = {}
        self._oldest: dict[bytes, float] = {}
        self._addresses: dict[str, bytes] = {}
        self._transport: asyncio.DatagramTransport | None = None
        self._ticker: asyncio.Task[None] | None = None
        self.bound: tuple[str, int] | None = None

    # asyncio.DatagramProtocol
    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        host = str(addr[0])
        exporter = self._addresses.get(host)
        if exporter is None:
            exporter = self._addresses[host] = address16(host)
        pending = self._pending.get(exporter)
        if pending is None:
            pending = self._pending[exporter] = []
            self._pending_records[exporter] = 0
            self._oldest[exporter] = time.monotonic()
        pending.append(Datagram(exporter, time.time_ns() // 1_000_000, data))
        self._pending_records[exporter] += _estimate_records(data)
        if self._pending_records[exporter] >= self._settings.batch_max_flows:
            self._flush(exporter)

    def error_received(self, exc: Exception) -> None:
        log.warning("UDP receive error: %s", exc)

    async def start(self) -> None:
        host, port = self._settings.listen_address()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        size = self._settings.receive_buffer_bytes
        try:  # with CAP_NET_ADMIN, beyond net.core.rmem_max; otherwise what the kernel allows
            sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, size)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
        granted = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // 2  # the kernel doubles it
        if granted < size:
            log.warning("UDP receive buffer is %d bytes, not the %d asked for: raise net.core.rmem_max "
                        "or bursts will be dropped by the kernel", granted, size)
        try:
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            raise OSError(f"cannot listen on UDP {self._settings.listen}: {exc}") from exc
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(lambda: self, sock=sock)
        self._transport = transport
        self.bound = sock.getsockname()[:2]
        self._ticker = asyncio.create_task(self._tick())
        log.info("receiving NetFlow on udp://%s:%d", *self.bound)

    async def stop(self) -> None:
        """Stop receiving and hand every pending datagram to the publisher."""
        if self._ticker is not None:
            self._ticker.cancel()
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        for exporter in list(self._pending):
            self._flush(exporter)

    async def _tick(self) -> None:
        max_age = self._settings.batch_max_age_ms / 1000
        while True:
            await asyncio.sleep(max_age / 4)
            now = time.monotonic()
            for exporter in [e for e, t in self._oldest.items() if now - t >= max_age]:
                self._flush(exporter)

    def _flush(self, exporter: bytes) -> None:
        datagrams = self._pending.pop(exporter, [])
        self._pending_records.pop(exporter, None)
        self._oldest.pop(exporter, None)
        if not datagrams:
            return
        stats = DecodeStats()
        table = decode_datagrams(datagrams, self._templates, stats)
        if self._settings.observer:
            table = with_observer(table, self._settings.observer)
        _export(stats)
        if table.num_rows:
            for message in encode_messages(table, address_text(exporter).encode()):
                self._publisher.offer(message)


def _export(stats: DecodeStats) -> None:
    """Move one decode call's counters into the Prometheus metrics."""
    for exporter, counts in stats.by_exporter().items():
        PACKETS.labels(exporter).inc(counts.packets)
        FLOWS.labels(exporter).inc(counts.records)
        TEMPLATES.labels(exporter).inc(counts.templates)
        for reason, n in counts.errors.items():
            ERRORS.labels(exporter, reason).inc(n)


def run(args: argparse.Namespace) -> int:
    """`flowtally sensor netflow`."""
    settings = load_settings(
        NetflowSettings, args.config, listen=args.listen, metrics_listen=args.metrics_listen
    )
    return asyncio.run(_main(settings))


async def _main(settings: NetflowSettings) -> int:
    await kafka.ensure_topics(settings.kafka, settings.topics)
    publisher = Publisher(kafka.producer(settings.kafka), settings.kafka.topic("raw"),
                          settings.max_queued_batches)
    receiver = NetflowReceiver(settings, publisher)

    def health() -> tuple[bool, str]:
        return (True, "ok") if publisher.healthy else (False, "cannot publish to Kafka")

    metrics = MetricsServer(settings.metrics_listen, health)
    return await run_components([metrics, publisher, receiver])
