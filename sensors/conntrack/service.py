"""`flowtally sensor conntrack`: the node's conntrack table as raw.v1 flow batches.

One asyncio loop reads the NEW/DESTROY event socket and, every ``dump_interval_s`` (and at once
after an overrun), a full dump of the table; both feed one :class:`~sensors.conntrack.tracker.Tracker`
whose deltas become raw.v1 records (:mod:`sensors.conntrack.records`), published in batches to
``<prefix>.flows.raw`` with the sensors' shared :class:`~sensors.publisher.Publisher` (keyed by
the node name), or printed as JSON lines with ``--stdout``.

Completeness rows (stage ``sensor-conntrack``, exporter = the ``exporter`` setting or ``::``,
domain 0): ``packets``/``bytes`` = netlink messages (events and dump rows) and their bytes,
``records`` = raw records made, ``dropped_backpressure`` = records Kafka did not take,
``kernel_drops`` = event socket overruns (ENOBUFS; the kernel does not say how many events).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import sys
import time
from typing import Any, TextIO

import numpy as np
from prometheus_client import Counter, Gauge

from flowtally import kafka
from flowtally.lifecycle import run_components
from flowtally.metrics import MetricsServer
from flowtally.process import MemoryPolicy
from flowtally.process import apply as apply_memory_policy
from flowtally.settings import load_settings
from sensors.completeness import SCHEMA_NAME as COMPLETENESS_SCHEMA
from sensors.completeness import CompletenessAccumulator
from sensors.conntrack import kernel
from sensors.conntrack.filters import Filter, make_filter, resolve_endpoints
from sensors.conntrack.messages import Rows, decode
from sensors.conntrack.netlink import EVENT_SLOTS, DumpSocket, EventSocket
from sensors.conntrack.records import build_columns
from sensors.conntrack.settings import ConntrackSettings
from sensors.conntrack.tracker import Counters, Deltas, Tracker
from sensors.publisher import Publisher, encode_messages
from sensors.schema import address16, address_text, build_raw_table

log = logging.getLogger(__name__)

_P = "flowtally_sensor_conntrack_"
EVENTS = Counter(_P + "events_total", "ctnetlink events received", ["type"])
EVENTS_NEW = EVENTS.labels("new")
EVENTS_DESTROY = EVENTS.labels("destroy")
DUMPS = Counter(_P + "dumps_total", "Full table dumps", ["result"])
DUMP_ENTRIES = Counter(_P + "dump_entries_total", "Connections listed by dumps")
DUMP_SECONDS = Gauge(_P + "dump_duration_seconds", "Duration of the last full dump")
OVERRUNS = Counter(_P + "overruns_total", "Event socket overruns (ENOBUFS): NEW events lost, resync dump")
TRACKED = Gauge(_P + "tracked_connections", "Connections whose last reported counters are kept")
TOMBSTONES = Gauge(_P + "tombstones", "Ended connections remembered so a late dump row cannot count twice")
LOST = Counter(_P + "lost_connections_total", "Connections gone from the table whose DESTROY never came")
RECORDS = Counter(_P + "delta_records_total", "Raw records made (one per direction with a delta)")
REPORTED_BYTES = Counter(_P + "reported_bytes_total", "Bytes in the records made")
REPORTED_PACKETS = Counter(_P + "reported_packets_total", "Packets in the records made")
FILTERED = Counter(_P + "filtered_total", "Snapshots skipped by a filter", ["reason"])
DECODE_SKIPPED = Counter(_P + "skipped_messages_total", "Netlink messages not understood")
TABLE_ENTRIES = Gauge(_P + "table_entries", "Entries in the conntrack table (nf_conntrack_count)")
TABLE_MAX = Gauge(_P + "table_max", "Size limit of the conntrack table (nf_conntrack_max)")
TABLE_FILL = Gauge(_P + "table_fill_ratio", "table_entries / table_max")

# Datagrams read per wakeup: enough that one decode pass over them pays (an event is a datagram
# of its own, up to netlink.EVENT_SLOTS are read at once; a dump chunk holds ~200 rows), few
# enough that dumps and timers get their turn under a flood.
_DUMP_DATAGRAMS = 32
_EVENT_PAUSE_S = 0.02  # after a read that emptied the event socket
_MIN_RESYNC_GAP_S = 0.5  # between an overrun's resync dump and the previous dump's end


class ConntrackSensor:
    """Event socket, periodic dumps, tracker, batching (a lifecycle component)."""

    name = "conntrack-sensor"

    def __init__(self, settings: ConntrackSettings, publisher: Publisher | None, *,
                 out: TextIO | None = None, completeness_topic: str | None = None) -> None:
        self._settings = settings
        self._publisher = publisher
        self._out = out
        self._tracker = Tracker(tombstone_s=settings.tombstone_s, lost_after_s=settings.lost_after_s)
        own_kafka = settings.ignore_kafka and not settings.stdout
        endpoints = resolve_endpoints(settings.kafka.bootstrap) if own_kafka else []
        self._skip: Filter = make_filter(loopback=settings.ignore_loopback, endpoints=endpoints,
                                         cidrs=settings.ignore_cidrs, ports=settings.ignore_ports)
        self._exporter = address16(settings.exporter) if settings.exporter else b"\x00" * 16
        # Rows that reported and their deltas, not yet published: records are made per batch
        # (numpy's per-call cost is then spread over thousands of rows).
        self._pending: list[tuple[Rows, list[Counters]]] = []
        self._pending_rows = 0
        self._pending_since = 0.0
        self._events: EventSocket | None = None
        self._resume: asyncio.TimerHandle | None = None  # event socket watched again then
        self._task: asyncio.Task[None] | None = None
        self._resync = asyncio.Event()
        self._seq = 0
        self._completeness = CompletenessAccumulator(settings.observer, stage="sensor-conntrack")
        self._completeness_topic = completeness_topic if settings.completeness else None
        self.ready = False

    async def start(self) -> None:
        changed = kernel.ensure_sysctls(self._settings.enable_sysctls)
        if changed:
            log.info("enabled %s", ", ".join(changed))
        build_raw_table(build_columns(Rows.empty(), Deltas([], []), 0))  # warm up pyarrow and numpy
        self._events = EventSocket(self._settings.receive_buffer_bytes)
        log.info("listening for conntrack events (receive buffer %d bytes), dump every %.1fs",
                 self._events.receive_buffer, self._settings.dump_interval_s)
        asyncio.get_running_loop().add_reader(self._events.fileno(), self._on_events)
        self._task = asyncio.create_task(self._run())

    async def wait(self) -> None:
        assert self._task is not None
        await self._task

    async def stop(self) -> None:
        """Stop dumping, take the events already queued, report every live connection's last
        delta with a final dump, hand every record over."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._events is not None:
            if self._resume is not None:
                self._resume.cancel()
                self._resume = None
            asyncio.get_running_loop().remove_reader(self._events.fileno())
            self._drain_events()
            try:
                await asyncio.wait_for(self._dump(baseline=False), self._settings.drain_timeout_s)
            except Exception as exc:  # the records so far still go out
                log.warning("final dump failed: %s", exc)
            self._drain_events()
            self._events.close()
            self._events = None
        self._flush()
        self._publish_completeness(None)
        self._gauges()

    # -- reading ---------------------------------------------------------------------------

    def _drain_events(self) -> None:
        """Take every event queued (bounded: the kernel may keep sending)."""
        for _ in range(10_000):
            if self._read_events() < EVENT_SLOTS:
                break

    def _on_events(self) -> None:
        """The event socket is readable. Unless a full read's worth was waiting, stop watching
        it for a moment: events then come in batches of hundreds, whose decoding costs a
        fraction per event of a handful's (the receive buffer holds far more than a pause's
        worth)."""
        if self._read_events() < EVENT_SLOTS and self._events is not None:
            loop = asyncio.get_running_loop()
            loop.remove_reader(self._events.fileno())
            self._resume = loop.call_later(_EVENT_PAUSE_S, self._watch_events)

    def _watch_events(self) -> None:
        self._resume = None
        if self._events is not None:
            asyncio.get_running_loop().add_reader(self._events.fileno(), self._on_events)

    def _read_events(self) -> int:
        """Read, decode and take the events waiting (up to EVENT_SLOTS); how many were read."""
        if self._events is None:
            return 0
        data, starts, ends, overrun = self._events.read()
        if overrun:
            OVERRUNS.inc()
            self._completeness.add_kernel_drops(time.time_ns() // 1_000_000, 1)
            log.warning("conntrack event socket overrun (ENOBUFS): resynchronising with a dump")
            self._resync.set()
        if not len(ends):
            return 0
        batch = decode(data, ends, starts=starts)
        if batch.skipped:
            DECODE_SKIPPED.inc(batch.skipped)
        if batch.news:
            EVENTS_NEW.inc(batch.news)
        if batch.destroys:
            EVENTS_DESTROY.inc(batch.destroys)
        self._take(batch.rows, batch.messages, int((ends - starts).sum()))
        return len(ends)

    def _take(self, rows: Rows, messages: int, nbytes: int) -> None:
        """Filter, track and queue the records of one wakeup's rows (``messages`` conntrack
        messages of ``nbytes`` bytes were read, NEW events included)."""
        if not messages:
            return
        now_ms = time.time_ns() // 1_000_000
        row = self._completeness.counts(now_ms, self._exporter, 0)
        row.packets += messages
        row.bytes += nbytes
        if not len(rows):
            return
        keep, skipped = self._skip(rows)
        if skipped:
            for reason, count in skipped.items():
                FILTERED.labels(reason).inc(count)
            rows = rows.take(keep)
        deltas = self._tracker.update(rows, time.monotonic())
        if deltas.positions:
            if not self._pending:
                self._pending_since = time.monotonic()
            reported = rows if len(deltas.positions) == len(rows) else rows.take(np.array(deltas.positions))
            self._pending.append((reported, deltas.counters))
            self._pending_rows += len(reported)
            if self._pending_rows >= self._settings.batch_max_flows:
                self._flush()

    async def _dump(self, baseline: bool) -> None:
        """One full dump of the table through the tracker."""
        loop = asyncio.get_running_loop()
        self._seq += 1
        t0 = time.monotonic()
        sock = DumpSocket(self._seq)
        done: asyncio.Future[bool] = loop.create_future()

        def on_readable() -> None:
            data, ends = sock.read(_DUMP_DATAGRAMS)
            if not ends:
                return
            batch = decode(data, ends, dump=True)
            if batch.skipped:
                DECODE_SKIPPED.inc(batch.skipped)
            DUMP_ENTRIES.inc(batch.messages)
            self._take(batch.rows, batch.messages, len(data))
            if done.done():
                return
            if batch.errors:
                log.warning("conntrack dump failed: errno %d", batch.last_error)
                done.set_result(False)
            elif batch.done:
                done.set_result(not batch.interrupted)

        self._tracker.begin_dump(time.monotonic(), baseline=baseline)
        complete = False
        loop.add_reader(sock.fileno(), on_readable)
        try:
            complete = await done
        finally:
            loop.remove_reader(sock.fileno())
            sock.close()
            lost = self._tracker.lost
            self._tracker.end_dump(time.monotonic(), complete)
            if self._tracker.lost > lost:
                LOST.inc(self._tracker.lost - lost)
                log.warning("%d connections left the table without a DESTROY event",
                            self._tracker.lost - lost)
        DUMPS.labels("complete" if complete else "incomplete").inc()
        DUMP_SECONDS.set(time.monotonic() - t0)

    async def _run(self) -> None:
        settings = self._settings
        tick = min(settings.batch_max_age_ms / 4000, 1.0)
        baseline = settings.baseline_first_dump
        while True:
            await self._dump(baseline=baseline)
            baseline = False
            self.ready = True
            self._gauges()
            ended = time.monotonic()
            deadline = ended + settings.dump_interval_s
            while True:
                now = time.monotonic()
                if now >= deadline or (self._resync.is_set() and now - ended >= _MIN_RESYNC_GAP_S):
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._resync.wait(), min(tick, deadline - now))
                if self._resync.is_set() and time.monotonic() - ended < _MIN_RESYNC_GAP_S:
                    await asyncio.sleep(_MIN_RESYNC_GAP_S - (time.monotonic() - ended))
                self._housekeeping()
            self._resync.clear()

    def _housekeeping(self) -> None:
        if self._pending and time.monotonic() - self._pending_since >= self._settings.batch_max_age_ms / 1000:
            self._flush()
        now_ms = time.time_ns() // 1_000_000
        grace_ms = self._settings.batch_max_age_ms + 2000
        self._publish_completeness(now_ms - grace_ms - (now_ms - grace_ms) % 60_000)
        self._gauges()

    def _gauges(self) -> None:
        TRACKED.set(len(self._tracker.live))
        TOMBSTONES.set(len(self._tracker.tombstones))
        with contextlib.suppress(OSError, ValueError):
            size = kernel.table_size()
            TABLE_ENTRIES.set(size.count)
            TABLE_MAX.set(size.max)
            TABLE_FILL.set(size.count / size.max if size.max else 0)

    # -- output ------------------------------------------------------------------------------

    def _flush(self) -> None:
        parts, self._pending, self._pending_rows = self._pending, [], 0
        if not parts:
            return
        now_ms = time.time_ns() // 1_000_000
        rows = Rows.concat([p[0] for p in parts])
        counters = [c for p in parts for c in p[1]]
        everything = Deltas(list(range(len(rows))), counters)
        columns = build_columns(rows, everything, now_ms, exporter=self._exporter)
        n = len(columns["src_port"])
        RECORDS.inc(n)
        REPORTED_BYTES.inc(int(columns["bytes"].sum()))
        REPORTED_PACKETS.inc(int(columns["packets"].sum()))
        self._completeness.counts(now_ms, self._exporter, 0).records += n
        if self._out is not None:
            _write_json_lines(self._out, columns, self._settings.observer)
            return
        assert self._publisher is not None
        table = build_raw_table(columns, observer=self._settings.observer)
        key = self._settings.observer.encode()
        for message in encode_messages(table, key, self._settings.kafka.max_message_bytes,
                                       compression=self._settings.compression):
            if not self._publisher.offer(message):
                self._completeness.counts(now_ms, self._exporter, 0).dropped_backpressure += message.flows

    def _publish_completeness(self, before_ms: int | None) -> None:
        if self._completeness_topic is None or self._publisher is None or not len(self._completeness):
            return
        table = self._completeness.take(before_ms)
        if table.num_rows:
            for message in encode_messages(table, self._settings.observer.encode(),
                                           self._settings.kafka.max_message_bytes,
                                           schema_name=COMPLETENESS_SCHEMA, topic=self._completeness_topic):
                self._publisher.offer(message)


