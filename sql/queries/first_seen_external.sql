-- External destinations each workload started talking to since `since` (UTC, 'YYYY-MM-DD
-- hh:mm:ss'): destinations whose first flow started at or after `since`, with when they were
-- first and last seen and the sampling-scaled bytes and flows sent there since. From the
-- first-seen table first_seen_external, which keeps a destination until it has not been seen for
-- the per-hour rollup's TTL, so "new" looks back much further than the raw flows' TTL.
-- `namespace` / `workload` narrow it to one namespace or workload ('*' = all).
-- params: since String = 1970-01-01 00:00:00, namespace String = *, workload String = *, limit UInt32 = 100
SELECT
    src_namespace                        AS namespace,
    if(src_workload != '', src_workload, src_kind) AS workload,
    toString(dst_addr)                   AS destination,
    anyLast(dst_asn)                     AS asn,
    anyLast(dst_as_org)                  AS organisation,
    anyLast(dst_country)                 AS country,
    min(first_seen)                      AS first_seen,
    max(last_seen)                       AS last_seen,
    sum(scaled_bytes)                    AS bytes,
    sum(flows)                           AS flows
FROM first_seen_external
-- Only destinations with a row that started since `since` can have their first flow since then:
-- the GROUP BY then sees those (few) instead of every workload's every destination.
WHERE (src_namespace, src_workload, src_kind, dst_addr) IN (
          SELECT src_namespace, src_workload, src_kind, dst_addr FROM first_seen_external
          WHERE first_seen >= parseDateTime64BestEffort({since:String}, 3, 'UTC'))
  AND ({namespace:String} = '*' OR src_namespace = {namespace:String})
  AND ({workload:String} = '*' OR src_workload = {workload:String})
GROUP BY src_namespace, src_workload, src_kind, dst_addr
HAVING first_seen >= parseDateTime64BestEffort({since:String}, 3, 'UTC')
ORDER BY first_seen DESC, namespace, workload, destination
LIMIT {limit:UInt32}
