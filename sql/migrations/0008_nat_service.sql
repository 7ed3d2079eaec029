-- The service a translated (DNAT) flow's initiator addressed (enricher schema, issue 6): the owner
-- of raw.v1's nat_addr when it is a ClusterIP service, '' when the record was not translated or
-- the address is not a service. They sit after direction in the enriched schema's order
-- (inserted_at stays last); rows stored before read as ''. Rollups are unchanged (the service
-- side's *_service already names the addressed service).
ALTER TABLE flows
    ADD COLUMN IF NOT EXISTS nat_namespace LowCardinality(String) DEFAULT '' AFTER direction,
    ADD COLUMN IF NOT EXISTS nat_service   LowCardinality(String) DEFAULT '' AFTER nat_namespace;
