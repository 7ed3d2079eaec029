"""Generate flowtally's Grafana dashboards (deploy/grafana/dashboards/*.json) from code.

    python deploy/grafana/generate.py           # rewrite the JSON files
    python deploy/grafana/generate.py --check   # exit 1 if a committed file differs

The JSON is committed so Grafana can provision it without Python; tests regenerate it and fail
when it differs, and run every panel's SQL on chDB with the plugin's macros expanded
(tests/integration/test_grafana_dashboards.py).

Dashboards import anywhere: the datasource is the variable ``${datasource}`` (type
grafana-clickhouse-datasource), no panel carries a pluginVersion, no variable a current value.

Windows: panels read the rollups. Up to one day of dashboard time range they read the per-minute
rollup ``flows_1m``; beyond, the per-hour ``flows_1h`` (hour-aligned). Rates divide by the bucket
width, never finer than the rollup's resolution. Only what the rollups cannot answer reads raw
``flows`` (addresses, TCP flags, insert times); its TTL is 15 days by default.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

OUT_DIR = Path(__file__).resolve().parent / "dashboards"
PLUGIN = "grafana-clickhouse-datasource"
DS = {"type": PLUGIN, "uid": "${datasource}"}
# The plugin's query formats (src/types: TIMESERIES = 0, TABLE = 1).
FORMAT_TIMESERIES, FORMAT_TABLE = 0, 1

# --- SQL building blocks --------------------------------------------------------------------

#: True when the dashboard's time range is longer than a day: read the per-hour rollup.
LONG = "dateDiff('second', $__fromTime, $__toTime) > 86400"
#: Seconds per bucket of a rollup time series: the panel interval, at least the rollup's own.
STEP = f"greatest($__interval_s, if({LONG}, 3600, 60))"
#: Seconds in the dashboard's time range (rates over the whole window divide by this).
RANGE_S = "greatest(dateDiff('second', $__fromTime, $__toTime), 1)"


def rollup(where: str = "1") -> str:
    """The rollup rows in the dashboard's time range (flows_1m up to a day, flows_1h beyond)."""
    return (
        "(\n"
        f"    SELECT * FROM flows_1m WHERE NOT ({LONG}) AND $__timeFilter(time) AND ({where})\n"
        "    UNION ALL\n"
        f"    SELECT * FROM flows_1h WHERE {LONG} AND time >= toStartOfHour($__fromTime)"
        f" AND time <= $__toTime AND ({where})\n"
        ")"
    )


def bucket(column: str = "time") -> str:
    """A rollup time bucket of STEP seconds."""
    return f"toStartOfInterval({column}, toIntervalSecond({STEP}))"


def workload(side: str) -> str:
    """namespace/workload, else namespace/service, else the address kind (external, private…)."""
    return (f"if({side}_workload != '', concat({side}_namespace, '/', {side}_workload), "
            f"if({side}_service != '', concat({side}_namespace, '/', {side}_service), {side}_kind))")


def service(side: str) -> str:
    """namespace/service, else namespace/workload, else the address kind."""
    return (f"if({side}_service != '', concat({side}_namespace, '/', {side}_service), "
            f"if({side}_workload != '', concat({side}_namespace, '/', {side}_workload), {side}_kind))")


#: Either side in the selected namespaces (no filter when All is selected).
NS_EITHER = ("$__conditionalAll(src_namespace IN (${namespace:singlequote})"
             " OR dst_namespace IN (${namespace:singlequote}), $namespace)")

# --- Dashboard model ------------------------------------------------------------------------


def target(sql: str, fmt: int = FORMAT_TABLE, ref: str = "A") -> dict[str, Any]:
    return {
        "datasource": DS,
        "editorType": "sql",
        "format": fmt,
        "queryType": "timeseries" if fmt == FORMAT_TIMESERIES else "table",
        "rawSql": sql.strip() + "\n",
        "refId": ref,
    }


class Layout:
    """Places panels left to right on Grafana's 24-column grid."""

    def __init__(self) -> None:
        self.x = self.y = self.row_h = 0
        self.next_id = 1

    def place(self, w: int, h: int) -> dict[str, int]:
        if self.x + w > 24:
            self.x, self.y, self.row_h = 0, self.y + self.row_h, 0
        pos = {"h": h, "w": w, "x": self.x, "y": self.y}
        self.x += w
        self.row_h = max(self.row_h, h)
        return pos


