"""Hostile NetFlow traffic for sensor tests and benchmarks: a mutation engine and a multi-source sender.

:class:`Mutator` makes datagrams that lie in every field a collector trusts (seeded, so a run is
reproducible):

* header fields: version, record count (0, huge), sequence, unix seconds, sysUptime;
* lengths: v9 flowset length, IPFIX message and set length, below the minimum, past the end;
* templates: field counts beyond the datagram, zero or absurd field lengths, variable-length
  markers in v9, huge templates (thousands of fields), random template IDs (cache pressure);
* template collisions: the valid exporter's own template IDs (256, 257) and observation domain,
  redefined with other layouts from other source addresses (must never reach its templates);
* random observation domains on every datagram (v9 source ID, IPFIX domain, v5 engine);
* truncation at a random byte, random garbage, and well-formed v9 data with random domains
  (decodable flows that create state: templates, sequence trackers, completeness rows).

:func:`valid_stream` is the well-behaved exporter: v9 datagrams from
:func:`~flowtally.dev.generator.encode_packets` with the exact totals (flows, bytes, packets)
a test compares with what reached Kafka. :class:`MultiSender` interleaves many sources (each a
bound UDP socket: source address and port) at a target datagram rate.
"""

from __future__ import annotations

import random
import socket
import struct
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flowtally.dev.generator import encode_packets, synthetic_cluster, synthetic_flows

V9_HEADER = struct.Struct("!HHIIII")  # version, count, sysUptime, unix secs, sequence, source ID
IPFIX_HEADER = struct.Struct("!HHIII")  # version, length, export time, sequence, domain
V5_HEADER = struct.Struct("!HHIIIIBBH")
#: The valid stream's observation domain and template IDs: the collisions aim at them.
VALID_DOMAIN = 7
VALID_TEMPLATES = (256, 257)
_INTERESTING16 = (0, 1, 2, 3, 4, 255, 256, 257, 0x7FFF, 0x8000, 0xFFFE, 0xFFFF)
_INTERESTING32 = (0, 1, VALID_DOMAIN, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF)


@dataclass(frozen=True, slots=True)
class ValidStream:
    """The well-behaved exporter's datagrams and what they carry."""

    payloads: list[bytes]
    flows: int
    bytes: int
    packets: int


def valid_stream(flows: int, *, seed: int = 1, now_s: int | None = None) -> ValidStream:
    """``flows`` v9 flows of a synthetic cluster (domain :data:`VALID_DOMAIN`, templates 256/257
    every 10 datagrams), ending around ``now_s`` (default: now)."""
    now_s = int(time.time()) if now_s is None else now_s
    cluster = synthetic_cluster(seed)
    columns = synthetic_flows(cluster, flows, seed, now_s * 1000 - 2_000, span_ms=1_000)
    out = encode_packets(columns, source_id=VALID_DOMAIN, sequence=1, unix_secs=now_s,
                         uptime_ms=3_600_000, records_per_packet=30, template_every=10)
    return ValidStream(out.packets, int(out.records.sum()), int(out.bytes.sum()), int(out.pkts.sum()))


