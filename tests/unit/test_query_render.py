"""How sql/queries.py renders its untyped placeholders ({rollup}, {window_start}, {pod_traffic},
fragments) before a named query is sent; that the rendered windows equal the raw ones is tested on
chDB in tests/integration/test_clickhouse.py."""

from __future__ import annotations

import re

import pytest

from sql import queries


def _tables(sql: str) -> list[str]:
    return sorted(set(re.findall(r"\bFROM\s+(\w+)", sql)))


def test_rollup_by_window() -> None:
    assert _tables(queries.rollup_rows(60)) == ["flows_1d", "flows_1h", "flows_1m"]
    assert _tables(queries.rollup_rows(1440)) == ["flows_1d", "flows_1h", "flows_1m"]
    assert _tables(queries.rollup_rows(1441)) == ["flows_1d", "flows_1h"]  # hour-aligned beyond a day
    assert _tables(queries.rollup_rows(0)) == ["flows_1d"]  # all time: the per-day rollup alone
    assert queries.window_start(90) == "toStartOfMinute(now() - toIntervalMinute(90))"
    assert queries.window_start(10080) == "toStartOfHour(now() - toIntervalMinute(10080))"
    assert _tables(queries.pod_rows(61)) == ["flows", "pod_traffic_1h"]  # raw only for the partial hour
    assert _tables(queries.pod_rows(60)) == ["flows"]  # an hour: the raw flows alone
    assert _tables(queries.pod_rows(0)) == ["pod_traffic_1h"]


def test_every_query_renders_without_untyped_placeholders() -> None:
    for name in queries.names():
        query = queries.load(name)
        for minutes in ("60", "10080", "0"):
            sql = queries.render(query, query.defaults | {"minutes": minutes})
            assert not re.search(r"\{[a-z_]+\}", sql), (name, sql)
            assert "--" not in sql  # comment lines are not sent (a placeholder in one stays unrendered)
            params = set(re.findall(r"\{(\w+):\w+\}", sql))
            assert params <= set(query.defaults), (name, params)


def test_pod_queries_share_their_select_list() -> None:
    history = queries.render(queries.load("pod_history"), {"minutes": "0", "uid": "u"})
    peers = queries.render(queries.load("pod_peers"), {"minutes": "0", "namespace": "n", "pod": "p"})
    assert history.split("WHERE")[0] == peers.split("WHERE")[0]
    assert "sum(scaled_bytes)   AS bytes" in history


def test_bad_placeholders_and_windows() -> None:
    query = queries.NamedQuery("x", "SELECT 1 FROM {nope}", {"minutes": "60"}, "")
    with pytest.raises(queries.QueryError, match=r"unknown placeholder \{nope\}"):
        queries.render(query, {"minutes": "60"})
    with pytest.raises(queries.QueryError, match="whole number"):
        queries.render(queries.load("top_talkers"), {"minutes": "an hour", "limit": "1"})
