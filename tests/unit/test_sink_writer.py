"""Sorting insert errors into rejected (DLQ) and unavailable (retry), on errors chDB really raises."""

from __future__ import annotations

from collections.abc import Callable

import pyarrow as pa
import pytest
from clickhouse_connect.driver.client import Client

from sink.writer import REJECTED_CODES, TOO_MANY_PARTITIONS, Writer, classify

DAY_MS = 86_400_000


def _error(call: Callable[[], object]) -> Exception:
    try:
        call()
    except Exception as exc:  # the error itself is what is tested
        return exc
    raise AssertionError("no error raised")


@pytest.fixture
def table(clickhouse: Client) -> Client:
    clickhouse.command("CREATE TABLE t (end DateTime64(3, 'UTC'), n UInt64) ENGINE = MergeTree "
                       "PARTITION BY toYYYYMMDD(end) ORDER BY end")
    return clickhouse


def _rows(days: int, n: int = 1) -> pa.Table:
    return pa.table({"end": pa.array([d * DAY_MS for d in range(days)], pa.timestamp("ms", tz="UTC")),
                     "n": pa.array([n] * days, pa.uint64())})


def test_too_many_partitions_is_a_rejection_and_the_limit_is_the_writers(table: Client) -> None:
    writer = Writer(table, "t", max_partitions=10)
    failure = classify(_error(lambda: writer.insert(_rows(11), "a")))
    assert failure.rejected
    assert failure.code == 252
    assert failure.reason == TOO_MANY_PARTITIONS
    assert "Too many partitions for single INSERT block (more than 10)" in failure.detail
    assert not failure.in_view
    assert writer.insert(_rows(10), "b") == 10  # at the limit it lands
    # without a limit of its own, the server's (100) applies
    assert classify(_error(lambda: Writer(table, "t").insert(_rows(101), "c"))).reason == TOO_MANY_PARTITIONS
    assert table.query("SELECT count() FROM t").result_rows == [(10,)]


def test_too_many_parts_is_transient(table: Client) -> None:
    """Code 252 again, but "too many parts" (merges behind inserts): retrying is right."""
    table.command("SYSTEM STOP MERGES t")
    table.command("ALTER TABLE t MODIFY SETTING parts_to_throw_insert = 2")
    writer = Writer(table, "t")
    writer.insert(_rows(1), "p1")
    writer.insert(_rows(1, 2), "p2")
    failure = classify(_error(lambda: writer.insert(_rows(1, 3), "p3")))
    assert failure.code == 252
    assert "parts" in failure.detail.lower() and "partitions" not in failure.detail.lower()
    assert not failure.rejected
    assert failure.reason == "TOO_MANY_PARTS"


def test_a_violated_constraint_and_a_throw_in_a_view_are_rejections(table: Client) -> None:
    table.command("ALTER TABLE t ADD CONSTRAINT small CHECK n < 100")
    writer = Writer(table, "t")
    failure = classify(_error(lambda: writer.insert(_rows(1, 1000), "v1")))
    assert (failure.rejected, failure.code, failure.reason) == (True, 469, "VIOLATED_CONSTRAINT")
    assert not failure.in_view  # refused by the table itself: nothing landed
    table.command("CREATE TABLE sink_view_target (x UInt8) ENGINE = MergeTree ORDER BY x")
    table.command("CREATE MATERIALIZED VIEW v TO sink_view_target AS "
                  "SELECT throwIf(n = 7, 'seven') AS x FROM t")
    failure = classify(_error(lambda: writer.insert(_rows(1, 7), "v2")))
    assert (failure.rejected, failure.code) == (True, 395)
    assert failure.reason == "FUNCTION_THROW_IF_VALUE_IS_NON_ZERO"
    # Refused by a view: ClickHouse had written the table already (the rejection is not atomic)
    assert failure.in_view
    assert table.query("SELECT count() FROM t").result_rows == [(1,)]


def test_a_batch_of_another_shape_is_rejected_as_a_whole(table: Client) -> None:
    """A column the table does not have: every row hits it alike, halving could not help."""
    extra = _rows(3).append_column("surplus", pa.array([1, 2, 3], pa.uint8()))
    failure = classify(_error(lambda: Writer(table, "t").insert(extra, "s")))
    assert failure.rejected and not failure.row_dependent
    assert failure.reason == REJECTED_CODES[failure.code or 0]
    table.command("ALTER TABLE t ADD CONSTRAINT small CHECK n < 100")
    assert classify(_error(lambda: Writer(table, "t").insert(_rows(1, 1000), "r"))).row_dependent


def test_a_missing_table_and_errors_without_a_code_are_transient(table: Client) -> None:
    failure = classify(_error(lambda: Writer(table, "nowhere").insert(_rows(1), "m")))
    assert (failure.rejected, failure.code, failure.reason) == (False, 60, "UNKNOWN_TABLE")
    failure = classify(ConnectionResetError("connection reset by peer"))
    assert (failure.rejected, failure.code, failure.reason) == (False, None, "ConnectionResetError")


def test_rejected_codes_carry_clickhouses_names(clickhouse: Client) -> None:
    """The table's names are ClickHouse's own (errorCodeToName), so metrics and DLQ reasons match
    what ClickHouse logs."""
    codes = sorted(REJECTED_CODES)
    names = clickhouse.query("SELECT " + ", ".join(f"errorCodeToName({c})" for c in codes)).result_rows[0]
    assert dict(zip(codes, names, strict=True)) == REJECTED_CODES
    assert 252 not in REJECTED_CODES and 36 not in REJECTED_CODES and 49 not in REJECTED_CODES
