-- Top talkers between services over the last `minutes` minutes (0 = all retained history), from
-- the rollups: per-minute for windows up to a day, per-hour beyond (hour-aligned there). An end
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
(
    SELECT * FROM flows_1m
    WHERE {minutes:UInt32} BETWEEN 1 AND 1440 AND time >= toStartOfMinute(now() - toIntervalMinute({minutes:UInt32}))
    UNION ALL
    SELECT * FROM flows_1h
    WHERE ({minutes:UInt32} = 0 OR {minutes:UInt32} > 1440)
      AND ({minutes:UInt32} = 0 OR time >= toStartOfHour(now() - toIntervalMinute({minutes:UInt32})))
)
GROUP BY source, destination
ORDER BY bytes DESC, source, destination
LIMIT {limit:UInt32}
