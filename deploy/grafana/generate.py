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
``flows`` (addresses, ASN/GeoIP columns, TCP flags, conntrack states, insert times); its TTL is 15
days by default. Pipeline health reads the ``completeness`` table (per-minute deltas, summed).
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


#: Either side in the selected namespaces (no filter when All is selected). Parenthesised: the
#: plugin pastes the condition as is, and an OR next to an AND would escape the other filters.
NS_EITHER = ("$__conditionalAll((src_namespace IN (${namespace:singlequote})"
             " OR dst_namespace IN (${namespace:singlequote})), $namespace)")

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
    # Conntrack records carry conn_state; a connection has a record per direction, and the one its
    # initiator sent (initiator 1, or 0 when unknown) counts it once: src is the client.
    opened = "conn_state != '' AND initiator != 2"
    conn_peer = f"if({is_dst}, concat('from ', {workload('src')}), concat('to ', {workload('dst')}))"
    conn_failures = f"""
SELECT {conn_peer} AS peer, dst_port, proto,
       countIf(conn_state = 'unreplied') AS unreplied, countIf(conn_state = 'refused') AS refused,
       count() AS connections, round(100 * (unreplied + refused) / connections, 2) AS failed_pct,
       maxIf(flow_end, conn_state IN ('unreplied', 'refused')) AS last_failure
FROM flows
WHERE $__timeFilter(flow_end) AND {opened} AND (({is_dst}) OR ({is_src}))
GROUP BY peer, dst_port, proto
HAVING unreplied + refused > 0
ORDER BY unreplied + refused DESC, peer, dst_port, proto"""
    conn_failures_ts = f"""
SELECT $__timeInterval(flow_end) AS time, concat(conn_state, ' ', {conn_peer}) AS failure,
       count() AS connections
FROM flows
WHERE $__timeFilter(flow_end) AND {opened} AND conn_state IN ('unreplied', 'refused')
  AND (({is_dst}) OR ({is_src}))
GROUP BY time, failure
ORDER BY time, failure"""
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
        table(lo, "Connection failures by peer (conntrack)", conn_failures,
              description="From the conntrack sensor's raw flows: connections that got no answer "
                          "(unreplied: TCP SYN without SYN-ACK, UDP without reply) or were refused (reset "
                          "before established), per peer and destination port; 'to' = this workload's own "
                          "attempts, 'from' = attempts to it. failed_pct over all its connections with that "
                          "peer and port."),
        timeseries(lo, "Failed connections (conntrack), by state and peer", conn_failures_ts, unit="short"),
        table(lo, "Pods of this workload", pods, unit="decbytes",
              description="From raw flows: each pod (deleted ones too, while their flows are retained)."),
    ]
    workloads = ("SELECT DISTINCT w FROM (SELECT src_workload AS w FROM flows_1h"
                 " WHERE src_namespace = ${namespace:singlequote} UNION ALL SELECT dst_workload AS w"
                 " FROM flows_1h WHERE dst_namespace = ${namespace:singlequote}) WHERE w != '' ORDER BY w")
    return dashboard("flowtally-service-detail", "flowtally / Service detail",
                     "One workload: its inbound and outbound peers, history, connection failures (TCP flags "
                     "from NetFlow; unreplied/refused connections from conntrack) and pods.",
                     panels,
                     [namespace_var(multi=False), query_var("workload", "Workload", workloads)])


