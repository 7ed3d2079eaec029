-- Top talkers: bytes and packets (scaled by sampling rate) per source -> destination workload
-- pair over the last `minutes` minutes of flow end time (0 = all time), from the rollups
-- (minute-aligned windows up to a day, hour-aligned beyond). Addresses no cluster object owns
-- show as their kind (external, private) instead of a namespace/workload.
-- params: minutes UInt32 = 60 (0 = all time), limit UInt32 = 10
SELECT
    if(src_workload != '', concat(src_namespace, '/', src_workload), src_kind) AS source,
    if(dst_workload != '', concat(dst_namespace, '/', dst_workload), dst_kind) AS destination,
    sum(scaled_bytes)   AS bytes,
    sum(scaled_packets) AS packets,
    sum(flows)          AS flows
FROM {rollup}
GROUP BY source, destination
ORDER BY bytes DESC, source, destination
LIMIT {limit:UInt32}
