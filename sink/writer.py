"""Inserts into ClickHouse with a deduplication token, so a replayed batch is a no-op.

Failures are sorted into two kinds (:func:`classify`), because they call for opposite actions:

* **rejected** — ClickHouse understood the insert and refused *this batch's data* (a constraint,
  a value it cannot convert or parse, a type or column mismatch). Retrying cannot help; the sink
  parks the message in the DLQ with the reason, counts it and moves on.
* **unavailable** — anything else: the server is unreachable, the table is missing (being
  renamed, migrated), too many parts, memory, timeouts, an error without a ClickHouse code. The
  sink retries with backoff and commits nothing after it, so no flow is lost.

The rule: *only* an error carrying one of the ClickHouse codes in :data:`REJECTED_CODES` is a
rejection; every other error is transient. An unknown error therefore stalls the partition (visible
through ``/healthz`` and the insert-error counter) rather than dropping data.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import pyarrow as pa
from clickhouse_connect.driver.client import Client

log = logging.getLogger(__name__)

#: ClickHouse error codes that mean "this data is invalid for this table" (permanent for the batch).
REJECTED_CODES: dict[int, str] = {
    6: "CANNOT_PARSE_TEXT",
    16: "NO_SUCH_COLUMN_IN_TABLE",
    20: "NUMBER_OF_COLUMNS_DOESNT_MATCH",
    27: "CANNOT_PARSE_INPUT_ASSERTION_FAILED",
    38: "CANNOT_PARSE_DATE",
    41: "CANNOT_PARSE_DATETIME",
    43: "ILLEGAL_TYPE_OF_ARGUMENT",
    44: "ILLEGAL_COLUMN",
    47: "UNKNOWN_IDENTIFIER",
    50: "UNKNOWN_TYPE",
    53: "TYPE_MISMATCH",
    69: "ARGUMENT_OUT_OF_BOUND",
    70: "CANNOT_CONVERT_TYPE",
    72: "CANNOT_PARSE_NUMBER",
    117: "INCORRECT_DATA",
    321: "VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE",
    349: "CANNOT_INSERT_NULL_IN_ORDINARY_COLUMN",
    441: "CANNOT_CONVERT_CHARSET",
    469: "VIOLATED_CONSTRAINT",
}

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

_CODE = re.compile(r"Code: (\d+)\.")
_NAME = re.compile(r"\(([A-Z][A-Z0-9_]+)\)")


@dataclass(frozen=True)
class InsertFailure:
    """What went wrong with one insert, as far as the sink must know."""

    rejected: bool  # True: permanent for this batch (DLQ); False: transient (retry)
    code: int | None  # the ClickHouse error code, when the error carries one
    reason: str  # short label for metrics and the DLQ header, e.g. "VIOLATED_CONSTRAINT"
    detail: str


def classify(exc: BaseException) -> InsertFailure:
    """Sort an insert error into rejected (DLQ) or unavailable (retry); see the module doc."""
    text = str(exc)
    match = _CODE.search(text)
    code = int(match[1]) if match else None
    if code is None:
        return InsertFailure(False, None, type(exc).__name__, text[:2000])
    name = _NAME.search(text)
    reason = REJECTED_CODES.get(code) or (name[1] if name else f"CODE_{code}")
    return InsertFailure(code in REJECTED_CODES, code, reason, text[:2000])


class Writer:
    """Writes whole batches to one table; one insert per batch (or group of batches), keyed by ``token``."""

    def __init__(self, client: Client, table: str) -> None:
        self.client = client
        self._table = table

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
            },
        )
        return rows.num_rows
