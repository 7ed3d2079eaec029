-- Retention of raw flows, and the per-minute and per-hour rollups that long-range queries read.
--
-- TTLs come from the sink's settings (flows_ttl_days, rollup_1m_ttl_days, rollup_1h_ttl_days;
-- defaults 15, 30 and 730 days), rendered into the placeholders below when this migration runs.
-- Tables are partitioned so that expiry drops whole parts (ttl_only_drop_parts).
-- flows expire by arrival time (inserted_at), not flow time: a replay of old captures or a late
-- export is kept for the full TTL instead of vanishing at the next merge. Rollups expire by their
-- (flow) time bucket, so rollup rows for flows older than the rollup TTL are dropped on merge.
--
-- Rollup keys: both sides' (namespace, workload, service, kind), protocol and a destination port
-- bucket: dst_port below 32768 is kept as is (well-known and registered service ports), 32768 and
-- above (the Linux ephemeral range 32768-60999 and the IANA dynamic range 49152-65535) become 0, so
-- client-side ports of reply flows do not explode the key space. Values: raw bytes and packets as
-- exported, the number of flow records, and bytes/packets scaled by each flow's sampling rate.
-- Rollup totals equal raw totals exactly: SummingMergeTree only adds rows with equal keys, so
-- sum(...) GROUP BY over a rollup is exact with or without merges (never read a rollup without sum).
--
-- Exactly-once: the sink inserts with deduplicate_blocks_in_dependent_materialized_views = 1, so
-- each rollup deduplicates its own blocks with the same token as flows
-- (non_replicated_deduplication_window below).
--
-- Cluster note: on a ClickHouse cluster use ReplicatedSummingMergeTree (ON CLUSTER, and
-- replicated_deduplication_window) and Distributed tables for reads; see sql/migrate.py.
ALTER TABLE flows MODIFY TTL toDateTime(inserted_at) + toIntervalDay({flows_ttl_days});

ALTER TABLE flows MODIFY SETTING ttl_only_drop_parts = 1;

CREATE TABLE IF NOT EXISTS flows_1m
(
    time               DateTime('UTC') CODEC(Delta, ZSTD),
    src_namespace      LowCardinality(String),
    src_workload       LowCardinality(String),
    src_service        LowCardinality(String),
    src_kind           LowCardinality(String),
    dst_namespace      LowCardinality(String),
    dst_workload       LowCardinality(String),
    dst_service        LowCardinality(String),
    dst_kind           LowCardinality(String),
    proto              UInt8,
    dst_port           UInt16,
    bytes              UInt64,
    packets            UInt64,
    flows              UInt64,
    scaled_bytes       UInt64,
    scaled_packets     UInt64
)
ENGINE = SummingMergeTree((bytes, packets, flows, scaled_bytes, scaled_packets))
PARTITION BY toYYYYMMDD(time)
ORDER BY (time, src_namespace, src_workload, src_service, src_kind,
          dst_namespace, dst_workload, dst_service, dst_kind, proto, dst_port)
TTL time + toIntervalDay({rollup_1m_ttl_days})
SETTINGS non_replicated_deduplication_window = 10000, ttl_only_drop_parts = 1;

CREATE TABLE IF NOT EXISTS flows_1h AS flows_1m
ENGINE = SummingMergeTree((bytes, packets, flows, scaled_bytes, scaled_packets))
PARTITION BY toYYYYMM(time)
ORDER BY (time, src_namespace, src_workload, src_service, src_kind,
          dst_namespace, dst_workload, dst_service, dst_kind, proto, dst_port)
TTL time + toIntervalDay({rollup_1h_ttl_days})
SETTINGS non_replicated_deduplication_window = 10000, ttl_only_drop_parts = 1;

CREATE MATERIALIZED VIEW IF NOT EXISTS flows_1m_mv TO flows_1m AS
SELECT
    toStartOfMinute(f.flow_end) AS time,
    src_namespace, src_workload, src_service, src_kind,
    dst_namespace, dst_workload, dst_service, dst_kind,
    proto,
    if(f.dst_port < 32768, f.dst_port, 0) AS dst_port,
    sum(f.bytes) AS bytes,
    sum(f.packets) AS packets,
    count() AS flows,
    sum(f.bytes * f.sampling_rate) AS scaled_bytes,
    sum(f.packets * f.sampling_rate) AS scaled_packets
FROM flows AS f
GROUP BY time, src_namespace, src_workload, src_service, src_kind,
         dst_namespace, dst_workload, dst_service, dst_kind, proto, dst_port;

CREATE MATERIALIZED VIEW IF NOT EXISTS flows_1h_mv TO flows_1h AS
SELECT
    toStartOfHour(f.flow_end) AS time,
    src_namespace, src_workload, src_service, src_kind,
    dst_namespace, dst_workload, dst_service, dst_kind,
    proto,
    if(f.dst_port < 32768, f.dst_port, 0) AS dst_port,
    sum(f.bytes) AS bytes,
    sum(f.packets) AS packets,
    count() AS flows,
    sum(f.bytes * f.sampling_rate) AS scaled_bytes,
    sum(f.packets * f.sampling_rate) AS scaled_packets
FROM flows AS f
GROUP BY time, src_namespace, src_workload, src_service, src_kind,
         dst_namespace, dst_workload, dst_service, dst_kind, proto, dst_port;

-- Backfill from flows already stored when this migration runs (flows inserted before the views
-- existed). Apply migrations with no sink inserting (the sink migrates before it consumes): rows
-- inserted while this runs could be counted by both a view and the backfill. The token makes a
-- re-run of the backfill (after a crash before the ledger row) a no-op for the same data.
INSERT INTO flows_1m
SELECT
    toStartOfMinute(f.flow_end) AS time,
    src_namespace, src_workload, src_service, src_kind,
    dst_namespace, dst_workload, dst_service, dst_kind,
    proto, if(f.dst_port < 32768, f.dst_port, 0) AS dst_port,
    sum(f.bytes), sum(f.packets), count(), sum(f.bytes * f.sampling_rate), sum(f.packets * f.sampling_rate)
FROM flows AS f
GROUP BY ALL
SETTINGS insert_deduplication_token = 'migration-0002-backfill-1m';

INSERT INTO flows_1h
SELECT
    toStartOfHour(f.flow_end) AS time,
    src_namespace, src_workload, src_service, src_kind,
    dst_namespace, dst_workload, dst_service, dst_kind,
    proto, if(f.dst_port < 32768, f.dst_port, 0) AS dst_port,
    sum(f.bytes), sum(f.packets), count(), sum(f.bytes * f.sampling_rate), sum(f.packets * f.sampling_rate)
FROM flows AS f
GROUP BY ALL
SETTINGS insert_deduplication_token = 'migration-0002-backfill-1h';