def _write_json_lines(out: TextIO, columns: dict[str, Any], observer: str) -> None:
    """One JSON object per record (addresses as text, times as ms since the epoch)."""
    n = len(columns["src_port"])
    names = [k for k in columns if k not in ("exporter", "src_addr", "dst_addr", "nat_addr")]
    lists = {k: (columns[k] if isinstance(columns[k], list) else columns[k].tolist()) for k in names}
    addresses = {k: [bytes(a) for a in columns[k]] for k in ("exporter", "src_addr", "dst_addr", "nat_addr")}
    lines = []
    for i in range(n):
        record: dict[str, Any] = {"observer": observer}
        for k in names:
            record[k] = lists[k][i]
        for k, values in addresses.items():
            address = values[i]
            record[k] = "" if k in ("exporter", "nat_addr") and not any(address) else address_text(address)
        lines.append(json.dumps(record, separators=(",", ":")))
    out.write("\n".join(lines) + "\n")
    out.flush()


def run(args: argparse.Namespace) -> int:
    """`flowtally sensor conntrack`."""
    settings = load_settings(ConntrackSettings, args.config, metrics_listen=args.metrics_listen,
                             stdout=True if args.stdout else None)
    apply_memory_policy(MEMORY)
    return asyncio.run(_main(settings))