def leaving_the_cluster() -> dict[str, Any]:
    lo = Layout()
    # The direction variable flips every panel: egress reads the destination as the outside end
    # (dst_asn, dst_country, ...) and the source as the workload; ingress the other way round.
    def outside(column: str) -> str:
        return f"if('${{direction}}' = 'ingress', src_{column}, dst_{column})"
    def inside(column: str) -> str:
        return f"if('${{direction}}' = 'ingress', dst_{column}, src_{column})"
    crossing = f"{outside('kind')} = 'external' AND {NS_EITHER}"
    inside_workload = (f"if({inside('workload')} != '', "
                       f"concat({inside('namespace')}, '/', {inside('workload')}), {inside('kind')})")
    by_workload = f"""
SELECT {inside('namespace')} AS namespace,
       if({inside('workload')} != '', {inside('workload')}, {inside('kind')}) AS workload,
       sum(scaled_bytes) AS bytes, sum(scaled_packets) AS packets, sum(flows) AS flows,
       round(bytes / {RANGE_S}, 3) AS bytes_per_s
FROM {rollup(crossing)}
GROUP BY namespace, workload
ORDER BY bytes DESC, namespace, workload"""
    by_workload_ts = f"""
SELECT {bucket()} AS time, {inside_workload} AS workload, sum(scaled_bytes) / {STEP} AS bytes_per_s
FROM {rollup(crossing)}
GROUP BY time, workload
ORDER BY time, workload"""
    raw_crossing = f"$__timeFilter(flow_end) AND {crossing}"
    # By ASN and country from the rollups (their keys since migration 0009), so these two panels
    # cover the rollups' retention (2 years) rather than the raw flows' 15 days; rows rolled up
    # before 0009 have no organisation (''), hence max() per ASN.
    by_asn = f"""
SELECT {outside('asn')} AS asn,
       if(max({outside('as_org')}) != '', max({outside('as_org')}), 'unknown') AS organisation,
       sum(scaled_bytes) AS bytes, sum(flows) AS flows, round(bytes / {RANGE_S}, 3) AS bytes_per_s
FROM {rollup(crossing)}
GROUP BY asn
ORDER BY bytes DESC, asn"""
    by_country = f"""
SELECT if({outside('country')} != '', {outside('country')}, 'unknown') AS country,
       sum(scaled_bytes) AS bytes, sum(flows) AS flows
FROM {rollup(crossing)}
GROUP BY country
ORDER BY bytes DESC, country"""
    # Grafana's Geomap finds numeric fields named latitude/longitude (the layer below names them
    # too). Rounding to 0.1 degree (about 10 km) keeps one marker per city instead of one per address.
    geomap = f"""
SELECT round({outside('lat')}, 1) AS latitude, round({outside('lon')}, 1) AS longitude,
       any(if({outside('city')} != '', concat({outside('city')}, ', ', {outside('country')}),
              {outside('country')})) AS place,
       sum(bytes * sampling_rate) AS bytes, count() AS flows, uniqExact({outside('addr')}) AS addresses
FROM flows
WHERE {raw_crossing} AND NOT isNaN({outside('lat')}) AND NOT isNaN({outside('lon')})
GROUP BY latitude, longitude
ORDER BY bytes DESC, latitude, longitude"""
    peers_of = f"arrayStringConcat(arraySort(groupUniqArray(10)({inside_workload})), ', ')"
    destinations = f"""
SELECT toString({outside('addr')}) AS address, {outside('as_org')} AS organisation,
       {outside('country')} AS country, dst_port, proto,
       sum(bytes * sampling_rate) AS bytes, count() AS flows,
       {peers_of} AS workloads
FROM flows
WHERE {raw_crossing}
GROUP BY address, organisation, country, dst_port, proto
ORDER BY bytes DESC, address, dst_port
LIMIT 100"""
    new_destinations = f"""
SELECT namespace, workload, address, organisation, country, first_seen, bytes, flows
FROM (
    SELECT {inside('namespace')} AS namespace,
           if({inside('workload')} != '', {inside('workload')}, {inside('kind')}) AS workload,
           toString({outside('addr')}) AS address, any({outside('as_org')}) AS organisation,
           any({outside('country')}) AS country, min(flow_end) AS first_seen,
           sum(bytes * sampling_rate) AS bytes, count() AS flows
    FROM flows
    WHERE flow_end <= $__toTime AND {crossing}
    GROUP BY namespace, workload, address
)
WHERE first_seen >= $__fromTime
ORDER BY first_seen DESC, namespace, workload, address
LIMIT 100"""
    geo_layer = {
        "type": "markers", "name": "bytes", "tooltip": True,
        "location": {"mode": "coords", "latitude": "latitude", "longitude": "longitude"},
        "config": {"showLegend": True, "style": {
            "size": {"field": "bytes", "fixed": 5, "min": 4, "max": 30},
            "color": {"field": "bytes", "fixed": "dark-green"},
            "opacity": 0.5, "symbol": {"fixed": "img/icons/marker/circle.svg", "mode": "fixed"},
            "text": {"field": "place", "mode": "field"}, "textConfig": {"fontSize": 10, "offsetY": -12}}},
    }
    geomap_options = {"view": {"id": "fit", "lat": 0, "lon": 0, "zoom": 1, "allLayers": True},
                      "controls": {"showZoom": True, "mouseWheelZoom": True, "showAttribution": True},
                      "basemap": {"type": "default", "name": "basemap"}, "layers": [geo_layer],
                      "tooltip": {"mode": "details"}}
    rollup_note = "From the rollups, GeoIP/ASN as the enricher resolved them (MaxMind)."
    raw_note = "From raw flows (TTL 15 days by default), GeoIP/ASN as the enricher resolved them (MaxMind)."
    panels = [
        table(lo, "Bytes by workload ($direction)", by_workload, unit="decbytes",
              description="The in-cluster end of traffic to (egress) or from (ingress) external addresses."),
        timeseries(lo, "Bytes/s by workload ($direction)", by_workload_ts, unit="Bps"),
        table(lo, "By ASN / organisation ($direction)", by_asn, unit="decbytes",
              description=rollup_note + " ASN 0: the ASN database does not know the address (or none is "
                                     "mounted)."),
        panel(lo, "barchart", "By country ($direction)", [target(by_country)], unit="decbytes",
              description=rollup_note + " 'unknown': no country in the GeoIP database (or none mounted).",
              options={"xField": "country", "orientation": "horizontal", "showValue": "auto",
                       "legend": {"showLegend": False, "displayMode": "list", "placement": "bottom"}}),
        panel(lo, "geomap", "Where it goes / comes from ($direction)", [target(geomap)], w=24, h=12,
              description=raw_note + " One marker per location rounded to 0.1 degree, sized by bytes.",
              options=geomap_options),
        table(lo, "Top external addresses ($direction)", destinations, unit="decbytes", description=raw_note),
        table(lo, "New external addresses ($direction)", new_destinations, unit="decbytes",
              description="(Workload, external address) pairs first seen in the time range, within the "
                          "retained raw flows: 'new' means not seen earlier in the retained history."),
    ]
    return dashboard("flowtally-egress", "flowtally / Leaving the cluster",
                     "Traffic between workloads and addresses no cluster object owns (kind external): per "
                     "workload, ASN, organisation and country from the rollups; on a map and per address "
                     "from the raw flows' GeoIP columns. Direction: egress (workload -> outside) or ingress "
                     "(outside -> workload).",
                     panels, [namespace_var(), custom_var("direction", "Direction", ["egress", "ingress"])])


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
    # completeness rows are deltas (several workers, restarts): always sum() ... GROUP BY.
    # The kernel's socket drops have no exporter (::), so they get a row of their own.
    exporter = "if(exporter = toIPv6('::'), 'kernel (socket)', toString(exporter))"
    per_exporter = f"""
SELECT stage, observer AS node, {exporter} AS source, observation_domain,
       sum(packets) AS packets, sum(records) AS records, sum(decode_errors) AS decode_errors,
       sum(sequence_lost) AS sequence_lost, sum(dropped_backpressure) AS dropped_backpressure,
       sum(kernel_drops) AS kernel_drops,
       if(records = 0, NULL, round(100 * (records - dropped_backpressure) / records, 3)) AS delivered_pct,
       max(minute) AS last_minute
FROM completeness
WHERE $__timeFilter(minute) AND stage != 'enricher'
GROUP BY stage, node, source, observation_domain
ORDER BY stage, node, source, observation_domain"""
    per_stage = """
SELECT stage, sum(packets) AS packets, sum(records) AS records, sum(bytes) AS bytes,
       sum(decode_errors) AS decode_errors, sum(sequence_lost) AS sequence_lost,
       sum(dropped_backpressure) AS dropped_backpressure, sum(kernel_drops) AS kernel_drops,
       sum(unknown_addresses) AS unknown_addresses, sum(ignored) AS ignored, sum(late) AS late,
       sum(duplicates_dropped) AS duplicates_dropped, sum(implausible_time) AS implausible_time,
       uniqExact(observer) AS nodes
FROM completeness
WHERE $__timeFilter(minute)
GROUP BY stage
ORDER BY stage"""
    per_minute = "* 60 / greatest($__interval_s, 60)"
    drops = f"""
SELECT $__timeInterval(minute) AS time,
       sum(decode_errors) {per_minute} AS decode_errors, sum(sequence_lost) {per_minute} AS sequence_lost,
       sum(dropped_backpressure) {per_minute} AS dropped_backpressure,
       sum(kernel_drops) {per_minute} AS kernel_drops
FROM completeness
WHERE $__timeFilter(minute) AND stage != 'enricher'
GROUP BY time
ORDER BY time"""
    received = f"""
SELECT $__timeInterval(minute) AS time, concat(stage, ' ', observer) AS source,
       sum(records) {per_minute} AS records_per_minute
FROM completeness
WHERE $__timeFilter(minute) AND stage != 'enricher'
GROUP BY time, source
ORDER BY time, source"""
    enricher = f"""
SELECT $__timeInterval(minute) AS time,
       sum(unknown_addresses) {per_minute} AS unknown_addresses, sum(ignored) {per_minute} AS ignored,
       sum(late) {per_minute} AS late, sum(duplicates_dropped) {per_minute} AS duplicates_dropped,
       sum(implausible_time) {per_minute} AS implausible_time
FROM completeness
WHERE $__timeFilter(minute) AND stage = 'enricher'
GROUP BY time
ORDER BY time"""
    panels = [
        timeseries(lo, "Rows inserted per minute, by exporter / node", inserted, unit="short"),
        timeseries(lo, "Lag: inserted_at - flow_end", lag, unit="s",
                   description="How long a flow takes from its end at the exporter to being queryable: "
                               "exporter active/inactive timeouts plus the pipeline's own latency."),
        table(lo, "Completeness per exporter / node", per_exporter, w=24,
              description="From the sensors' completeness records (table completeness): datagrams and "
                          "records received, decode errors, records the exporter's sequence numbers say "
                          "were lost, flows dropped because Kafka did not keep up, and kernel socket drops "
                          "(exporter unknown: own row). delivered_pct: records handed to Kafka / records "
                          "decoded."),
        timeseries(lo, "Sensor drops per minute, by reason", drops, unit="short",
                   description="Sums over all sensors: decode errors, sequence losses, backpressure drops, "
                               "kernel socket drops."),
        timeseries(lo, "Records received per minute, by sensor", received, unit="short"),
        table(lo, "Per stage", per_stage, w=24,
              description="Every counter summed per stage (sensor-netflow, sensor-conntrack, enricher); "
                          "the enricher counts flows with an unknown address, ignored flows, flows later "
                          "than the identity history, and duplicate observations it dropped."),
        timeseries(lo, "Enricher: unknown, ignored, late, duplicates per minute", enricher, unit="short",
                   w=24),
        table(lo, "Exporters and nodes (stored flows)", sources, w=24,
              description="Per observation point in the flows table: rows stored, last insert and median "
                          "lag."),
    ]
    return dashboard("flowtally-pipeline", "flowtally / Pipeline health",
                     "Is data arriving, from whom, how late, and how complete: the stages' per-minute "
                     "completeness records (received, decode errors, sequence losses, drops by reason, the "
                     "enricher's unknown/ignored/late/duplicates) and the flows table's insert times.",
                     panels, [], time_from="now-3h")


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
