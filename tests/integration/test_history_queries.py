"""History queries on chDB over flows with known totals: the first-seen table (migration 0007) and
its exactly-once behaviour, and the named queries egress_by_asn, egress_by_country,
first_seen_external, pod_history and completeness.

Flows are built with explicit identities (namespace, workload, pod UID, ASN, country…) set on
the enriched columns, so the expected values below are written from the flow list by hand, not
computed by the code under test.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pytest
from clickhouse_connect.driver.client import Client

from enricher.enrich import enrich_batch
from enricher.identity import IdentityIndex
from sensors.completeness import CompletenessAccumulator
from sensors.schema import address16, build_raw_table
from sink.rows import flow_rows
from sink.writer import Writer
from sql import migrate, queries

MIN, HOUR, DAY = 60_000, 3_600_000, 86_400_000

#: The queries this file checks (test_sink_queries.py checks the others).
TESTED = {"egress_by_asn", "egress_by_country", "first_seen_external", "pod_history", "completeness"}


@dataclass(frozen=True)
class End:
    """One end of a flow, as the enricher would have described it."""

    addr: str
    kind: str = "pod"
    namespace: str = ""
    name: str = ""
    workload: str = ""
    uid: str = ""
    asn: int = 0
    org: str = ""
    country: str = ""


API = End("10.244.3.3", namespace="web", name="api-x", workload="api", uid="uid-api")
DB = End("10.244.2.9", namespace="shop", name="db-0", workload="db", uid="uid-db")
# cart-1 was deleted and recreated with the same name: two pods, two UIDs, two addresses.
CART_OLD = End("10.244.1.7", namespace="shop", name="cart-1", workload="cart", uid="uid-cart-old")
CART_NEW = End("10.244.1.9", namespace="shop", name="cart-1", workload="cart", uid="uid-cart-new")
GOOGLE = End("8.8.8.8", "external", asn=15169, org="GOOGLE", country="US")
CLOUDFLARE = End("1.1.1.1", "external", asn=13335, org="CLOUDFLARENET", country="AU")
HETZNER = End("81.2.69.160", "external", asn=24940, org="Hetzner Online GmbH", country="DE")
NOWHERE = End("203.0.113.5", "external")  # not in the ASN/country databases

IDENTITY = {"kind": "kind", "namespace": "namespace", "name": "name", "workload": "workload",
            "pod_uid": "uid", "as_org": "org", "country": "country"}

Flow = tuple[End, End, int, int, int, int, int, int]  # src, dst, bytes, packets, sampling, port, age, initiator

RECENT: list[Flow] = [
    (API, GOOGLE, 1000, 2, 1, 443, 5 * MIN, 0),
    (API, GOOGLE, 500, 1, 10, 443, 10 * MIN, 0),        # 1:10 sampled: 5000 bytes, 10 packets
    (CART_NEW, CLOUDFLARE, 300, 3, 1, 53, 2 * MIN, 0),
    (CART_NEW, HETZNER, 700, 7, 1, 443, 20 * MIN, 0),
    (CART_OLD, HETZNER, 200, 2, 1, 443, 90 * MIN, 0),   # outside a 60-minute window
    (API, NOWHERE, 50, 1, 1, 80, 3 * MIN, 0),
    (HETZNER, API, 400, 4, 1, 8443, 4 * MIN, 1),        # inbound from outside: not egress
    (API, HETZNER, 900, 9, 1, 51000, 4 * MIN, 2),       # its reply: egress, but HETZNER opened it
    (CART_OLD, DB, 100, 1, 1, 5432, 100 * MIN, 0),
    (DB, CART_OLD, 40, 1, 1, 45000, 100 * MIN, 0),
]
OLD: list[Flow] = [
    (API, GOOGLE, 30, 1, 1, 443, 3 * DAY, 0),           # GOOGLE was known to api 3 days ago
    (CART_OLD, HETZNER, 100, 1, 1, 443, 2 * DAY, 0),    # and HETZNER to cart 2 days ago
]


def _flows(flows: list[Flow], now_ms: int) -> pa.Table:
    """The ``flows`` rows of ``flows`` (ending ``age`` ms before ``now_ms``), identities set as given."""
    n = len(flows)
    src, dst, nbytes, packets, sampling, port, age, initiator = zip(*flows, strict=True)

    def addr(ends: tuple[End, ...]) -> np.ndarray:
        return np.frombuffer(b"".join(address16(e.addr) for e in ends), dtype=np.uint8).reshape(-1, 16)

    end = now_ms - np.array(age)
    raw = build_raw_table({
        "src_addr": addr(src), "dst_addr": addr(dst), "bytes": np.array(nbytes), "packets": np.array(packets),
        "sampling_rate": np.array(sampling), "dst_port": np.array(port), "src_port": np.full(n, 40000),
        "proto": np.full(n, 6), "start": end - 1000, "end": end, "time_received": end + 10,
        "initiator": np.array(initiator),
    })
    table = enrich_batch(raw, IdentityIndex(()))
    for side, ends in (("src", src), ("dst", dst)):
        for column, attr in IDENTITY.items():
            name = f"{side}_{column}"
            values = pa.array([getattr(e, attr) for e in ends], pa.string()).dictionary_encode()
            table = table.set_column(table.column_names.index(name), name, values)
        name = f"{side}_asn"
        table = table.set_column(table.column_names.index(name), name, pa.array([e.asn for e in ends], pa.uint32()))
    return flow_rows(table)


def _now_ms(client: Client) -> int:
    return int(client.query("SELECT toUnixTimestamp64Milli(now64(3))").result_rows[0][0])


def _ts(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


@pytest.fixture
def loaded(clickhouse: Client) -> tuple[Client, int]:
    migrate.migrate(clickhouse)
    now = _now_ms(clickhouse)
    writer = Writer(clickhouse, "flows")
    writer.insert(_flows(RECENT, now), "h/recent")
    writer.insert(_flows(OLD, now), "h/old")
    return clickhouse, now


def _first_seen(client: Client) -> dict[tuple[str, str, str], tuple[int, int, int, int, int]]:
    """(namespace, workload, destination) -> (first_seen ms, last_seen ms, scaled bytes, flows, asn)."""
    rows = client.query(
        "SELECT src_namespace, src_workload, toString(dst_addr), toUnixTimestamp64Milli(min(first_seen)), "
        "toUnixTimestamp64Milli(max(last_seen)), sum(scaled_bytes), sum(flows), anyLast(dst_asn) "
        "FROM first_seen_external GROUP BY 1, 2, 3").result_rows
    return {(r[0], r[1], r[2]): tuple(int(v) for v in r[3:]) for r in rows}  # type: ignore[misc]


def _expected_first_seen(now: int) -> dict[tuple[str, str, str], tuple[int, int, int, int, int]]:
    """From the flow lists above: egress flows the workload opened (initiator != 2)."""
    return {
        ("web", "api", "::ffff:8.8.8.8"): (now - 3 * DAY - 1000, now - 5 * MIN, 1000 + 5000 + 30, 3, 15169),
        ("web", "api", "::ffff:203.0.113.5"): (now - 3 * MIN - 1000, now - 3 * MIN, 50, 1, 0),
        ("shop", "cart", "::ffff:1.1.1.1"): (now - 2 * MIN - 1000, now - 2 * MIN, 300, 1, 13335),
        ("shop", "cart", "::ffff:81.2.69.160"): (now - 2 * DAY - 1000, now - 20 * MIN, 700 + 200 + 100, 3, 24940),
    }


def test_first_seen_table_is_exact(loaded: tuple[Client, int]) -> None:
    client, now = loaded
    assert _first_seen(client) == _expected_first_seen(now)


def test_first_seen_replays_count_once(loaded: tuple[Client, int]) -> None:
    """The view's block is deduplicated with the insert's token: a replay adds nothing; the same
    content under another token (another raw message) is counted; and a replay after an insert
    that wrote `flows` but died before the view's table fills the view in, once."""
    client, now = loaded
    writer = Writer(client, "flows")
    writer.insert(_flows(RECENT, now), "h/recent")  # the sink replaying after a crash
    writer.insert(_flows(OLD, now), "h/old")
    assert _first_seen(client) == _expected_first_seen(now)

    crash = [(API, CLOUDFLARE, 7, 1, 1, 53, MIN, 0)]
    # The insert dies after `flows` (and the rollups) got their parts, before first_seen_external:
    # a constraint that fails stands in for the crash.
    client.command("ALTER TABLE first_seen_external ADD CONSTRAINT crash CHECK bytes > 1000000")
    with pytest.raises(Exception, match="crash"):
        writer.insert(_flows(crash, now), "h/crash")
    client.command("ALTER TABLE first_seen_external DROP CONSTRAINT crash")
    assert client.query("SELECT count() FROM flows").result_rows == [(len(RECENT) + len(OLD) + 1,)]
    assert ("web", "api", "::ffff:1.1.1.1") not in _first_seen(client)
    writer.insert(_flows(crash, now), "h/crash")  # the replay: flows skips it, the view fills in
    writer.insert(_flows(crash, now), "h/crash")  # and a second replay changes nothing
    assert client.query("SELECT count() FROM flows").result_rows == [(len(RECENT) + len(OLD) + 1,)]
    expected = _expected_first_seen(now) | {
        ("web", "api", "::ffff:1.1.1.1"): (now - MIN - 1000, now - MIN, 7, 1, 13335)}
    assert _first_seen(client) == expected
    for rollup in ("flows_1m", "flows_1h"):  # the rollups saw the crash insert exactly once too
        assert client.query(f"SELECT sum(flows) FROM {rollup}").result_rows == [(len(RECENT) + len(OLD) + 1,)]

    writer.insert(_flows(crash, now), "h/crash-again")  # equal content, another message: counted
    assert _first_seen(client)[("web", "api", "::ffff:1.1.1.1")] == (now - MIN - 1000, now - MIN, 14, 2, 13335)


