"""Cluster rendering of the migrations and queries (sql/migrate.py, sql/queries.py): single-server
rendering and checksums unchanged; for a cluster every statement parses in the real ClickHouse
parser (chDB's formatQuery), carries ON CLUSTER, and names the Replicated engines and the
Distributed read tables."""

from __future__ import annotations

import argparse
import re

import pytest
from clickhouse_connect.driver.client import Client

from sql import migrate, queries

CLUSTER = "flow_cluster"
VARIABLES = {"flows_ttl_days": 3, "rollup_1m_ttl_days": 7, "rollup_1h_ttl_days": 400}
ENGINES = {  # the data tables of migrations 0001-0009 and their engines on a cluster
    "flows": "ReplicatedMergeTree",
    "flows_1m": "ReplicatedSummingMergeTree",
    "flows_1h": "ReplicatedSummingMergeTree",
    "completeness": "ReplicatedSummingMergeTree",
    "first_seen_external": "ReplicatedAggregatingMergeTree",
    "flows_1d": "ReplicatedSummingMergeTree",
    "pod_traffic_1h": "ReplicatedAggregatingMergeTree",
}


def _parse(client: Client, statement: str) -> str:
    """The statement as ClickHouse's parser reads it back (raises if it does not parse)."""
    return str(client.query("SELECT formatQuery({s:String})", parameters={"s": statement}).result_rows[0][0])


def test_single_server_rendering_and_checksums_unchanged() -> None:
    for m in migrate.available():
        checksum = m.checksum
        assert m.rendered(VARIABLES) == m.statements(VARIABLES)
        assert m.rendered(VARIABLES, None, migrate.data_tables()) == m.statements(VARIABLES)
        m.rendered(VARIABLES, CLUSTER, migrate.data_tables())
        assert m.checksum == checksum  # the ledger's checksum is of the file, whatever the rendering
    code = "\n".join(migrate._without_comments(s) for m in migrate.available() for s in m.rendered(VARIABLES))
    assert "ON CLUSTER" not in code and "Replicated" not in code and "Distributed" not in code


def test_data_tables() -> None:
    assert set(ENGINES) <= set(migrate.data_tables())
    assert "flows_1m_mv" not in migrate.data_tables() and "schema_migrations" not in migrate.data_tables()


def test_cluster_ddl_parses_and_names_replicated_engines(clickhouse: Client) -> None:
    tables = migrate.data_tables()
    statements = [s for m in migrate.available() for s in m.rendered(VARIABLES, CLUSTER, tables)]
    statements.insert(0, migrate._ledger(CLUSTER))
    created: dict[str, str] = {}
    for statement in statements:
        formatted = _parse(clickhouse, statement)
        head = formatted.split(maxsplit=2)[:2]
        if head[0] in ("CREATE", "ALTER", "DROP", "RENAME"):
            assert f"ON CLUSTER {CLUSTER}" in formatted, formatted[:200]
        else:
            assert head[0] == "INSERT", formatted[:200]  # backfills run on the connected shard
        assert "non_replicated_deduplication_window" not in formatted
        match = re.match(r"CREATE TABLE (?:IF NOT EXISTS )?(\w+) ON CLUSTER \S+\s.*?ENGINE = (\w+)\(", formatted, re.S)
        if match:
            created[match[1]] = match[2]
    for table, engine in ENGINES.items():
        assert created[table] == engine
        assert created[f"{table}_dist"] == "Distributed"
    assert created["schema_migrations"] == "ReplicatedMergeTree"
    text = "\n".join(statements)
    assert "replicated_deduplication_window = 10000" in text
    assert f"ReplicatedSummingMergeTree('{migrate.REPLICA_PATH}', '{{replica}}', (bytes, packets, flows," in text
    assert f"Distributed('{CLUSTER}', currentDatabase(), 'flows')" in text
    assert "toIntervalDay(400)" in text  # placeholders rendered before the cluster rewrite
    # the Distributed table over flows is re-created after each migration that changes flows
    assert text.count("CREATE TABLE flows_dist") == 1 + sum(
        1 for m in migrate.available() if m.version > 1 and any(
            re.match(r"(?:ALTER TABLE |CREATE TABLE (?:IF NOT EXISTS )?)flows\b", migrate._without_comments(s))
            for s in m.statements()))


def test_render_for_cluster_cases() -> None:
    r = migrate.render_for_cluster
    assert r("CREATE TABLE t (x UInt8) ENGINE = MergeTree() ORDER BY x", "c") == (
        f"CREATE TABLE t ON CLUSTER 'c' (x UInt8) ENGINE = ReplicatedMergeTree('{migrate.REPLICA_PATH}', "
        "'{replica}') ORDER BY x")
    assert r("-- a comment naming ENGINE = MergeTree\nDROP VIEW IF EXISTS v", "c") == "DROP VIEW IF EXISTS v ON CLUSTER 'c'"
    assert r("RENAME TABLE a TO b", "c") == "RENAME TABLE a TO b ON CLUSTER 'c'"
    insert = "INSERT INTO flows_1m SELECT * FROM flows SETTINGS insert_deduplication_token = 'x'"
    assert r(insert, "c") == insert


def test_named_queries_read_distributed_tables(clickhouse: Client) -> None:
    for name in queries.names():
        query = queries.load(name)
        for minutes in ("60", "1440", "1441", "10080", "0"):  # every rollup choice
            sql = queries.on_cluster(queries.render(query, query.defaults | {"minutes": minutes}))
            read = set(re.findall(r"\b(?:FROM|JOIN)\s+(\w+)", sql))
            assert read and all(t.endswith("_dist") for t in read), (name, read)
            _parse(clickhouse, sql)
    assert queries.on_cluster("SELECT sum(flows) AS flows FROM flows_1m") == "SELECT sum(flows) AS flows FROM flows_1m_dist"


def test_migrate_render_command(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("FLOWTALLY_CLICKHOUSE_CLUSTER", CLUSTER)
    monkeypatch.setenv("FLOWTALLY_CLICKHOUSE_PATH", "/nonexistent/never-opened")
    assert migrate.run(argparse.Namespace(config=None, status=False, render=True)) == 0
    out = capsys.readouterr().out
    assert out == migrate.render_all(migrate.DEFAULT_VARIABLES, CLUSTER)
    assert out.count(f"ON CLUSTER '{CLUSTER}'") > 10
