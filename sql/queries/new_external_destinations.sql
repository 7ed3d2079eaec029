-- External addresses each workload started talking to since `since` (UTC, 'YYYY-MM-DD hh:mm:ss'):
-- first seen at or after `since` within the retained raw flows (flows TTL, 15 days by default),
-- so "new" means "not seen in the retained history before". From `flows`.
-- params: since String = 1970-01-01 00:00:00, limit UInt32 = 100
SELECT
    src_namespace AS namespace,
    if(src_workload != '', src_workload, src_kind) AS workload,
    toString(dst_addr)                  AS destination,
    min(flow_end)                       AS first_seen,
    sum(bytes * sampling_rate)          AS bytes,
    count()                             AS flows
FROM flows
WHERE dst_kind = 'external'
GROUP BY namespace, workload, dst_addr
HAVING first_seen >= parseDateTime64BestEffort({since:String}, 3, 'UTC')
ORDER BY first_seen DESC, namespace, workload, destination
LIMIT {limit:UInt32}
