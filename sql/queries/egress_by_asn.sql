-- Traffic leaving the cluster (destination kind `external`) by destination ASN and organisation
-- over the last `minutes` minutes of flow end time (0 = all retained raw flows), sampling-scaled.
-- ASN 0 / organisation '' = not in the ASN database (or no database configured).
-- `per_workload` = 1 splits each ASN by source namespace/workload; `namespace` / `workload`
-- narrow it to one namespace or workload ('*' = all). From `flows` (the time range is the
-- table's primary key prefix, so a window reads only its own granules).
-- params: minutes UInt32 = 60 (0 = all time), per_workload UInt8 = 0, namespace String = *, workload String = *, limit UInt32 = 20
SELECT
    if({per_workload:UInt8} = 1, src_namespace, '*')                                   AS namespace,
    if({per_workload:UInt8} = 1, if(src_workload != '', src_workload, src_kind), '*') AS workload,
    dst_asn                      AS asn,
    dst_as_org                   AS organisation,
    sum(bytes * sampling_rate)   AS bytes,
    sum(packets * sampling_rate) AS packets,
    count()                      AS flows
FROM flows
WHERE dst_kind = 'external'
  AND ({minutes:UInt32} = 0 OR flow_end >= now64(3) - toIntervalMinute({minutes:UInt32}))
  AND ({namespace:String} = '*' OR src_namespace = {namespace:String})
  AND ({workload:String} = '*' OR src_workload = {workload:String})
GROUP BY namespace, workload, asn, organisation
ORDER BY bytes DESC, namespace, workload, asn
LIMIT {limit:UInt32}
