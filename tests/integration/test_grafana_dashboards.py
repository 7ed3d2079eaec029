"""The Grafana dashboards: generated JSON is committed and normalised, and every panel's SQL runs
on chDB (macros expanded as the ClickHouse plugin expands them) over flows the sink wrote."""

from __future__ import annotations

import datetime as dt
import itertools
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from clickhouse_connect.driver.client import Client

from enricher.enrich import enrich_batch
from enricher.geo import GeoIP
from enricher.identity import IdentityIndex
from sensors.completeness import CompletenessAccumulator
from sensors.schema import address16, build_raw_table
from sink.rows import flow_rows
from sink.writer import Writer
from tests.fixtures.grafana import (
    ALL,
    API,
    CART,
    DB,
    MIN,
    OWNERS,
    WEB,
    TimeRange,
    Variable,
    expand,
    grafana_interval,
)
from tests.oracle import shared_testdata
from tests.scripts import load_script

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "deploy" / "grafana"


gen = load_script(GRAFANA / "generate.py")


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
        sql = "".join(t["rawSql"] for t in p["targets"])
        assert re.search(r"FROM (flows|flows_1m|flows_1h|completeness)\b", sql), (p["title"], sql)
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


# --- Data the newer panels need, on top of tests/fixtures/grafana.FLOWS ------------------------

#: External flows enriched with the MaxMind *test* databases (what each address resolves to is in
#: tests/unit/test_geo.py and flowtally/dev/generator.py), and conntrack records with a state.
#: (src, dst, bytes, dst_port, age_ms, observer, conn_state, initiator)
GEO_AND_CONNTRACK = [
    (CART, "89.160.20.112", 2000, 443, 7 * MIN, "node-1", "", 0),      # SE Linköping, AS29518
    (API, "216.160.83.56", 800, 443, 8 * MIN, "node-1", "", 0),       # US Milton, AS209
    (API, "1.128.0.1", 300, 443, 9 * MIN, "node-1", "", 0),           # AS1221 Telstra, no country
    ("175.16.199.5", WEB, 1500, 443, 6 * MIN, "node-2", "", 0),       # ingress from CN Changchun
    ("2.125.160.216", API, 700, 443, 6 * MIN, "node-1", "", 0),       # ingress from GB Boxford
    (CART, DB, 120, 5432, 11 * MIN, "node-1", "refused", 1),          # cart -> db refused
    (DB, CART, 60, 45001, 11 * MIN, "node-2", "refused", 2),          # ... its reply direction
    (API, CART, 180, 8080, 12 * MIN, "node-1", "unreplied", 1),       # api -> cart unanswered
    (API, CART, 400, 8080, 13 * MIN, "node-1", "established", 1),
    (CART, API, 600, 45002, 13 * MIN, "node-1", "established", 2),
    (WEB, API, 500, 80, 14 * MIN, "node-2", "established", 1),
]


def _geo_and_conntrack_rows(now_ms: int) -> Any:
    """GEO_AND_CONNTRACK through the enricher's pure core (with GeoIP) into the sink's rows."""
    src, dst, nbytes, port, age, observer, state, initiator = zip(*GEO_AND_CONNTRACK, strict=True)
    def addr(texts: tuple[str, ...]) -> Any:
        return np.frombuffer(b"".join(address16(t) for t in texts), dtype=np.uint8).reshape(-1, 16)
    end = now_ms - np.array(age)
    n = len(GEO_AND_CONNTRACK)
    raw = build_raw_table({
        "src_addr": addr(src), "dst_addr": addr(dst), "bytes": np.array(nbytes), "packets": np.full(n, 2),
        "dst_port": np.array(port), "src_port": np.full(n, 40001), "proto": np.full(n, 6),
        "tcp_flags": np.where(np.array(state) == "", 0x1B, 0), "start": end - 1000, "end": end,
        "time_received": end + 10, "observer": list(observer), "conn_state": list(state),
        "initiator": np.array(initiator), "version": np.full(n, 9), "observation_domain": np.full(n, 1),
        "exporter": addr(tuple("192.0.2.1" if o == "node-1" else "192.0.2.2" for o in observer)),
    })
    geo = GeoIP(shared_testdata("mmdb", "GeoLite2-ASN-Test.mmdb"), shared_testdata("mmdb", "GeoLite2-City-Test.mmdb"))
    try:
        return flow_rows(enrich_batch(raw, IdentityIndex(OWNERS), geo.current()))
    finally:
        geo.close()


