-- The service map's nodes for Grafana's Node Graph panel over the last `minutes` minutes (0 = all
-- time): one node per workload (namespace/workload, else namespace/service, else the kind of
-- address) with the bytes it sent plus received (mainstat) and its flow count (secondarystat).
-- From the rollups, in one pass: each row's source and destination ends are both counted
-- (ARRAY JOIN over the two sides). Pair with service_map_edges (same parameters).
-- params: minutes UInt32 = 60 (0 = all time)
SELECT
    side.1 AS id,
    any(side.2) AS title,
    any(side.3) AS subtitle,
    sum(scaled_bytes) AS mainstat,
    sum(flows) AS secondarystat
FROM {rollup}
ARRAY JOIN [
    (if(src_workload != '', concat(src_namespace, '/', src_workload),
        if(src_service != '', concat(src_namespace, '/', src_service), CAST(src_kind, 'String'))),
     if(src_workload != '', CAST(src_workload, 'String'), if(src_service != '', CAST(src_service, 'String'), CAST(src_kind, 'String'))),
     if(src_namespace != '', CAST(src_namespace, 'String'), CAST(src_kind, 'String'))),
    (if(dst_workload != '', concat(dst_namespace, '/', dst_workload),
        if(dst_service != '', concat(dst_namespace, '/', dst_service), CAST(dst_kind, 'String'))),
     if(dst_workload != '', CAST(dst_workload, 'String'), if(dst_service != '', CAST(dst_service, 'String'), CAST(dst_kind, 'String'))),
     if(dst_namespace != '', CAST(dst_namespace, 'String'), CAST(dst_kind, 'String')))
] AS side
GROUP BY id
ORDER BY mainstat DESC, id
