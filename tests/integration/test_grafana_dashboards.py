"""The Grafana dashboards: generated JSON is committed and normalised, and every panel's SQL runs
on chDB (macros expanded as the ClickHouse plugin expands them) over flows the sink wrote."""

from __future__ import annotations

import datetime as dt
import importlib.util
import itertools
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from clickhouse_connect.driver.client import Client

from tests.fixtures.grafana import ALL, TimeRange, Variable, expand, grafana_interval

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "deploy" / "grafana"


def _generator() -> Any:
    spec = importlib.util.spec_from_file_location("flowtally_grafana_generate", GRAFANA / "generate.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


gen = _generator()


def _walk(node: Any) -> Any:
    yield node
    if isinstance(node, dict):
        for v in node.values():
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


def test_committed_json_is_what_the_generator_writes() -> None:
    files = sorted(p.name for p in (GRAFANA / "dashboards").glob("*.json"))
    assert files == sorted(f"{n}.json" for n in gen.DASHBOARDS)
    for name in gen.DASHBOARDS:
        assert (GRAFANA / "dashboards" / f"{name}.json").read_text() == gen.render(name), (
            f"{name}.json is stale: run python deploy/grafana/generate.py")
    assert gen.main(["--check"]) == 0


@pytest.mark.parametrize("name", list(gen.DASHBOARDS))
def test_dashboard_is_normalised(name: str) -> None:
    """Importable anywhere (as retina's dashboard test demands): datasource uid is the variable,
    no plugin versions, no current variable values, unique ids and uids."""
    board = json.loads((GRAFANA / "dashboards" / f"{name}.json").read_text())
    for node in _walk(board):
        if isinstance(node, dict):
            assert "pluginVersion" not in node
            if isinstance(node.get("datasource"), dict):
                assert node["datasource"] == {"type": "grafana-clickhouse-datasource", "uid": "${datasource}"}
    assert "id" not in board and "version" not in board and "__inputs" not in board
    for var in board["templating"]["list"]:
        assert var["current"] == {}
    assert board["templating"]["list"][0]["type"] == "datasource"
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for p in board["panels"]:
        assert p["targets"] and all(t["rawSql"].strip() for t in p["targets"])
        assert "flows_1m" in json.dumps(p) or "flows_1h" in json.dumps(p) or "FROM flows\n" in json.dumps(p) \
            or "FROM flows" in "".join(t["rawSql"] for t in p["targets"])
    uids = {json.loads((GRAFANA / "dashboards" / f"{n}.json").read_text())["uid"] for n in gen.DASHBOARDS}
    assert len(uids) == len(gen.DASHBOARDS)


def test_provisioning_files() -> None:
    ds = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "clickhouse.yaml").read_text())
    (source,) = ds["datasources"]
    assert source["type"] == "grafana-clickhouse-datasource" and source["uid"] == "flowtally-clickhouse"
    assert set(source["jsonData"]) >= {"host", "port", "protocol", "defaultDatabase", "username"}
    assert source["secureJsonData"]["password"].startswith("$")  # from the environment, never inline
    dashboards = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "flowtally.yaml").read_text())
    assert dashboards["providers"][0]["options"]["path"]


def _time_ranges(now_ms: int) -> list[tuple[str, dt.datetime, dt.datetime]]:
    now = dt.datetime.fromtimestamp(now_ms / 1000, dt.UTC) + dt.timedelta(seconds=1)
    return [("6h", now - dt.timedelta(hours=6), now), ("7d", now - dt.timedelta(days=7), now)]


def _variable_options(client: Client, board: dict[str, Any], tr: TimeRange,
                      chosen: dict[str, Variable]) -> dict[str, list[str]]:
    """Each query/custom variable's options, query variables executed (after those they depend on)."""
    options: dict[str, list[str]] = {}
    for var in board["templating"]["list"]:
        if var["type"] == "custom":
            options[var["name"]] = [o["value"] for o in var["options"]]
        elif var["type"] == "query":
            sql = expand(var["query"], tr, chosen)
            rows = client.query(sql).result_rows
            options[var["name"]] = [str(r[0]) for r in rows]
            assert options[var["name"]], f"variable {var['name']} has no options: {sql}"
    return options


# Selections per dashboard variable: "All" where allowed, the first option, and a specific value.
SELECTIONS: dict[str, list[dict[str, str]]] = {
    "top-talkers": [{"namespace": ALL, "limit": "10"}, {"namespace": "shop", "limit": "20"}],
    "service-map": [{"namespace": ALL, "group": g, "direction": d} for g in ("workload", "namespace")
                    for d in ("both",)] + [{"namespace": "shop", "group": "workload", "direction": d}
                                           for d in ("both", "outbound", "inbound")],
    "service-detail": [{"namespace": "shop", "workload": "cart"}, {"namespace": "web", "workload": "api"}],
    "leaving-the-cluster": [{"namespace": ALL}, {"namespace": "web"}],
    "pipeline-health": [{}],
}

# Columns each panel type needs.
NODE_COLUMNS = {"id", "title", "mainstat"}
EDGE_COLUMNS = {"id", "source", "target", "mainstat"}