def panel(layout: Layout, kind: str, title: str, targets: list[dict[str, Any]], *, w: int = 12, h: int = 9,
          description: str = "", unit: str | None = None, min_interval: str | None = None,
          options: dict[str, Any] | None = None) -> dict[str, Any]:
    p: dict[str, Any] = {
        "datasource": DS,
        "description": description,
        "fieldConfig": {"defaults": {"unit": unit} if unit else {}, "overrides": []},
        "gridPos": layout.place(w, h),
        "id": layout.next_id,
        "options": options or {},
        "targets": targets,
        "title": title,
        "type": kind,
    }
    if min_interval:
        p["interval"] = min_interval
    layout.next_id += 1
    return p


def timeseries(layout: Layout, title: str, sql: str, **kw: Any) -> dict[str, Any]:
    kw.setdefault("min_interval", "1m")
    return panel(layout, "timeseries", title, [target(sql, FORMAT_TIMESERIES)], **kw)


def table(layout: Layout, title: str, sql: str, **kw: Any) -> dict[str, Any]:
    return panel(layout, "table", title, [target(sql)], **kw)


def datasource_var() -> dict[str, Any]:
    return {"name": "datasource", "label": "ClickHouse", "type": "datasource", "query": PLUGIN,
            "hide": 0, "refresh": 1, "regex": "", "current": {}}


def query_var(name: str, label: str, sql: str, *, multi: bool = False,
              include_all: bool = False) -> dict[str, Any]:
    return {"name": name, "label": label, "type": "query", "datasource": DS,
            "definition": sql, "query": sql, "refresh": 1, "sort": 1,
            "multi": multi, "includeAll": include_all, "hide": 0, "regex": "", "current": {}, "options": []}


def custom_var(name: str, label: str, values: list[str]) -> dict[str, Any]:
    return {"name": name, "label": label, "type": "custom", "query": ",".join(values),
            "multi": False, "includeAll": False, "hide": 0, "current": {},
            "options": [{"selected": i == 0, "text": v, "value": v} for i, v in enumerate(values)]}


NAMESPACES_SQL = ("SELECT DISTINCT ns FROM (SELECT src_namespace AS ns FROM flows_1h UNION ALL "
                  "SELECT dst_namespace AS ns FROM flows_1h) WHERE ns != '' ORDER BY ns")


def namespace_var(*, multi: bool = True) -> dict[str, Any]:
    return query_var("namespace", "Namespace", NAMESPACES_SQL, multi=multi, include_all=multi)


def dashboard(uid: str, title: str, description: str, panels: list[dict[str, Any]],
              variables: list[dict[str, Any]], time_from: str = "now-6h") -> dict[str, Any]:
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["flowtally"],
        "editable": True,
        "refresh": "1m",
        "schemaVersion": 39,
        "time": {"from": time_from, "to": "now"},
        "timezone": "utc",
        "templating": {"list": [datasource_var(), *variables]},
        "panels": panels,
        "links": [{"asDropdown": True, "includeVars": False, "keepTime": True, "tags": ["flowtally"],
                   "title": "flowtally", "type": "dashboards"}],
    }


# --- The dashboards -------------------------------------------------------------------------


def top_talkers() -> dict[str, Any]:
    lo = Layout()
    pairs = f"""
SELECT {service('src')} AS source, {service('dst')} AS destination,
       sum(scaled_bytes) AS bytes, sum(scaled_packets) AS packets, sum(flows) AS flows,
       round(bytes / {RANGE_S}, 3) AS bytes_per_s
FROM {rollup(NS_EITHER)}
GROUP BY source, destination
ORDER BY bytes DESC, source, destination
LIMIT $limit"""
    def series(value: str, alias: str) -> str:
        return f"""
SELECT {bucket()} AS time, concat({service('src')}, ' -> ', {service('dst')}) AS pair,
       sum({value}) / {STEP} AS {alias}
FROM {rollup(NS_EITHER)}
WHERE pair IN (
    SELECT concat({service('src')}, ' -> ', {service('dst')}) AS p FROM {rollup(NS_EITHER)}
    GROUP BY p ORDER BY sum(scaled_bytes) DESC, p LIMIT $limit)
GROUP BY time, pair
ORDER BY time, pair"""
    panels = [
        table(lo, "Service pairs by bytes", pairs, w=24, h=10, unit="decbytes",
              description="Source -> destination service (namespace/service, else namespace/workload, "
                          "else the address kind), sampling-scaled, over the dashboard's time range."),
        timeseries(lo, "Bytes/s by service pair (top $limit)", series("scaled_bytes", "bytes_per_s"),
                   unit="Bps"),
        timeseries(lo, "Packets/s by service pair (top $limit by bytes)",
                   series("scaled_packets", "packets_per_s"), unit="pps"),
        timeseries(lo, "Flows/s by service pair (top $limit by bytes)", series("flows", "flows_per_s"),
                   unit="short", w=24),
    ]
    return dashboard("flowtally-top-talkers", "flowtally / Top talkers",
                     "Who sends the most to whom, between services, from the rollups.", panels,
                     [namespace_var(), custom_var("limit", "Top", ["10", "20", "50"])])