def test_first_seen_backfill_from_existing_flows(clickhouse: Client) -> None:
    """Migrating a database that already has flows fills the first-seen table from them."""
    versions = [m.version for m in migrate.available()]
    clickhouse.command("CREATE TABLE IF NOT EXISTS schema_migrations (version UInt32, name String, "
                       "checksum String, applied_at DateTime64(3, 'UTC') DEFAULT now64(3)) "
                       "ENGINE = MergeTree ORDER BY version")
    for m in migrate.available():
        if m.version >= 7:
            break
        for statement in m.statements():
            clickhouse.command(statement)
        clickhouse.insert("schema_migrations", [[m.version, m.name, m.checksum]],
                          column_names=["version", "name", "checksum"])
    now = _now_ms(clickhouse)
    # What a sink at version 6 wrote: the columns the table has then (later migrations add more).
    existing = {r[0] for r in clickhouse.query(
        "SELECT name FROM system.columns WHERE database = currentDatabase() AND table = 'flows'").result_rows}
    rows = _flows(RECENT + OLD, now)
    Writer(clickhouse, "flows").insert(rows.select([c for c in rows.column_names if c in existing]), "h/before-0007")
    applied = [m.version for m in migrate.migrate(clickhouse)]
    assert applied == [v for v in versions if v >= 7]
    assert _first_seen(clickhouse) == _expected_first_seen(now)