def _completeness_rows(now_ms: int) -> Any:
    """Per-minute completeness records as the sensors and the enricher build them."""
    tables = []
    for observer, stage in (("node-1", "sensor-netflow"), ("node-2", "sensor-netflow"),
                            ("node-1", "sensor-conntrack"), ("enricher-0", "enricher")):
        acc = CompletenessAccumulator(observer, stage)
        exporter = address16("192.0.2.2" if observer == "node-2" else "192.0.2.1")
        for age in (3 * MIN, 30 * MIN, 2 * 24 * 60 * MIN):  # the 2-day-old one only in week windows
            c = acc.counts(now_ms - age, exporter, 1)
            if stage == "enricher":
                c.records, c.unknown_addresses, c.ignored, c.late, c.duplicates_dropped = 1000, 7, 3, 2, 5
                c.implausible_time = 4
            else:
                c.packets, c.records, c.bytes = 40, 1200, 60_000
                c.sequence_lost, c.decode_errors, c.dropped_backpressure = 12, 1, 24
                acc.add_kernel_drops(now_ms - age, 9)
        tables.append(acc.take())
    return tables


@pytest.fixture
def dashboard_db(grafana_db: tuple[Client, int]) -> tuple[Client, int]:
    """grafana_db plus GEO_AND_CONNTRACK flows and completeness rows, written by the sink's Writer."""
    client, now_ms = grafana_db
    Writer(client, "flows").insert(_geo_and_conntrack_rows(now_ms), "grafana/geo-conntrack")
    for i, table in enumerate(_completeness_rows(now_ms)):
        Writer(client, "completeness").insert(table, f"grafana/completeness/{i}")
    return client, now_ms


def _time_ranges(now_ms: int) -> list[tuple[str, dt.datetime, dt.datetime]]:
    now = dt.datetime.fromtimestamp(now_ms / 1000, dt.UTC) + dt.timedelta(seconds=1)
    # The flows end before now_ms, but the fixtures' inserts (through every view) come after it:
    # a second of slack left the panels by insert time (inserted_at) empty on a busy machine.
    end = now + dt.timedelta(minutes=1)
    return [("6h", now - dt.timedelta(hours=6), end), ("7d", now - dt.timedelta(days=7), end)]


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
    "leaving-the-cluster": [{"namespace": ns, "direction": d} for d in ("egress", "ingress") for ns in (ALL, "web")],
    "pipeline-health": [{}],
}

# Columns each panel type needs.
NODE_COLUMNS = {"id", "title", "mainstat"}
EDGE_COLUMNS = {"id", "source", "target", "mainstat"}


@pytest.mark.parametrize("name", list(gen.DASHBOARDS))
def test_every_panel_query_runs(dashboard_db: tuple[Client, int], name: str) -> None:
    client, now_ms = dashboard_db
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
                if p["type"] == "geomap":  # numeric latitude/longitude fields, as the layer names them
                    layer = p["options"]["layers"][0]["location"]
                    assert (layer["latitude"], layer["longitude"]) == ("latitude", "longitude")
                    lat, lon = columns.index("latitude"), columns.index("longitude")
                    assert all(-90 <= r[lat] <= 90 and -180 <= r[lon] <= 180 for r in rows), rows
                if p["type"] == "barchart":  # the x field (strings) and at least one number
                    x = columns.index(p["options"]["xField"])
                    assert all(isinstance(r[x], str) for r in rows)
                    assert any(all(isinstance(r[i], int | float) for r in rows) for i in range(len(columns)) if i != x)
                checked += 1
            if p["type"] == "nodegraph":
                node_cols, nodes = frames["nodes"]
                edge_cols, edges = frames["edges"]
                assert set(node_cols) >= NODE_COLUMNS and set(edge_cols) >= EDGE_COLUMNS
                ids = {r[node_cols.index("id")] for r in nodes}
                for e in edges:  # every edge ends at a node
                    assert e[edge_cols.index("source")] in ids and e[edge_cols.index("target")] in ids
    assert checked


