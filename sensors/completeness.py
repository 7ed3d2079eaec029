"""Per-minute completeness records (`completeness.v1`): how much of each exporter's stream a sensor
received, decoded and handed to Kafka, so the history can later say how complete a minute is.

One Arrow batch per minute per sensor process goes to the topic ``<prefix>.sensor.completeness``
with the header ``flowtally-schema: completeness.v1``. Rows are *deltas*: a sensor that restarts
within a minute, or several ``SO_REUSEPORT`` workers, publish more than one row for the same
(minute, exporter, observation_domain, observer); readers sum them.

Columns (the minute is the UTC minute in which the datagrams were received):

- ``packets``: export datagrams received; ``bytes``: their UDP payload bytes;
- ``records``: flow records decoded from them;
- ``sequence_lost``: export packets/records the exporter's sequence numbers say were lost on the
  way (0 until the decoder reports sequence gaps);
- ``decode_errors``: datagrams or flowsets that could not be decoded (all reasons);
- ``dropped_backpressure``: decoded flows dropped because Kafka did not keep up;
- ``kernel_drops``: datagrams the kernel dropped at the socket (buffer full) during the minute.
  The kernel does not say from whom, so these are on a row of their own with the exporter
  ``::`` (16 zero bytes) and observation domain 0. (The conntrack sensor counts netlink
  overruns here.)

Additive columns (older writers lack them; readers fill the defaults with
:func:`with_additive_defaults`):

- ``stage``: who wrote the row, one of :data:`STAGES` (default ``sensor-netflow``);
- ``unknown_addresses``, ``ignored``, ``late``, ``duplicates_dropped``: the enricher's counts of
  flows with an address no owner was known for, flows marked ignored (annotation), flows later
  than the identity history window, and second observations of one connection it dropped
  (0 on sensor rows). Enricher rows use the flow's exporter/domain/observer as keys, and the
  minute in which it processed the batch.
- ``implausible_time``: the enricher's count of flows whose end time was outside the plausible
  window around their receive time (clamped or sent to the DLQ: :mod:`enricher.times`).

Bounded rows: the observation domain comes from the datagram, so a sender can invent one per
datagram. Per minute an exporter gets at most ``max_domains_per_exporter`` rows; its further
domains are counted on its overflow row (observation domain :data:`OVERFLOW_DOMAIN`), and a
minute holds at most ``max_rows_per_minute`` rows, the last of which is the one overflow row of
the minute (exporter :data:`OVERFLOW_EXPORTER`, ``ff..ff``, a multicast address no exporter
sends from; domain :data:`OVERFLOW_DOMAIN`). Totals stay exact; only the attribution of what
overflowed is coarser. The kernel drop row is exempt (one per minute).

Per-exporter counts the decoder keeps per exporter only (errors, sequence losses) are put on the
row of the exporter's first observation domain in the decoded batch.

The accumulator is pure (no clock, no I/O): the caller passes the minutes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

SCHEMA_NAME = "completeness.v1"
UNKNOWN_EXPORTER = b"\x00" * 16
#: The exporter and domain of overflow rows (see the module docstring).
OVERFLOW_EXPORTER = b"\xff" * 16
OVERFLOW_DOMAIN = 0xFFFFFFFF
MINUTE_MS = 60_000

COUNTERS = ("packets", "records", "bytes", "sequence_lost", "decode_errors", "dropped_backpressure",
            "kernel_drops")
#: Counters added after completeness.v1 was first published (the enricher's).
ADDITIVE_COUNTERS = ("unknown_addresses", "ignored", "late", "duplicates_dropped", "implausible_time")
ALL_COUNTERS = COUNTERS + ADDITIVE_COUNTERS

#: Values of the ``stage`` column.
STAGES = ("sensor-netflow", "sensor-conntrack", "enricher")

COMPLETENESS_SCHEMA = pa.schema(
    [
        pa.field("minute", pa.timestamp("ms", tz="UTC"), nullable=False),
        pa.field("exporter", pa.binary(16), nullable=False),
        pa.field("observation_domain", pa.uint32(), nullable=False),
        pa.field("observer", pa.string(), nullable=False),
        *(pa.field(name, pa.uint64(), nullable=False) for name in COUNTERS),
        pa.field("stage", pa.string(), nullable=False),
        *(pa.field(name, pa.uint64(), nullable=False) for name in ADDITIVE_COUNTERS),
    ],
    metadata={"flowtally-schema": SCHEMA_NAME},
)

Key = tuple[int, bytes, int]  # minute (ms), exporter (16 bytes), observation domain


@dataclass(slots=True)
class Counts:
    """The counters of one (minute, exporter, observation domain)."""

    packets: int = 0
    records: int = 0
    bytes: int = 0
    sequence_lost: int = 0
    decode_errors: int = 0
    dropped_backpressure: int = 0
    kernel_drops: int = 0
    unknown_addresses: int = 0
    ignored: int = 0
    late: int = 0
    duplicates_dropped: int = 0
    implausible_time: int = 0


def with_additive_defaults(table: pa.Table) -> pa.Table:
    """``table`` with the columns older writers lack (``stage`` = ``sensor-netflow``, the
    enricher's counters = 0) added."""
    n = table.num_rows
    if "stage" not in table.column_names:
        stage = pa.array([STAGES[0]] * n, pa.string())
        table = table.append_column(COMPLETENESS_SCHEMA.field("stage"), stage)
    for name in ADDITIVE_COUNTERS:
        if name not in table.column_names:
            table = table.append_column(COMPLETENESS_SCHEMA.field(name), pa.array(np.zeros(n, np.uint64)))
    return table


def minute_of(ms: int) -> int:
    """The start of the UTC minute holding ``ms`` (ms since the epoch)."""
    return ms - ms % MINUTE_MS


def group_counts(minutes: np.ndarray, domains: np.ndarray) -> Iterable[tuple[int, int, int]]:
    """(minute, domain, rows) for each distinct pair in two parallel columns."""
    if len(minutes) == 0:
        return []
    keys = (minutes.astype(np.int64) // MINUTE_MS) << 32 | domains.astype(np.int64)
    uniq, counts = np.unique(keys, return_counts=True)
    return [(int(k >> 32) * MINUTE_MS, int(k & 0xFFFFFFFF), int(c))
            for k, c in zip(uniq, counts, strict=True)]


class CompletenessAccumulator:
    """Counts per (minute, exporter, domain) until :meth:`take` hands closed minutes over."""

    def __init__(self, observer: str = "", stage: str = STAGES[0], *, max_rows_per_minute: int = 65_536,
                 max_domains_per_exporter: int = 1024) -> None:
        """``max_*``: the row bounds (see the module docstring). The defaults are generous (a
        stage that sees every sensor's flows, the enricher, must not fold real exporters into
        overflow rows) yet keep a minute's rows near 16 MB (~250 bytes a row, measured); the
        NetFlow sensor passes its tighter settings."""
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        self.observer = observer
        self.stage = stage
        self.max_rows_per_minute = max(2, max_rows_per_minute)
        self.max_domains_per_exporter = max(1, max_domains_per_exporter)
        self._counts: dict[Key, Counts] = {}
        self._rows: dict[int, int] = {}  # minute -> rows (the kernel drop row not counted)
        self._domains: dict[tuple[int, bytes], int] = {}  # (minute, exporter) -> its domain rows
        self.overflowed = 0  # keys that were counted on an overflow row (first use of each)

    def counts(self, minute_ms: int, exporter: bytes, domain: int) -> Counts:
        """The live counters of one key (created on first use, or its overflow row's beyond the
        bounds); ``minute_ms`` any ms in the minute."""
        minute = minute_of(minute_ms)
        key = (minute, exporter, domain)
        counts = self._counts.get(key)
        if counts is not None:
            return counts
        if exporter != UNKNOWN_EXPORTER:
            rows = self._rows.get(minute, 0)
            if exporter != OVERFLOW_EXPORTER and domain != OVERFLOW_DOMAIN and \
                    self._domains.get((minute, exporter), 0) >= self.max_domains_per_exporter:
                self.overflowed += 1
                return self.counts(minute, exporter, OVERFLOW_DOMAIN)
            if rows >= self.max_rows_per_minute - 1 and exporter != OVERFLOW_EXPORTER:
                self.overflowed += 1
                return self.counts(minute, OVERFLOW_EXPORTER, OVERFLOW_DOMAIN)
            self._rows[minute] = rows + 1
            self._domains[(minute, exporter)] = self._domains.get((minute, exporter), 0) + 1
        counts = self._counts[key] = Counts()
        return counts

    def add_kernel_drops(self, minute_ms: int, n: int) -> None:
        """Datagrams the kernel dropped at the socket (exporter unknown)."""
        if n:
            self.counts(minute_ms, UNKNOWN_EXPORTER, 0).kernel_drops += n

    def take(self, before_ms: int | None = None) -> pa.Table:
        """Remove and return the rows of minutes starting before ``before_ms`` (all if None)."""
        keys = sorted(k for k in self._counts if before_ms is None or k[0] < before_ms)
        rows = [(k, self._counts.pop(k)) for k in keys]
        for minute in [m for m in self._rows if before_ms is None or m < before_ms]:
            del self._rows[minute]
        for pair in [p for p in self._domains if before_ms is None or p[0] < before_ms]:
            del self._domains[pair]
        columns: dict[str, list[object]] = {
            "minute": [k[0] for k, _ in rows],
            "exporter": [k[1] for k, _ in rows],
            "observation_domain": [k[2] for k, _ in rows],
            "observer": [self.observer] * len(rows),
            "stage": [self.stage] * len(rows),
        }
        for name in ALL_COUNTERS:
            columns[name] = [getattr(c, name) for _, c in rows]
        return pa.Table.from_pydict(columns, schema=COMPLETENESS_SCHEMA)

    def __len__(self) -> int:
        return len(self._counts)