def test_first_seen_external_query(loaded: tuple[Client, int]) -> None:
    client, now = loaded
    columns, rows = queries.execute(client, "first_seen_external", {"since": _ts(now - DAY)})
    assert columns == ["namespace", "workload", "destination", "asn", "organisation", "country",
                       "first_seen", "last_seen", "bytes", "flows"]
    # New this day: cart -> 1.1.1.1 and api -> 203.0.113.5; api knew 8.8.8.8 and cart 81.2.69.160 before.
    assert [(r[0], r[1], r[2], r[3], r[4], r[5], r[8], r[9]) for r in rows] == [
        ("shop", "cart", "::ffff:1.1.1.1", 13335, "CLOUDFLARENET", "AU", 300, 1),
        ("web", "api", "::ffff:203.0.113.5", 0, "", "", 50, 1),
    ]
    assert int(rows[0][6].timestamp() * 1000) == now - 2 * MIN - 1000
    _, rows = queries.execute(client, "first_seen_external", {"workload": "api"})
    assert [(r[2], r[8], r[9]) for r in rows] == [("::ffff:203.0.113.5", 50, 1), ("::ffff:8.8.8.8", 6030, 3)]
    _, rows = queries.execute(client, "first_seen_external", {"namespace": "shop", "since": _ts(now - 3 * DAY)})
    assert [(r[2], r[8]) for r in rows] == [("::ffff:1.1.1.1", 300), ("::ffff:81.2.69.160", 1000)]