def test_totals_match_the_data(dashboard_db: tuple[Client, int]) -> None:
    """Spot checks that the panels count what was written, in both rollup branches."""
    client, now_ms = dashboard_db
    board = gen.top_talkers()
    pairs = board["panels"][0]["targets"][0]["rawSql"]
    (_, s6, e6), (_, s7, e7) = _time_ranges(now_ms)
    variables = {"namespace": Variable(["kube-system", "shop", "web"], [ALL]), "limit": Variable(["50"], ["50"])}
    rows = client.query(expand(pairs, TimeRange(s6, e6, 20), variables)).result_rows
    got = {(r[0], r[1]): r[2] for r in rows}
    # 2 flows x 1000 bytes x sampling 10, + the conntrack records api -> cart (180 unreplied, 400 established)
    assert got[("web/api", "shop/cart")] == 20000 + 180 + 400
    assert got[("shop/cart", "shop/db")] == 200 + 120  # + the refused conntrack attempt
    assert ("shop/cart", "kube-system/kube-dns") in got and got[("shop/cart", "external")] == 500 + 2000
    rows = client.query(expand(pairs, TimeRange(s7, e7, 600), variables)).result_rows
    got = {(r[0], r[1]): r[2] for r in rows}
    assert got[("shop/cart", "shop/db")] == 10320  # the 3-day-old flow is in the hourly rollup
    # Namespace filter: only pairs touching web.
    variables["namespace"] = Variable(["kube-system", "shop", "web"], ["web"])
    rows = client.query(expand(pairs, TimeRange(s6, e6, 20), variables)).result_rows
    assert {(r[0], r[1]) for r in rows} == {("web/api", "shop/cart"), ("web/front", "web/api"), ("web/api", "external"),
                                            ("external", "web/front"), ("external", "web/api"), ("shop/cart", "web/api")}


def _panel_rows(client: Client, board: dict[str, Any], title: str, tr: TimeRange,
                variables: dict[str, Variable]) -> list[dict[str, Any]]:
    (p,) = [p for p in board["panels"] if p["title"] == title]
    result = client.query(expand(p["targets"][0]["rawSql"], tr, variables))
    return [dict(zip(result.column_names, r, strict=True)) for r in result.result_rows]


def test_geo_panels_match_the_data(dashboard_db: tuple[Client, int]) -> None:
    """Egress/ingress by country, ASN and location: the GeoIP answers of GEO_AND_CONNTRACK's addresses,
    plus FLOWS' external flows (not geo-enriched: unknown), within the namespace filter."""
    client, now_ms = dashboard_db
    board = gen.leaving_the_cluster()
    (_, s6, e6), _ = _time_ranges(now_ms)
    tr = TimeRange(s6, e6, 20)
    def run(title: str, ns: str, direction: str) -> list[dict[str, Any]]:
        variables = {"namespace": Variable(["kube-system", "shop", "web"], [ns]),
                     "direction": Variable(["egress", "ingress"], [direction])}
        return _panel_rows(client, board, title, tr, variables)
    country = "By country ($direction)"
    assert {r["country"]: r["bytes"] for r in run(country, ALL, "egress")} == {
        "SE": 2000, "US": 800, "unknown": 500 + 70 + 300}
    assert {r["country"]: r["bytes"] for r in run(country, "web", "egress")} == {"US": 800, "unknown": 70 + 300}
    assert {r["country"]: r["bytes"] for r in run(country, "shop", "egress")} == {"SE": 2000, "unknown": 500}
    assert {r["country"]: r["bytes"] for r in run(country, ALL, "ingress")} == {"CN": 1500, "GB": 700}
    asn = {r["asn"]: r for r in run("By ASN / organisation ($direction)", ALL, "egress")}
    assert {a: r["bytes"] for a, r in asn.items()} == {29518: 2000, 209: 800, 1221: 300, 0: 570}
    assert asn[1221]["organisation"] == "Telstra Pty Ltd" and asn[0]["organisation"] == "unknown"
    # Both read the rollups (their retention, not the raw flows'), and count the same flows as raw.
    for title in (country, "By ASN / organisation ($direction)"):
        (p,) = [p for p in board["panels"] if p["title"] == title]
        assert "FROM flows_1m" in p["targets"][0]["rawSql"] and "FROM flows\n" not in p["targets"][0]["rawSql"]
    raw_flows = client.command(f"SELECT count() FROM flows WHERE dst_kind = 'external' AND flow_end "
                               f"BETWEEN '{s6:%Y-%m-%d %H:%M:%S}' AND '{e6:%Y-%m-%d %H:%M:%S}'")
    assert raw_flows > 0 and sum(r["flows"] for r in asn.values()) == raw_flows
    where = run("Where it goes / comes from ($direction)", ALL, "egress")
    assert sorted((r["place"], r["bytes"]) for r in where) == [("Linköping, SE", 2000), ("Milton, US", 800)]
    assert all(isinstance(r["latitude"], float) and isinstance(r["longitude"], float) for r in where)
    where = run("Where it goes / comes from ($direction)", "web", "ingress")
    assert [(r["place"], r["bytes"]) for r in where] == [("Changchun, CN", 1500), ("Boxford, GB", 700)]


