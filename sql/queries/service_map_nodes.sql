-- The service map's nodes for Grafana's Node Graph panel over the last `minutes` minutes (0 = all
-- time): one node per workload (namespace/workload, else namespace/service, else the kind of
-- address) with the bytes it sent plus received (mainstat) and its flow count (secondarystat).
-- From the rollups. Pair with service_map_edges (same parameters).
-- params: minutes UInt32 = 60 (0 = all time)
SELECT id, any(title) AS title, any(subtitle) AS subtitle, sum(b) AS mainstat, sum(f) AS secondarystat
FROM
(
    SELECT
        if(src_workload != '', concat(src_namespace, '/', src_workload),
           if(src_service != '', concat(src_namespace, '/', src_service), src_kind)) AS id,
        if(src_workload != '', src_workload, if(src_service != '', src_service, src_kind)) AS title,
        if(src_namespace != '', src_namespace, src_kind) AS subtitle,
        scaled_bytes AS b, flows AS f
    FROM
    (
        SELECT * FROM flows_1m
        WHERE {minutes:UInt32} BETWEEN 1 AND 1440 AND time >= toStartOfMinute(now() - toIntervalMinute({minutes:UInt32}))
        UNION ALL
        SELECT * FROM flows_1h
        WHERE ({minutes:UInt32} = 0 OR {minutes:UInt32} > 1440)
          AND ({minutes:UInt32} = 0 OR time >= toStartOfHour(now() - toIntervalMinute({minutes:UInt32})))
    )
    UNION ALL
    SELECT
        if(dst_workload != '', concat(dst_namespace, '/', dst_workload),
           if(dst_service != '', concat(dst_namespace, '/', dst_service), dst_kind)) AS id,
        if(dst_workload != '', dst_workload, if(dst_service != '', dst_service, dst_kind)) AS title,
        if(dst_namespace != '', dst_namespace, dst_kind) AS subtitle,
        scaled_bytes AS b, flows AS f
    FROM
    (
        SELECT * FROM flows_1m
        WHERE {minutes:UInt32} BETWEEN 1 AND 1440 AND time >= toStartOfMinute(now() - toIntervalMinute({minutes:UInt32}))
        UNION ALL
        SELECT * FROM flows_1h
        WHERE ({minutes:UInt32} = 0 OR {minutes:UInt32} > 1440)
          AND ({minutes:UInt32} = 0 OR time >= toStartOfHour(now() - toIntervalMinute({minutes:UInt32})))
    )
)
GROUP BY id
ORDER BY mainstat DESC, id