def test_egress_by_asn(loaded: tuple[Client, int]) -> None:
    client, _ = loaded
    columns, rows = queries.execute(client, "egress_by_asn")
    assert columns == ["namespace", "workload", "asn", "organisation", "bytes", "packets", "flows"]
    # last 60 minutes, dst external: api->google 1000+5000, cart->hetzner 700, api->hetzner reply 900,
    # cart->cloudflare 300, api->nowhere 50
    assert rows == [("*", "*", 15169, "GOOGLE", 6000, 12, 2), ("*", "*", 24940, "Hetzner Online GmbH", 1600, 16, 2),
                    ("*", "*", 13335, "CLOUDFLARENET", 300, 3, 1), ("*", "*", 0, "", 50, 1, 1)]
    _, rows = queries.execute(client, "egress_by_asn", {"minutes": "0", "per_workload": "1"})
    assert rows == [("web", "api", 15169, "GOOGLE", 6030, 13, 3), ("shop", "cart", 24940, "Hetzner Online GmbH", 1000, 10, 3),
                    ("web", "api", 24940, "Hetzner Online GmbH", 900, 9, 1), ("shop", "cart", 13335, "CLOUDFLARENET", 300, 3, 1),
                    ("web", "api", 0, "", 50, 1, 1)]
    _, rows = queries.execute(client, "egress_by_asn", {"minutes": "0", "workload": "cart", "limit": "1"})
    assert rows == [("*", "*", 24940, "Hetzner Online GmbH", 1000, 10, 3)]


def test_egress_by_country(loaded: tuple[Client, int]) -> None:
    client, _ = loaded
    columns, rows = queries.execute(client, "egress_by_country")
    assert columns == ["namespace", "workload", "country", "bytes", "packets", "flows", "destinations"]
    assert rows == [("*", "*", "US", 6000, 12, 2, 1), ("*", "*", "DE", 1600, 16, 2, 1),
                    ("*", "*", "AU", 300, 3, 1, 1), ("*", "*", "", 50, 1, 1, 1)]
    _, rows = queries.execute(client, "egress_by_country", {"minutes": "0", "per_workload": "1", "namespace": "web"})
    # api's only flow to DE (HETZNER) is the reply of a connection HETZNER opened: its bytes are
    # egress, but it is not a destination api opened a connection to.
    assert rows == [("web", "api", "US", 6030, 13, 3, 1), ("web", "api", "DE", 900, 9, 1, 0), ("web", "api", "", 50, 1, 1, 1)]
    _, rows = queries.execute(client, "egress_by_country", {"minutes": "15", "per_workload": "1"})
    # within 15 minutes: api -> google (5 and 10 minutes ago), api -> nowhere; cart -> cloudflare
    # (cart -> hetzner ended 20 minutes ago)
    assert rows == [("web", "api", "US", 6000, 12, 2, 1), ("web", "api", "DE", 900, 9, 1, 0),
                    ("shop", "cart", "AU", 300, 3, 1, 1), ("web", "api", "", 50, 1, 1, 1)]


