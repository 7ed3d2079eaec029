"""Migrations, the dedup-token writer and named queries on the real ClickHouse engine (chDB)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from clickhouse_connect.driver.client import Client

from enricher.enrich import enrich_batch
from enricher.identity import IdentityIndex
from enricher.inventory import Owner
from sensors.schema import address16, build_raw_table
from sink.rows import FLOW_COLUMNS, flow_rows
from sink.writer import Writer
from sql import migrate, queries

OWNERS = [
    Owner(ip="10.244.1.7", namespace="shop", name="cart-1", workload="cart", workload_kind="Deployment"),
    Owner(ip="10.244.2.9", namespace="shop", name="db-0", workload="db", workload_kind="StatefulSet"),
]


def _rows(src: list[str], dst: list[str], nbytes: list[int], end_ms: int) -> pa.Table:
    n = len(src)
    def addr(texts: list[str]) -> np.ndarray:
        return np.frombuffer(b"".join(address16(t) for t in texts), dtype=np.uint8).reshape(-1, 16)
    raw = build_raw_table({
        "src_addr": addr(src), "dst_addr": addr(dst), "bytes": np.array(nbytes),
        "packets": np.ones(n), "start": np.full(n, end_ms - 1000), "end": np.full(n, end_ms),
        "time_received": np.full(n, end_ms + 10), "version": np.full(n, 9),
    })
    return flow_rows(enrich_batch(raw, IdentityIndex(OWNERS)))


def test_migrations_apply_once_and_refuse_edits(clickhouse: Client) -> None:
    applied = migrate.migrate(clickhouse)
    assert [m.version for m in applied] == [m.version for m in migrate.available()]
    assert migrate.migrate(clickhouse) == []  # idempotent: a second run applies nothing
    columns = [r[0] for r in clickhouse.query("SELECT name FROM system.columns WHERE database = currentDatabase() AND table = 'flows' ORDER BY position").result_rows]
    assert columns[: len(FLOW_COLUMNS)] == list(FLOW_COLUMNS)
    clickhouse.command("ALTER TABLE schema_migrations UPDATE checksum = 'edited' WHERE version = 1 SETTINGS mutations_sync = 1")
    with pytest.raises(migrate.MigrationError, match="was changed after it was applied"):
        migrate.pending(clickhouse)


def test_migration_statements_split_on_line_end_semicolons() -> None:
    m = migrate.Migration(9, "x", "-- only a comment;\nCREATE TABLE a (x String DEFAULT ';') ENGINE=Memory;\n\n-- c\nSELECT 1;\n")
    assert m.statements() == ["CREATE TABLE a (x String DEFAULT ';') ENGINE=Memory", "-- c\nSELECT 1"]


def test_writer_dedup_token_makes_a_replay_a_no_op(clickhouse: Client) -> None:
    migrate.migrate(clickhouse)
    writer = Writer(clickhouse, "flows")
    batch = _rows(["10.244.1.7", "10.244.2.9", "81.2.69.160"], ["10.244.2.9", "10.244.1.7", "10.244.1.7"],
                  [100, 250, 7], 1_700_000_000_000)
    assert writer.insert(batch, "flowtally.flows.raw/0/17") == 3
    writer.insert(batch, "flowtally.flows.raw/0/17")  # replay of the same raw message
    writer.insert(batch, "flowtally.flows.raw/1/17")  # a different message with equal content
    count, total = clickhouse.query("SELECT count(), sum(bytes) FROM flows").result_rows[0]
    assert (count, total) == (6, 2 * 357)
    ns = clickhouse.query("SELECT src_kind, src_namespace, src_workload, dst_workload FROM flows ORDER BY bytes LIMIT 3").result_rows
    assert ns == [("external", "", "", "cart"), ("external", "", "", "cart"), ("pod", "shop", "cart", "db")]
    lag = clickhouse.query("SELECT min(inserted_at) > max(flow_end) FROM flows").result_rows[0][0]
    assert lag == 1


def test_top_talkers_query(clickhouse: Client) -> None:
    migrate.migrate(clickhouse)
    writer = Writer(clickhouse, "flows")
    now_ms = int(clickhouse.query("SELECT toUnixTimestamp64Milli(now64(3))").result_rows[0][0])
    writer.insert(_rows(["10.244.1.7"] * 3 + ["10.244.2.9"], ["10.244.2.9"] * 3 + ["81.2.69.160"],
                        [10, 20, 30, 5], now_ms - 60_000), "t1")
    writer.insert(_rows(["10.244.1.7"], ["10.244.2.9"], [1000], now_ms - 3 * 3600_000), "t2")  # 3 h ago
    columns, rows = queries.execute(clickhouse, "top_talkers")
    assert columns == ["source", "destination", "bytes", "packets", "flows"]
    assert rows == [("shop/cart", "shop/db", 60, 3, 3), ("shop/db", "external", 5, 1, 1)]
    _, rows = queries.execute(clickhouse, "top_talkers", {"minutes": "0", "limit": "1"})
    assert rows == [("shop/cart", "shop/db", 1060, 4, 4)]
    with pytest.raises(queries.QueryError, match="no parameter"):
        queries.execute(clickhouse, "top_talkers", {"hours": "1"})
    with pytest.raises(queries.QueryError, match="no query named"):
        queries.load("nope")
    assert "top_talkers" in queries.names()
