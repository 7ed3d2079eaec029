-- The flow history, one row per (deduplicated, enriched) flow record.
-- Raw counters are stored as the exporter sent them; multiply by sampling_rate in queries.
-- Addresses are IPv6 (IPv4 as ::ffff:a.b.c.d), times UTC milliseconds.
CREATE TABLE IF NOT EXISTS flows
(
    time_received      DateTime64(3, 'UTC') CODEC(Delta, ZSTD),
    exporter           IPv6,
    observation_domain UInt32,
    observer           LowCardinality(String),
    version            UInt16,
    flow_start         DateTime64(3, 'UTC') CODEC(Delta, ZSTD),
    flow_end           DateTime64(3, 'UTC') CODEC(Delta, ZSTD),
    src_addr           IPv6,
    dst_addr           IPv6,
    src_port           UInt16,
    dst_port           UInt16,
    proto              UInt8,
    bytes              UInt64,
    packets            UInt64,
    sampling_rate      UInt32,
    tcp_flags          UInt8,
    in_if              UInt32,
    out_if             UInt32,
    src_kind           LowCardinality(String),
    src_namespace      LowCardinality(String),
    src_name           String,
    src_workload       LowCardinality(String),
    src_workload_kind  LowCardinality(String),
    src_service        LowCardinality(String),
    src_node           LowCardinality(String),
    dst_kind           LowCardinality(String),
    dst_namespace      LowCardinality(String),
    dst_name           String,
    dst_workload       LowCardinality(String),
    dst_workload_kind  LowCardinality(String),
    dst_service        LowCardinality(String),
    dst_node           LowCardinality(String),
    -- When the row became queryable: flow_end to inserted_at is the pipeline's latency.
    inserted_at        DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = MergeTree
PARTITION BY toYYYYMMDD(flow_end)
ORDER BY (toStartOfMinute(flow_end), src_namespace, src_workload, dst_namespace, dst_workload)
-- The sink inserts one Kafka batch per insert with a token derived from the raw message's
-- offset, so remembering the last 10000 tokens makes a replay of recent batches a no-op.
SETTINGS non_replicated_deduplication_window = 10000;