def test_pod_history_by_uid(loaded: tuple[Client, int]) -> None:
    client, now = loaded
    columns, rows = queries.execute(client, "pod_history", {"uid": "uid-cart-old"})
    assert columns == ["direction", "peer", "peer_workload", "proto", "dst_port", "bytes", "packets", "flows",
                       "first_seen", "last_seen"]
    assert [r[:8] for r in rows] == [
        ("inbound", "shop/db-0", "db", 6, 45000, 40, 1, 1),
        ("outbound", "::ffff:81.2.69.160", "external", 6, 443, 300, 3, 2),
        ("outbound", "shop/db-0", "db", 6, 5432, 100, 1, 1),
    ]
    assert int(rows[1][8].timestamp() * 1000) == now - 2 * DAY - 1000  # first_seen: the old flow's start
    _, rows = queries.execute(client, "pod_history", {"uid": "uid-cart-new"})  # same name, another pod
    assert [r[:8] for r in rows] == [("outbound", "::ffff:81.2.69.160", "external", 6, 443, 700, 7, 1),
                                     ("outbound", "::ffff:1.1.1.1", "external", 6, 53, 300, 3, 1)]
    _, rows = queries.execute(client, "pod_history", {"uid": "uid-cart-old", "minutes": "60"})
    assert rows == []  # its last flows ended 90 and 100 minutes ago
    # pod_peers names the pod by namespace/name, and so mixes the two cart-1 pods.
    _, rows = queries.execute(client, "pod_peers", {"namespace": "shop", "pod": "cart-1", "minutes": "0"})
    assert sum(r[5] for r in rows if r[0] == "outbound" and r[1] == "::ffff:81.2.69.160") == 1000
    assert queries.execute(client, "pod_history")[1] == []  # the default uid matches nothing


def test_pod_peers_counts_a_flow_between_two_pods_of_one_name_once(clickhouse: Client) -> None:
    """Old and new cart-1 in one flow: per UID (pod_history) each pod has its side of it, but by
    namespace/name (pod_peers) it is a flow from cart-1 to itself, counted once (outbound)."""
    migrate.migrate(clickhouse)
    now = _now_ms(clickhouse)
    Writer(clickhouse, "flows").insert(_flows([(CART_OLD, CART_NEW, 100, 1, 1, 8080, 5 * MIN, 0),
                                               (CART_NEW, DB, 70, 1, 1, 5432, 5 * MIN, 0)], now), "h/self")
    for minutes in ("0", "60", "10"):  # the rollup only; rollup and raw; raw only
        _, rows = queries.execute(clickhouse, "pod_peers", {"namespace": "shop", "pod": "cart-1",
                                                            "minutes": minutes})
        assert [r[:8] for r in rows] == [("outbound", "shop/cart-1", "cart", 6, 8080, 100, 1, 1),
                                         ("outbound", "shop/db-0", "db", 6, 5432, 70, 1, 1)], minutes
    _, rows = queries.execute(clickhouse, "pod_history", {"uid": "uid-cart-new", "minutes": "0"})
    assert [r[:8] for r in rows] == [("inbound", "shop/cart-1", "cart", 6, 8080, 100, 1, 1),
                                     ("outbound", "shop/db-0", "db", 6, 5432, 70, 1, 1)]
    _, rows = queries.execute(clickhouse, "pod_peers", {"namespace": "shop", "pod": "db-0", "minutes": "0"})
    assert [r[:6] for r in rows] == [("inbound", "shop/cart-1", "cart", 6, 5432, 70)]