def service_map() -> dict[str, Any]:
    lo = Layout()
    def node(side: str) -> str:
        return (f"if('${{group}}' = 'namespace', if({side}_namespace != '', {side}_namespace, {side}_kind), "
                f"{workload(side)})")
    directed = ("$__conditionalAll(('${direction}' IN ('both', 'outbound')"
                " AND src_namespace IN (${namespace:singlequote}))"
                " OR ('${direction}' IN ('both', 'inbound') AND dst_namespace IN (${namespace:singlequote})),"
                " $namespace)")
    edges_cte = f"""
SELECT {node('src')} AS source, {node('dst')} AS target,
       sum(scaled_bytes) AS bytes, sum(flows) AS nflows
FROM {rollup(directed)}
GROUP BY source, target"""
    nodes = f"""
SELECT id, any(title) AS title, any(subtitle) AS subtitle,
       round(sum(bytes) / {RANGE_S}, 3) AS mainstat, sum(nflows) AS secondarystat
FROM (
    SELECT source AS id, splitByChar('/', source)[-1] AS title,
           if(position(source, '/') > 0, splitByChar('/', source)[1], '') AS subtitle, bytes, nflows
    FROM ({edges_cte})
    UNION ALL
    SELECT target AS id, splitByChar('/', target)[-1] AS title,
           if(position(target, '/') > 0, splitByChar('/', target)[1], '') AS subtitle, bytes, nflows
    FROM ({edges_cte})
)
GROUP BY id
ORDER BY mainstat DESC, id"""
    edges = f"""
SELECT concat(source, ' -> ', target) AS id, source, target,
       round(bytes / {RANGE_S}, 3) AS mainstat, nflows AS secondarystat
FROM ({edges_cte})
ORDER BY mainstat DESC, id"""
    edge_table = f"""
SELECT source, target, bytes, nflows AS flows, round(bytes / {RANGE_S}, 3) AS bytes_per_s
FROM ({edges_cte})
ORDER BY bytes DESC, source, target"""
    panels = [
        panel(lo, "nodegraph", "Who talks to whom (bytes/s on edges)",
              [target(nodes, ref="nodes"), target(edges, ref="edges")], w=24, h=16,
              description="Nodes: workloads (or namespaces), mainstat bytes/s sent + received, secondarystat "
                          "flows. Edges: bytes/s and flows from source to target over the time range."),
        table(lo, "Edges", edge_table, w=24, h=10, unit="decbytes"),
    ]
    return dashboard("flowtally-service-map", "flowtally / Service map",
                     "Node Graph of who talks to whom, by workload or namespace, from the rollups. Direction "
                     "applies the namespace filter to the sending side (outbound), receiving side (inbound) "
                     "or either (both).", panels,
                     [namespace_var(), custom_var("group", "Group by", ["workload", "namespace"]),
                      custom_var("direction", "Direction", ["both", "outbound", "inbound"])])


