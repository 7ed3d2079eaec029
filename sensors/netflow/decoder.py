"""Decode batches of NetFlow datagrams into `raw.v1` Arrow tables: the pure core of the sensor.

:func:`decode_datagrams` does no I/O and reads no clock: the caller passes the datagrams (with
their exporter address and receive time), the exporters' template state and the counters to
update. Work per packet is a header parse and a flowset walk with :mod:`struct`; records are
converted in bulk with numpy at the end of the call (one pass for all v5 records, one per v9
template layout). Records come out grouped by version and layout, not in packet order.

A collector's batch of one v9 or IPFIX exporter (:func:`decode_payloads`) is cheaper still: the
usual datagrams (a header and one data set of a known template, maybe after an unchanged
template refresh) are parsed together with numpy, and only the others are walked one by one, in
order between them, so the outcome is the same as walking every datagram (tests hold the two
paths equal: rows, every counter, template and sequence state).

There is no compiled kernel, deliberately: a numba kernel writing every column in one pass was
built and held equal to this code (issue 4), and measured slower on the bulk path (1.07-1.16x
numpy's CPU per flow in tests/benchmarks/bench_decode, same run; ~0.12 us/flow for v9 either
way), while costing numba and llvmlite as dependencies and ~3 CPU-s of compilation at each
start. numpy's strided ``astype`` copies are already near memory speed; what is left of the
sensor's CPU per flow is receiving, Arrow IPC with lz4 and Kafka (bench_sensor ``--perf``).

Every datagram is accounted for in :class:`DecodeStats`: it is counted as a packet of its
exporter, and whatever could not be decoded is counted under a short, stable reason:

- ``truncated_header``: shorter than its version's header (or than 2 bytes);
- ``unknown_version``: not NetFlow v5, v9 or IPFIX (e.g. other UDP traffic);
- ``count_mismatch``: v5 with fewer bytes than the header's record count needs;
- ``bad_flowset_length``: v9 flowset length below 4 or past the end of the packet;
- ``bad_template``: malformed v9/IPFIX template or options template record;
- ``missing_template_expired``: a v9/IPFIX data set whose template did not arrive in time: sets
  without a known template are held in the template store (bounded per exporter and domain, see
  :class:`~sensors.netflow.templates.TemplateStore`) and decoded when it arrives; a set that ages
  out (by receive time), overflows the bound or is given up by :func:`flush_pending` is counted
  here, once per set, never guessed;
- ``missing_template``: the same when the store holds nothing (``max_pending_sets=0``);
- ``bad_message_length`` / ``bad_set_length``: IPFIX message or set length inconsistent with the
  datagram; ``reserved_set_id``: IPFIX set IDs 0, 1, 4-255; ``bad_data_record``: an IPFIX set
  with variable-length fields whose tail is neither a whole record nor zero padding;
  ``missing_system_init_time``: an IPFIX data set with uptime-relative times (21/22) before any
  systemInitTimeMilliseconds was announced (its records get the export time);
- ``reserved_flowset_id``: v9 flowset IDs 2-255, which carry nothing defined;
- ``bad_exporter_address``: the datagram's exporter is not a 4- or 16-byte address;
- ``malformed_packet``: the parser met something it did not expect (a guard against bugs: the
  datagram is skipped, the rest of the batch still decodes).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from sensors.netflow.ipfix import IpfixBatch
from sensors.netflow.stats import DecodeStats, ExporterStats
from sensors.netflow.templates import TemplateStore
from sensors.netflow.v5 import V5Batch
from sensors.netflow.v9 import MIN_VECTORISED, V9Batch
from sensors.schema import ADDRESS_COLUMNS, NUMPY_DTYPES, address_text, build_raw_table, empty_raw_table

_V4_MAPPED_PREFIX = b"\x00" * 10 + b"\xff\xff"


@dataclass(frozen=True, slots=True)
class Datagram:
    """One received UDP payload and where and when it came from."""

    exporter: bytes  # 16-byte address, IPv4-mapped for IPv4 (see sensors.schema.ipv4_to_mapped)
    received_ms: int  # UTC ms when received
    payload: bytes


def decode_datagrams(datagrams: Sequence[Datagram], templates: TemplateStore, stats: DecodeStats) -> pa.Table:
    """Decode NetFlow v5, v9 and IPFIX datagrams into one `raw.v1` table.

    Templates found in the datagrams are stored in ``templates`` as the datagrams are walked in
    order, so data later in the same call (or in a later call) can use them. Nothing raises for
    bad input: a malformed datagram is counted in ``stats`` and skipped without affecting the
    others. Row order follows version and template layout, not packet order.

    Data sets held for a missing template that are older than the store's
    ``max_pending_age_ms`` relative to the newest receive time in this call are dropped at the
    end of the call and counted.
    """
    batch = _Batch(templates, stats)
    for datagram in datagrams:
        batch.walk(datagram.exporter, (datagram.payload,), (datagram.received_ms,))
    return batch.table()


def decode_payloads(exporter: bytes, payloads: Sequence[bytes], received_ms: Sequence[int],
                    templates: TemplateStore, stats: DecodeStats) -> pa.Table:
    """:func:`decode_datagrams` for datagrams of one exporter given as parallel lists of payloads
    and receive times (UTC ms): what a collector has at hand, without a Datagram per payload."""
    batch = _Batch(templates, stats)
    batch.walk(exporter, payloads, received_ms)
    return batch.table()


class _Batch:
    """The datagrams of one decode call, walked as they come, converted to columns at the end."""

    __slots__ = ("exporter_index", "ipfix", "latest_ms", "per_exporter", "stats", "templates", "v5", "v9")

    def __init__(self, templates: TemplateStore, stats: DecodeStats) -> None:
        self.templates = templates
        self.stats = stats
        self.v5 = V5Batch()
        self.v9 = V9Batch()
        self.ipfix = IpfixBatch()
        self.latest_ms: int | None = None
        self.exporter_index: dict[bytes, int] = {}
        self.per_exporter: dict[bytes, ExporterStats] = {}

    def walk(self, exporter: bytes, payloads: Sequence[bytes], received: Sequence[int]) -> None:
        if len(exporter) == 4:  # tolerate a bare IPv4 address
            exporter = _V4_MAPPED_PREFIX + exporter
        counts = self.per_exporter.get(exporter)
        if counts is None:
            label = address_text(exporter) if len(exporter) == 16 else f"invalid:{exporter.hex()}"
            counts = self.per_exporter[exporter] = self.stats.exporter(label)
        counts.packets += len(payloads)
        if len(exporter) != 16:
            counts.error("bad_exporter_address", len(payloads))
            return
        if not payloads:
            return
        index = self.exporter_index.setdefault(exporter, len(self.exporter_index))
        newest = max(received)
        if self.latest_ms is None or newest > self.latest_ms:
            self.latest_ms = newest
        templates = self.templates
        v9, v5, ipfix = self.v9.add, self.v5.add, self.ipfix.add

        def one(i: int) -> None:
            payload, ms = payloads[i], received[i]
            if len(payload) < 2:
                counts.error("truncated_header")
                return
            version = (payload[0] << 8) | payload[1]
            try:
                if version == 9:
                    v9(payload, exporter, index, ms, templates, counts)
                elif version == 5:
                    v5(payload, index, ms, counts, templates, exporter)
                elif version == 10:
                    ipfix(payload, exporter, index, ms, templates, counts)
                else:
                    counts.error("unknown_version")
            except (struct.error, ValueError, IndexError, OverflowError):
                # The parsers check every length before reading; reaching this is a bug, but one
                # bad datagram must not take the batch (and the other exporters' flows) down.
                counts.error("malformed_packet")

        if len(payloads) >= MIN_VECTORISED and payloads[0][:2] == b"\x00\x09":
            # A v9 (or IPFIX) exporter's batch: the usual datagrams in bulk, the others one by one.
            self.v9.add_many(payloads, received, exporter, index, templates, counts, one)
            return
        if len(payloads) >= MIN_VECTORISED and payloads[0][:2] == b"\x00\x0a":
            self.ipfix.add_many(payloads, received, exporter, index, templates, counts, one)
            return
        for i in range(len(payloads)):
            one(i)

    def table(self) -> pa.Table:
        templates = self.templates
        self.ipfix.finish(templates)
        if self.latest_ms is not None and templates.has_pending():
            _count_expired(templates.expire(self.latest_ms), self.stats)
        exporters = np.frombuffer(b"".join(self.exporter_index), dtype=np.uint8).reshape(-1, 16)
        parts = [c for c in (self.v5.columns(exporters), *self.v9.columns(exporters),
                             *self.ipfix.columns(exporters)) if c is not None]
        if not parts:
            return empty_raw_table()
        if len(parts) == 1:
            return build_raw_table(parts[0])
        # Parts of different versions and layouts report different optional columns (the flow
        # details): where one part has a column the others lack, theirs are its zeros.
        names = dict.fromkeys(name for p in parts for name in p)
        return build_raw_table({name: np.concatenate([_column(p, name) for p in parts]) for name in names})


def _column(part: dict[str, np.ndarray], name: str) -> np.ndarray:
    """Column ``name`` of a decoded part, or its "not reported" zeros if the part has none."""
    value = part.get(name)
    if value is not None:
        return value
    rows = len(part["bytes"])
    return np.zeros((rows, 16), np.uint8) if name in ADDRESS_COLUMNS else np.zeros(rows, NUMPY_DTYPES[name])


def flush_pending(templates: TemplateStore, stats: DecodeStats) -> int:
    """Give up on every data set still waiting for its template (end of a capture, shutdown):
    each is counted as ``missing_template_expired`` for its exporter. Returns how many."""
    return _count_expired(templates.expire(None), stats)


def _count_expired(expired: list[tuple[bytes, int]], stats: DecodeStats) -> int:
    total = 0
    for exporter, n in expired:
        stats.exporter(address_text(exporter)).error("missing_template_expired", n)
        total += n
    return total