class Mutator:
    """Seeded hostile datagrams (see the module docstring); :meth:`next` returns one."""

    def __init__(self, seed: int, seeds: Sequence[bytes]) -> None:
        """``seeds``: well-formed datagrams to mutate (e.g. a :func:`valid_stream`'s)."""
        self.rng = random.Random(seed)
        self.seeds = [s for s in seeds if len(s) >= 24]
        self._kinds = (self.lying_header, self.lying_lengths, self.lying_template, self.huge_template,
                       self.template_collision, self.random_templates, self.random_domain,
                       self.truncated, self.garbage, self.lying_ipfix, self.lying_v5, self.bit_flips)

    def next(self) -> bytes:
        """One hostile datagram of a random kind."""
        return self.rng.choice(self._kinds)()

    # --- helpers ---------------------------------------------------------------------------

    def _seed(self) -> bytearray:
        return bytearray(self.rng.choice(self.seeds))

    def _u16(self) -> int:
        return self.rng.choice(_INTERESTING16) if self.rng.random() < 0.6 else self.rng.getrandbits(16)

    def _u32(self) -> int:
        return self.rng.choice(_INTERESTING32) if self.rng.random() < 0.3 else self.rng.getrandbits(32)

    def _v9(self, body: bytes, *, count: int | None = None, domain: int | None = None) -> bytes:
        rng = self.rng
        return V9_HEADER.pack(9, rng.getrandbits(16) if count is None else count, rng.getrandbits(32),
                              int(time.time()), rng.getrandbits(32),
                              rng.getrandbits(32) if domain is None else domain) + body

    def _template_set(self, template_id: int, fields: Sequence[tuple[int, int]]) -> bytes:
        record = struct.pack("!HH", template_id, len(fields)) + b"".join(struct.pack("!HH", *f) for f in fields)
        return struct.pack("!HH", 0, 4 + len(record)) + record

    # --- mutation kinds --------------------------------------------------------------------

    def lying_header(self) -> bytes:
        """A valid datagram whose version, count, times, sequence or domain lie."""
        data = self._seed()
        offset = self.rng.choice((0, 2, 4, 8, 12, 16))
        if offset in (0, 2):
            struct.pack_into("!H", data, offset, self._u16())
        else:
            struct.pack_into("!I", data, offset, self._u32())
        return bytes(data)

    def lying_lengths(self) -> bytes:
        """A flowset length below 4, past the end, or off by a few bytes."""
        data = self._seed()
        if len(data) > 24:
            pos = 20 + 2  # the first flowset's length
            struct.pack_into("!H", data, pos, self.rng.choice((0, 1, 3, 5, len(data), len(data) - 19, 0xFFFF)))
        return bytes(data)

    def lying_template(self) -> bytes:
        """Templates with field counts beyond the datagram, zero or absurd field lengths."""
        rng = self.rng
        fields = [(rng.getrandbits(16), rng.choice((0, 1, 3, 0xFFFF, 0x7FFF, rng.getrandbits(16))))
                  for _ in range(rng.randint(1, 20))]
        tset = bytearray(self._template_set(rng.choice((256, 257, rng.randint(256, 0xFFFF))), fields))
        if rng.random() < 0.5:
            struct.pack_into("!H", tset, 6, rng.choice((0, 0xFFFF, len(fields) + 100)))  # field count
        return self._v9(bytes(tset), domain=self._u32())

    def huge_template(self) -> bytes:
        """One well-formed template of thousands of 1-byte fields (cache bytes, not count)."""
        rng = self.rng
        n = rng.randint(1000, 2000)
        fields = [(rng.randint(1, 127), 1) for _ in range(n)]
        return self._v9(self._template_set(rng.randint(256, 0xFFFF), fields), count=1, domain=self._u32())

    def template_collision(self) -> bytes:
        """The valid exporter's template IDs and domain with another layout, then data for them."""
        rng = self.rng
        template_id = rng.choice(VALID_TEMPLATES)
        fields = [(1, 4), (2, 4), (8, 4)]
        body = self._template_set(template_id, fields)
        records = b"".join(struct.pack("!III", rng.getrandbits(32), 1, rng.getrandbits(32)) for _ in range(5))
        body += struct.pack("!HH", template_id, 4 + len(records)) + records
        return self._v9(body, count=6, domain=VALID_DOMAIN)

    def random_templates(self) -> bytes:
        """Well-formed templates with random IDs: pressure on the template cache's count."""
        rng = self.rng
        body = b"".join(self._template_set(rng.randint(256, 0xFFFF), [(1, 4), (2, 4), (8, 4), (12, 4)])
                        for _ in range(rng.randint(1, 8)))
        return self._v9(body, count=8, domain=self._u32() if rng.random() < 0.5 else VALID_DOMAIN)

    def random_domain(self) -> bytes:
        """A decodable datagram (template and data) with a random observation domain."""
        data = self._seed()
        struct.pack_into("!I", data, 16, self.rng.getrandbits(32))
        return bytes(data)

    def truncated(self) -> bytes:
        """A valid datagram cut at a random byte."""
        data = self._seed()
        return bytes(data[: self.rng.randint(0, len(data) - 1)])

    def garbage(self) -> bytes:
        """Random bytes, sometimes behind a plausible version number."""
        rng = self.rng
        body = rng.randbytes(rng.randint(0, 1400))
        return (struct.pack("!H", rng.choice((5, 9, 10))) + body) if rng.random() < 0.7 else body

    def lying_ipfix(self) -> bytes:
        """IPFIX messages whose message length, set lengths or set IDs lie, random domains."""
        rng = self.rng
        fields = b"".join(struct.pack("!HH", t, ln) for t, ln in ((8, 4), (12, 4), (1, 8), (82, 0xFFFF)))
        tset = struct.pack("!HHHH", 2, 8 + len(fields), rng.randint(256, 300), 4) + fields
        record = struct.pack("!IIQ", 1, 2, 3) + bytes([rng.choice((0, 5, 255))]) + rng.randbytes(rng.randint(0, 8))
        dset = struct.pack("!HH", rng.randint(256, 300), 4 + len(record) + rng.choice((0, 1, 7, 300))) + record
        body = tset + dset
        length = rng.choice((16 + len(body), 0, 15, 0xFFFF, 16 + len(body) + 9))
        return IPFIX_HEADER.pack(10, length, int(time.time()), rng.getrandbits(32), self._u32()) + body

    def lying_v5(self) -> bytes:
        """v5 headers whose count exceeds what follows, random engine IDs."""
        rng = self.rng
        count = rng.choice((0, 1, 30, 31, 0xFFFF))
        head = V5_HEADER.pack(5, count, rng.getrandbits(32), int(time.time()), 0, rng.getrandbits(32),
                              rng.getrandbits(8), rng.getrandbits(8), 0)
        return head + rng.randbytes(48 * rng.randint(0, 3))

    def bit_flips(self) -> bytes:
        """A valid datagram with a few random bytes overwritten."""
        data = self._seed()
        for _ in range(self.rng.randint(1, 8)):
            data[self.rng.randrange(len(data))] = self.rng.getrandbits(8)
        return bytes(data)


