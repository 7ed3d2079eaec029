-- Rollup keys gain the flow's direction and, for external ends, ASN and country (issue 7:
-- "dst namespace, workload, service or external ASN/country"); and the per-hour rollup is fed from
-- the per-minute one instead of from flows (a chained view, see below).
--
-- Keys after this migration: time bucket, both sides' (namespace, workload, service, kind),
-- protocol, destination port bucket, direction, src_asn, src_country, dst_asn, dst_country. The
-- enricher fills ASN and country only for public addresses (kind `external`), so pod-to-pod rows
-- keep ASN 0 and country '' and the key space grows only with the external ends seen.
--
-- Data is kept: the new columns are added to the existing tables (at the end of the sort key,
-- which ClickHouse allows for columns added in the same ALTER without a DEFAULT expression; the
-- type's default, '' or 0, is what they read as), so rows written before this
-- migration read as direction '' and ASN 0 / country '' (unknown); their totals are unchanged.
-- The exactly-once settings (non_replicated_deduplication_window) stay on the tables as they were.
--
-- Why chained: the views run inside every sink insert. The hourly view now aggregates the
-- per-minute block (already reduced) instead of every flow of the insert, and stays consistent
-- with flows_1m by construction (anything inserted into flows_1m, e.g. a backfill, reaches
-- flows_1h). Measured with `python -m tests.benchmarks.bench_sink --views` (same batches,
-- interleaved): each view costs a roughly fixed ~35-40 ms CPU per 8k-row insert on chDB (planning
-- and writing a part), chained or not, so chaining saves little at 8k rows; fewer, larger inserts
-- are what would amortise it. Chained views keep exactly-once: with
-- deduplicate_blocks_in_dependent_materialized_views each table checks the insert's token on its
-- own, so a replay whose flows_1m block is skipped as a duplicate still reaches flows_1h and fills
-- it in if that part was lost, and adds nothing where it landed
-- (tests/integration/test_clickhouse.py::test_replays_never_double_the_rollups).
--
-- Statements are safe to re-run (a crash before the ledger row): views are dropped with IF EXISTS
-- and created with IF NOT EXISTS, columns added with IF NOT EXISTS, and MODIFY ORDER BY to the
-- key the table already has is a no-op. Apply with no sink inserting (the sink migrates before it
-- consumes): between the DROP and the CREATE an insert would bypass the rollups.
DROP VIEW IF EXISTS flows_1h_mv;

DROP VIEW IF EXISTS flows_1m_mv;

ALTER TABLE flows_1m
    ADD COLUMN IF NOT EXISTS direction   LowCardinality(String) AFTER dst_port,
    ADD COLUMN IF NOT EXISTS src_asn     UInt32 AFTER direction,
    ADD COLUMN IF NOT EXISTS src_country LowCardinality(String) AFTER src_asn,
    ADD COLUMN IF NOT EXISTS dst_asn     UInt32 AFTER src_country,
    ADD COLUMN IF NOT EXISTS dst_country LowCardinality(String) AFTER dst_asn,
    MODIFY ORDER BY (time, src_namespace, src_workload, src_service, src_kind,
                     dst_namespace, dst_workload, dst_service, dst_kind, proto, dst_port,
                     direction, src_asn, src_country, dst_asn, dst_country);

ALTER TABLE flows_1h
    ADD COLUMN IF NOT EXISTS direction   LowCardinality(String) AFTER dst_port,
    ADD COLUMN IF NOT EXISTS src_asn     UInt32 AFTER direction,
    ADD COLUMN IF NOT EXISTS src_country LowCardinality(String) AFTER src_asn,
    ADD COLUMN IF NOT EXISTS dst_asn     UInt32 AFTER src_country,
    ADD COLUMN IF NOT EXISTS dst_country LowCardinality(String) AFTER dst_asn,
    MODIFY ORDER BY (time, src_namespace, src_workload, src_service, src_kind,
                     dst_namespace, dst_workload, dst_service, dst_kind, proto, dst_port,
                     direction, src_asn, src_country, dst_asn, dst_country);

CREATE MATERIALIZED VIEW IF NOT EXISTS flows_1m_mv TO flows_1m AS
SELECT
    toStartOfMinute(f.flow_end) AS time,
    src_namespace, src_workload, src_service, src_kind,
    dst_namespace, dst_workload, dst_service, dst_kind,
    proto,
    if(f.dst_port < 32768, f.dst_port, 0) AS dst_port,
    direction, src_asn, src_country, dst_asn, dst_country,
    sum(f.bytes) AS bytes,
    sum(f.packets) AS packets,
    count() AS flows,
    sum(f.bytes * f.sampling_rate) AS scaled_bytes,
    sum(f.packets * f.sampling_rate) AS scaled_packets
FROM flows AS f
GROUP BY time, src_namespace, src_workload, src_service, src_kind,
         dst_namespace, dst_workload, dst_service, dst_kind, proto, dst_port,
         direction, src_asn, src_country, dst_asn, dst_country;

-- Fires on each block the per-minute view inserts into flows_1m (not on merges).
CREATE MATERIALIZED VIEW IF NOT EXISTS flows_1h_mv TO flows_1h AS
SELECT
    toStartOfHour(m.time) AS time,
    src_namespace, src_workload, src_service, src_kind,
    dst_namespace, dst_workload, dst_service, dst_kind,
    proto, dst_port,
    direction, src_asn, src_country, dst_asn, dst_country,
    sum(m.bytes) AS bytes,
    sum(m.packets) AS packets,
    sum(m.flows) AS flows,
    sum(m.scaled_bytes) AS scaled_bytes,
    sum(m.scaled_packets) AS scaled_packets
FROM flows_1m AS m
GROUP BY time, src_namespace, src_workload, src_service, src_kind,
         dst_namespace, dst_workload, dst_service, dst_kind, proto, dst_port,
         direction, src_asn, src_country, dst_asn, dst_country;
