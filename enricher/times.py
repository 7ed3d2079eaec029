"""Implausible flow times (pure): a broken exporter clock is decided here, before enrichment, so
it never reaches an insert as rows on 150 different days.

A flow's ``end`` is plausible within a window around the time the sensor *received* it:
``[time_received - max_age, time_received + max_future]`` (settings ``max_flow_age_s``, default
one day, at most 90 days; ``max_flow_future_s``, default 300 s). ``end`` alone decides: it is what
``flows`` and the rollups are partitioned and bucketed by, and the receive time is the sensor's
own clock. ``start`` is not judged on its own (a conntrack connection may have started weeks ago).
Rows with ``time_received`` 0 (older producers, synthetic batches) carry no receive time and are
never judged. With the window at most 90 days wide plus the future margin, the plausible rows of
any batch fall on at most 92 days, below ClickHouse's 100 partitions per insert.

What happens to an implausible row (setting ``implausible_time``):

* ``clamp`` (default): the flow is kept and counted, its times replaced by the receive time:
  ``end`` becomes ``time_received`` and ``start`` keeps the flow's duration before it (capped to
  ``[0, max_age]``). Why the receive time and not the window's nearest edge: a time outside the
  window says nothing about when the flow happened, while an exporter sends a flow within its
  active timeout of the flow's end, so the receive time is the best estimate there is (the same
  choice as collectors' "use arrival time" options); an edge would pile a broken exporter's
  traffic onto the minute a day ago. The original times are not kept in ``flows`` (there is no
  column for them); choose ``dlq`` to keep them.
* ``dlq``: the row is taken out of the batch and handed back as received (original values), for
  the DLQ; the rest of the batch is enriched.

Either way the rows are counted (metric ``flowtally_enricher_flows_implausible_time_total{action}``
and the ``implausible_time`` column of the enricher's completeness rows).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa

Policy = Literal["clamp", "dlq"]
POLICIES: tuple[Policy, ...] = ("clamp", "dlq")

#: The widest window: the plausible rows of a batch then fall on at most 92 days (< 100 partitions).
MAX_AGE_LIMIT_S = 90 * 86400


@dataclass(frozen=True)
class TimeWindow:
    """The plausible range of ``end`` around the receive time, and what to do outside it."""

    max_age_ms: int = 86_400_000
    max_future_ms: int = 300_000
    policy: Policy = "clamp"

    def __post_init__(self) -> None:
        if not 0 <= self.max_age_ms <= MAX_AGE_LIMIT_S * 1000:
            raise ValueError(f"max_age_ms must be within 0..{MAX_AGE_LIMIT_S * 1000}")
        if self.max_future_ms < 0:
            raise ValueError("max_future_ms must not be negative")
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")


@dataclass
class TimeCheck:
    """The outcome for one batch: the rows to enrich, which input rows were implausible (mask
    over the input), and those rows as received when the policy is ``dlq`` (else None)."""

    table: pa.Table
    implausible: np.ndarray
    rejected: pa.Table | None = None

    @property
    def count(self) -> int:
        return int(np.count_nonzero(self.implausible))


def _ms(table: pa.Table, name: str) -> np.ndarray:
    column = table.column(name)
    chunk = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
    return chunk.cast(pa.int64()).to_numpy(zero_copy_only=False)


def implausible(received: np.ndarray, end: np.ndarray, window: TimeWindow) -> np.ndarray:
    """Mask of the rows whose ``end`` is outside the window around ``received`` (rows received
    at 0, i.e. without a receive time, are never implausible). Overflow-safe for any int64."""
    known = received != 0
    # float64 comparisons: end and received may be anything an exporter sent (no int64 overflow);
    # the window's width is far below float64's exact range, so the bounds are exact enough.
    delta = end.astype(np.float64) - received.astype(np.float64)
    return known & ((delta < -window.max_age_ms) | (delta > window.max_future_ms))


def clamped(received: np.ndarray, start: np.ndarray, end: np.ndarray,
            window: TimeWindow) -> tuple[np.ndarray, np.ndarray]:
    """The (start, end) of implausible rows under ``clamp``: end = received, start = received
    minus the flow's duration capped to ``[0, max_age]`` (see the module doc)."""
    span = end.astype(np.float64) - start.astype(np.float64)
    duration = np.clip(span, 0, window.max_age_ms).astype(np.int64)
    return received - duration, received.copy()


def check_times(raw: pa.Table, window: TimeWindow) -> TimeCheck:
    """Apply ``window`` to a `raw.v1` batch (the rule and the policies in the module doc)."""
    received = _ms(raw, "time_received")
    end = _ms(raw, "end")
    mask = implausible(received, end, window)
    if not mask.any():
        return TimeCheck(raw, mask)
    if window.policy == "dlq":
        return TimeCheck(raw.filter(pa.array(~mask)), mask, raw.filter(pa.array(mask)))
    start = _ms(raw, "start")
    new_start, new_end = clamped(received[mask], start[mask], end[mask], window)
    start, end = start.copy(), end.copy()
    start[mask], end[mask] = new_start, new_end
    table = raw
    for name, values in (("start", start), ("end", end)):
        i = table.schema.get_field_index(name)
        table = table.set_column(i, table.schema.field(i), pa.array(values).cast(table.schema.field(i).type))
    return TimeCheck(table, mask)