#: Garbage collection for the sensor's process: the tracker keeps up to millions of small objects
#: alive and every wakeup allocates per row, so the collector's passes would walk them all, and
#: everything imported by then, again and again. What exists at start is moved out of its sight,
#: and young collections run less often.
MEMORY = MemoryPolicy(freeze_gc=True, gc_thresholds=(50_000, 20, 20))


async def _main(settings: ConntrackSettings) -> int:
    publisher: Publisher | None = None
    if not settings.stdout:
        async def prepare() -> None:
            await kafka.ensure_topics(settings.kafka, settings.topics, timeout=5.0)

        publisher = Publisher(lambda: kafka.producer(settings.kafka), settings.kafka.topic("raw"),
                              settings.max_queued_batches, max_in_flight=settings.max_in_flight,
                              drain_timeout_s=settings.drain_timeout_s, prepare=prepare)
    sensor = ConntrackSensor(settings, publisher, out=sys.stdout if settings.stdout else None,
                             completeness_topic=settings.kafka.topic("completeness"))

    def health() -> tuple[bool, str]:
        if not sensor.ready:
            return False, "first dump not done"
        if publisher is not None and not publisher.healthy:
            return False, "cannot publish to Kafka"
        return True, "ok"

    metrics = MetricsServer(settings.metrics_listen, health,
                            kafka=settings.kafka if publisher is not None else None)
    components: list[object] = [metrics]
    if publisher is not None:
        components.append(publisher)
    components.append(sensor)
    return await run_components(components)  # type: ignore[arg-type]
