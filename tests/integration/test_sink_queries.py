"""Each named query on chDB, on a small data set with known totals (rollups fed by the sink's writer)."""

from __future__ import annotations

import argparse
import datetime as dt

import numpy as np
import pyarrow as pa
import pytest
from clickhouse_connect.driver.client import Client

from enricher.enrich import enrich_batch
from enricher.identity import IdentityIndex
from enricher.inventory import Owner
from flowtally.settings import ClickHouseSettings
from sensors.schema import address16, build_raw_table
from sink.rows import flow_rows
from sink.writer import Writer
from sql import migrate, queries

CART, DB, API = "10.244.1.7", "10.244.2.9", "10.244.3.3"
OWNERS = [
    Owner(ip=CART, namespace="shop", name="cart-1", workload="cart", workload_kind="Deployment", service="cart"),
    Owner(ip=DB, namespace="shop", name="db-0", workload="db", workload_kind="StatefulSet", service="db"),
    Owner(ip=API, namespace="web", name="api-x", workload="api", workload_kind="Deployment", service="api"),
]
MIN, HOUR, DAY = 60_000, 3_600_000, 86_400_000


def _flows(rows: list[tuple[str, str, int, int, int, int, int]], now_ms: int) -> pa.Table:
    """(src, dst, bytes, packets, sampling, dst_port, age_ms) per flow."""
    n = len(rows)
    src, dst, nbytes, packets, sampling, port, age = zip(*rows, strict=True)
    def addr(texts: tuple[str, ...]) -> np.ndarray:
        return np.frombuffer(b"".join(address16(t) for t in texts), dtype=np.uint8).reshape(-1, 16)
    end = now_ms - np.array(age)
    raw = build_raw_table({
        "src_addr": addr(src), "dst_addr": addr(dst), "bytes": np.array(nbytes), "packets": np.array(packets),
        "sampling_rate": np.array(sampling), "dst_port": np.array(port), "src_port": np.full(n, 40000),
        "proto": np.full(n, 6), "start": end - 1000, "end": end, "time_received": end + 10,
    })
    return flow_rows(enrich_batch(raw, IdentityIndex(OWNERS)))


@pytest.fixture
def loaded(clickhouse: Client) -> tuple[Client, int]:
    migrate.migrate(clickhouse)
    now = int(clickhouse.query("SELECT toUnixTimestamp64Milli(now64(3))").result_rows[0][0])
    writer = Writer(clickhouse, "flows")
    writer.insert(_flows([
        (CART, DB, 100, 1, 1, 5432, 5 * MIN),
        (CART, DB, 100, 1, 1, 5432, 6 * MIN),
        (CART, DB, 100, 1, 1, 5432, 7 * MIN),
        (API, CART, 1000, 2, 10, 8080, 10 * MIN),     # sampled 1:10 -> 10000 bytes, 20 packets each
        (API, CART, 1000, 2, 10, 8080, 12 * MIN),
        (CART, "81.2.69.160", 500, 5, 1, 443, 3 * MIN),
        (API, "8.8.8.8", 70, 1, 1, 53, 2 * MIN),
        (DB, CART, 40, 1, 1, 45000, 5 * MIN),          # reply flow: ephemeral port -> bucket 0
    ], now), "q/recent")
    writer.insert(_flows([
        (CART, DB, 10_000, 10, 1, 5432, 3 * HOUR),     # outside a 60-minute window
        (API, "8.8.8.8", 30, 1, 1, 53, 3 * DAY),       # 8.8.8.8 was already known 3 days ago
    ], now), "q/old")
    return clickhouse, now


def test_top_services(loaded: tuple[Client, int]) -> None:
    client, _ = loaded
    columns, rows = queries.execute(client, "top_services")
    assert columns == ["source", "destination", "bytes", "packets", "flows"]
    assert rows == [("web/api", "shop/cart", 20000, 40, 2), ("shop/cart", "external", 500, 5, 1),
                    ("shop/cart", "shop/db", 300, 3, 3), ("web/api", "external", 70, 1, 1),
                    ("shop/db", "shop/cart", 40, 1, 1)]
    _, rows = queries.execute(client, "top_services", {"minutes": "0", "limit": "3"})
    assert rows[:3] == [("web/api", "shop/cart", 20000, 40, 2), ("shop/cart", "shop/db", 10300, 13, 4),
                        ("shop/cart", "external", 500, 5, 1)]
    _, rows = queries.execute(client, "top_services", {"minutes": "10080", "limit": "100"})  # a week: hourly rollup
    assert sum(r[2] for r in rows) == 20000 + 10300 + 500 + 70 + 30 + 40


def test_service_peers(loaded: tuple[Client, int]) -> None:
    client, _ = loaded
    columns, rows = queries.execute(client, "service_peers", {"namespace": "shop", "service": "cart", "minutes": "0"})
    assert columns == ["direction", "peer", "proto", "dst_port", "bytes", "packets", "flows"]
    assert rows == [("inbound", "web/api", 6, 8080, 20000, 40, 2), ("inbound", "shop/db", 6, 0, 40, 1, 1),
                    ("outbound", "shop/db", 6, 5432, 10300, 13, 4), ("outbound", "external", 6, 443, 500, 5, 1)]


