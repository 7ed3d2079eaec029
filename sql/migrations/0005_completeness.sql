-- Per-minute completeness records (completeness.v1, written by the sensors and the enricher; see
-- sensors/completeness.py for what each counter means). Rows are deltas: several sensor workers
-- or a restart within a minute write several rows for one key, and SummingMergeTree adds them.
-- Always read with sum(...) GROUP BY. Kept as long as the hourly rollups whose completeness it
-- qualifies; inserted with a deduplication token like flows, so a replay does not add twice.
CREATE TABLE IF NOT EXISTS completeness
(
    minute               DateTime('UTC') CODEC(Delta, ZSTD),
    stage                LowCardinality(String),
    exporter             IPv6,
    observation_domain   UInt32,
    observer             LowCardinality(String),
    packets              UInt64,
    records              UInt64,
    bytes                UInt64,
    sequence_lost        UInt64,
    decode_errors        UInt64,
    dropped_backpressure UInt64,
    kernel_drops         UInt64,
    unknown_addresses    UInt64,
    ignored              UInt64,
    late                 UInt64,
    duplicates_dropped   UInt64
)
ENGINE = SummingMergeTree
PARTITION BY toYYYYMM(minute)
ORDER BY (minute, stage, exporter, observation_domain, observer)
TTL minute + toIntervalDay({rollup_1h_ttl_days})
SETTINGS non_replicated_deduplication_window = 10000, ttl_only_drop_parts = 1;