@dataclass(slots=True)
class SendStats:
    """What a :class:`MultiSender` sent."""

    valid: int = 0
    hostile: int = 0
    errors: int = 0


class MultiSender:
    """Interleaves the valid stream (one source) with hostile datagrams from several sources.

    ``sources``: (address, port) to bind the hostile sockets to (port 0: any); e.g. several
    loopback addresses (127.0.0.x) with a few ports each: distinct exporters, and several
    transport sessions of one exporter.
    """

    def __init__(self, target: tuple[str, int], sources: Sequence[tuple[str, int]], *, seed: int,
                 seeds: Sequence[bytes], valid_source: tuple[str, int] = ("127.0.0.1", 0),
                 pool: int = 0) -> None:
        """``pool`` > 0: mutate that many datagrams up front and cycle through them (the
        mutator costs ~40 us a datagram: at 10,000/s it would compete with the sensor)."""
        self.target = target
        self.mutator = Mutator(seed, seeds)
        self.pool = [self.mutator.next() for _ in range(pool)]
        self.sockets = [self._bound(s) for s in sources]
        self.valid_socket = self._bound(valid_source)
        self.stats = SendStats()

    @staticmethod
    def _bound(source: tuple[str, int]) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        sock.bind(source)
        return sock

    def close(self) -> None:
        """Close every socket."""
        for sock in (*self.sockets, self.valid_socket):
            sock.close()

    def _sendto(self, sock: socket.socket, payload: bytes) -> bool:
        try:
            sock.sendto(payload, self.target)
            return True
        except OSError:  # ENOBUFS / EAGAIN under load: counted, not sent
            self.stats.errors += 1
            return False

    def run(self, valid: Sequence[bytes], *, hostile_rate: float, valid_rate: float,
            duration_s: float | None = None) -> SendStats:
        """Send all of ``valid`` at ``valid_rate`` datagrams/s while sending hostile datagrams at
        ``hostile_rate`` round robin over the sources; with ``duration_s`` keep fuzzing that
        long even after the valid stream is done. Paced in 5 ms ticks."""
        tick = 0.005
        start = time.monotonic()
        end = start + duration_s if duration_s is not None else None
        next_valid = 0
        hostile_sent = 0
        i = 0
        while True:
            now = time.monotonic()
            elapsed = now - start
            if next_valid >= len(valid) and (end is None or now >= end):
                break
            due_valid = min(len(valid), int(elapsed * valid_rate) + 1)
            while next_valid < due_valid:
                if self._sendto(self.valid_socket, valid[next_valid]):
                    self.stats.valid += 1
                    next_valid += 1
                else:
                    break  # the kernel is full: retry on the next tick (the valid stream is exact)
            due_hostile = int(elapsed * hostile_rate)
            while hostile_sent < due_hostile:
                sock = self.sockets[i % len(self.sockets)]
                i += 1
                hostile_sent += 1
                payload = self.pool[hostile_sent % len(self.pool)] if self.pool else self.mutator.next()
                if self._sendto(sock, payload):
                    self.stats.hostile += 1
            time.sleep(max(0.0, tick - (time.monotonic() - now)))
        return self.stats


def loopback_sources(addresses: int, ports_each: int, first: int = 10) -> list[tuple[str, int]]:
    """``addresses`` loopback addresses (127.0.0.<first>...) times ``ports_each`` any-port sockets."""
    return [(f"127.0.0.{first + a}", 0) for a in range(addresses) for _ in range(ports_each)]


# --- a fuzz run against a real sensor process and a real broker ---------------------------------

