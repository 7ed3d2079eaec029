"""Render the README's pictures (Grafana itself does not run here):

- ``images/service-map-demo.png``: the service map of the demo's synthetic cluster. Its traffic
  (flowtally/dev/generator.py) goes through the enricher's pure core and the sink's writer into
  chDB, the named queries ``service_map_nodes`` / ``service_map_edges`` (what the Node Graph panel
  shows) read it back, and graphviz draws the graph, one box per namespace.
- ``images/layout-<dashboard>.png``: each dashboard's layout, drawn from its generated JSON: every panel at
  its grid position with its title, type and the tables it reads.

    python deploy/grafana/render_images.py            # rewrite deploy/grafana/images/*.png
    python deploy/grafana/render_images.py --out DIR  # somewhere else (the tests do)

Needs graphviz (``dot``, ``neato``; Debian package ``graphviz``, installed by deploy/local/setup.sh).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

IMAGES = HERE / "images"
DEMO_FLOWS = 50_000
DEMO_SEED = 1  # the cluster `flowtally demo` uses (synthetic_cluster(1))
WINDOW_MIN = 60
MAX_PAIRS = 28  # edges drawn in the service map picture (the busiest pairs)

#: Panel fill colours by type.
COLOURS = {"table": "#dbe9f6", "timeseries": "#e3f1dc", "nodegraph": "#fbe3c8", "geomap": "#f6dbe6",
           "barchart": "#ece1f5"}


def _dot(engine: str) -> str:
    found = shutil.which(engine)
    if not found:
        raise SystemExit(f"{engine} (graphviz) is missing: apt-get install graphviz, "
                         "or bash deploy/local/setup.sh")
    return found


def render_png(source: str, out: Path, engine: str = "dot") -> None:
    """Render DOT ``source`` to ``out`` with a graphviz ``engine``."""
    # neato -n2: node positions are given (pos in points), nothing is laid out.
    extra = ["-n2"] if engine == "neato" else []
    proc = subprocess.run([_dot(engine), *extra, "-Tpng", "-o", str(out)], input=source, text=True,
                          capture_output=True, timeout=120, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{engine} failed: {proc.stderr}")


def _q(text: str) -> str:
    """A DOT double-quoted string."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _html(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


# --- Dashboard layouts ------------------------------------------------------------------------

COL_PT, ROW_PT = 34, 22  # one grid column / row unit, in points


def tables_read(panel: dict[str, Any]) -> list[str]:
    """The tables a panel's SQL reads, in a stable order."""
    sql = " ".join(t["rawSql"] for t in panel["targets"])
    return sorted(set(re.findall(r"FROM (flows_1m|flows_1h|flows|completeness)\b", sql)))


