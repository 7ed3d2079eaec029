-- Query performance (issue 7): a per-day rollup, the external ends' AS organisation as a rollup
-- key, and a per-pod rollup, so every named query but completeness reads pre-aggregated rows.
--
-- 1. Rollup keys gain src_as_org and dst_as_org (the organisation MaxMind names for an external
--    end's ASN), so traffic by ASN and organisation is answered from the rollups. An ASN has one
--    organisation at a time, so the key adds a column, not rows. Rows rolled up before this
--    migration read as '' (queries take max(dst_as_org) per ASN). As in 0006 the views are
--    re-created with the new keys; the tables keep their data.
--
-- 2. flows_1d: per day (UTC), the same columns and keys as flows_1m/flows_1h, fed from flows_1h by
--    a chained view (like flows_1h from flows_1m: it fires on each block the hourly view inserts,
--    and deduplicates that block with the sink's insert token, so a replay adds nothing here
--    either), and backfilled from flows_1h. Long windows read it: all time reads ~1/24 of the
--    hourly rows. TTL {rollup_1d_ttl_days} (default 10 years); partitioned by year, so expiry
--    drops whole years (ttl_only_drop_parts). Always read with sum() … GROUP BY (SummingMergeTree).
--
-- 3. pod_traffic_1h: per pod and hour, what it sent (outbound) and received (inbound), per peer,
--    protocol and destination port (the exact port: what the raw flows say), with first/last seen.
--    The rollups have no pod, and `flows` is ordered by time, so "what did this pod talk to this
--    month" had to scan every flow of the month. Here a pod's rows are contiguous: ordered by
--    (namespace, name, pod_uid, time …), found through the sort key by namespace/name (pod_peers)
--    and through a bloom-filter skip index by UID (pod_history; a UID has one namespace/name, so
--    its rows sit in a few granules). Every flow gives a row for each end that is named (a pod,
--    node or service: name or pod UID set; external/private addresses are the peers, never the
--    subject). A flow from an end to itself is counted once, outbound, as the raw queries did.
--    Fed by a view from flows (deduplicated with the insert token like the others), backfilled
--    from flows; kept as long as the per-hour rollup ({rollup_1h_ttl_days}).
--    AggregatingMergeTree with SimpleAggregateFunction columns: read with sum/min/max … GROUP BY.
--
-- Statements are safe to re-run (views dropped IF EXISTS and created IF NOT EXISTS, columns added
-- IF NOT EXISTS, backfills deduplicated by their tokens). Apply with no sink inserting (the sink
-- migrates before it consumes): between the DROP and the CREATE of a view an insert would bypass it.
DROP VIEW IF EXISTS flows_1h_mv;

DROP VIEW IF EXISTS flows_1m_mv;

ALTER TABLE flows_1m
    ADD COLUMN IF NOT EXISTS src_as_org LowCardinality(String) AFTER dst_country,
    ADD COLUMN IF NOT EXISTS dst_as_org LowCardinality(String) AFTER src_as_org,
    MODIFY ORDER BY (time, src_namespace, src_workload, src_service, src_kind,
                     dst_namespace, dst_workload, dst_service, dst_kind, proto, dst_port,
                     direction, src_asn, src_country, dst_asn, dst_country, src_as_org, dst_as_org);

ALTER TABLE flows_1h
    ADD COLUMN IF NOT EXISTS src_as_org LowCardinality(String) AFTER dst_country,
    ADD COLUMN IF NOT EXISTS dst_as_org LowCardinality(String) AFTER src_as_org,
    MODIFY ORDER BY (time, src_namespace, src_workload, src_service, src_kind,
                     dst_namespace, dst_workload, dst_service, dst_kind, proto, dst_port,
                     direction, src_asn, src_country, dst_asn, dst_country, src_as_org, dst_as_org);

CREATE MATERIALIZED VIEW IF NOT EXISTS flows_1m_mv TO flows_1m AS
SELECT
    toStartOfMinute(f.flow_end) AS time,
    src_namespace, src_workload, src_service, src_kind,
    dst_namespace, dst_workload, dst_service, dst_kind,
    proto,
    if(f.dst_port < 32768, f.dst_port, 0) AS dst_port,
    direction, src_asn, src_country, dst_asn, dst_country, src_as_org, dst_as_org,
    sum(f.bytes) AS bytes,
    sum(f.packets) AS packets,
    count() AS flows,
    sum(f.bytes * f.sampling_rate) AS scaled_bytes,
    sum(f.packets * f.sampling_rate) AS scaled_packets
FROM flows AS f
GROUP BY time, src_namespace, src_workload, src_service, src_kind,
         dst_namespace, dst_workload, dst_service, dst_kind, proto, dst_port,
         direction, src_asn, src_country, dst_asn, dst_country, src_as_org, dst_as_org;

-- Fires on each block the per-minute view inserts into flows_1m (not on merges).
CREATE MATERIALIZED VIEW IF NOT EXISTS flows_1h_mv TO flows_1h AS
SELECT
    toStartOfHour(m.time) AS time,
    src_namespace, src_workload, src_service, src_kind,
    dst_namespace, dst_workload, dst_service, dst_kind,
    proto, dst_port,
    direction, src_asn, src_country, dst_asn, dst_country, src_as_org, dst_as_org,
    sum(m.bytes) AS bytes,
    sum(m.packets) AS packets,
    sum(m.flows) AS flows,
    sum(m.scaled_bytes) AS scaled_bytes,
    sum(m.scaled_packets) AS scaled_packets
FROM flows_1m AS m
GROUP BY time, src_namespace, src_workload, src_service, src_kind,
         dst_namespace, dst_workload, dst_service, dst_kind, proto, dst_port,
         direction, src_asn, src_country, dst_asn, dst_country, src_as_org, dst_as_org;

CREATE TABLE IF NOT EXISTS flows_1d AS flows_1h
ENGINE = SummingMergeTree((bytes, packets, flows, scaled_bytes, scaled_packets))
PARTITION BY toYear(time)
ORDER BY (time, src_namespace, src_workload, src_service, src_kind,
          dst_namespace, dst_workload, dst_service, dst_kind, proto, dst_port,
          direction, src_asn, src_country, dst_asn, dst_country, src_as_org, dst_as_org)
TTL time + toIntervalDay({rollup_1d_ttl_days})
SETTINGS non_replicated_deduplication_window = 10000, ttl_only_drop_parts = 1;

-- Fires on each block the per-hour view inserts into flows_1h.
CREATE MATERIALIZED VIEW IF NOT EXISTS flows_1d_mv TO flows_1d AS
SELECT
    toStartOfDay(h.time) AS time,
    src_namespace, src_workload, src_service, src_kind,
    dst_namespace, dst_workload, dst_service, dst_kind,
    proto, dst_port,
    direction, src_asn, src_country, dst_asn, dst_country, src_as_org, dst_as_org,
    sum(h.bytes) AS bytes,
    sum(h.packets) AS packets,
    sum(h.flows) AS flows,
    sum(h.scaled_bytes) AS scaled_bytes,
    sum(h.scaled_packets) AS scaled_packets
FROM flows_1h AS h
GROUP BY time, src_namespace, src_workload, src_service, src_kind,
         dst_namespace, dst_workload, dst_service, dst_kind, proto, dst_port,
         direction, src_asn, src_country, dst_asn, dst_country, src_as_org, dst_as_org;

INSERT INTO flows_1d
SELECT
    toStartOfDay(h.time) AS time,
    src_namespace, src_workload, src_service, src_kind,
    dst_namespace, dst_workload, dst_service, dst_kind,
    proto, dst_port,
    direction, src_asn, src_country, dst_asn, dst_country, src_as_org, dst_as_org,
    sum(h.bytes), sum(h.packets), sum(h.flows), sum(h.scaled_bytes), sum(h.scaled_packets)
FROM flows_1h AS h
GROUP BY ALL
SETTINGS insert_deduplication_token = 'migration-0009-backfill-1d';

CREATE TABLE IF NOT EXISTS pod_traffic_1h
(
    namespace      LowCardinality(String),
    name           String,
    pod_uid        String,
    time           DateTime('UTC') CODEC(Delta, ZSTD),
    direction      LowCardinality(String),
    peer           String,
    peer_workload  LowCardinality(String),
    proto          UInt8,
    dst_port       UInt16,
    bytes          SimpleAggregateFunction(sum, UInt64),
    packets        SimpleAggregateFunction(sum, UInt64),
    flows          SimpleAggregateFunction(sum, UInt64),
    scaled_bytes   SimpleAggregateFunction(sum, UInt64),
    scaled_packets SimpleAggregateFunction(sum, UInt64),
    first_seen     SimpleAggregateFunction(min, DateTime64(3, 'UTC')),
    last_seen      SimpleAggregateFunction(max, DateTime64(3, 'UTC')),
    INDEX pod_uid_bloom pod_uid TYPE bloom_filter GRANULARITY 1
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(time)
ORDER BY (namespace, name, pod_uid, time, direction, peer, peer_workload, proto, dst_port)
TTL time + toIntervalDay({rollup_1h_ttl_days})
SETTINGS non_replicated_deduplication_window = 10000, ttl_only_drop_parts = 1;

CREATE MATERIALIZED VIEW IF NOT EXISTS pod_traffic_1h_mv TO pod_traffic_1h AS
SELECT
    side.1 AS namespace, side.2 AS name, side.3 AS pod_uid,
    toStartOfHour(f.flow_end) AS time,
    side.4 AS direction, side.5 AS peer, side.6 AS peer_workload,
    f.proto AS proto, f.dst_port AS dst_port,
    sum(f.bytes) AS bytes,
    sum(f.packets) AS packets,
    count() AS flows,
    sum(f.bytes * f.sampling_rate) AS scaled_bytes,
    sum(f.packets * f.sampling_rate) AS scaled_packets,
    min(f.flow_start) AS first_seen,
    max(f.flow_end) AS last_seen
FROM flows AS f
ARRAY JOIN [
    (CAST(f.src_namespace, 'String'), f.src_name, f.src_pod_uid, 'outbound',
     if(f.dst_name != '', concat(f.dst_namespace, '/', f.dst_name), toString(f.dst_addr)),
     CAST(if(f.dst_workload != '', f.dst_workload, f.dst_kind), 'String')),
    (CAST(f.dst_namespace, 'String'), f.dst_name, f.dst_pod_uid, 'inbound',
     if(f.src_name != '', concat(f.src_namespace, '/', f.src_name), toString(f.src_addr)),
     CAST(if(f.src_workload != '', f.src_workload, f.src_kind), 'String'))
] AS side
WHERE (side.2 != '' OR side.3 != '')
  AND NOT (side.4 = 'inbound' AND f.src_namespace = f.dst_namespace AND f.src_name = f.dst_name
           AND f.src_pod_uid = f.dst_pod_uid)
GROUP BY namespace, name, pod_uid, time, direction, peer, peer_workload, proto, dst_port;

INSERT INTO pod_traffic_1h
SELECT
    side.1 AS namespace, side.2 AS name, side.3 AS pod_uid,
    toStartOfHour(f.flow_end) AS time,
    side.4 AS direction, side.5 AS peer, side.6 AS peer_workload,
    f.proto AS proto, f.dst_port AS dst_port,
    sum(f.bytes), sum(f.packets), count(), sum(f.bytes * f.sampling_rate), sum(f.packets * f.sampling_rate),
    min(f.flow_start), max(f.flow_end)
FROM flows AS f
ARRAY JOIN [
    (CAST(f.src_namespace, 'String'), f.src_name, f.src_pod_uid, 'outbound',
     if(f.dst_name != '', concat(f.dst_namespace, '/', f.dst_name), toString(f.dst_addr)),
     CAST(if(f.dst_workload != '', f.dst_workload, f.dst_kind), 'String')),
    (CAST(f.dst_namespace, 'String'), f.dst_name, f.dst_pod_uid, 'inbound',
     if(f.src_name != '', concat(f.src_namespace, '/', f.src_name), toString(f.src_addr)),
     CAST(if(f.src_workload != '', f.src_workload, f.src_kind), 'String'))
] AS side
WHERE (side.2 != '' OR side.3 != '')
  AND NOT (side.4 = 'inbound' AND f.src_namespace = f.dst_namespace AND f.src_name = f.dst_name
           AND f.src_pod_uid = f.dst_pod_uid)
GROUP BY namespace, name, pod_uid, time, direction, peer, peer_workload, proto, dst_port
SETTINGS insert_deduplication_token = 'migration-0009-backfill-pods';
