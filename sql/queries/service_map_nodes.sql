-- The service map's nodes for Grafana's Node Graph panel over the last `minutes` minutes (0 = all
-- time): one node per workload (namespace/workload, else namespace/service, else the kind of
-- address) with the bytes it sent plus received (mainstat) and its flow count (secondarystat).
-- From the rollups (read once, summed per key columns first; each row then counts for both of its
-- ends). Pair with service_map_edges (same parameters).
-- params: minutes UInt32 = 60 (0 = all time)
SELECT id, any(title) AS title, any(subtitle) AS subtitle, sum(b) AS mainstat, sum(f) AS secondarystat
FROM
(
    SELECT
        arrayJoin([(src_namespace, src_workload, src_service, src_kind),
                   (dst_namespace, dst_workload, dst_service, dst_kind)]) AS node,
        node.1 AS namespace, node.2 AS workload, node.3 AS service, node.4 AS kind,
        if(workload != '', concat(namespace, '/', workload),
           if(service != '', concat(namespace, '/', service), kind)) AS id,
        if(workload != '', workload, if(service != '', service, kind)) AS title,
        if(namespace != '', namespace, kind) AS subtitle,
        b, f
    FROM
    (
        SELECT src_namespace, src_workload, src_service, src_kind, dst_namespace, dst_workload, dst_service, dst_kind,
               sum(scaled_bytes) AS b, sum(flows) AS f
        FROM
        (
            SELECT * FROM flows_1m
            WHERE {minutes:UInt32} BETWEEN 1 AND 1440 AND time >= toStartOfMinute(now() - toIntervalMinute({minutes:UInt32}))
            UNION ALL
            SELECT * FROM flows_1h
            WHERE ({minutes:UInt32} = 0 OR {minutes:UInt32} > 1440)
              AND ({minutes:UInt32} = 0 OR time >= toStartOfHour(now() - toIntervalMinute({minutes:UInt32})))
        )
        GROUP BY src_namespace, src_workload, src_service, src_kind, dst_namespace, dst_workload, dst_service, dst_kind
    )
)
GROUP BY id
ORDER BY mainstat DESC, id
