"""`flowtally sensor netflow`: receive NetFlow over UDP, decode in batches, publish raw batches.

The receive path does as little as possible per datagram: :class:`~sensors.netflow.receiver.UdpReceiver`
drains the socket in batches and this module files each payload under its exporter (one dict
lookup per datagram; the allowlist is checked once per source address). Decoding happens per
exporter when its pending datagrams reach ``batch_max_flows`` (estimated from the header counts)
or ``batch_max_age_ms``, so the decoder works on whole batches.

Decoding does not run in the receive callback but in a task that serves the due exporters in
round robin, one turn of at most ``decode_quantum_ms`` each (sized from the exporter's measured
cost per datagram), yielding to the event loop after every turn so the Kafka producer and the
socket are served between turns. Each exporter's undecoded datagrams are bounded
(``decode_backlog_bytes``, and ``decode_backlog_total_bytes`` for all): beyond, that exporter's
datagrams are dropped and counted (``decode_overload``), so a source whose datagrams are
expensive to decode (a fuzzer's: up to 100 times a valid one) loses its own input and nobody
else's. A turn's rows wait until the exporter's backlog is decoded or a batch's worth is there,
so the producer sends batch-sized messages. The decoder's state is bounded too (see
:class:`~sensors.netflow.templates.TemplateStore`), and so are the exporter label values
(``max_exporter_labels``) and the completeness rows.

``workers > 1`` runs that many processes, each with its own socket bound to the same port with
``SO_REUSEPORT``: the kernel hashes each datagram's 4-tuple to one socket, so an exporter (one
source address and port) always reaches the same worker and its template state stays in one
process. An exporter that changes its source port mid-stream may land on another worker, which
then waits for the next template refresh (counted as ``missing_template`` meanwhile). Worker *i*
serves its metrics on the metrics port + *i*.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import os
import signal
import subprocess
import sys
import time
from typing import Literal

import numpy as np
import pyarrow as pa
from prometheus_client import Counter, Gauge
from pydantic import Field, field_validator

from flowtally import kafka
from flowtally.kafka import TopicSettings
from flowtally.lifecycle import run_components
from flowtally.metrics import LabelCap, MetricsServer
from flowtally.process import MemoryPolicy
from flowtally.process import apply as apply_memory_policy
from flowtally.settings import CommaList, KafkaSettings, StageSettings, load_settings, parse_hostport
from sensors.completeness import SCHEMA_NAME as COMPLETENESS_SCHEMA
from sensors.completeness import CompletenessAccumulator, group_counts
from sensors.netflow.decoder import decode_payloads, flush_pending
from sensors.netflow.receiver import Run, UdpReceiver, domains_many, open_udp_socket, split_run
from sensors.netflow.stats import DecodeStats, ExporterStats
from sensors.netflow.templates import TemplateStore
from sensors.publisher import Publisher, encode_messages
from sensors.schema import address16, address_text, build_raw_table, with_observer

log = logging.getLogger(__name__)

PACKETS = Counter("flowtally_sensor_netflow_packets_total", "Datagrams received", ["exporter"])
PAYLOAD_BYTES = Counter("flowtally_sensor_netflow_bytes_total", "UDP payload bytes received", ["exporter"])
FLOWS = Counter("flowtally_sensor_netflow_flows_total", "Flow records decoded", ["exporter"])
TEMPLATES = Counter("flowtally_sensor_netflow_templates_total", "Templates received", ["exporter"])
ERRORS = Counter("flowtally_sensor_netflow_decode_errors_total", "Datagrams or flowsets not decoded",
                 ["exporter", "reason"])
SEQUENCE_GAPS = Counter("flowtally_sensor_netflow_sequence_gaps_total",
                        "Forward jumps of the exporter's sequence number", ["exporter"])
SEQUENCE_LOST = Counter("flowtally_sensor_netflow_sequence_lost_total", "What sequence gaps skipped "
                        "(v9: packets; v5, IPFIX: records); net loss = lost - late", ["exporter", "unit"])
SEQUENCE_LATE = Counter("flowtally_sensor_netflow_sequence_late_total",
                        "Reordered datagrams' units, counted as lost before they came", ["exporter", "unit"])
SEQUENCE_RESETS = Counter("flowtally_sensor_netflow_sequence_resets_total",
                          "Sequence jumps too large for loss (exporter restarts)", ["exporter"])
DENIED = Counter("flowtally_sensor_netflow_denied_packets_total",
                 "Datagrams from sources outside the exporter allowlist (dropped)")
KERNEL_DROPS = Gauge("flowtally_sensor_netflow_kernel_drops",
                     "Datagrams the kernel dropped at this process's socket (SO_RXQ_OVFL, cumulative)")

TEMPLATES_EVICTED = Counter("flowtally_sensor_netflow_templates_evicted_total", "Templates the state bounds "
                            "evicted (least recently used first), by the bound that did", ["reason"])
STATE_EVICTED = Counter("flowtally_sensor_netflow_state_evicted_total", "Decoder state the bounds evicted: "
                        "exporters, domains (all of their state), pending_sets (held data lost with them)",
                        ["kind"])
STATE = Gauge("flowtally_sensor_netflow_state", "Decoder state held: templates, template_fields, domains, "
              "exporters, completeness_rows, pending_set_bytes", ["kind"])
DECODE_BACKLOG = Gauge("flowtally_sensor_netflow_decode_backlog_bytes",
                       "Datagram bytes received and waiting to be decoded (all exporters)")

_ADDRESS_CACHE_MAX = 65_536  # distinct source addresses remembered (allowlist verdicts)
#: What a datagram waiting for the decoder costs beyond its payload (bytes object, list slots,
#: receive time, header row): counted against the backlog bounds.
_BACKLOG_OVERHEAD = 128
#: Datagrams of an exporter decoded in its first turn, before its cost per datagram is known
#: (small: a hostile datagram can cost over 1 ms).
_FIRST_CHUNK = 8
#: Decode errors reason for datagrams dropped because the exporter's backlog was full.
OVERLOAD = "decode_overload"


class NetflowSettings(StageSettings):
    """Settings of the NetFlow sensor."""

    kafka: KafkaSettings = KafkaSettings()
    topics: TopicSettings = TopicSettings()
    listen: str = Field("0.0.0.0:2055", description="UDP host:port to receive NetFlow on; [::]:port is "
                        "dual-stack (IPv6 and IPv4)")
    metrics_listen: str = "0.0.0.0:9461"
    observer: str = Field("", description="Name of this observation point (e.g. the node name)")
    batch_max_flows: int = Field(16384, ge=1, le=1_000_000, description="Decode and publish an exporter's "
                                 "datagrams once they hold about this many flows (or batch_max_age_ms): "
                                 "bigger batches cost less CPU per flow (16384: ~0.45 MB lz4 messages)")
    batch_max_age_ms: int = Field(1000, ge=10, le=60_000)
    max_queued_batches: int = Field(256, ge=1, le=100_000, description="Batches held while Kafka is slow "
                                    "(each at most ~1 MB): beyond, batches are dropped and counted")
    max_in_flight: int = Field(8, ge=1, le=1024, description="Kafka sends awaiting acknowledgement")
    drain_timeout_s: float = Field(10.0, ge=0.1, le=300, description="On stop, how long to wait for Kafka "
                                   "to take queued batches; what is left is counted as dropped")
    receive_buffer_bytes: int = Field(32 * 1024 * 1024, ge=65536, le=2**31 - 1)
    receive_coalesce_ms: float = Field(
        50.0, ge=0, le=100, description="After draining the socket, read again this long after, so one "
        "wakeup takes many datagrams (the receive buffer holds them meanwhile; shorter when it would fill "
        "beyond half); 0 = read on every wakeup. A wakeup costs ~0.5 ms of CPU: 10 ms spent 0.45, 50 ms "
        "0.17 CPU-s per million flows on receiving")
    workers: int = Field(1, ge=1, le=256, description="Processes receiving on the same port with "
                         "SO_REUSEPORT (one exporter always reaches the same worker)")
    reuse_port: bool = Field(False, description="Bind with SO_REUSEPORT (implied by workers > 1)")
    allow_exporters: CommaList = Field(
        default_factory=list, description="Exporter CIDRs to accept (comma-separated in the environment); "
        "empty = any")
    compression: Literal["none", "lz4", "zstd"] = Field(
        "lz4", description="Arrow buffer compression of published batches: lz4 costs half of zstd's "
        "CPU for about twice its bytes (28 vs 15 per flow); none is nearly free but 116 bytes per flow")
    completeness: bool = Field(True, description="Publish per-minute completeness records")
    max_pending_sets: int = Field(256, ge=0, le=100_000, description="v9/IPFIX data sets held per exporter "
                                  "and domain while their template has not arrived (0 = none: counted as "
                                  "missing_template at once); beyond, the oldest is dropped and counted")
    max_pending_bytes: int = Field(1 << 20, ge=0, le=1 << 30, description="Bytes of data sets held per "
                                   "exporter and domain for a missing template; beyond, the oldest is "
                                   "dropped and counted")
    max_pending_age_ms: int = Field(30_000, ge=0, le=3_600_000, description="How long (by receive time) "
                                    "a data set waits for its template before it is dropped and counted as "
                                    "missing_template_expired")
    max_pending_total_bytes: int = Field(16 << 20, ge=0, le=1 << 34, description="Bytes of data sets held "
                                         "for a missing template, all exporters and domains together; beyond "
                                         "a set is not held (counted as missing_template_expired)")
    # Bounds on what exporters can make the sensor hold (see sensors.netflow.templates and the
    # deploy/docs/sensor-netflow.md, "Hostile input"). A router has one to a few observation domains, tens of
    # templates of 10-60 fields; the defaults leave a wide margin for that and cap the worst case.
    max_exporters: int = Field(1024, ge=1, le=1_000_000, description="Exporter addresses whose decoder "
                               "state (templates, sequence numbers, ...) is kept; beyond, the least "
                               "recently used exporter's state is evicted and counted")
    max_domains_per_exporter: int = Field(64, ge=1, le=1_000_000, description="Observation domains (v9 "
                                          "source IDs) kept per exporter; beyond, the least recently used "
                                          "one's state is evicted and counted")
    max_templates_per_domain: int = Field(512, ge=1, le=65_536, description="Templates kept per "
                                          "exporter and domain; beyond, the least recently used is evicted")
    max_template_fields_per_exporter: int = Field(16_384, ge=1, le=1 << 30, description="Field specifiers "
                                                  "of all of one exporter's templates (~200 bytes of memory "
                                                  "each); beyond, its least recently used templates go")
    max_template_fields: int = Field(131_072, ge=1, le=1 << 30, description="Field specifiers of all "
                                     "templates held (~200 bytes each, measured: the default bounds the "
                                     "cache near 26 MB; a router's templates are ~1,500); beyond, the "
                                     "exporter holding the most loses its least recently used templates")
    max_exporter_labels: int = Field(128, ge=1, le=100_000, description="Distinct exporter label values "
                                     "on the metrics (~4 KB of /metrics each); later exporters are counted "
                                     "under exporter=\"other\"")
    max_completeness_rows: int = Field(4096, ge=2, le=1_000_000, description="Completeness rows per minute "
                                       "(exporter x observation domain); beyond, counted on one overflow row")
    decode_backlog_bytes: int = Field(8 << 20, ge=65_536, le=1 << 31, description="Received bytes of one "
                                      "exporter waiting for the decoder; beyond, its datagrams are dropped "
                                      "and counted as decode_overload (only that exporter's)")
    decode_backlog_total_bytes: int = Field(64 << 20, ge=65_536, le=1 << 34, description="Received bytes "
                                            "of all exporters waiting for the decoder; beyond, datagrams are "
                                            "dropped and counted as decode_overload")
    decode_quantum_ms: float = Field(10.0, ge=0.5, le=1000, description="Decoding time an exporter gets "
                                     "per turn (round robin over exporters with datagrams to decode) before "
                                     "the event loop sends to Kafka and receives again")


    @field_validator("allow_exporters")
    @classmethod
    def _check_cidrs(cls, value: list[str]) -> list[str]:
        for cidr in value:
            ipaddress.ip_network(cidr, strict=False)  # ValueError names the bad one
        return value

    def listen_address(self) -> tuple[str, int]:
        return parse_hostport(self.listen, what="listen address")


class Allowlist:
    """Exporter CIDRs; IPv4-mapped IPv6 sources are matched as IPv4."""

    def __init__(self, cidrs: list[str]) -> None:
        self._networks = [ipaddress.ip_network(c, strict=False) for c in cidrs]

    def __bool__(self) -> bool:
        return bool(self._networks)

    def allows(self, host: str) -> bool:
        if not self._networks:
            return True
        ip = ipaddress.ip_address(host.split("%")[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip.version == net.version and ip in net for net in self._networks)


class _Pending:
    """One exporter's datagrams waiting to be decoded (parallel lists, no object per datagram;
    their lengths and header bytes in the receiver's numpy chunks)."""

    __slots__ = ("bytes", "heads", "lengths", "payloads", "received", "records", "since", "wakeups")

    def __init__(self, since: float) -> None:
        self.bytes = 0  # payloads + _BACKLOG_OVERHEAD each: what the backlog bounds count
        self.payloads: list[bytes] = []
        self.received: list[int] = []
        self.lengths: list[np.ndarray] = []
        self.heads: list[np.ndarray] = []
        self.wakeups: list[int] = []  # the receive times, once per run
        self.records = 0
        self.since = since


