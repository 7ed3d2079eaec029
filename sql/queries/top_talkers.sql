-- Top talkers: bytes and packets (scaled by sampling rate) per source -> destination workload
-- pair over the last `minutes` minutes of flow end time. Addresses no cluster object owns show
-- as their kind (external, private) instead of a namespace/workload.
-- params: minutes UInt32 = 60 (0 = all time), limit UInt32 = 10
SELECT
    if(src_workload != '', concat(src_namespace, '/', src_workload), src_kind) AS source,
    if(dst_workload != '', concat(dst_namespace, '/', dst_workload), dst_kind) AS destination,
    sum(bytes * sampling_rate)   AS bytes,
    sum(packets * sampling_rate) AS packets,
    count()                      AS flows
FROM flows
WHERE {minutes:UInt32} = 0 OR flow_end >= now64(3) - toIntervalMinute({minutes:UInt32})
GROUP BY source, destination
ORDER BY bytes DESC, source, destination
LIMIT {limit:UInt32}