def service_detail() -> dict[str, Any]:
    lo = Layout()
    is_dst = "dst_namespace = ${namespace:singlequote} AND dst_workload = ${workload:singlequote}"
    is_src = "src_namespace = ${namespace:singlequote} AND src_workload = ${workload:singlequote}"
    def peers(direction: str) -> str:
        this, peer = ("dst", "src") if direction == "inbound" else ("src", "dst")
        cond = is_dst if this == "dst" else is_src
        return f"""
SELECT {workload(peer)} AS peer, proto, dst_port,
       sum(scaled_bytes) AS bytes, sum(scaled_packets) AS packets, sum(flows) AS flows,
       round(bytes / {RANGE_S}, 3) AS bytes_per_s
FROM {rollup(cond)}
GROUP BY peer, proto, dst_port
ORDER BY bytes DESC, peer, proto, dst_port"""
    history = f"""
SELECT {bucket()} AS time, if({is_dst}, 'inbound', 'outbound') AS direction,
       sum(scaled_bytes) / {STEP} AS bytes_per_s
FROM {rollup(f'({is_dst}) OR ({is_src})')}
GROUP BY time, direction
ORDER BY time, direction"""
    by_peer = f"""
SELECT {bucket()} AS time,
       if({is_dst}, concat('from ', {workload('src')}), concat('to ', {workload('dst')})) AS peer,
       sum(scaled_bytes) / {STEP} AS bytes_per_s
FROM {rollup(f'({is_dst}) OR ({is_src})')}
GROUP BY time, peer
ORDER BY time, peer"""
    failures = f"""
SELECT $__timeInterval(flow_end) AS time,
       countIf(bitAnd(tcp_flags, 18) = 2) AS unanswered_syn,
       countIf(bitAnd(tcp_flags, 4) != 0) AS resets
FROM flows
WHERE $__timeFilter(flow_end) AND proto = 6 AND (({is_dst}) OR ({is_src}))
GROUP BY time
ORDER BY time"""
    pods = f"""
SELECT if({is_src}, src_name, dst_name) AS pod,
       sumIf(bytes * sampling_rate, {is_src}) AS bytes_out,
       sumIf(bytes * sampling_rate, {is_dst}) AS bytes_in,
       count() AS flows, max(flow_end) AS last_seen
FROM flows
WHERE $__timeFilter(flow_end) AND (({is_dst}) OR ({is_src}))
GROUP BY pod
ORDER BY bytes_out + bytes_in DESC, pod"""
    panels = [
        table(lo, "Inbound peers (who sends to it)", peers("inbound"), unit="decbytes"),
        table(lo, "Outbound peers (whom it sends to)", peers("outbound"), unit="decbytes"),
        timeseries(lo, "In / out bytes/s", history, unit="Bps"),
        timeseries(lo, "Bytes/s by peer", by_peer, unit="Bps"),
        timeseries(lo, "TCP connection failures (SYN without ACK, resets)", failures, unit="short",
                   description="From raw flows (TTL 15 days by default): flows whose cumulative TCP flags "
                               "hold SYN without ACK (unanswered attempts) or RST."),
        table(lo, "Pods of this workload", pods, unit="decbytes",
              description="From raw flows: each pod (deleted ones too, while their flows are retained)."),
    ]
    workloads = ("SELECT DISTINCT w FROM (SELECT src_workload AS w FROM flows_1h"
                 " WHERE src_namespace = ${namespace:singlequote} UNION ALL SELECT dst_workload AS w"
                 " FROM flows_1h WHERE dst_namespace = ${namespace:singlequote}) WHERE w != '' ORDER BY w")
    return dashboard("flowtally-service-detail", "flowtally / Service detail",
                     "One workload: its inbound and outbound peers, history and TCP connection failures.",
                     panels,
                     [namespace_var(multi=False), query_var("workload", "Workload", workloads)])


def leaving_the_cluster() -> dict[str, Any]:
    lo = Layout()
    egress = f"""
SELECT src_namespace AS namespace, if(src_workload != '', src_workload, src_kind) AS workload,
       sum(scaled_bytes) AS bytes, sum(scaled_packets) AS packets, sum(flows) AS flows,
       round(bytes / {RANGE_S}, 3) AS bytes_per_s
FROM {rollup("dst_kind = 'external' AND " + NS_EITHER)}
GROUP BY namespace, workload
ORDER BY bytes DESC, namespace, workload"""
    egress_ts = f"""
SELECT {bucket()} AS time, {workload('src')} AS workload, sum(scaled_bytes) / {STEP} AS bytes_per_s
FROM {rollup("dst_kind = 'external' AND " + NS_EITHER)}
GROUP BY time, workload
ORDER BY time, workload"""
    destinations = """
SELECT toString(dst_addr) AS destination, dst_port, proto,
       sum(bytes * sampling_rate) AS bytes, count() AS flows,
       arrayStringConcat(arraySort(groupUniqArray(10)(
           if(src_workload != '', concat(src_namespace, '/', src_workload), src_kind))), ', ')
       AS from_workloads
FROM flows
WHERE $__timeFilter(flow_end) AND dst_kind = 'external' AND """ + NS_EITHER + """
GROUP BY destination, dst_port, proto
ORDER BY bytes DESC, destination, dst_port
LIMIT 100"""
    new_destinations = """
SELECT namespace, workload, destination, first_seen, bytes, flows
FROM (
    SELECT src_namespace AS namespace, if(src_workload != '', src_workload, src_kind) AS workload,
           toString(dst_addr) AS destination, min(flow_end) AS first_seen,
           sum(bytes * sampling_rate) AS bytes, count() AS flows
    FROM flows
    WHERE dst_kind = 'external' AND flow_end <= $__toTime AND """ + NS_EITHER + """
    GROUP BY namespace, workload, dst_addr
)
WHERE first_seen >= $__fromTime
ORDER BY first_seen DESC, namespace, workload, destination
LIMIT 100"""
    panels = [
        table(lo, "Egress by workload", egress, unit="decbytes"),
        timeseries(lo, "Egress bytes/s by workload", egress_ts, unit="Bps"),
        table(lo, "Top external destinations", destinations, unit="decbytes",
              description="From raw flows (TTL 15 days by default)."),
        table(lo, "New external destinations", new_destinations, unit="decbytes",
              description="Pairs (workload, external address) first seen in the time range, within the "
                          "retained raw flows: 'new' means not seen earlier in the retained history."),
    ]
    # TODO(geo): egress by ASN / organisation / country and a Geomap (lat/lon) need the geo/ASN
    # columns of the enrichment; `flows` has none yet. Add those panels when the schema has them.
    return dashboard("flowtally-egress", "flowtally / Leaving the cluster",
                     "Traffic to addresses no cluster object owns (kind external). Per ASN, organisation and "
                     "country, and the Geomap, come with the geo/ASN enrichment columns (not in the flows "
                     "table yet).", panels, [namespace_var()])


