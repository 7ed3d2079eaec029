-- Columns of the time-aware identity, MaxMind data and flow direction (enricher schema, issue 6).
-- Each has a default, so rows stored before this migration read as "not known": '' for strings,
-- 0 for the ASN, nan for coordinates. They sit after dst_node in the enriched schema's order
-- (inserted_at stays last). Rollups are unchanged.
ALTER TABLE flows
    ADD COLUMN IF NOT EXISTS src_pod_uid String DEFAULT '' AFTER dst_node,
    ADD COLUMN IF NOT EXISTS dst_pod_uid String DEFAULT '' AFTER src_pod_uid,
    ADD COLUMN IF NOT EXISTS src_asn     UInt32 DEFAULT 0 AFTER dst_pod_uid,
    ADD COLUMN IF NOT EXISTS src_as_org  LowCardinality(String) DEFAULT '' AFTER src_asn,
    ADD COLUMN IF NOT EXISTS src_country LowCardinality(String) DEFAULT '' AFTER src_as_org,
    ADD COLUMN IF NOT EXISTS src_city    LowCardinality(String) DEFAULT '' AFTER src_country,
    ADD COLUMN IF NOT EXISTS src_lat     Float32 DEFAULT nan AFTER src_city,
    ADD COLUMN IF NOT EXISTS src_lon     Float32 DEFAULT nan AFTER src_lat,
    ADD COLUMN IF NOT EXISTS dst_asn     UInt32 DEFAULT 0 AFTER src_lon,
    ADD COLUMN IF NOT EXISTS dst_as_org  LowCardinality(String) DEFAULT '' AFTER dst_asn,
    ADD COLUMN IF NOT EXISTS dst_country LowCardinality(String) DEFAULT '' AFTER dst_as_org,
    ADD COLUMN IF NOT EXISTS dst_city    LowCardinality(String) DEFAULT '' AFTER dst_country,
    ADD COLUMN IF NOT EXISTS dst_lat     Float32 DEFAULT nan AFTER dst_city,
    ADD COLUMN IF NOT EXISTS dst_lon     Float32 DEFAULT nan AFTER dst_lat,
    ADD COLUMN IF NOT EXISTS direction   LowCardinality(String) DEFAULT '' AFTER dst_lon;