def test_completeness_query(clickhouse: Client) -> None:
    migrate.migrate(clickhouse)
    now = _now_ms(clickhouse)
    minute = now - now % MIN
    sensor = CompletenessAccumulator(observer="node-1")
    for at, packets, records, lost in ((minute - 3 * MIN, 10, 300, 2), (minute - 2 * MIN, 12, 360, 0),
                                       (minute - 90 * MIN, 5, 50, 1)):
        c = sensor.counts(at, address16("192.0.2.1"), 0)
        c.packets, c.records, c.bytes, c.sequence_lost = packets, records, packets * 1400, lost
    sensor.counts(minute - 2 * MIN, address16("192.0.2.1"), 0).decode_errors = 3
    sensor.add_kernel_drops(minute - 2 * MIN, 6)
    enricher = CompletenessAccumulator(observer="enricher-0", stage="enricher")
    e = enricher.counts(minute - 2 * MIN, address16("192.0.2.1"), 0)
    e.records, e.unknown_addresses, e.late, e.implausible_time = 360, 20, 1, 4
    writer = Writer(clickhouse, "completeness")
    writer.insert(sensor.take(), "c/sensor")
    writer.insert(sensor.take(), "c/empty")  # nothing left: inserts nothing
    writer.insert(enricher.take(), "c/enricher")
    # a second sensor worker's delta for the same minute and exporter: summed
    worker2 = CompletenessAccumulator(observer="node-1")
    worker2.counts(minute - 3 * MIN, address16("192.0.2.1"), 0).packets = 1
    writer.insert(worker2.take(), "c/worker2")

    columns, rows = queries.execute(clickhouse, "completeness")
    assert columns == ["time", "stage", "exporter", "observation_domain", "observer", "packets", "bytes", "records",
                       "sequence_lost", "decode_errors", "dropped_backpressure", "kernel_drops",
                       "unknown_addresses", "ignored", "late", "duplicates_dropped", "implausible_time"]
    got = [(int(r[0].timestamp() * 1000) - minute, *r[1:]) for r in rows]
    assert got == [
        (-3 * MIN, "sensor-netflow", "::ffff:192.0.2.1", 0, "node-1", 11, 14000, 300, 2, 0, 0, 0, 0, 0, 0, 0, 0),
        (-2 * MIN, "enricher", "::ffff:192.0.2.1", 0, "enricher-0", 0, 0, 360, 0, 0, 0, 0, 20, 0, 1, 0, 4),
        (-2 * MIN, "sensor-netflow", "::", 0, "node-1", 0, 0, 0, 0, 0, 0, 6, 0, 0, 0, 0, 0),
        (-2 * MIN, "sensor-netflow", "::ffff:192.0.2.1", 0, "node-1", 12, 16800, 360, 0, 3, 0, 0, 0, 0, 0, 0, 0),
    ]
    # one bucket per UTC day over all time, sensor rows only: the minutes of a day summed
    _, rows = queries.execute(clickhouse, "completeness", {"minutes": "0", "step": "1440", "stage": "sensor-netflow"})
    expected: dict[tuple[int, str], list[int]] = {}
    for at, exporter, counts in (  # (packets, bytes, records, sequence_lost, decode_errors, backpressure, kernel)
        (minute - 3 * MIN, "::ffff:192.0.2.1", (11, 14000, 300, 2, 0, 0, 0)),
        (minute - 2 * MIN, "::ffff:192.0.2.1", (12, 16800, 360, 0, 3, 0, 0)),
        (minute - 90 * MIN, "::ffff:192.0.2.1", (5, 7000, 50, 1, 0, 0, 0)),
        (minute - 2 * MIN, "::", (0, 0, 0, 0, 0, 0, 6)),
    ):
        into = expected.setdefault((at - at % DAY, exporter), [0] * 7)
        into[:] = [a + b for a, b in zip(into, counts, strict=True)]
    assert {(int(r[0].timestamp() * 1000), r[2]): list(r[5:12]) for r in rows} == expected

def test_every_history_query_is_tested() -> None:
    assert set(queries.names()) >= TESTED