def layout_dot(board: dict[str, Any]) -> str:
    """A DOT graph (neato -n2: positions in points) of the dashboard's panel grid."""
    panels = board["panels"]
    bottom = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    variables = [v["label"] for v in board["templating"]["list"] if v["type"] != "datasource"]
    title = board["title"] + (f"   [variables: {', '.join(variables)}]" if variables else "")
    lines = ["digraph layout {",
             f"  graph [label={_q(title)}, labelloc=t, fontsize=20, fontname=Helvetica, pad=0.2, "
             "bgcolor=white];",
             "  node [shape=box, style=\"rounded,filled\", fixedsize=true, fontname=Helvetica, "
             "color=\"#555555\"];"]
    for p in panels:
        g = p["gridPos"]
        width, height = g["w"] * COL_PT - 6, g["h"] * ROW_PT - 6
        x = (g["x"] + g["w"] / 2) * COL_PT
        y = (bottom - g["y"] - g["h"] / 2) * ROW_PT
        # The description, wrapped to the box (about 6 points per character at 10 points).
        wrapped = textwrap.wrap(p.get("description", ""), width=max(20, int(width / 5.6)))
        wrapped = wrapped[:max(1, g["h"] // 2 - 1)]
        about = "".join(f"<br/>{_html(line)}" for line in wrapped)
        label = (f"<<b>{_html(p['title'])}</b><br/><font point-size=\"11\">{_html(p['type'])}"
                 f" · {_html(', '.join(tables_read(p)))}</font><font point-size=\"10\" color=\"#555555\">"
                 f"<br/>{about}</font>>")
        fill = _q(COLOURS.get(p["type"], "#eeeeee"))
        lines.append(f"  p{p['id']} [label={label}, pos=\"{x:.0f},{y:.0f}!\", width={width / 72:.3f}, "
                     f"height={height / 72:.3f}, fillcolor={fill}, fontsize=13];")
    lines.append("}")
    return "\n".join(lines) + "\n"


# --- The service map of the demo cluster -------------------------------------------------------


def load_demo(client: Any, now_ms: int, flows: int = DEMO_FLOWS) -> int:
    """Write ``flows`` synthetic flows of the demo cluster, ending over the last half hour, through
    the enricher's core and the sink's writer; returns how many were written."""
    from enricher.enrich import enrich_batch
    from enricher.identity import IdentityIndex
    from enricher.inventory import Inventory
    from flowtally.dev.generator import inventory_owners, synthetic_cluster, synthetic_flows
    from sensors.schema import address16, build_raw_table
    from sink.rows import flow_rows
    from sink.writer import Writer

    cluster = synthetic_cluster(DEMO_SEED)
    owners = Inventory.model_validate({"owners": inventory_owners(cluster)}).owners
    columns = synthetic_flows(cluster, flows, DEMO_SEED, now_ms - 30 * 60_000, span_ms=29 * 60_000)
    n = len(columns["bytes"])
    import numpy as np

    raw = build_raw_table(columns | {
        "time_received": columns["end"] + 50, "version": np.full(n, 9), "observation_domain": np.zeros(n),
        "exporter": np.frombuffer(address16("192.0.2.1") * n, dtype=np.uint8).reshape(-1, 16),
    }, observer="demo")
    return Writer(client, "flows").insert(flow_rows(enrich_batch(raw, IdentityIndex(owners))), "images/demo")


def _rate(bps: float) -> str:
    for unit, size in (("MB/s", 1e6), ("kB/s", 1e3)):
        if bps >= size:
            return f"{bps / size:.1f} {unit}"
    return f"{bps:.0f} B/s"


def service_map_dot(nodes: list[dict[str, Any]], edges: list[dict[str, Any]], window_s: int,
                    max_pairs: int = MAX_PAIRS) -> str:
    """A DOT graph of the Node Graph queries' rows: nodes boxed per namespace; the two directions of
    a pair merged into one edge (arrowheads where traffic flows) labelled with bytes/s over the window
    and drawn thicker for more bytes; only the ``max_pairs`` busiest pairs, so it stays readable."""
    pairs: dict[tuple[str, str], dict[str, float]] = {}
    for e in edges:
        a, b = sorted((e["source"], e["target"]))
        pair = pairs.setdefault((a, b), {"fwd": 0.0, "back": 0.0})
        pair["fwd" if (e["source"], e["target"]) == (a, b) else "back"] += e["mainstat"]
    busiest = sorted(pairs.items(), key=lambda kv: (-(kv[1]["fwd"] + kv[1]["back"]), kv[0]))[:max_pairs]
    shown = {n for (a, b), _ in busiest for n in (a, b)}
    by_ns: dict[str, list[dict[str, Any]]] = {}
    for node in nodes:
        if node["id"] in shown:
            ns = node["id"].split("/", 1)[0] if "/" in node["id"] else ""
            by_ns.setdefault(ns, []).append(node)
    top = max((p["fwd"] + p["back"] for _, p in busiest), default=1) or 1
    title = (f"Service map of the demo cluster: bytes/s over {window_s // 60} min, "
             f"the {len(busiest)} busiest of {len(pairs)} pairs")
    lines = ["digraph service_map {",
             f"  graph [rankdir=LR, label={_q(title)}, labelloc=t, fontsize=20, fontname=Helvetica, "
             "nodesep=0.3, ranksep=1.4, pad=0.3, bgcolor=white, newrank=true];",
             "  node [shape=box, style=\"rounded,filled\", fillcolor=\"#dbe9f6\", fontname=Helvetica, "
             "fontsize=12];",
             "  edge [fontname=Helvetica, fontsize=10, color=\"#4a6fa5\", fontcolor=\"#333333\", "
             "arrowsize=0.7];"]
    for i, ns in enumerate(sorted(by_ns)):
        members = sorted(by_ns[ns], key=lambda n: n["id"])
        if ns:
            lines.append(f"  subgraph cluster_{i} {{ label={_q(ns)}; style=\"rounded\"; color=\"#999999\"; "
                         "fontname=Helvetica; fontsize=14;")
        for node in members:
            # Two lines: the DOT escape \\n is joined after quoting (quoting would escape it).
            label = _q(node["title"])[:-1] + "\\n" + _rate(node["mainstat"] / window_s) + '"'
            fill = "" if ns else ", fillcolor=\"#f6dbe6\""
            lines.append(f"    {_q(node['id'])} [label={label}{fill}];")
        if ns:
            lines.append("  }")
    for (a, b), p in busiest:
        total = p["fwd"] + p["back"]
        width = 0.8 + 6 * math.log1p(total) / math.log1p(top)
        direction = "both" if p["fwd"] and p["back"] else ("forward" if p["fwd"] else "back")
        lines.append(f"  {_q(a)} -> {_q(b)} [label={_q(_rate(total / window_s))}, dir={direction}, "
                     f"penwidth={width:.2f}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def service_map_rows(client: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The named queries service_map_nodes and service_map_edges over the last WINDOW_MIN minutes."""
    from sql import queries

    def rows(name: str) -> list[dict[str, Any]]:
        columns, data = queries.execute(client, name, {"minutes": str(WINDOW_MIN)})
        return [dict(zip(columns, r, strict=True)) for r in data]
    return rows("service_map_nodes"), rows("service_map_edges")


def render_service_map(out: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Load the demo data into a throwaway chDB, query the map and draw it; returns nodes and edges."""
    from flowtally.clickhouse import connect
    from flowtally.settings import ClickHouseSettings
    from sql import migrate

    with tempfile.TemporaryDirectory() as tmp:
        client = connect(ClickHouseSettings(path=Path(tmp) / "chdb", database="flowtally_images"))
        try:
            migrate.migrate(client)
            now = int(client.query("SELECT toUnixTimestamp64Milli(now64(3))").result_rows[0][0])
            load_demo(client, now)
            nodes, edges = service_map_rows(client)
        finally:
            client.close()
    render_png(service_map_dot(nodes, edges, WINDOW_MIN * 60), out)
    return nodes, edges


def _dashboards() -> dict[str, dict[str, Any]]:
    spec = importlib.util.spec_from_file_location("flowtally_grafana_generate", HERE / "generate.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return {name: json.loads(module.render(name)) for name in module.DASHBOARDS}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=IMAGES, help="directory of the PNGs")
    parser.add_argument("--no-service-map", action="store_true", help="only the dashboard layouts")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, board in _dashboards().items():
        render_png(layout_dot(board), args.out / f"layout-{name}.png", engine="neato")
        print(f"wrote {args.out}/layout-{name}.png")
    if not args.no_service_map:
        nodes, edges = render_service_map(args.out / "service-map-demo.png")
        print(f"wrote {args.out / 'service-map-demo.png'} ({len(nodes)} nodes, {len(edges)} edges)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
