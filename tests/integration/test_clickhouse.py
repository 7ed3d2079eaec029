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
from sink.writer import Writer, classify
from sql import migrate, queries
from tests.oracle import DATA

SCHEMA_DUMPS = sorted((DATA / "schema").glob("*.sql"))
ROLLUPS = ("flows_1m", "flows_1h", "flows_1d")

OWNERS = [
    Owner(ip="10.244.1.7", namespace="shop", name="cart-1", workload="cart", workload_kind="Deployment"),
    Owner(ip="10.244.2.9", namespace="shop", name="db-0", workload="db", workload_kind="StatefulSet"),
]


def _now_ms(client: Client) -> int:
    return int(client.query("SELECT toUnixTimestamp64Milli(now64(3))").result_rows[0][0])


def _rows(src: list[str], dst: list[str], nbytes: list[int], end_ms: int, **extra: np.ndarray) -> pa.Table:
    n = len(src)
    def addr(texts: list[str]) -> np.ndarray:
        return np.frombuffer(b"".join(address16(t) for t in texts), dtype=np.uint8).reshape(-1, 16)
    raw = build_raw_table({
        "src_addr": addr(src), "dst_addr": addr(dst), "bytes": np.array(nbytes),
        "packets": np.ones(n), "start": np.full(n, end_ms - 1000), "end": np.full(n, end_ms),
        "time_received": np.full(n, end_ms + 10), "version": np.full(n, 9), **extra,
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
    # Recent flows: the flows TTL (15 days) must not expire test data during the test.
    batch = _rows(["10.244.1.7", "10.244.2.9", "81.2.69.160"], ["10.244.2.9", "10.244.1.7", "10.244.1.7"],
                  [100, 250, 7], _now_ms(clickhouse) - 60_000)
    assert writer.insert(batch, "flowtally.flows.raw/0/17") == 3
    writer.insert(batch, "flowtally.flows.raw/0/17")  # replay of the same raw message
    writer.insert(batch, "flowtally.flows.raw/1/17")  # a different message with equal content
    count, total = clickhouse.query("SELECT count(), sum(bytes) FROM flows").result_rows[0]
    assert (count, total) == (6, 2 * 357)
    ns = clickhouse.query("SELECT src_kind, src_namespace, src_workload, dst_workload FROM flows ORDER BY bytes LIMIT 3").result_rows
    assert ns == [("external", "", "", "cart"), ("external", "", "", "cart"), ("pod", "shop", "cart", "db")]
    lag = clickhouse.query("SELECT min(inserted_at) > max(flow_end) FROM flows").result_rows[0][0]
    assert lag == 1


def test_pod_labels_read_as_maps(clickhouse: Client) -> None:
    """The enricher's *_labels text (migration 0011) is queryable as a map through the alias."""
    migrate.migrate(clickhouse)
    batch = _rows(["10.244.1.7", "10.244.2.9"], ["10.244.2.9", "10.244.1.7"], [100, 250],
                  _now_ms(clickhouse) - 60_000)
    at = batch.schema.get_field_index("src_labels")
    labels = pa.array(['{"app":"cart","team":"shop"}', ""]).dictionary_encode()
    Writer(clickhouse, "flows").insert(batch.set_column(at, batch.schema.field(at), labels), "labels")
    rows = clickhouse.query("SELECT src_labels_map['team'], dst_labels_map['team'], bytes FROM flows "
                            "ORDER BY bytes").result_rows
    assert rows == [("shop", "", 100), ("", "", 250)]
    assert clickhouse.query("SELECT sum(bytes) FROM flows WHERE src_labels_map['app'] = 'cart'"
                            ).result_rows[0][0] == 100


def test_top_talkers_query(clickhouse: Client) -> None:
    migrate.migrate(clickhouse)
    writer = Writer(clickhouse, "flows")
    now_ms = _now_ms(clickhouse)
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


def _totals(client: Client, table: str) -> tuple[int, ...]:
    """(flows, bytes, packets, scaled bytes, scaled packets) of ``flows`` or a rollup (sum() over keys)."""
    if table == "flows":
        sql = "SELECT count(), sum(bytes), sum(packets), sum(bytes * sampling_rate), sum(packets * sampling_rate) FROM flows"
    else:
        sql = f"SELECT sum(flows), sum(bytes), sum(packets), sum(scaled_bytes), sum(scaled_packets) FROM {table}"
    return tuple(int(v) for v in client.query(sql).result_rows[0])


def _pod_totals(client: Client) -> dict[tuple[str, ...], tuple[int, ...]]:
    """(namespace, name, pod_uid, direction) -> (flows, bytes, scaled bytes) of pod_traffic_1h."""
    rows = client.query("SELECT namespace, name, pod_uid, direction, sum(flows), sum(bytes), sum(scaled_bytes) "
                        "FROM pod_traffic_1h GROUP BY ALL").result_rows
    return {tuple(r[:4]): tuple(int(v) for v in r[4:]) for r in rows}


def _pod_totals_raw(client: Client) -> dict[tuple[str, ...], tuple[int, ...]]:
    """The same from the raw flows: each named end's outbound (as source) and inbound (as
    destination) flows; a flow from an end to itself counts once, outbound."""
    rows = client.query("""
        SELECT src_namespace, src_name, src_pod_uid, 'outbound', count(), sum(bytes), sum(bytes * sampling_rate)
        FROM flows WHERE src_name != '' OR src_pod_uid != '' GROUP BY ALL
        UNION ALL
        SELECT dst_namespace, dst_name, dst_pod_uid, 'inbound', count(), sum(bytes), sum(bytes * sampling_rate)
        FROM flows WHERE (dst_name != '' OR dst_pod_uid != '')
          AND (src_namespace, src_name, src_pod_uid) != (dst_namespace, dst_name, dst_pod_uid)
        GROUP BY ALL""").result_rows
    return {tuple(r[:4]): tuple(int(v) for v in r[4:]) for r in rows}


#: The rollup key besides the time bucket (migrations 0002, 0006 and 0009), as the views group it.
ROLLUP_KEYS = ("src_namespace, src_workload, src_service, src_kind, dst_namespace, dst_workload, dst_service, "
               "dst_kind, proto, {port}, direction, src_asn, src_country, dst_asn, dst_country, src_as_org, dst_as_org")
BUCKETS = {"flows": "toStartOfMinute", "flows_1m": "toStartOfMinute", "flows_1h": "toStartOfHour",
           "flows_1d": "toStartOfDay"}


def _grouped(client: Client, table: str) -> dict[tuple[object, ...], tuple[int, ...]]:
    """Totals per rollup key (the raw table grouped the way the views group it)."""
    bucket = BUCKETS[table]
    if table == "flows":
        keys = ROLLUP_KEYS.format(port="if(dst_port < 32768, dst_port, 0) AS p")
        sql = (f"SELECT toStartOfMinute(flow_end) AS t, {keys}, "
               "count(), sum(bytes), sum(packets), sum(bytes * sampling_rate) FROM flows GROUP BY ALL")
    else:
        keys = ROLLUP_KEYS.format(port="dst_port AS p")
        sql = (f"SELECT {bucket}(time) AS t, {keys}, sum(flows), sum(bytes), sum(packets), "
               f"sum(scaled_bytes) FROM {table} GROUP BY ALL")
    return {tuple(r[:-4]): tuple(int(v) for v in r[-4:]) for r in client.query(sql).result_rows}


def _with_geo(batch: pa.Table, rng: np.random.Generator) -> pa.Table:
    """External ends get an ASN, its organisation and a country (what MaxMind would give them), so
    the rollup keys that carry them (migrations 0006, 0009) are exercised; cluster ends keep 0 and ''."""
    orgs = {0: "", 3320: "Deutsche Telekom AG", 15169: "GOOGLE", 16509: "AMAZON-02"}
    for side in ("src", "dst"):
        external = np.array(batch[f"{side}_kind"].to_pylist()) == "external"
        asn = np.where(external, rng.choice([3320, 15169, 16509], batch.num_rows), 0).astype(np.uint32)
        country = np.where(external, rng.choice(["DE", "US", "IE"], batch.num_rows), "")
        org = np.array([orgs[int(a)] for a in asn], dtype=object)
        for name, values in ((f"{side}_asn", pa.array(asn)),
                             (f"{side}_country", pa.array(country).dictionary_encode()),
                             (f"{side}_as_org", pa.array(org, pa.string()).dictionary_encode())):
            if name in batch.column_names:
                i = batch.column_names.index(name)
                batch = batch.set_column(i, batch.schema.field(i), values.cast(batch.schema.field(i).type))
    return batch


def _load_dump(client: Client, name: str) -> None:
    text = (DATA / "schema" / name).read_text()
    for statement in migrate.Migration(0, "dump", text).statements():
        client.command(statement)


def _known_traffic(client: Client, batches: int = 6, seed: int = 7, span_ms: int = 7_200_000) -> tuple[int, int, int]:
    """Insert ``batches`` batches of varied flows over the last ``span_ms`` (two hours); their totals."""
    rng = np.random.default_rng(seed)
    writer = Writer(client, "flows")
    now = _now_ms(client)
    # Write only the columns the table has: at an older schema version this is what that
    # version's sink wrote.
    existing = {r[0] for r in client.query(
        "SELECT name FROM system.columns WHERE database = currentDatabase() AND table = 'flows'").result_rows}
    pods = ["10.244.1.7", "10.244.2.9", "81.2.69.160", "10.99.0.1"]
    total = [0, 0, 0]
    for b in range(batches):
        n = 500
        src = [pods[i] for i in rng.integers(0, 4, n)]
        dst = [pods[i] for i in rng.integers(0, 4, n)]
        nbytes = rng.integers(40, 1_000_000, n)
        packets = rng.integers(1, 1000, n)
        ends = now - rng.integers(0, span_ms, n)
        batch = _rows(src, dst, list(nbytes), 0, packets=packets, end=ends, start=ends - 1000,
                      dst_port=rng.choice([53, 80, 443, 5432, 40000, 61000], n),
                      sampling_rate=rng.choice([1, 1, 10], n), proto=rng.choice([6, 17], n))
        batch = _with_geo(batch, rng).select([c for c in batch.column_names if c in existing])
        writer.insert(batch, f"known/{seed}/{b}")
        total[0] += n
        total[1] += int(nbytes.sum())
        total[2] += int(packets.sum())
    return total[0], total[1], total[2]


def test_migrations_from_empty_database(clickhouse: Client) -> None:
    applied = migrate.migrate(clickhouse)
    assert [m.version for m in applied] == [m.version for m in migrate.available()]
    assert migrate.migrate(clickhouse) == []
    tables = {r[0]: r[1] for r in clickhouse.query(
        "SELECT name, engine_full FROM system.tables WHERE database = currentDatabase()").result_rows}
    assert {"flows", "flows_1m", "flows_1h", "flows_1m_mv", "flows_1h_mv", "schema_migrations"} <= set(tables)
    # TTLs present with the defaults
    assert "TTL toDateTime(inserted_at) + toIntervalDay(15)" in tables["flows"]
    assert "TTL time + toIntervalDay(30)" in tables["flows_1m"]
    assert "TTL time + toIntervalDay(730)" in tables["flows_1h"]
    assert "TTL time + toIntervalDay(3650)" in tables["flows_1d"]
    assert "TTL time + toIntervalDay(730)" in tables["pod_traffic_1h"]
    for name in ("flows", *ROLLUPS, "pod_traffic_1h"):
        assert "non_replicated_deduplication_window = 10000" in tables[name]
    # The rollups have the same columns in the same order (queries read them with SELECT * …
    # UNION ALL) and the keys of migrations 0006 and 0009 at the end of the sort key.
    layout = {t: clickhouse.query(f"SELECT name, type FROM system.columns WHERE database = currentDatabase() "
                                  f"AND table = '{t}' ORDER BY position").result_rows for t in ROLLUPS}
    assert layout["flows_1m"] == layout["flows_1h"] == layout["flows_1d"]
    for name in ROLLUPS:
        assert "dst_port, direction, src_asn, src_country, dst_asn, dst_country, src_as_org, dst_as_org)" in tables[name]
    views = {r[0]: r[1] for r in clickhouse.query(
        "SELECT name, create_table_query FROM system.tables WHERE database = currentDatabase()").result_rows}
    assert "FROM flowtally_test.flows_1m" in views["flows_1h_mv"]  # chained: 1m -> 1h -> 1d
    assert "FROM flowtally_test.flows_1h" in views["flows_1d_mv"]
    # The newest migration re-run (a crash before its ledger row) changes nothing (with data:
    # test_migrations_from_each_older_version)
    for statement in migrate.available()[-1].statements():
        clickhouse.command(statement)
    again = {r[0]: r[1] for r in clickhouse.query(
        "SELECT name, engine_full FROM system.tables WHERE database = currentDatabase()").result_rows}
    assert again == tables


def test_ttls_come_from_settings(clickhouse: Client) -> None:
    from sink.settings import SinkSettings

    settings = SinkSettings(flows_ttl_days=3, rollup_1m_ttl_days=7, rollup_1h_ttl_days=400, rollup_1d_ttl_days=1000)
    migrate.migrate(clickhouse, settings.migration_variables())
    engines = {r[0]: r[1] for r in clickhouse.query(
        "SELECT name, engine_full FROM system.tables WHERE database = currentDatabase()").result_rows}
    assert "toIntervalDay(3)" in engines["flows"]
    assert "toIntervalDay(7)" in engines["flows_1m"]
    assert "toIntervalDay(400)" in engines["flows_1h"]
    assert "toIntervalDay(1000)" in engines["flows_1d"]
    with pytest.raises(migrate.MigrationError, match="unknown variable"):
        migrate.Migration(9, "x", "SELECT {nope}").statements()


@pytest.mark.parametrize("dump", [p.name for p in SCHEMA_DUMPS])
def test_migrations_from_each_previous_version(clickhouse: Client, dump: str) -> None:
    """A database at an older version (its schema dump, with data) migrates to the newest; the
    rollups are backfilled from the flows already there, exactly."""
    _load_dump(clickhouse, dump)
    version = int(dump.split(".")[0])
    assert set(migrate.applied(clickhouse)) == set(range(1, version + 1))
    expected = _known_traffic(clickhouse, batches=3)
    applied = migrate.migrate(clickhouse)
    assert [m.version for m in applied] == [m.version for m in migrate.available() if m.version > version]
    assert migrate.migrate(clickhouse) == []
    for table in ROLLUPS:
        assert _totals(clickhouse, table)[:3] == expected
    # and the views take over from there
    more = _known_traffic(clickhouse, batches=2, seed=8)
    for table in ("flows", *ROLLUPS):
        assert _totals(clickhouse, table)[:3] == tuple(a + b for a, b in zip(expected, more, strict=True))


def _migrate_to(client: Client, version: int) -> None:
    """The database as the sink of ``version`` left it: the shipped migrations up to it, recorded."""
    migrate.applied(client)  # creates the ledger
    for m in migrate.available():
        if m.version <= version:
            for statement in m.statements():
                client.command(statement)
            client.insert("schema_migrations", [[m.version, m.name, m.checksum]],
                          column_names=["version", "name", "checksum"])


@pytest.mark.parametrize("version", [m.version for m in migrate.available()][:-1])
def test_migrations_from_each_older_version(clickhouse: Client, version: int) -> None:
    """From every older version, with flows (and rollups) in it: the newest schema keeps every
    row, rollups equal raw totals, and the views (0006: chained, more keys) take over exactly."""
    _migrate_to(clickhouse, version)
    expected = _known_traffic(clickhouse, batches=3)
    applied = migrate.migrate(clickhouse)
    assert [m.version for m in applied] == [m.version for m in migrate.available() if m.version > version]
    raw = _totals(clickhouse, "flows")
    assert raw[:3] == expected
    for table in ROLLUPS:
        assert _totals(clickhouse, table) == raw, table
    # A crash after the newest migration's statements, before its ledger row: re-running them
    # (backfills included: their tokens) changes nothing.
    for statement in migrate.available()[-1].statements():
        clickhouse.command(statement)
    for table in ROLLUPS:
        assert _totals(clickhouse, table) == raw, table
    more = _known_traffic(clickhouse, batches=2, seed=8)
    raw = _totals(clickhouse, "flows")
    assert raw[:3] == tuple(a + b for a, b in zip(expected, more, strict=True))
    assert _pod_totals(clickhouse) == _pod_totals_raw(clickhouse)  # backfilled by 0009, then its view
    for table in ROLLUPS:
        assert _totals(clickhouse, table) == raw, table
        # Rows rolled up before 0006 are kept with direction '' (unknown); rows after have it.
        unknown = clickhouse.query(f"SELECT sum(flows) FROM {table} WHERE direction = ''").result_rows[0][0]
        assert unknown == (expected[0] if version < 6 else 0), table


def test_rollups_equal_raw_totals_with_and_without_merges(clickhouse: Client) -> None:
    migrate.migrate(clickhouse)
    expected = _known_traffic(clickhouse)
    raw = _totals(clickhouse, "flows")
    assert raw[:3] == expected
    assert raw[3] > raw[1]  # some flows are sampled
    by_minute = _grouped(clickhouse, "flows")
    by_hour: dict[tuple[object, ...], list[int]] = {}
    for key, values in by_minute.items():
        hour = (key[0].replace(minute=0), *key[1:])  # type: ignore[attr-defined]
        acc = by_hour.setdefault(hour, [0, 0, 0, 0])
        for i, v in enumerate(values):
            acc[i] += v
    by_day: dict[tuple[object, ...], list[int]] = {}
    for key, values in by_minute.items():
        day = (key[0].replace(hour=0, minute=0), *key[1:])  # type: ignore[attr-defined]
        acc = by_day.setdefault(day, [0, 0, 0, 0])
        for i, v in enumerate(values):
            acc[i] += v
    for final in (False, True):
        if final:
            for table in ROLLUPS:
                clickhouse.command(f"OPTIMIZE TABLE {table} FINAL")
        for table in ROLLUPS:
            assert _totals(clickhouse, table) == raw, (table, final)
        assert _grouped(clickhouse, "flows_1m") == by_minute
        assert _grouped(clickhouse, "flows_1h") == {k: tuple(v) for k, v in by_hour.items()}
        assert _grouped(clickhouse, "flows_1d") == {k: tuple(v) for k, v in by_day.items()}
        pods = _pod_totals_raw(clickhouse)
        assert _pod_totals(clickhouse) == pods, final
        assert any(k[3] == "inbound" for k in pods) and any(k[3] == "outbound" for k in pods)
        if final:
            clickhouse.command("OPTIMIZE TABLE pod_traffic_1h FINAL")
    # ephemeral destination ports are bucketed as 0, well-known ones kept
    ports = {r[0] for r in clickhouse.query("SELECT DISTINCT dst_port FROM flows_1m").result_rows}
    assert ports == {0, 53, 80, 443, 5432}
    # the keys of 0006 are really there (not all defaults): directions, external ASNs and countries
    for table in ROLLUPS:
        asns, countries, directions = clickhouse.query(
            f"SELECT groupUniqArray(dst_asn), groupUniqArray(src_country), groupUniqArray(direction) FROM {table}"
        ).result_rows[0]
        assert set(asns) == {0, 3320, 15169, 16509}, table
        assert set(countries) == {"", "DE", "US", "IE"}, table
        orgs = clickhouse.query(f"SELECT DISTINCT dst_asn, dst_as_org FROM {table}").result_rows
        assert sorted(orgs) == [(0, ""), (3320, "Deutsche Telekom AG"), (15169, "GOOGLE"), (16509, "AMAZON-02")]
        assert {"pod-to-pod", "egress", "ingress"} <= set(directions), table


_POD_TOTALS = """SELECT arraySort(groupArray(t)) FROM (
    SELECT tuple(namespace, name, pod_uid, direction, sum(flows), sum(bytes), sum(scaled_packets),
                 min(first_seen), max(last_seen)) AS t
    FROM {rows} GROUP BY namespace, name, pod_uid, direction)"""
_POD_TOTALS_RAW = """SELECT arraySort(groupArray(t)) FROM (
    SELECT tuple(src_namespace, src_name, src_pod_uid, 'outbound', count(), sum(bytes),
                 sum(packets * sampling_rate), min(flow_start), max(flow_end)) AS t
    FROM flows WHERE (src_name != '' OR src_pod_uid != '') AND flow_end >= {start}
    GROUP BY src_namespace, src_name, src_pod_uid
    UNION ALL
    SELECT tuple(dst_namespace, dst_name, dst_pod_uid, 'inbound', count(), sum(bytes),
                 sum(packets * sampling_rate), min(flow_start), max(flow_end)) AS t
    FROM flows WHERE (dst_name != '' OR dst_pod_uid != '') AND flow_end >= {start}
      AND (src_namespace, src_name, src_pod_uid) != (dst_namespace, dst_name, dst_pod_uid)
    GROUP BY dst_namespace, dst_name, dst_pod_uid)"""


def test_windows_read_from_the_rollups_equal_the_raw_window(clickhouse: Client) -> None:
    """``{rollup}`` (sql/queries.py) reads a window from flows_1m for its partial first hour,
    flows_1h for its partial first day and flows_1d for the rest: over four days of flows, every
    window's totals equal the raw flows' from the window's start, and ``{pod_traffic}`` (raw flows
    for the partial first hour, pod_traffic_1h after) equals the raw flows to the millisecond.
    Each comparison is one query, so both sides see the same now()."""
    migrate.migrate(clickhouse)
    _known_traffic(clickhouse, batches=4, span_ms=4 * 86_400_000)
    windows = (1, 59, 60, 61, 90, 1439, 1440, 1441, 1500, 2 * 1440 + 7, 3 * 1440, 5 * 1440, 0)
    # A flow just inside each window's start, so neighbouring windows differ by construction
    # (random flows alone left some one-minute gaps empty: the windows' totals then coincide).
    starts = clickhouse.query("SELECT " + ", ".join(
        f"toUnixTimestamp({queries.window_start(m)}) * 1000" for m in windows if m)).result_rows[0]
    edges = np.array(starts, dtype=np.int64) + 20_000
    Writer(clickhouse, "flows").insert(_rows(["10.244.1.7"] * len(edges), ["10.244.2.9"] * len(edges),
                                             [1000] * len(edges), 0, end=edges, start=edges - 1000), "edges")
    seen = set()
    for minutes in windows:
        rows = queries.rollup_rows(minutes)
        assert ("flows_1m" in rows) == (0 < minutes <= 1440) and ("flows_1h" in rows) == (minutes > 0), minutes
        got, expected = clickhouse.query(f"""SELECT
            (SELECT (sum(flows), sum(bytes), sum(packets), sum(scaled_bytes), sum(scaled_packets)) FROM {rows}),
            (SELECT (count(), sum(bytes), sum(packets), sum(bytes * sampling_rate), sum(packets * sampling_rate))
             FROM flows WHERE flow_end >= {queries.window_start(minutes)})""").result_rows[0]
        assert got == expected, minutes
        seen.add(expected[0])
        start = "toDateTime64(0, 3)" if minutes == 0 else f"now64(3) - toIntervalMinute({minutes})"
        pods, pods_raw = clickhouse.query(
            f"SELECT ({_POD_TOTALS.format(rows=queries.pod_rows(minutes))}), "
            f"({_POD_TOTALS_RAW.format(start=start)})").result_rows[0]
        assert pods == pods_raw, minutes
    assert len(seen) >= 10  # the windows really differ


def test_replays_never_double_the_rollups(clickhouse: Client) -> None:
    """The same token again is a no-op everywhere; if the sink died after the flows part was
    written but before the rollup parts (simulated by dropping the rollup rows), the replay fills
    in the rollups and still adds nothing to flows."""
    migrate.migrate(clickhouse)
    writer = Writer(clickhouse, "flows")
    batch = _rows(["10.244.1.7", "10.244.2.9"], ["10.244.2.9", "81.2.69.160"], [100, 250], _now_ms(clickhouse) - 60_000)
    writer.insert(batch, "raw/0/1")
    writer.insert(batch, "raw/0/1")
    for table in ("flows", *ROLLUPS):
        assert _totals(clickhouse, table)[:3] == (2, 350, 2), table
    # flows_1h is fed from flows_1m (a chained view, migration 0006), flows_1d from flows_1h (0009).
    # Each table checks the token on its own: whichever of the parts a crash left unwritten, the
    # replay writes exactly that one — also when the block it descends from is skipped as a duplicate.
    for lost in (["flows_1m"], ["flows_1h"], ["flows_1d"], ["flows_1m", "flows_1h"], ["flows_1h", "flows_1d"],
                 ["flows_1m", "flows_1d"], ["pod_traffic_1h"]):
        for table in lost:
            clickhouse.command(f"TRUNCATE TABLE {table}")  # that rollup insert "never happened"
        writer.insert(batch, "raw/0/1")
        for table in ("flows", *ROLLUPS):
            assert _totals(clickhouse, table)[:3] == (2, 350, 2), (lost, table)
        assert _pod_totals(clickhouse) == _pod_totals_raw(clickhouse), lost
    writer.insert(batch, "raw/0/2")  # a new token still counts, through the chain
    for table in ("flows", *ROLLUPS):
        assert _totals(clickhouse, table)[:3] == (4, 700, 4), table


def test_rejections_and_outages_are_told_apart(clickhouse: Client) -> None:
    """A constraint violation is a rejection of the batch (DLQ); a missing table is an outage (retry)."""
    migrate.migrate(clickhouse)
    writer = Writer(clickhouse, "flows")
    now = _now_ms(clickhouse)
    clickhouse.command("ALTER TABLE flows ADD CONSTRAINT sane_bytes CHECK bytes < 1000000000000")
    with pytest.raises(Exception) as rejected:
        writer.insert(_rows(["10.244.1.7"], ["10.244.2.9"], [10**13], now), "bad")
    failure = classify(rejected.value)
    assert (failure.rejected, failure.code, failure.reason) == (True, 469, "VIOLATED_CONSTRAINT")
    clickhouse.command("RENAME TABLE flows TO flows_away")
    with pytest.raises(Exception) as missing:
        writer.insert(_rows(["10.244.1.7"], ["10.244.2.9"], [10], now), "ok")
    failure = classify(missing.value)
    assert (failure.rejected, failure.code) == (False, 60)
    assert classify(ConnectionRefusedError("refused")).rejected is False
