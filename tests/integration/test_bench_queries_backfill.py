"""The query benchmark's fast build: backfilling the views' tables equals running the views inline.

tests/benchmarks/bench_queries.py generates flows with the materialized views detached and then
fills every derived table by running each view's own SELECT per source partition. Here the same
flows are first inserted through the attached views (the way the sink inserts), the derived
tables are read, emptied and backfilled, and read again: the rows (merged by each table's engine,
FINAL) must be the same, and the views must be attached again afterwards.
"""

from __future__ import annotations

from clickhouse_connect.driver.client import Client

from sql.migrate import migrate
from tests.benchmarks.bench_queries import (
    DERIVED,
    attach_views,
    backfill,
    check_totals,
    detach_views,
    generator_sql,
    views,
)

FLOWS = 40_000


def merged(client: Client, table: str) -> list[tuple[object, ...]]:
    """Every row of ``table`` as its engine merges them (FINAL), sorted."""
    return sorted(tuple(r) for r in client.query(f"SELECT * FROM {table} FINAL").result_rows)


def test_backfill_equals_inline_views(clickhouse: Client) -> None:
    migrate(clickhouse)
    found = views(clickhouse)
    order = [v.target for v in found]
    assert sorted(order) == sorted(DERIVED), "the views feed exactly the tables the benchmark reports"
    # chained views after the view that fills their source
    assert order.index("flows_1m") < order.index("flows_1h") < order.index("flows_1d")
    assert {v.target: v.source for v in found}["flows_1h"] == "flows_1m"

    end_ms = int(clickhouse.query("SELECT toUnixTimestamp64Milli(now64(3))").result_rows[0][0])
    clickhouse.command(generator_sql(0, FLOWS, FLOWS, end_ms))  # through the attached views
    inline = {table: merged(clickhouse, table) for table in DERIVED}
    assert all(inline.values()), "every derived table got rows from the inline views"
    assert check_totals(clickhouse)

    detach_views(clickhouse, found)
    try:
        for table in DERIVED:
            clickhouse.command(f"TRUNCATE TABLE {table}")
        seconds = backfill(clickhouse, found)
    finally:
        attach_views(clickhouse, found)
    assert set(seconds) == {v.name for v in found}
    for table in DERIVED:
        assert merged(clickhouse, table) == inline[table], table
    assert check_totals(clickhouse)

    # the views are back in the insert path
    before = clickhouse.query("SELECT sum(flows) FROM flows_1d").result_rows[0][0]
    clickhouse.command(generator_sql(0, 10, 10, end_ms))
    assert clickhouse.query("SELECT sum(flows) FROM flows_1d").result_rows[0][0] == before + 10