@dataclass(slots=True)
class FuzzReport:
    """What :func:`run_fuzz` measured."""

    seconds: float
    hostile_sent: int
    send_errors: int
    valid: ValidStream
    valid_stored: tuple[int, int, int]  # (flows, bytes, packets) of the valid exporter read back from Kafka
    rss_before_kb: int
    rss_after_kb: int
    metrics_before: int
    metrics_after: int
    metrics: str  # /metrics at the end
    rss_samples_kb: list[int]  # VmRSS every half second while sending
    log_lines: list[str]  # the sensor's log lines written while fuzzed

    @property
    def rate(self) -> float:
        """Hostile datagrams sent per second."""
        return self.hostile_sent / self.seconds if self.seconds else 0.0

    def rss_at(self, fraction: float) -> int:
        """The RSS sample taken at ``fraction`` of the run (KiB)."""
        if not self.rss_samples_kb:
            return self.rss_before_kb
        return self.rss_samples_kb[min(len(self.rss_samples_kb) - 1, int(fraction * len(self.rss_samples_kb)))]

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        """A metric of the final scrape (summed over matching label sets)."""
        from flowtally.dev.localstack import scrape

        return scrape(self.metrics, name, labels)

    def errors_by_reason(self) -> dict[str, int]:
        """flowtally_sensor_netflow_decode_errors_total summed by reason."""
        return self.by_label("flowtally_sensor_netflow_decode_errors_total", "reason")

    def lines(self) -> list[str]:
        """A printable summary."""
        flows, size, packets = self.valid_stored
        return [
            f"fuzz: {self.hostile_sent} hostile datagrams in {self.seconds:.1f} s = {self.rate:,.0f}/s "
            f"({self.send_errors} not sent by the kernel)",
            f"valid exporter: sent {self.valid.flows} flows / {self.valid.bytes} bytes / {self.valid.packets} "
            f"packets; stored in Kafka {flows} / {size} / {packets}",
            f"sensor RSS: {self.rss_before_kb / 1024:.1f} MiB before, {self.rss_after_kb / 1024:.1f} MiB after "
            f"(at 1/4, 1/2, 3/4 of the run {self.rss_at(0.25) / 1024:.1f}, {self.rss_at(0.5) / 1024:.1f}, "
            f"{self.rss_at(0.75) / 1024:.1f}; peak {max(self.rss_samples_kb, default=0) / 1024:.1f})",
            f"/metrics: {self.metrics_before} bytes before, {self.metrics_after} bytes after",
            f"decode errors by reason: {self.errors_by_reason()}",
            f"sensor log: {len(self.log_lines)} lines while fuzzed",
            f"kernel drops: {self.metric('flowtally_sensor_netflow_kernel_drops'):.0f}; flows dropped: "
            f"{self.metric('flowtally_sensor_flows_dropped_total'):.0f}; templates evicted: "
            f"{self.metric('flowtally_sensor_netflow_templates_evicted_total'):.0f}; state evicted: "
            f"{self.metric('flowtally_sensor_netflow_state_evicted_total'):.0f}",
            f"state at the end: {self.by_label('flowtally_sensor_netflow_state', 'kind')}, decode backlog "
            f"{self.metric('flowtally_sensor_netflow_decode_backlog_bytes'):.0f} bytes",
            f"flows published: {self.metric('flowtally_sensor_flows_published_total'):.0f} in "
            f"{self.metric('flowtally_sensor_batches_published_total'):.0f} messages; dropped by reason: "
            f"{self.by_label('flowtally_sensor_flows_dropped_total', 'reason')}",
        ]

    def by_label(self, metric: str, label: str) -> dict[str, int]:
        """A metric of the final scrape summed by one label."""
        out: dict[str, int] = {}
        for line in self.metrics.splitlines():
            if line.startswith(metric + "{") and f'{label}="' in line:
                labels, value = line.rsplit(" ", 1)
                key = labels.split(f'{label}="', 1)[1].split('"', 1)[0]
                out[key] = out.get(key, 0) + int(float(value))
        return dict(sorted(out.items()))