def test_completeness_and_failure_panels_match_the_data(dashboard_db: tuple[Client, int]) -> None:
    """Pipeline health sums the completeness deltas; service detail counts each conntrack connection
    once (its initiator's record)."""
    client, now_ms = dashboard_db
    (_, s6, e6), (_, s7, e7) = _time_ranges(now_ms)
    health = gen.pipeline_health()
    rows = _panel_rows(client, health, "Completeness per exporter / node", TimeRange(s6, e6, 20), {})
    by_key = {(r["stage"], r["node"], r["source"]): r for r in rows}
    assert set(by_key) == {(stage, node, src) for stage, node, src in [
        ("sensor-netflow", "node-1", "::ffff:192.0.2.1"), ("sensor-netflow", "node-1", "kernel (socket)"),
        ("sensor-netflow", "node-2", "::ffff:192.0.2.2"), ("sensor-netflow", "node-2", "kernel (socket)"),
        ("sensor-conntrack", "node-1", "::ffff:192.0.2.1"), ("sensor-conntrack", "node-1", "kernel (socket)")]}
    one = by_key[("sensor-netflow", "node-1", "::ffff:192.0.2.1")]  # two minutes in 6 h
    assert (one["packets"], one["records"], one["sequence_lost"], one["dropped_backpressure"]) == (80, 2400, 24, 48)
    assert one["delivered_pct"] == 98.0 and by_key[("sensor-netflow", "node-1", "kernel (socket)")]["kernel_drops"] == 18
    stages = {r["stage"]: r for r in _panel_rows(client, health, "Per stage", TimeRange(s7, e7, 600), {})}
    assert stages["enricher"]["unknown_addresses"] == 21 and stages["enricher"]["duplicates_dropped"] == 15
    assert stages["enricher"]["implausible_time"] == 12 and stages["sensor-netflow"]["implausible_time"] == 0
    assert stages["sensor-netflow"]["records"] == 2 * 3 * 1200 and stages["sensor-netflow"]["kernel_drops"] == 2 * 3 * 9
    detail = gen.service_detail()
    variables = {"namespace": Variable(["shop", "web"], ["shop"]), "workload": Variable(["cart", "db"], ["cart"])}
    rows = _panel_rows(client, detail, "Connection failures by peer (conntrack)", TimeRange(s6, e6, 20), variables)
    assert [(r["peer"], r["dst_port"], r["unreplied"], r["refused"], r["connections"], r["failed_pct"])
            for r in rows] == [("from web/api", 8080, 1, 0, 2, 50.0), ("to shop/db", 5432, 0, 1, 1, 100.0)]


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


def test_service_map_picture_from_demo_data(tmp_path: Path) -> None:
    """The README's service map: the demo cluster's synthetic traffic through the enricher and the
    sink's writer, read back by the named Node Graph queries; the edges carry every scaled byte
    stored, every edge ends at a node, and graphviz draws it."""
    module = load_script(GRAFANA / "render_images.py")
    from flowtally.clickhouse import connect
    from flowtally.settings import ClickHouseSettings
    from sql import migrate

    client = connect(ClickHouseSettings(path=tmp_path / "chdb", database="flowtally_images"))
    try:
        migrate.migrate(client)
        now = int(client.query("SELECT toUnixTimestamp64Milli(now64(3))").result_rows[0][0])
        assert module.load_demo(client, now, flows=5000) == 5000
        nodes, edges = module.service_map_rows(client)
        stored = client.query("SELECT sum(bytes * sampling_rate) FROM flows").result_rows[0][0]
    finally:
        client.close()
    ids = {n["id"] for n in nodes}
    assert {"shop/frontend", "shop/cart", "external"} <= ids
    assert all(e["source"] in ids and e["target"] in ids for e in edges)
    assert sum(e["mainstat"] for e in edges) == stored
    assert sum(n["mainstat"] for n in nodes) == 2 * stored  # each byte counted at both ends
    dot = module.service_map_dot(nodes, edges, module.WINDOW_MIN * 60, max_pairs=10)
    assert dot.count(" -> ") == 10
    out = tmp_path / "map.png"
    module.render_png(dot, out)
    assert out.read_bytes()[:4] == b"\x89PNG"
