"""Decode batches of NetFlow datagrams into `raw.v1` Arrow tables: the pure core of the sensor.

:func:`decode_datagrams` does no I/O and reads no clock: the caller passes the datagrams (with
their exporter address and receive time), the exporters' template state and the counters to
update. Work per packet is a header parse and a flowset walk with :mod:`struct`; records are
converted in bulk with numpy at the end of the call (one pass for all v5 records, one per v9
template layout). Records come out grouped by version and layout, not in packet order.

Every datagram is accounted for in :class:`DecodeStats`: it is counted as a packet of its
exporter, and whatever could not be decoded is counted under a short, stable reason:

- ``truncated_header``: shorter than its version's header (or than 2 bytes);
- ``unknown_version``: not NetFlow v5, v9 or IPFIX (e.g. other UDP traffic);
- ``unsupported_version_10``: IPFIX, not decoded yet;
- ``count_mismatch``: v5 with fewer bytes than the header's record count needs;
- ``bad_flowset_length``: v9 flowset length below 4 or past the end of the packet;
- ``bad_template``: v9 malformed template or options template record;
- ``missing_template``: v9 data flowset whose template was never received, counted once per
  flowset; its records are dropped, not decoded;
- ``reserved_flowset_id``: v9 flowset IDs 2-255, which carry nothing defined;
- ``bad_exporter_address``: the datagram's exporter is not a 4- or 16-byte address;
- ``malformed_packet``: the parser met something it did not expect (a guard against bugs: the
  datagram is skipped, the rest of the batch still decodes).
"""

from __future__ import annotations

import struct
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from sensors.netflow.templates import TemplateStore
from sensors.netflow.v5 import V5Batch
from sensors.netflow.v9 import V9Batch
from sensors.schema import address_text, build_raw_table, empty_raw_table

_V4_MAPPED_PREFIX = b"\x00" * 10 + b"\xff\xff"


@dataclass(frozen=True, slots=True)
class Datagram:
    """One received UDP payload and where and when it came from."""

    exporter: bytes  # 16-byte address, IPv4-mapped for IPv4 (see sensors.schema.ipv4_to_mapped)
    received_ms: int  # UTC ms when received
    payload: bytes


@dataclass(slots=True)
class ExporterStats:
    """What one exporter sent in the decoded datagrams."""

    packets: int = 0
    records: int = 0  # flow records decoded
    options_records: int = 0  # v9 options data records (sampling, interface tables): not flows
    templates: int = 0  # template and options template records received
    errors: Counter[str] = field(default_factory=Counter)  # reason -> count

    def error(self, reason: str, n: int = 1) -> None:
        """Count ``n`` occurrences of ``reason``."""
        self.errors[reason] += n

    def merge(self, other: ExporterStats) -> None:
        """Add another instance's counts to this one."""
        self.packets += other.packets
        self.records += other.records
        self.options_records += other.options_records
        self.templates += other.templates
        self.errors.update(other.errors)


@dataclass(slots=True)
class DecodeStats:
    """Counters of what the decoder saw, per exporter (keyed by its printable IP, "10.0.0.1").

    The collector turns them into Prometheus metrics (plain ints and Counters keep this module
    free of any metrics library): iterate :meth:`by_exporter`, then :meth:`reset` after exporting
    if the metrics are fed deltas, or create a fresh instance per decode call. Error reasons are
    the short strings listed in the module docstring.
    """

    exporters: dict[str, ExporterStats] = field(default_factory=dict)

    def exporter(self, label: str) -> ExporterStats:
        """The counters of one exporter, created on first use."""
        counts = self.exporters.get(label)
        if counts is None:
            counts = self.exporters[label] = ExporterStats()
        return counts

    def by_exporter(self) -> dict[str, ExporterStats]:
        """Exporter label -> its counters (the live objects, not a copy)."""
        return self.exporters

    @property
    def packets(self) -> int:
        """Datagrams seen, all exporters."""
        return sum(c.packets for c in self.exporters.values())

    @property
    def records(self) -> int:
        """Flow records decoded, all exporters."""
        return sum(c.records for c in self.exporters.values())

    @property
    def options_records(self) -> int:
        """Options data records seen (not decoded as flows), all exporters."""
        return sum(c.options_records for c in self.exporters.values())

    @property
    def templates(self) -> int:
        """Template records received, all exporters."""
        return sum(c.templates for c in self.exporters.values())

    def errors_by_reason(self) -> Counter[str]:
        """Errors summed over exporters."""
        out: Counter[str] = Counter()
        for counts in self.exporters.values():
            out.update(counts.errors)
        return out

    def merge(self, other: DecodeStats) -> None:
        """Add another instance's counts to this one (e.g. one decode call's into a running total)."""
        for label, counts in other.exporters.items():
            self.exporter(label).merge(counts)

    def reset(self) -> None:
        """Forget every count (after the caller exported them as deltas)."""
        self.exporters.clear()

    def as_dict(self) -> dict[str, object]:
        """Totals over all exporters, with errors by reason: a compact summary for logs."""
        return {
            "packets": self.packets,
            "records": self.records,
            "options_records": self.options_records,
            "templates": self.templates,
            "errors": dict(sorted(self.errors_by_reason().items())),
        }


def decode_datagrams(datagrams: Sequence[Datagram], templates: TemplateStore, stats: DecodeStats) -> pa.Table:
    """Decode NetFlow v5 and v9 datagrams into one `raw.v1` table.

    Templates found in the datagrams are stored in ``templates`` as the datagrams are walked in
    order, so data later in the same call (or in a later call) can use them. Nothing raises for
    bad input: a malformed datagram is counted in ``stats`` and skipped without affecting the
    others. Row order follows version and template layout, not packet order.
    """
    v5 = V5Batch()
    v9 = V9Batch()
    exporter_index: dict[bytes, int] = {}
    per_exporter: dict[bytes, ExporterStats] = {}
    for datagram in datagrams:
        exporter = datagram.exporter
        if len(exporter) == 4:  # tolerate a bare IPv4 address
            exporter = _V4_MAPPED_PREFIX + exporter
        counts = per_exporter.get(exporter)
        if counts is None:
            label = address_text(exporter) if len(exporter) == 16 else f"invalid:{exporter.hex()}"
            counts = per_exporter[exporter] = stats.exporter(label)
        counts.packets += 1
        if len(exporter) != 16:
            counts.error("bad_exporter_address")
            continue
        index = exporter_index.setdefault(exporter, len(exporter_index))
        payload = datagram.payload
        if len(payload) < 2:
            counts.error("truncated_header")
            continue
        version = (payload[0] << 8) | payload[1]
        try:
            if version == 9:
                v9.add(payload, exporter, index, datagram.received_ms, templates, counts)
            elif version == 5:
                v5.add(payload, index, datagram.received_ms, counts)
            elif version == 10:
                counts.error("unsupported_version_10")
            else:
                counts.error("unknown_version")
        except (struct.error, ValueError, IndexError, OverflowError):
            # The parsers check every length before reading; reaching this is a bug, but one bad
            # datagram must not take the batch (and the other exporters' flows) down with it.
            counts.error("malformed_packet")

    exporters = np.frombuffer(b"".join(exporter_index), dtype=np.uint8).reshape(-1, 16)
    parts = [c for c in (v5.columns(exporters), *v9.columns(exporters)) if c is not None]
    if not parts:
        return empty_raw_table()
    if len(parts) == 1:
        return build_raw_table(parts[0])
    return build_raw_table({name: np.concatenate([p[name] for p in parts]) for name in parts[0]})
