-- The pods' chosen labels (watch-k8s setting pod_labels; enricher schema *_labels, issue 6): a
-- JSON object with sorted keys per side, '' for ends without labels. Stored as one
-- LowCardinality string per label set (a cluster has few distinct sets); the *_labels_map ALIAS
-- columns read them as maps, so a query can say src_labels_map['team'] = 'payments'. Rows stored
-- before read as ''. Rollups are unchanged (workloads already group their pods).
ALTER TABLE flows
    ADD COLUMN IF NOT EXISTS src_labels LowCardinality(String) DEFAULT '' AFTER nat_service,
    ADD COLUMN IF NOT EXISTS dst_labels LowCardinality(String) DEFAULT '' AFTER src_labels,
    ADD COLUMN IF NOT EXISTS src_labels_map Map(String, String) ALIAS JSONExtract(src_labels, 'Map(String, String)'),
    ADD COLUMN IF NOT EXISTS dst_labels_map Map(String, String) ALIAS JSONExtract(dst_labels, 'Map(String, String)');