@pytest.mark.parametrize("name", list(gen.DASHBOARDS))
def test_every_panel_query_runs(grafana_db: tuple[Client, int], name: str) -> None:
    client, now_ms = grafana_db
    board = gen.DASHBOARDS[name]()
    assert set(SELECTIONS[name][0]) == {v["name"] for v in board["templating"]["list"] if v["type"] != "datasource"}
    checked = 0
    for (label, start, end), selection in itertools.product(_time_ranges(now_ms), SELECTIONS[name]):
        tr = TimeRange(start, end, grafana_interval(start, end))
        variables = {k: Variable([], [v]) for k, v in selection.items()}
        for k, opts in _variable_options(client, board, tr, variables).items():
            variables[k].options = opts
            assert selection[k] == ALL or selection[k] in opts, (k, selection[k], opts)
        for p in board["panels"]:
            ptr = TimeRange(start, end, grafana_interval(start, end, min_interval=p.get("interval")))
            frames = {}
            for t in p["targets"]:
                sql = expand(t["rawSql"], ptr, variables)
                try:
                    result = client.query(sql)
                except Exception as exc:  # the message, with the expanded SQL, is the useful part
                    pytest.fail(f"{name}/{p['title']} [{label} {selection}]: {exc}\n{sql}")
                columns, rows = list(result.column_names), result.result_rows
                assert rows, f"{name}/{p['title']} [{label} {selection}] returned no rows:\n{sql}"
                frames[t["refId"]] = (columns, rows)
                if p["type"] == "timeseries":
                    assert t["format"] == gen.FORMAT_TIMESERIES
                    assert columns[0] == "time", columns
                    assert all(isinstance(r[0], dt.datetime) for r in rows)
                    assert len(columns) >= 2
                    assert [r[0] for r in rows] == sorted(r[0] for r in rows)
                checked += 1
            if p["type"] == "nodegraph":
                node_cols, nodes = frames["nodes"]
                edge_cols, edges = frames["edges"]
                assert set(node_cols) >= NODE_COLUMNS and set(edge_cols) >= EDGE_COLUMNS
                ids = {r[node_cols.index("id")] for r in nodes}
                for e in edges:  # every edge ends at a node
                    assert e[edge_cols.index("source")] in ids and e[edge_cols.index("target")] in ids
    assert checked


def test_totals_match_the_data(grafana_db: tuple[Client, int]) -> None:
    """Spot checks that the panels count what was written, in both rollup branches."""
    client, now_ms = grafana_db
    board = gen.top_talkers()
    pairs = board["panels"][0]["targets"][0]["rawSql"]
    (_, s6, e6), (_, s7, e7) = _time_ranges(now_ms)
    variables = {"namespace": Variable(["kube-system", "shop", "web"], [ALL]), "limit": Variable(["50"], ["50"])}
    rows = client.query(expand(pairs, TimeRange(s6, e6, 20), variables)).result_rows
    got = {(r[0], r[1]): r[2] for r in rows}
    assert got[("web/api", "shop/cart")] == 20000  # 2 flows x 1000 bytes x sampling 10
    assert got[("shop/cart", "shop/db")] == 200
    assert ("shop/cart", "kube-system/kube-dns") in got and got[("shop/cart", "external")] == 500
    rows = client.query(expand(pairs, TimeRange(s7, e7, 600), variables)).result_rows
    got = {(r[0], r[1]): r[2] for r in rows}
    assert got[("shop/cart", "shop/db")] == 10200  # the 3-day-old flow is in the hourly rollup
    # Namespace filter: only pairs touching web.
    variables["namespace"] = Variable(["kube-system", "shop", "web"], ["web"])
    rows = client.query(expand(pairs, TimeRange(s6, e6, 20), variables)).result_rows
    assert {(r[0], r[1]) for r in rows} == {("web/api", "shop/cart"), ("web/front", "web/api"), ("web/api", "external")}


def test_expander_follows_the_plugin() -> None:
    tr = TimeRange(dt.datetime.fromtimestamp(1415792726, dt.UTC), dt.datetime.fromtimestamp(1447328726, dt.UTC), 20)
    v = {"ns": Variable(["a", "b'c"], [ALL]), "one": Variable(["x", "y"], ["y"])}
    assert expand("$__timeFilter(t)", tr, v) == "t >= toDateTime(1415792726) AND t <= toDateTime(1447328726)"
    assert expand("$__timeInterval(t)", tr, v) == "toStartOfInterval(toDateTime(t), INTERVAL 20 second)"
    assert expand("$__fromTime $__toTime $__interval_s", tr, v) == "toDateTime(1415792726) toDateTime(1447328726) 20"
    assert expand("$__conditionalAll(n IN (${ns:singlequote}), $ns)", tr, v) == "1=1"
    assert expand("n IN (${ns:singlequote})", tr, v) == "n IN ('a','b\\'c')"
    assert expand("$__conditionalAll(n = ${one:singlequote}, $one) AND $one", tr, v) == "n = 'y' AND y"
    with pytest.raises(ValueError):
        expand("$__nope(x)", tr, v)
    with pytest.raises(ValueError):
        expand("n IN ($ns)", tr, v)  # multi-value without a format
