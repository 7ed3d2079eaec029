-- The schema of a flowtally database at migration version 0001, as SHOW CREATE TABLE printed it
-- (database name removed), plus its ledger row. tests/integration/test_clickhouse.py loads it and
-- migrates from there. Do not regenerate it: it records what version 0001 databases look like.

CREATE TABLE IF NOT EXISTS flows
(
    `time_received` DateTime64(3, 'UTC') CODEC(Delta(8), ZSTD(1)),
    `exporter` IPv6,
    `observation_domain` UInt32,
    `observer` LowCardinality(String),
    `version` UInt16,
    `flow_start` DateTime64(3, 'UTC') CODEC(Delta(8), ZSTD(1)),
    `flow_end` DateTime64(3, 'UTC') CODEC(Delta(8), ZSTD(1)),
    `src_addr` IPv6,
    `dst_addr` IPv6,
    `src_port` UInt16,
    `dst_port` UInt16,
    `proto` UInt8,
    `bytes` UInt64,
    `packets` UInt64,
    `sampling_rate` UInt32,
    `tcp_flags` UInt8,
    `in_if` UInt32,
    `out_if` UInt32,
    `src_kind` LowCardinality(String),
    `src_namespace` LowCardinality(String),
    `src_name` String,
    `src_workload` LowCardinality(String),
    `src_workload_kind` LowCardinality(String),
    `src_service` LowCardinality(String),
    `src_node` LowCardinality(String),
    `dst_kind` LowCardinality(String),
    `dst_namespace` LowCardinality(String),
    `dst_name` String,
    `dst_workload` LowCardinality(String),
    `dst_workload_kind` LowCardinality(String),
    `dst_service` LowCardinality(String),
    `dst_node` LowCardinality(String),
    `inserted_at` DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = MergeTree
PARTITION BY toYYYYMMDD(flow_end)
ORDER BY (toStartOfMinute(flow_end), src_namespace, src_workload, dst_namespace, dst_workload)
SETTINGS non_replicated_deduplication_window = 10000, index_granularity = 8192;

CREATE TABLE IF NOT EXISTS schema_migrations
(
    `version` UInt32,
    `name` String,
    `checksum` String,
    `applied_at` DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = MergeTree
ORDER BY version
SETTINGS index_granularity = 8192;

INSERT INTO schema_migrations (version, name, checksum) VALUES (1, 'flows', '962d98d2ce1fe552a60f866738588601155fb6db09e8235e152a7a3f2c055f9d');
