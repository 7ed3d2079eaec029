"""Inserts into ClickHouse with a deduplication token, so a replayed batch is a no-op.

Failures are sorted into two kinds (:func:`classify`), because they call for opposite actions:

* **rejected** — ClickHouse understood the insert and refused *this batch's data* (a constraint,
  a value it cannot convert or parse, a type or column mismatch, rows on too many partitions).
  Retrying cannot help; the sink isolates the rows refused (:mod:`sink.split`), parks them in the
  DLQ with the reason, counts them and moves on.
* **unavailable** — anything else: the server is unreachable, the table is missing (being
  renamed, migrated), too many parts, memory, timeouts, an error without a ClickHouse code. The
  sink retries with backoff and commits nothing after it, so no flow is lost.

The rule: *only* an error carrying one of the ClickHouse codes in :data:`REJECTED_CODES` (or 252
saying "too many partitions", see :func:`classify`) is a rejection; every other error is
transient. An unknown error therefore stalls the partition (visible through ``/healthz`` and the
insert-error counter) rather than dropping data.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import pyarrow as pa
from clickhouse_connect.driver.client import Client

log = logging.getLogger(__name__)

#: ClickHouse error codes that mean "this data is invalid for this table": the same rows sent again
#: hit the same error, so retrying can never help (names as in ClickHouse's ErrorCodes.cpp).
REJECTED_CODES: dict[int, str] = {
    # Values ClickHouse cannot parse or convert into the column's type.
    6: "CANNOT_PARSE_TEXT",
    25: "CANNOT_PARSE_ESCAPE_SEQUENCE",
    26: "CANNOT_PARSE_QUOTED_STRING",
    27: "CANNOT_PARSE_INPUT_ASSERTION_FAILED",
    38: "CANNOT_PARSE_DATE",
    41: "CANNOT_PARSE_DATETIME",
    69: "ARGUMENT_OUT_OF_BOUND",
    70: "CANNOT_CONVERT_TYPE",
    72: "CANNOT_PARSE_NUMBER",
    117: "INCORRECT_DATA",
    321: "VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE",
    346: "CANNOT_CONVERT_CHARSET",
    349: "CANNOT_INSERT_NULL_IN_ORDINARY_COLUMN",
    376: "CANNOT_PARSE_UUID",
    441: "CANNOT_PARSE_DOMAIN_VALUE_FROM_STRING",  # e.g. an IPv6 column given a bad string
    467: "CANNOT_PARSE_BOOL",
    # The batch's shape does not fit the table (an Arrow batch of another schema).
    9: "SIZES_OF_COLUMNS_DOESNT_MATCH",
    16: "NO_SUCH_COLUMN_IN_TABLE",
    19: "SIZE_OF_FIXED_STRING_DOESNT_MATCH",
    20: "NUMBER_OF_COLUMNS_DOESNT_MATCH",
    43: "ILLEGAL_TYPE_OF_ARGUMENT",
    44: "ILLEGAL_COLUMN",
    47: "UNKNOWN_IDENTIFIER",
    50: "UNKNOWN_TYPE",
    53: "TYPE_MISMATCH",
    190: "SIZES_OF_ARRAYS_DONT_MATCH",
    # Values the table or a materialized view refuses while computing on them.
    128: "TOO_LARGE_ARRAY_SIZE",
    131: "TOO_LARGE_STRING_SIZE",
    153: "ILLEGAL_DIVISION",  # a view dividing by a value of the batch that is 0
    395: "FUNCTION_THROW_IF_VALUE_IS_NON_ZERO",  # throwIf() in a view or constraint
    407: "DECIMAL_OVERFLOW",
    469: "VIOLATED_CONSTRAINT",
    # 252 is TOO_MANY_PARTS: only the "too many partitions for single INSERT block" text is about
    # the batch (its rows span more partitions than max_partitions_per_insert_block); the same
    # code also says "too many parts" (merges behind inserts), which is transient. See classify.
    # Deliberately *not* here, although the same data could hit them again: 36 BAD_ARGUMENTS and
    # 49 LOGICAL_ERROR (a setting or a server bug, not this batch: fixing the config or the server
    # helps, so the sink retries and its /healthz says so after unhealthy_after_s), and
    # 241 MEMORY_LIMIT_EXCEEDED, 159 TIMEOUT_EXCEEDED, 209/210 socket errors (load or network).
    # A transient failure is retried with the *same* token and rows, never split: a timed-out
    # insert may have landed, and only the same token makes its retry a no-op. A rejection is
    # final (nothing of the insert landed), which is what makes splitting it safe (sink.split).
}

#: Rejections about the batch's shape (its columns and types), not about some of its rows:
#: halving cannot isolate anything, so a message refused with one is parked whole.
SHAPE_CODES = frozenset({9, 16, 19, 20, 43, 44, 47, 50, 53})

#: The code whose meaning depends on its text (see :func:`classify`).
TOO_MANY_PARTS = 252
#: The reason label of a batch spanning too many partitions (252 with that text).
TOO_MANY_PARTITIONS = "TOO_MANY_PARTITIONS"

#: Settings for the views' GROUP BYs during an insert. Past ``group_by_two_level_threshold``
#: (100,000 keys) ClickHouse switches to two-level aggregation, whose output is up to 256 blocks
#: per view; measured on the sink's groups (5 views), a 384,000-row insert then took 5x the CPU
#: of a 256,000-row one. One-level keeps the cost per row flat up to the group limits.
#: ``optimize_on_insert`` off: the rollup tables (Summing/AggregatingMergeTree) would otherwise
#: collapse every inserted block as it is written, which measured 4-5x the cost of the view's
#: SELECT itself (tests/benchmarks/bench_queries); background merges collapse the rows later, and
#: every query aggregates (sum, min) anyway, as it must across parts. Deduplication is by token,
#: not by the block's content, so it is unaffected.
VIEW_SETTINGS = {"group_by_two_level_threshold": 0, "group_by_two_level_threshold_bytes": 0,
                 "optimize_on_insert": 0}

#: How ClickHouse ends the text of an error raised inside a materialized view of the insert.
VIEW_MARK = "while pushing to view"

_CODE = re.compile(r"Code: (\d+)\.")
_NAME = re.compile(r"\(([A-Z][A-Z0-9_]+)\)")


@dataclass(frozen=True)
class InsertFailure:
    """What went wrong with one insert, as far as the sink must know."""

    rejected: bool  # True: permanent for this batch (DLQ); False: transient (retry)
    code: int | None  # the ClickHouse error code, when the error carries one
    reason: str  # short label for metrics and the DLQ header, e.g. "VIOLATED_CONSTRAINT"
    detail: str

    @property
    def row_dependent(self) -> bool:
        """Whether fewer rows may get through: not for errors about the batch's shape (a column
        or type the table does not have), which every row of it hits alike."""
        return self.code not in SHAPE_CODES

    @property
    def in_view(self) -> bool:
        """Raised by a materialized view ("while pushing to view"): ClickHouse had already
        written the insert into the table itself (and the views before that one), so the
        rejection is not atomic and the rows must not be inserted again under other tokens."""
        return VIEW_MARK in self.detail


def classify(exc: BaseException) -> InsertFailure:
    """Sort an insert error into rejected (DLQ) or unavailable (retry); see the module doc."""
    text = str(exc)
    match = _CODE.search(text)
    code = int(match[1]) if match else None
    if code is None:
        return InsertFailure(False, None, type(exc).__name__, _detail(text))
    if code == TOO_MANY_PARTS and "partitions" in text.lower():
        # "Too many partitions for single INSERT block": these rows, sent again, span as many
        # partitions again; a smaller insert lands (sink.split).
        return InsertFailure(True, code, TOO_MANY_PARTITIONS, _detail(text))
    name = _NAME.search(text)
    reason = REJECTED_CODES.get(code) or (name[1] if name else f"CODE_{code}")
    return InsertFailure(code in REJECTED_CODES, code, reason, _detail(text))


def _detail(text: str) -> str:
    """The error text, bounded; the view mark (at the end, where ClickHouse puts it) is kept."""
    if len(text) <= 2000:
        return text
    mark = text.rfind(VIEW_MARK)
    return text[:2000] if mark < 0 else text[:1900] + " … " + text[mark:mark + 90]


class Writer:
    """Writes whole batches to one table; one insert per batch (or group of batches), keyed by ``token``."""

    def __init__(self, client: Client, table: str, max_partitions: int | None = None) -> None:
        self.client = client
        self._table = table
        #: sent as max_partitions_per_insert_block, so the server's limit is the one the sink
        #: plans its day chunks by (sink.split); None: the server's own
        self._partitions = ({} if max_partitions is None
                            else {"max_partitions_per_insert_block": max_partitions})

    def insert(self, rows: pa.Table, token: str) -> int:
        """Insert ``rows`` atomically; a repeat of the same ``token`` inserts nothing.

        ClickHouse keeps the last ``non_replicated_deduplication_window`` tokens of the table
        and of each rollup table (see the migrations), which covers any replay the sink can cause.
        ``deduplicate_blocks_in_dependent_materialized_views`` makes the rollups deduplicate on
        their own: if the sink died after the part of ``flows`` was written but before the rollup
        parts were, the replay is skipped in ``flows`` yet still fills the missing rollup rows
        (and a rollup that already has them skips them too). Returns the row count.
        """
        if rows.num_rows == 0:
            return 0
        self.client.insert_arrow(
            self._table,
            rows,
            settings={
                "insert_deduplication_token": token,
                "deduplicate_blocks_in_dependent_materialized_views": 1,
                # One batch (a group: one record batch) lands as one part, or dedup would work per block.
                "max_insert_block_size": max(rows.num_rows, 1_048_576),
                "min_insert_block_size_rows": 0,
                "min_insert_block_size_bytes": 0,
                **VIEW_SETTINGS,
                **self._partitions,
            },
        )
        return rows.num_rows
