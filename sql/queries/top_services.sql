-- Top talkers between services over the last `minutes` minutes (0 = all retained history), from
-- the rollups (minute-aligned windows up to a day, hour-aligned beyond). An end
-- is named namespace/service, else namespace/workload, else its kind (external, private…).
-- Bytes and packets are scaled by each flow's sampling rate.
-- params: minutes UInt32 = 60 (0 = all time), limit UInt32 = 10
SELECT
    if(src_service != '', concat(src_namespace, '/', src_service),
       if(src_workload != '', concat(src_namespace, '/', src_workload), src_kind)) AS source,
    if(dst_service != '', concat(dst_namespace, '/', dst_service),
       if(dst_workload != '', concat(dst_namespace, '/', dst_workload), dst_kind)) AS destination,
    sum(scaled_bytes)   AS bytes,
    sum(scaled_packets) AS packets,
    sum(flows)          AS flows
FROM
{rollup}
GROUP BY source, destination
ORDER BY bytes DESC, source, destination
LIMIT {limit:UInt32}
