-- The sink's insert groups (sink/groups.py): before the sink inserts several consecutive enriched
-- messages of one Kafka partition as one insert, it records here which messages (first and last
-- offset), under which deduplication token, and the raw origins they carry. After a crash the
-- partition's committed offset starts a recorded group, and the sink re-forms exactly that group
-- (same messages, same token: ClickHouse drops it if it had landed, in flows and in every view).
-- The origins of recent groups let it drop what the enricher re-emits after its own crash (the
-- same raw batch at a new offset). Written once per group, read when a partition is assigned.
-- Kept as long as raw flows: a replay older than that has nothing left to protect.
CREATE TABLE IF NOT EXISTS sink_groups
(
    topic           LowCardinality(String),
    kafka_partition UInt32,
    first_offset    UInt64,
    last_offset     UInt64,
    token           String,
    origins         Array(String),
    recorded_at     DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = MergeTree
ORDER BY (topic, kafka_partition, first_offset)
TTL toDateTime(recorded_at) + toIntervalDay({flows_ttl_days});