def pipeline_health() -> dict[str, Any]:
    lo = Layout()
    source = "if(observer != '', observer, toString(exporter))"
    inserted = f"""
SELECT $__timeInterval(inserted_at) AS time, {source} AS source,
       count() * 60 / $__interval_s AS rows_per_minute
FROM flows
WHERE $__timeFilter(inserted_at)
GROUP BY time, source
ORDER BY time, source"""
    lag = """
SELECT $__timeInterval(inserted_at) AS time,
       quantile(0.5)(dateDiff('millisecond', flow_end, inserted_at)) / 1000 AS p50_s,
       quantile(0.99)(dateDiff('millisecond', flow_end, inserted_at)) / 1000 AS p99_s,
       max(dateDiff('millisecond', flow_end, inserted_at)) / 1000 AS max_s
FROM flows
WHERE $__timeFilter(inserted_at)
GROUP BY time
ORDER BY time"""
    sources = f"""
SELECT {source} AS source, observation_domain, any(version) AS version, count() AS rows,
       max(inserted_at) AS last_insert, max(flow_end) AS last_flow_end,
       dateDiff('second', max(inserted_at), now()) AS seconds_since_last_insert,
       round(quantile(0.5)(dateDiff('millisecond', flow_end, inserted_at)) / 1000, 3) AS median_lag_s
FROM flows
WHERE $__timeFilter(inserted_at)
GROUP BY source, observation_domain
ORDER BY source, observation_domain"""
    panels = [
        timeseries(lo, "Rows inserted per minute, by exporter / node", inserted, unit="short"),
        timeseries(lo, "Lag: inserted_at - flow_end", lag, unit="s",
                   description="How long a flow takes from its end at the exporter to being queryable: "
                               "exporter active/inactive timeouts plus the pipeline's own latency."),
        table(lo, "Exporters and nodes", sources, w=24,
              description="Per observation point: rows stored, last insert and median lag. Completeness "
                          "(sequence losses, decode errors, drops by reason) comes from the sensors' "
                          "completeness topic once it is stored in ClickHouse; until then see each stage's "
                          "/metrics."),
    ]
    return dashboard("flowtally-pipeline", "flowtally / Pipeline health",
                     "Is data arriving, from whom, and how late. Completeness per exporter and drops by "
                     "reason are on the stages' /metrics until they are stored in ClickHouse.", panels, [],
                     time_from="now-3h")


DASHBOARDS = {
    "top-talkers": top_talkers,
    "service-map": service_map,
    "service-detail": service_detail,
    "leaving-the-cluster": leaving_the_cluster,
    "pipeline-health": pipeline_health,
}


def render(name: str) -> str:
    """The committed JSON text of dashboard ``name``."""
    return json.dumps(DASHBOARDS[name](), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args(argv)
    OUT_DIR.mkdir(exist_ok=True)
    stale = []
    for name in DASHBOARDS:
        path = OUT_DIR / f"{name}.json"
        text = render(name)
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(path.name)
        else:
            path.write_text(text)
    if stale:
        print(f"stale: {', '.join(stale)}; run python deploy/grafana/generate.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