def rss_kb(pid: int) -> int:
    """VmRSS of a process, in KiB (from /proc/<pid>/status)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def read_exporter_totals(bootstrap: str, topic: str, exporter: bytes, want_flows: int,
                         timeout: float) -> tuple[int, int, int]:
    """(flows, bytes, packets) of ``exporter``'s rows in the raw ``topic``, read from the start
    until ``want_flows`` were seen, or time is up (and then a little longer, to see extras)."""
    import asyncio
    import uuid

    import pyarrow as pa

    from flowtally import kafka
    from flowtally.settings import KafkaSettings

    settings = KafkaSettings(bootstrap=bootstrap)
    target = np.frombuffer(exporter, dtype=np.uint8)

    async def read() -> tuple[int, int, int]:
        consumer = kafka.consumer(settings, topic, group_id=f"fuzz-reader-{uuid.uuid4().hex[:8]}")
        await consumer.start()
        flows = size = packets = 0
        try:
            deadline = time.monotonic() + timeout
            settle: float | None = None
            while time.monotonic() < deadline and (settle is None or time.monotonic() < settle):
                for messages in (await consumer.getmany(timeout_ms=500)).values():
                    for m in messages:
                        assert m.value is not None
                        table = pa.ipc.open_stream(m.value).read_all()
                        column = table.column("exporter").combine_chunks()
                        rows = np.frombuffer(column.buffers()[1], dtype=np.uint8)[
                            column.offset * 16 : (column.offset + len(column)) * 16].reshape(-1, 16)
                        mine = (rows == target).all(axis=1)
                        if mine.any():
                            flows += int(mine.sum())
                            size += int(table.column("bytes").to_numpy()[mine].sum())
                            packets += int(table.column("packets").to_numpy()[mine].sum())
                if flows >= want_flows and settle is None:
                    settle = time.monotonic() + 2.0  # doubles would come right behind
        finally:
            await consumer.stop()
        return flows, size, packets

    return asyncio.run(read())


def run_fuzz(bootstrap: str, workdir: Path, *, hostile_rate: float, seconds: float, valid_flows: int,
             addresses: int = 6, ports_each: int = 3, seed: int = 1, pool: int = 0,
             env: dict[str, str] | None = None) -> FuzzReport:
    """Start a sensor (`flowtally sensor netflow`) publishing to ``bootstrap``, fuzz it from
    ``addresses`` x ``ports_each`` sources for ``seconds`` while a valid exporter (127.0.0.1)
    sends ``valid_flows`` flows spread over the same time, and read the valid exporter's
    flows back from the raw topic."""
    from flowtally.dev.localstack import Stage, free_port
    from flowtally.settings import KafkaSettings
    from sensors.schema import address16

    prefix = f"fuzz{uuid_hex()}"
    metrics_port = free_port()
    udp = free_port(socket.SOCK_DGRAM)
    stage = Stage("sensor", ["sensor", "netflow", "--listen", f"127.0.0.1:{udp}",
                             "--metrics-listen", f"127.0.0.1:{metrics_port}"],
                  {"FLOWTALLY_KAFKA_BOOTSTRAP": bootstrap, "FLOWTALLY_KAFKA_TOPIC_PREFIX": prefix,
                   "FLOWTALLY_BATCH_MAX_AGE_MS": "200"} | (env or {}), workdir / "sensor.log", metrics_port)
    stage.start()
    try:
        stage.wait_healthy(90)
        deadline = time.monotonic() + 60
        while "receiving NetFlow on" not in stage.log_path.read_text(errors="replace"):
            stage.check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"sensor did not bind:\n{stage.log_tail()}")
            time.sleep(0.1)
        time.sleep(0.5)
        assert stage.process is not None
        pid = stage.process.pid
        valid = valid_stream(valid_flows, seed=seed)
        sender = MultiSender(("127.0.0.1", udp), loopback_sources(addresses, ports_each), seed=seed,
                             seeds=valid.payloads, pool=pool)
        before = stage.metrics()
        rss_before = rss_kb(pid)
        log_start = stage.log_path.stat().st_size
        samples: list[int] = []
        sending = threading.Event()

        def sample() -> None:
            while not sending.wait(0.5):
                samples.append(rss_kb(pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        started = time.monotonic()
        try:
            stats = sender.run(valid.payloads, hostile_rate=hostile_rate,
                               valid_rate=len(valid.payloads) / seconds, duration_s=seconds)
        finally:
            sender.close()
            sending.set()
            sampler.join()
        elapsed = time.monotonic() - started
        topic = KafkaSettings(bootstrap=bootstrap, topic_prefix=prefix).topic("raw")
        stored = read_exporter_totals(bootstrap, topic, address16("127.0.0.1"), valid.flows, timeout=60)
        stage.check_alive()
        after = stage.metrics()
        rss_after = rss_kb(pid)
        return FuzzReport(elapsed, stats.hostile, stats.errors, valid, stored, rss_before, rss_after,
                          len(before), len(after), after, samples,
                          stage.log_path.read_bytes()[log_start:].decode(errors="replace").splitlines())
    finally:
        stage.stop()


def uuid_hex() -> str:
    """Ten random hex digits, for topic names of one run."""
    import uuid

    return uuid.uuid4().hex[:10]
