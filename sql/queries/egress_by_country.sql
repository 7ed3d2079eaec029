-- Traffic leaving the cluster (destination kind `external`) by destination country (ISO code;
-- '' = unknown) over the last `minutes` minutes of flow end time (0 = all retained raw flows),
-- sampling-scaled, with the number of distinct destination addresses. `per_workload` = 1 splits
-- each country by source namespace/workload; `namespace` / `workload` narrow it ('*' = all).
-- From `flows`.
-- params: minutes UInt32 = 60 (0 = all time), per_workload UInt8 = 0, namespace String = *, workload String = *, limit UInt32 = 50
SELECT
    if({per_workload:UInt8} = 1, src_namespace, '*')                                   AS namespace,
    if({per_workload:UInt8} = 1, if(src_workload != '', src_workload, src_kind), '*') AS workload,
    dst_country                  AS country,
    sum(bytes * sampling_rate)   AS bytes,
    sum(packets * sampling_rate) AS packets,
    count()                      AS flows,
    uniqExact(dst_addr)          AS destinations
FROM flows
WHERE dst_kind = 'external'
  AND ({minutes:UInt32} = 0 OR flow_end >= now64(3) - toIntervalMinute({minutes:UInt32}))
  AND ({namespace:String} = '*' OR src_namespace = {namespace:String})
  AND ({workload:String} = '*' OR src_workload = {workload:String})
GROUP BY namespace, workload, country
ORDER BY bytes DESC, namespace, workload, country
LIMIT {limit:UInt32}
