-- First-seen external destinations per workload: one row per (source namespace, workload, kind,
-- external destination address) with when it was first and last seen and how much went there,
-- so "what did this workload start talking to this week" reads a table of (workloads ×
-- destinations) rows instead of scanning the raw flows, and outlives the flows TTL.
--
-- Fed by a materialized view from `flows`: flows whose destination is `external` (a public
-- address no cluster object owns), except those the destination opened (initiator = 2, known
-- from conntrack): the reply direction of an inbound connection is not something the workload
-- started talking to. NetFlow flows have initiator 0 (unknown) and are kept.
--
-- AggregatingMergeTree with SimpleAggregateFunction columns: rows with one key are combined on
-- merge (min first_seen, max last_seen, sums, the latest ASN/org/country); before a merge a key
-- can have several rows, so always read with min()/max()/sum() … GROUP BY — exact either way.
-- first_seen is min(flow_start), last_seen max(flow_end). Bytes and packets as exported and
-- scaled by the sampling rate, like the rollups.
--
-- Exactly-once: the sink inserts with deduplicate_blocks_in_dependent_materialized_views = 1, so
-- this view's block is deduplicated with the insert's token (the window below), like the rollups:
-- a replay adds nothing, and a replay after a crash that wrote flows but not this table fills it
-- in (tests/integration/test_history_queries.py proves both).
--
-- Rows expire when the destination has not been seen for the per-hour rollup's TTL
-- ({rollup_1h_ttl_days}); a destination seen again after that counts as new.
CREATE TABLE IF NOT EXISTS first_seen_external
(
    src_namespace  LowCardinality(String),
    src_workload   LowCardinality(String),
    src_kind       LowCardinality(String),
    dst_addr       IPv6,
    dst_asn        SimpleAggregateFunction(anyLast, UInt32),
    dst_as_org     SimpleAggregateFunction(anyLast, LowCardinality(String)),
    dst_country    SimpleAggregateFunction(anyLast, LowCardinality(String)),
    first_seen     SimpleAggregateFunction(min, DateTime64(3, 'UTC')),
    last_seen      SimpleAggregateFunction(max, DateTime64(3, 'UTC')),
    bytes          SimpleAggregateFunction(sum, UInt64),
    packets        SimpleAggregateFunction(sum, UInt64),
    flows          SimpleAggregateFunction(sum, UInt64),
    scaled_bytes   SimpleAggregateFunction(sum, UInt64),
    scaled_packets SimpleAggregateFunction(sum, UInt64)
)
ENGINE = AggregatingMergeTree
ORDER BY (src_namespace, src_workload, src_kind, dst_addr)
TTL toDateTime(last_seen) + toIntervalDay({rollup_1h_ttl_days})
SETTINGS non_replicated_deduplication_window = 10000;

CREATE MATERIALIZED VIEW IF NOT EXISTS first_seen_external_mv TO first_seen_external AS
SELECT
    src_namespace, src_workload, src_kind, dst_addr,
    anyLast(f.dst_asn)                AS dst_asn,
    anyLast(f.dst_as_org)             AS dst_as_org,
    anyLast(f.dst_country)            AS dst_country,
    min(f.flow_start)                 AS first_seen,
    max(f.flow_end)                   AS last_seen,
    sum(f.bytes)                      AS bytes,
    sum(f.packets)                    AS packets,
    count()                           AS flows,
    sum(f.bytes * f.sampling_rate)    AS scaled_bytes,
    sum(f.packets * f.sampling_rate)  AS scaled_packets
FROM flows AS f
WHERE f.dst_kind = 'external' AND f.initiator != 2
GROUP BY src_namespace, src_workload, src_kind, dst_addr;

-- Backfill from the flows already stored (apply with no sink inserting, as for 0002); the token
-- makes a re-run after a crash before the ledger row a no-op.
INSERT INTO first_seen_external
SELECT
    src_namespace, src_workload, src_kind, dst_addr,
    anyLast(f.dst_asn), anyLast(f.dst_as_org), anyLast(f.dst_country),
    min(f.flow_start), max(f.flow_end),
    sum(f.bytes), sum(f.packets), count(), sum(f.bytes * f.sampling_rate), sum(f.packets * f.sampling_rate)
FROM flows AS f
WHERE f.dst_kind = 'external' AND f.initiator != 2
GROUP BY src_namespace, src_workload, src_kind, dst_addr
SETTINGS insert_deduplication_token = 'migration-0007-backfill';