class _Decoded:
    """One exporter's decoded tables waiting to fill a message."""

    __slots__ = ("rows", "since", "tables")

    def __init__(self, since: float) -> None:
        self.tables: list[pa.Table] = []
        self.rows = 0
        self.since = since


class NetflowReceiver:
    """The UDP socket, the per-exporter pending datagrams and the decoder (a lifecycle component)."""

    name = "netflow-receiver"

    def __init__(self, settings: NetflowSettings, publisher: Publisher, *,
                 completeness_topic: str | None = None) -> None:
        self._settings = settings
        self._publisher = publisher
        self._templates = TemplateStore(
            settings.max_pending_sets, settings.max_pending_bytes, settings.max_pending_age_ms,
            max_exporters=settings.max_exporters, max_domains_per_exporter=settings.max_domains_per_exporter,
            max_templates_per_domain=settings.max_templates_per_domain,
            max_template_fields_per_exporter=settings.max_template_fields_per_exporter,
            max_template_fields=settings.max_template_fields,
            max_pending_total_bytes=settings.max_pending_total_bytes)
        self._pending: dict[bytes, _Pending] = {}
        self._exporters: dict[bytes, bytes | None] = {}  # source address -> itself, None = denied
        self._labels: dict[bytes, str] = {}  # exporter -> its metrics label (at most max_exporter_labels)
        self._label_cap = LabelCap(settings.max_exporter_labels)
        # The decoder's round robin: exporters whose pending datagrams are due, in turn order;
        # their measured decoding cost per datagram (bounded like the template state).
        self._ready: dict[bytes, None] = {}
        self._wake = asyncio.Event()
        self._cost: dict[bytes, float] = {}
        self._backlog = 0  # bytes of all pending datagrams (_Pending.bytes summed)
        self._decoder: asyncio.Task[None] | None = None
        self._decoded: dict[bytes, _Decoded] = {}  # decoded rows not yet published, per exporter
        self._held_rows = 0
        self._allow = Allowlist(settings.allow_exporters)
        self._udp: UdpReceiver | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._completeness = CompletenessAccumulator(
            settings.observer, max_rows_per_minute=settings.max_completeness_rows,
            max_domains_per_exporter=settings.max_domains_per_exporter)
        self._completeness_topic = completeness_topic if settings.completeness else None
        self._kernel_drops_seen = 0
        self._closed_before = 0  # the minute the last per-minute take closed
        self._reuse_port = settings.reuse_port or settings.workers > 1
        self.bound: tuple[str, int] | None = None
        self.denied = 0

    @property
    def kernel_drops(self) -> int:
        return self._udp.kernel_drops if self._udp is not None else 0

    async def start(self) -> None:
        _warm_up()
        host, port = self._settings.listen_address()
        sock = open_udp_socket(host, port, receive_buffer=self._settings.receive_buffer_bytes,
                               reuse_port=self._reuse_port)
        self._udp = UdpReceiver(sock, self._on_datagrams, coalesce_ms=self._settings.receive_coalesce_ms)
        self.bound = self._udp.address
        self._udp.start()
        self._ticker = asyncio.create_task(self._tick())
        self._decoder = asyncio.create_task(self._decode_loop())
        log.info("receiving NetFlow on udp://[%s]:%d", *self.bound)

    async def stop(self) -> None:
        """Stop receiving (taking what the socket holds) and hand every pending datagram over."""
        for task in (self._ticker, self._decoder):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._ticker = self._decoder = None
        if self._udp is not None:
            self._udp.stop(drain=True)
            self._note_kernel_drops()
            self._udp = None
        for exporter in list(self._pending):
            self._flush(exporter)
        for exporter in list(self._decoded):
            self._publish(exporter)
        self._give_up_pending()
        self._export_state()
        self._publish_completeness(None)

    def _give_up_pending(self) -> None:
        """Count the data sets still waiting for their template (shutdown): nothing more will
        come to complete them, so each is counted as ``missing_template_expired``."""
        stats = DecodeStats()
        if not flush_pending(self._templates, stats):
            return
        now_ms = time.time_ns() // 1_000_000
        for label, counts in stats.by_exporter().items():
            _export(self._label_cap(label), counts, 0)
            if self._completeness_topic:
                exporter = address16(label)
                row = self._completeness.counts(now_ms, exporter, 0)
                row.decode_errors += sum(counts.errors.values())
            log.warning("%s: %d data sets never got their template (counted as missing_template_expired)",
                        label, sum(counts.errors.values()))

    # The hot path: one call per socket wakeup, one step per run of datagrams from one source.
    def _on_datagrams(self, runs: list[Run], received_ms: int) -> None:
        exporters = self._exporters
        pending_of = self._pending
        max_flows = self._settings.batch_max_flows
        for run in runs:
            source, payloads = run.source, run.payloads
            exporter = exporters.get(source, b"")
            if not exporter:
                exporter = self._learn(source) if exporter is not None else None
                if exporter is None:
                    self.denied += len(payloads)
                    DENIED.inc(len(payloads))
                    continue
            pending = pending_of.get(exporter)
            if pending is None:
                pending = pending_of[exporter] = _Pending(time.monotonic())
            size = sum(int(c.sum()) for c in run.lengths) + _BACKLOG_OVERHEAD * len(payloads)
            if pending.bytes + size > self._settings.decode_backlog_bytes or \
                    self._backlog + size > self._settings.decode_backlog_total_bytes:
                run, size = self._shed(exporter, pending, run, received_ms)
                payloads = run.payloads
                if not payloads:
                    continue
            pending.bytes += size
            self._backlog += size
            pending.payloads.extend(payloads)
            pending.received.extend([received_ms] * len(payloads))
            pending.wakeups.append(received_ms)
            pending.lengths.extend(run.lengths)
            pending.heads.extend(run.heads)
            pending.records += run.records
            if pending.records >= max_flows and exporter not in self._ready:
                self._ready[exporter] = None
                self._wake.set()

    def _shed(self, exporter: bytes, pending: _Pending, run: Run, received_ms: int) -> tuple[Run, int]:
        """The part of ``run`` that fits the backlog bounds (and its size); the rest is dropped
        and counted as ``decode_overload`` of this exporter: packets, bytes and decode errors
        on the metrics and in the completeness counts (so a saturated decoder drops its own
        input, never another exporter's and never what it already decoded)."""
        room = min(self._settings.decode_backlog_bytes - pending.bytes,
                   self._settings.decode_backlog_total_bytes - self._backlog)
        lengths = _joined(run.lengths) + _BACKLOG_OVERHEAD
        keep = int(np.searchsorted(np.cumsum(lengths), room, side="right")) if room > 0 else 0
        kept, dropped = split_run(run, keep)
        dropped_lengths = _joined(dropped.lengths)
        label = self._label(exporter)
        n = len(dropped.payloads)
        PACKETS.labels(label).inc(n)
        PAYLOAD_BYTES.labels(label).inc(int(dropped_lengths.sum()))
        ERRORS.labels(label, OVERLOAD).inc(n)
        if self._completeness_topic:
            counts = ExporterStats()
            counts.error(OVERLOAD, n)
            domains = domains_many(np.concatenate(dropped.heads), dropped_lengths)
            self._account(exporter, dropped_lengths, domains, [received_ms] * n, [received_ms], counts)
        return kept, int(lengths[:keep].sum())

    def _label(self, exporter: bytes) -> str:
        """The exporter's metrics label: its address, or ``other`` beyond ``max_exporter_labels``."""
        label = self._labels.get(exporter)
        if label is None:
            label = self._label_cap(address_text(exporter))
            if len(self._labels) < self._settings.max_exporter_labels:
                self._labels[exporter] = label
        return label

    async def _decode_loop(self) -> None:
        """Decode the due exporters' datagrams in round robin, one bounded turn each, yielding
        to the event loop after every turn.

        Decoding and publishing share this loop: run to completion, a busy decoder would keep
        the Kafka producer from sending (measured at 10,000 fuzz datagrams/s, decoded in the
        receive callback: 585,040 decoded flows dropped for backpressure, 16,448 kernel drops,
        3,870 of a valid exporter's 20,000 flows published). A turn is at most
        ``decode_quantum_ms`` of decoding as estimated from the exporter's measured cost per
        datagram (hostile datagrams cost up to 100 times a valid one), so an exporter whose
        datagrams are expensive gets through fewer of them per turn, its backlog fills, and it
        is its input that is dropped (:meth:`_shed`), while every other exporter still gets a
        turn per round."""
        quantum = self._settings.decode_quantum_ms / 1000
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._ready:
                exporter = next(iter(self._ready))
                del self._ready[exporter]
                cost = self._cost.get(exporter)
                limit = _FIRST_CHUNK if cost is None else max(1, int(quantum / max(cost, 1e-7)))
                pending = self._take(exporter, limit)
                if pending is None:
                    continue
                started = time.perf_counter()
                try:
                    self._decode(exporter, pending)
                except Exception:  # a bug must not stop the decoding of every exporter
                    log.exception("decoding %d datagrams of %s failed", len(pending.payloads),
                                  address_text(exporter))
                per = (time.perf_counter() - started) / len(pending.payloads)
                self._cost.pop(exporter, None)
                self._cost[exporter] = per if cost is None else (cost + per) / 2
                if len(self._cost) > self._settings.max_exporters:
                    del self._cost[next(iter(self._cost))]
                await asyncio.sleep(0)

    def _take(self, exporter: bytes, limit: int) -> _Pending | None:
        """Up to ``limit`` of the exporter's oldest pending datagrams, removed from its backlog;
        what remains is due again (back in the round robin)."""
        pending = self._pending.get(exporter)
        if pending is None or not pending.payloads:
            self._pending.pop(exporter, None)
            return None
        if len(pending.payloads) <= limit:
            del self._pending[exporter]
            self._backlog -= pending.bytes
            return pending
        lengths, heads = _joined(pending.lengths), np.concatenate(pending.heads)
        head = _Pending(pending.since)
        head.payloads, pending.payloads = pending.payloads[:limit], pending.payloads[limit:]
        head.received, pending.received = pending.received[:limit], pending.received[limit:]
        head.lengths, pending.lengths = [lengths[:limit]], [lengths[limit:]]
        head.heads, pending.heads = [heads[:limit]], [heads[limit:]]
        head.wakeups = pending.wakeups  # a superset of each part's: only their extremes are read
        head.bytes = int(lengths[:limit].sum()) + _BACKLOG_OVERHEAD * limit
        share = pending.records * limit // (limit + len(pending.payloads))
        head.records, pending.records = share, pending.records - share
        pending.bytes -= head.bytes
        self._backlog -= head.bytes
        self._ready[exporter] = None
        return head

    def _learn(self, source: bytes) -> bytes | None:
        if len(self._exporters) >= _ADDRESS_CACHE_MAX:
            self._exporters.clear()
        host = address_text(source)
        verdict = source if self._allow.allows(host) else None
        self._exporters[source] = verdict
        if verdict is not None:
            self._label(source)  # labels go to exporters in the order they were first heard
        if verdict is None:
            log.warning("datagrams from %s are not from an allowed exporter: dropped and counted", host)
        return verdict

    async def _tick(self) -> None:
        max_age = self._settings.batch_max_age_ms / 1000
        grace_ms = self._settings.batch_max_age_ms + 2000
        while True:
            await asyncio.sleep(max_age / 4)
            now = time.monotonic()
            for exporter in [e for e, p in self._pending.items() if now - p.since >= max_age]:
                self._ready[exporter] = None
            if self._ready:
                self._wake.set()
            for exporter in [e for e, d in self._decoded.items() if now - d.since >= max_age]:
                self._publish(exporter)
            self._note_kernel_drops()
            self._export_state()
            # A minute is closed once every datagram received in it has been decoded.
            now_ms = time.time_ns() // 1_000_000
            self._publish_completeness(now_ms - grace_ms - (now_ms - grace_ms) % 60_000)

    def _note_kernel_drops(self) -> None:
        if self._udp is None:
            return
        drops = self._udp.kernel_drops
        if drops > self._kernel_drops_seen:
            KERNEL_DROPS.set(drops)
            self._completeness.add_kernel_drops(time.time_ns() // 1_000_000, drops - self._kernel_drops_seen)
            self._kernel_drops_seen = drops

    def _export_state(self) -> None:
        """The template store's size and evictions (as deltas) into the metrics."""
        store = self._templates
        for reason, n in store.templates_evicted.items():
            TEMPLATES_EVICTED.labels(reason).inc(n)
        for kind, n in store.evicted.items():
            STATE_EVICTED.labels(kind).inc(n)
        store.templates_evicted.clear()
        store.evicted.clear()
        STATE.labels("templates").set(len(store))
        STATE.labels("template_fields").set(store.template_fields())
        STATE.labels("domains").set(store.domain_count())
        STATE.labels("exporters").set(store.exporter_count())
        STATE.labels("completeness_rows").set(len(self._completeness))
        STATE.labels("pending_set_bytes").set(store.pending_bytes())
        DECODE_BACKLOG.set(self._backlog)

    def _flush(self, exporter: bytes) -> None:
        """Decode all of one exporter's pending datagrams now (at stop)."""
        pending = self._pending.pop(exporter, None)
        self._ready.pop(exporter, None)
        if pending is None or not pending.payloads:
            return
        self._backlog -= pending.bytes
        self._decode(exporter, pending)

    def _decode(self, exporter: bytes, pending: _Pending) -> None:
        """Decode, count and publish one batch of an exporter's datagrams."""
        payloads, received = pending.payloads, pending.received
        stats = DecodeStats()
        table = decode_payloads(exporter, payloads, received, self._templates, stats)
        if self._settings.observer:
            table = with_observer(table, self._settings.observer)
        label = self._label(exporter)
        counts = stats.by_exporter().get(address_text(exporter)) or ExporterStats()
        lengths = _joined(pending.lengths)
        _export(label, counts, int(lengths.sum()))
        if self._completeness_topic:
            domains = domains_many(np.concatenate(pending.heads), lengths)
            self._account(exporter, lengths, domains, received, pending.wakeups, counts)
            self._account_rows(exporter, table, "records")
        if table.num_rows:
            held = self._decoded.get(exporter)
            if held is None:
                held = self._decoded[exporter] = _Decoded(time.monotonic())
            held.tables.append(table)
            held.rows += table.num_rows
            self._held_rows += table.num_rows
        # Published once the exporter's backlog is decoded (the usual case: one turn takes a
        # whole batch) or a batch's worth is held: a turn's slice of a backlog is not a message
        # of its own (under fuzz, per-turn messages outran what the producer could send).
        held = self._decoded.get(exporter)
        if held is not None and (exporter not in self._pending or held.rows >= self._settings.batch_max_flows
                                 or self._held_rows > 4 * self._settings.batch_max_flows):
            self._publish(exporter)

    def _publish(self, exporter: bytes) -> None:
        """Encode the exporter's decoded rows and offer them to the publisher (what it cannot
        take is counted as dropped_backpressure)."""
        held = self._decoded.pop(exporter, None)
        if held is None:
            return
        self._held_rows -= held.rows
        table = held.tables[0] if len(held.tables) == 1 else \
            pa.concat_tables(held.tables).unify_dictionaries().combine_chunks()
        offset = 0
        key = address_text(exporter).encode()  # the partition key: the address, never "other"
        for message in encode_messages(table, key, self._settings.kafka.max_message_bytes,
                                       compression=self._settings.compression):
            if not self._publisher.offer(message) and self._completeness_topic:
                self._account_rows(exporter, table.slice(offset, message.flows), "dropped_backpressure")
            offset += message.flows

    def _account(self, exporter: bytes, lengths: np.ndarray, domains: np.ndarray, received: list[int],
                 wakeups: list[int], counts: ExporterStats) -> None:
        """Add a decoded batch to the completeness counts: packets and bytes per (minute,
        domain) with numpy over the batch (usually one pair), not datagram by datagram; the
        datagrams' ``lengths`` and observation ``domains`` (from the receiver's header bytes), ``received``
        their receive times and ``wakeups`` the distinct ones."""
        if not len(lengths):
            return
        acc = self._completeness
        # The receive times are a few distinct values (one per wakeup): their extremes decide the
        # usual one-minute case without an array of them (the clock may step back: not first/last).
        if min(wakeups) // 60_000 == max(wakeups) // 60_000 and (domains == domains[0]).all():
            groups = [(received[0], int(domains[0]), len(lengths), int(lengths.sum()))]
        else:
            ms = np.asarray(received, dtype=np.int64)
            keys = (ms // 60_000) << 32 | domains.astype(np.int64)
            uniq, index = np.unique(keys, return_inverse=True)
            packets = np.bincount(index).tolist()
            sizes = np.bincount(index, weights=lengths).astype(np.int64).tolist()
            groups = [((int(k) >> 32) * 60_000, int(k) & 0xFFFFFFFF, p, b)
                      for k, p, b in zip(uniq.tolist(), packets, sizes, strict=True)]
        for minute, domain, packets_n, size in groups:
            row = acc.counts(minute, exporter, domain)
            row.packets += packets_n
            row.bytes += size
        errors = sum(counts.errors.values())
        lost = _sequence_lost(counts)
        if errors or lost:  # in the minute and domain of the batch's first datagram
            row = acc.counts(received[0], exporter, int(domains[0]))
            row.decode_errors += errors
            row.sequence_lost += lost

    def _account_rows(self, exporter: bytes, table: pa.Table, counter: str) -> None:
        """Count decoded flows (``records``, or ``dropped_backpressure`` for those Kafka did not
        take) in the minute and domain they were received in."""
        if not table.num_rows:
            return
        # Views of the decoder's single-chunk columns (no copy), not pyarrow.compute: importing
        # it for these two min/max cost the sensor ~9 MB resident.
        received = table.column("time_received").to_numpy().view(np.int64)  # UTC ms
        domain = table.column("observation_domain").to_numpy()
        # The usual case (one minute, one domain) from min/max: no division over every row.
        first, last = int(received.min()), int(received.max())
        low, high = int(domain.min()), int(domain.max())
        if first // 60_000 == last // 60_000 and low == high:
            groups = [(first - first % 60_000, low, table.num_rows)]
        else:
            groups = list(group_counts(received, domain))
        for minute, domain, n in groups:
            row = self._completeness.counts(minute, exporter, domain)
            setattr(row, counter, getattr(row, counter) + n)

    def _publish_completeness(self, before_ms: int | None) -> None:
        """Publish the rows of the minutes before ``before_ms`` (all if None): once per minute
        boundary (each take builds a table even when nothing is due; a row that comes for a
        minute already closed waits for the next boundary)."""
        if before_ms is not None:
            if before_ms <= self._closed_before:
                return
            self._closed_before = before_ms
        if self._completeness_topic is None or not len(self._completeness):
            return
        table = self._completeness.take(before_ms)
        if table.num_rows:
            key = (self._settings.observer or os.uname().nodename).encode()
            for message in encode_messages(table, key, self._settings.kafka.max_message_bytes,
                                           schema_name=COMPLETENESS_SCHEMA, topic=self._completeness_topic):
                self._publisher.offer(message)


def _joined(chunks: list[np.ndarray]) -> np.ndarray:
    """The receiver's per-call chunks of lengths as one array."""
    if len(chunks) == 1:
        return chunks[0]
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int64)


def _warm_up() -> None:
    """Build one raw table before receiving: the first timestamp conversion has pyarrow look for
    pandas (importing it, about a CPU-second, where :data:`MEMORY` did not keep it out),
    which would otherwise stall the first batch's datagrams."""
    build_raw_table({"bytes": np.zeros(1, dtype=np.uint64), "end": np.zeros(1, dtype=np.int64)})


def _count(counts: ExporterStats, name: str) -> int:
    """A counter of ExporterStats, 0 if this decoder version does not keep it."""
    value = getattr(counts, name, 0)
    return value if isinstance(value, int) else 0


def _sequence_lost(counts: ExporterStats) -> int:
    """Net units lost according to the sequence numbers in one decoded batch (lost minus late,
    never below 0: a late datagram decoded in a later batch makes this an over-count)."""
    lost = _count(counts, "lost_packets") + _count(counts, "lost_records")
    late = _count(counts, "late_packets") + _count(counts, "late_records")
    return max(0, lost - late)


#: ExporterStats counters that have a metric of their own above (the rest go to COUNTERS).
_DEDICATED = {"packets", "records", "templates", "sequence_gaps", "lost_packets", "lost_records",
              "late_packets", "late_records", "sequence_resets"}
COUNTERS = Counter("flowtally_sensor_netflow_decoder_total", "Other decoder counters by name (see "
                   "ExporterStats): options_records, pending_sets, reordered, enterprise_fields, "
                   "reverse_records, ...", ["exporter", "counter"])


def _export(label: str, counts: ExporterStats, payload_bytes: int) -> None:
    """Move one decode call's counters into the Prometheus metrics: every ExporterStats counter
    (:meth:`~sensors.netflow.decoder.ExporterStats.counters`) and every error reason."""
    values = counts.counters()
    PACKETS.labels(label).inc(values["packets"])
    PAYLOAD_BYTES.labels(label).inc(payload_bytes)
    FLOWS.labels(label).inc(values["records"])
    TEMPLATES.labels(label).inc(values["templates"])
    for reason, n in counts.errors.items():
        ERRORS.labels(label, reason).inc(n)
    if values["sequence_gaps"]:
        SEQUENCE_GAPS.labels(label).inc(values["sequence_gaps"])
    for unit in ("packets", "records"):
        if values[f"lost_{unit}"]:
            SEQUENCE_LOST.labels(label, unit).inc(values[f"lost_{unit}"])
        if values[f"late_{unit}"]:
            SEQUENCE_LATE.labels(label, unit).inc(values[f"late_{unit}"])
    if values["sequence_resets"]:
        SEQUENCE_RESETS.labels(label).inc(values["sequence_resets"])
    for name, n in values.items():
        if n and name not in _DEDICATED:
            COUNTERS.labels(label, name).inc(n)


class WorkerProcesses:
    """Workers 1..N-1 as child processes on the same port (SO_REUSEPORT); a lifecycle component."""

    name = "netflow-workers"

    def __init__(self, settings: NetflowSettings, port: int, stop_timeout: float) -> None:
        self._settings = settings
        self._port = port
        self._stop_timeout = stop_timeout
        self._children: list[subprocess.Popen[bytes]] = []
        self._watch: asyncio.Task[None] | None = None

    async def start(self) -> None:
        host, _ = self._settings.listen_address()
        mhost, mport = parse_hostport(self._settings.metrics_listen, what="metrics listen address")
        for i in range(1, self._settings.workers):
            env = os.environ | {
                "FLOWTALLY_WORKERS": "1",
                "FLOWTALLY_REUSE_PORT": "true",
                "FLOWTALLY_LISTEN": f"[{host}]:{self._port}" if ":" in host else f"{host}:{self._port}",
                "FLOWTALLY_METRICS_LISTEN": f"[{mhost}]:{mport and mport + i}" if ":" in mhost
                else f"{mhost}:{mport and mport + i}",
            }
            self._children.append(subprocess.Popen(
                [sys.executable, "-m", "flowtally.cli", "sensor", "netflow"], env=env))
        self._watch = asyncio.create_task(self._watch_children())

    async def _watch_children(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            for child in self._children:
                if child.poll() is not None:
                    raise RuntimeError(f"worker process {child.pid} exited with {child.returncode}")

    async def wait(self) -> None:
        assert self._watch is not None
        await self._watch

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
        for child in self._children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self._stop_timeout
        for child in self._children:
            while child.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if child.poll() is None:
                child.kill()
                child.wait()
        self._children.clear()


def run(args: argparse.Namespace) -> int:
    """`flowtally sensor netflow`."""
    settings = load_settings(
        NetflowSettings, args.config, listen=args.listen, metrics_listen=args.metrics_listen
    )
    if not settings.allow_exporters:
        log.warning("allow_exporters is empty: datagrams from any source are decoded; on an exposed "
                    "address set FLOWTALLY_ALLOW_EXPORTERS to your exporters' CIDRs")
    apply_memory_policy(MEMORY)
    return asyncio.run(_main(settings))


#: Process-wide settings for a long-running sensor (measured with bench_sensor, v9, 1 M flows).
#:
#: Arrow's default pool (mimalloc) gives the pages of freed buffers back to the kernel between
#: two batches, so every batch's encoding faults fresh (huge) pages in again: 55 k minor faults
#: and 0.30 system CPU-s per million flows. The system allocator keeps them: 10 k faults and
#: 0.09 CPU-s.
#:
#: glibc's malloc serves blocks above a (dynamic) threshold with their own mmap and gives the top
#: of the heap back beyond another: a batch's buffers (hundreds of KB to a few MB, allocated and
#: freed every batch) would be faulted in afresh each time. Both thresholds are raised, so
#: freed memory is reused; the heap keeps the peak of what the sensor held (bounded by its
#: queue and batch sizes).
#:
#: pandas is kept out (every policy does): pyarrow imported it on the first batch's timestamps,
#: ~40 MB resident and about a CPU-second at start for nothing.
#:
#: What start-up created (modules, settings, metrics) lives as long as the process: frozen out
#: of the cyclic garbage collector's reach, so the collections the receive path triggers do not
#: walk it again and again.
MEMORY = MemoryPolicy(mmap_threshold=32 << 20, trim_threshold=256 << 20, freeze_gc=True)


async def _main(settings: NetflowSettings) -> int:
    async def prepare() -> None:
        await kafka.ensure_topics(settings.kafka, settings.topics, timeout=5.0)

    publisher = Publisher(lambda: kafka.producer(settings.kafka), settings.kafka.topic("raw"),
                          settings.max_queued_batches, max_in_flight=settings.max_in_flight,
                          drain_timeout_s=settings.drain_timeout_s, prepare=prepare)
    receiver = NetflowReceiver(settings, publisher, completeness_topic=settings.kafka.topic("completeness"))

    def health() -> tuple[bool, str]:
        return (True, "ok") if publisher.healthy else (False, "cannot publish to Kafka")

    metrics = MetricsServer(settings.metrics_listen, health, kafka=settings.kafka)
    components: list[object] = [metrics, publisher, receiver]
    if settings.workers > 1:
        components.append(_LateWorkers(settings, receiver))
    return await run_components(components)  # type: ignore[arg-type]


class _LateWorkers(WorkerProcesses):
    """Starts the other workers once worker 0 has bound (so port 0 resolves to one port)."""

    def __init__(self, settings: NetflowSettings, receiver: NetflowReceiver) -> None:
        super().__init__(settings, 0, stop_timeout=settings.drain_timeout_s + 5)
        self._receiver = receiver

    async def start(self) -> None:
        assert self._receiver.bound is not None
        self._port = self._receiver.bound[1]
        await super().start()
