-- Traffic leaving the cluster (destination kind `external`) by source workload over the last
-- `minutes` minutes (0 = all time), from the rollups. Bytes and packets are sampling-scaled.
-- Per ASN and country comes with the geo/ASN columns of the enrichment (issue 6).
-- params: minutes UInt32 = 60 (0 = all time), limit UInt32 = 20
SELECT
    src_namespace AS namespace,
    if(src_workload != '', src_workload, src_kind) AS workload,
    sum(b) AS bytes,
    sum(p) AS packets,
    sum(f) AS flows
FROM
(
    -- summed per key columns first, the label built on that small result
    SELECT src_namespace, src_workload, src_kind,
           sum(scaled_bytes) AS b, sum(scaled_packets) AS p, sum(flows) AS f
    FROM
    (
        SELECT * FROM flows_1m
        WHERE {minutes:UInt32} BETWEEN 1 AND 1440 AND time >= toStartOfMinute(now() - toIntervalMinute({minutes:UInt32}))
        UNION ALL
        SELECT * FROM flows_1h
        WHERE ({minutes:UInt32} = 0 OR {minutes:UInt32} > 1440)
          AND ({minutes:UInt32} = 0 OR time >= toStartOfHour(now() - toIntervalMinute({minutes:UInt32})))
    )
    WHERE dst_kind = 'external'
    GROUP BY src_namespace, src_workload, src_kind
)
GROUP BY namespace, workload
ORDER BY bytes DESC, namespace, workload
LIMIT {limit:UInt32}