def test_egress_by_workload(loaded: tuple[Client, int]) -> None:
    client, _ = loaded
    _, rows = queries.execute(client, "egress_by_workload")
    assert rows == [("shop", "cart", 500, 5, 1), ("web", "api", 70, 1, 1)]
    _, rows = queries.execute(client, "egress_by_workload", {"minutes": "0"})
    assert rows == [("shop", "cart", 500, 5, 1), ("web", "api", 100, 2, 2)]


def test_first_seen_external_on_sink_data(loaded: tuple[Client, int]) -> None:
    """The first-seen table fed by the sink's inserts (the view on flows) answers "new since"."""
    client, now = loaded
    since = dt.datetime.fromtimestamp((now - DAY) / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
    columns, rows = queries.execute(client, "first_seen_external", {"since": since})
    assert columns[:3] == ["namespace", "workload", "destination"] and columns[-2:] == ["bytes", "flows"]
    assert [(r[0], r[1], r[2], r[-2], r[-1]) for r in rows] == [("shop", "cart", "::ffff:81.2.69.160", 500, 1)]
    _, rows = queries.execute(client, "first_seen_external")  # since the epoch: everything
    assert sorted((r[1], r[2], r[-2]) for r in rows) == [("api", "::ffff:8.8.8.8", 100), ("cart", "::ffff:81.2.69.160", 500)]


def test_service_map(loaded: tuple[Client, int]) -> None:
    client, now = loaded
    columns, nodes = queries.execute(client, "service_map_nodes")
    assert columns == ["id", "title", "subtitle", "mainstat", "secondarystat"]
    assert nodes == [("shop/cart", "cart", "shop", 20000 + 300 + 500 + 40, 7), ("web/api", "api", "web", 20070, 3),
                     ("external", "external", "external", 570, 2), ("shop/db", "db", "shop", 340, 4)]
    columns, edges = queries.execute(client, "service_map_edges")
    assert columns == ["id", "source", "target", "mainstat", "secondarystat"]
    assert [(e[1], e[2], e[3]) for e in edges] == [
        ("web/api", "shop/cart", 20000), ("shop/cart", "external", 500), ("shop/cart", "shop/db", 300),
        ("web/api", "external", 70), ("shop/db", "shop/cart", 40)]
    assert edges[0][0] == "web/api -> shop/cart" and edges[0][4] == pytest.approx(20000 / 3600, abs=1e-3)
    ids = {n[0] for n in nodes}
    assert all(e[1] in ids and e[2] in ids for e in edges)
    # All time: the rate over the data's span in the hourly rollup (first to last hour, plus a
    # minute), not over the daily rollup's day buckets the bytes come from.
    _, edges = queries.execute(client, "service_map_edges", {"minutes": "0"})
    first, last = now - 3 * DAY, now - 2 * MIN  # the oldest and the newest flow's end
    span_s = ((last - last % HOUR) - (first - first % HOUR)) // 1000 + 60
    assert edges[0][:4] == ("web/api -> shop/cart", "web/api", "shop/cart", 20000)
    assert edges[0][4] == pytest.approx(20000 / span_s, abs=1e-3)


def test_pod_peers(loaded: tuple[Client, int]) -> None:
    client, _ = loaded
    columns, rows = queries.execute(client, "pod_peers", {"namespace": "shop", "pod": "cart-1", "minutes": "0"})
    assert columns[:6] == ["direction", "peer", "peer_workload", "proto", "dst_port", "bytes"]
    assert [r[:8] for r in rows] == [
        ("inbound", "web/api-x", "api", 6, 8080, 20000, 40, 2),
        ("inbound", "shop/db-0", "db", 6, 45000, 40, 1, 1),
        ("outbound", "shop/db-0", "db", 6, 5432, 10300, 13, 4),
        ("outbound", "::ffff:81.2.69.160", "external", 6, 443, 500, 5, 1),
    ]


def test_query_cli_csv(loaded: tuple[Client, int], clickhouse_settings: ClickHouseSettings,
                       monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    client, _ = loaded
    client.close()  # the command opens the database itself
    monkeypatch.setenv("FLOWTALLY_CLICKHOUSE_PATH", str(clickhouse_settings.path))
    monkeypatch.setenv("FLOWTALLY_CLICKHOUSE_DATABASE", clickhouse_settings.database)
    args = argparse.Namespace(name="egress_by_workload", param=["minutes=0"], format="csv", config=None)
    assert queries.run(args) == 0
    assert capsys.readouterr().out == "namespace,workload,bytes,packets,flows\nshop,cart,500,5,1\nweb,api,100,2,2\n"


def test_every_query_is_tested() -> None:
    tested = {"top_talkers", "top_services", "service_peers", "egress_by_workload",
              "service_map_nodes", "service_map_edges", "pod_peers"}
    from tests.integration.test_history_queries import TESTED as HISTORY  # the history queries' tests

    assert set(queries.names()) == tested | HISTORY
