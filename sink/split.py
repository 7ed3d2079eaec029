"""Splitting an insert group so that one bad row, or rows on too many days, never stalls a
partition (pure: no Kafka, no ClickHouse; :mod:`sink.service` does the inserts).

Two cuts, both deterministic, so that a group re-formed after a crash (same messages, same
token: :mod:`sink.groups`) is cut the same way and every sub-insert it repeats is a no-op:

1. **Day chunks, before inserting.** ``flows`` is partitioned by ``toYYYYMMDD(flow_end)`` and
   ``flows_1m`` by the day of its minute; ``flows_1h``, ``pod_traffic_1h`` by month and
   ``flows_1d`` by year, so the days of ``flow_end`` bound the partitions every table of one insert
   touches. ClickHouse refuses an insert block touching more than
   ``max_partitions_per_insert_block`` (100) partitions (code 252) — *all* of it, every time. A
   group whose rows fall on more days than ``max_partitions`` is cut into chunks of at most that
   many days (in day order; each chunk keeps the rows' group order), with tokens ``T/d<k>``.
   A group within the limit is one insert with the group's own token ``T``, as before.
2. **Isolation, after a rejection.** An insert ClickHouse rejects for its content
   (:func:`sink.writer.classify`) is inserted again per source message (``<base>/<offset>``,
   ``base`` being ``T`` or ``T/d<k>``), and a message rejected alone is halved
   (``<base>/<offset>/<first>-<last>``, row positions within the message's rows of that insert)
   until a range is at most ``min_rows`` rows or ``max_depth`` halvings deep: only the ranges
   still rejected then go to the DLQ; everything else is inserted. Not halved: a rejection about
   the batch's shape (every row alike, :attr:`sink.writer.InsertFailure.row_dependent`). A group
   spends at most ``split_max_inserts`` inserts on this; what is still refused then is parked as
   it is (worst case without the budget: 2^(depth+1) inserts per message).

An insert refused by the table itself (a value it cannot convert, a constraint, too many
partitions) is atomic in ClickHouse: nothing of it landed, so inserting its pieces cannot double
anything, and a piece that had landed before a crash is dropped by its token. An insert refused
inside a materialized view ("while pushing to view", :attr:`sink.writer.InsertFailure.in_view`)
is *not*: the table (and the views before that one) kept it; measured, splitting one stored 4468
rows for 2000. The shell parks such an insert's messages whole instead, marked as stored.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from sink.rows import RENAMES

MS_PER_DAY = 86_400_000


@dataclass(frozen=True)
class Part:
    """One source message's rows within an insert: ``count`` rows from position ``start``."""

    offset: int
    start: int
    count: int


@dataclass(frozen=True)
class Chunk:
    """One insert of a group: its token, which rows of the group's table (None: all, in order)
    and the messages it holds (contiguous, in offset order)."""

    token: str
    indices: np.ndarray | None
    parts: tuple[Part, ...]

    @property
    def num_rows(self) -> int:
        return sum(p.count for p in self.parts)


@dataclass(frozen=True)
class Span:
    """A range of one message's rows within an insert (positions ``first`` to ``last``
    inclusive, relative to the message's first row there), ``depth`` halvings deep."""

    offset: int
    first: int
    last: int
    depth: int

    @property
    def count(self) -> int:
        return self.last - self.first + 1


def day_numbers(flow_end: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """The UTC day (days since the epoch, floored) of each ``flow_end`` (ms timestamps)."""
    ms = flow_end.cast(pa.int64())
    values = ms.to_numpy() if isinstance(ms, pa.Array) else ms.combine_chunks().to_numpy()
    return np.floor_divide(values, MS_PER_DAY)


def plan_chunks(token: str, messages: list[tuple[int, int]], days: np.ndarray,
                max_partitions: int) -> list[Chunk]:
    """The inserts of a group: ``messages`` are (offset, row count) in table order, ``days``
    the day of each row of the group's table (:func:`day_numbers`). One chunk with ``token``
    and every row when the rows span at most ``max_partitions`` days; else chunks of at most
    ``max_partitions`` days each (ascending), tokens ``<token>/d<k>``."""
    if max_partitions < 1:
        raise ValueError("max_partitions must be at least 1")
    total = sum(n for _, n in messages)
    if len(days) != total:
        raise ValueError(f"{len(days)} days for {total} rows")
    # The usual group spans a day or two: a range within the limit needs no sort (np.unique of
    # 500,000 days costs ~30 ms, min/max ~1 ms).
    within = len(days) == 0 or int(days.max()) - int(days.min()) < max_partitions
    distinct, inverse = (days[:0], days) if within else np.unique(days, return_inverse=True)
    if within or len(distinct) <= max_partitions:
        parts, start = [], 0
        for offset, n in messages:
            if n:
                parts.append(Part(offset, start, n))
            start += n
        return [Chunk(token, None, tuple(parts))]
    chunk_of_row = inverse // max_partitions
    # The message of each row (table order), to cut each chunk into its messages' parts.
    offsets = np.array([o for o, _ in messages], dtype=np.int64)
    message_of_row = np.repeat(np.arange(len(messages)), [n for _, n in messages])
    chunks = []
    for k in range(int(chunk_of_row.max()) + 1):
        indices = np.flatnonzero(chunk_of_row == k)  # ascending: the group's order is kept
        per_message = np.bincount(message_of_row[indices], minlength=len(messages))
        parts, start = [], 0
        for m in np.flatnonzero(per_message).tolist():
            parts.append(Part(int(offsets[m]), start, int(per_message[m])))
            start += int(per_message[m])
        chunks.append(Chunk(f"{token}/d{k}", indices, tuple(parts)))
    return chunks


def message_token(base: str, offset: int) -> str:
    """The token of one message's rows inserted alone after ``base`` was rejected."""
    return f"{base}/{offset}"


def span_token(base: str, span: Span) -> str:
    """The token of a range of one message's rows (a half, a quarter…)."""
    return f"{base}/{span.offset}/{span.first}-{span.last}"


def whole(part: Part) -> Span:
    """All rows of ``part`` as a span (depth 0)."""
    return Span(part.offset, 0, part.count - 1, 0)


def halves(span: Span, min_rows: int, max_depth: int) -> tuple[Span, Span] | None:
    """The two halves of a rejected ``span``; None when it is not split further (at most
    ``min_rows`` rows, or ``max_depth`` halvings deep): it goes to the DLQ as it is."""
    if span.count <= max(min_rows, 1) or span.depth >= max_depth:
        return None
    middle = span.first + span.count // 2
    return (Span(span.offset, span.first, middle - 1, span.depth + 1),
            Span(span.offset, middle, span.last, span.depth + 1))


def as_enriched(rows: pa.Table) -> pa.Table:
    """Flow rows (``flows`` column names) back under the `enriched.v1` names, for the DLQ."""
    back = {table: wire for wire, table in RENAMES.items()}
    return rows.rename_columns([back.get(name, name) for name in rows.column_names])
