-- What one pod talked to, found by its pod UID (`metadata.uid` of the pod,
-- or from an older flow): unlike a namespace/name (pod_peers), a UID names one pod for ever,
-- so a deleted pod's history is its own even after a new pod reuses the name. Both directions,
-- per peer, protocol and destination port, over the last `minutes` minutes (0 = all retained raw
-- flows), sampling-scaled, with first and last seen. From `flows`.
-- params: uid String = none, minutes UInt32 = 0 (0 = all time)
SELECT
    if(src_pod_uid = {uid:String}, 'outbound', 'inbound') AS direction,
    if(direction = 'outbound',
       if(dst_name != '', concat(dst_namespace, '/', dst_name), toString(dst_addr)),
       if(src_name != '', concat(src_namespace, '/', src_name), toString(src_addr))) AS peer,
    if(direction = 'outbound', if(dst_workload != '', dst_workload, dst_kind),
       if(src_workload != '', src_workload, src_kind)) AS peer_workload,
    proto,
    dst_port,
    sum(bytes * sampling_rate)   AS bytes,
    sum(packets * sampling_rate) AS packets,
    count()                      AS flows,
    min(flow_start)              AS first_seen,
    max(flow_end)                AS last_seen
FROM flows
WHERE (src_pod_uid = {uid:String} OR dst_pod_uid = {uid:String})
  AND {uid:String} != ''
  AND ({minutes:UInt32} = 0 OR flow_end >= now64(3) - toIntervalMinute({minutes:UInt32}))
GROUP BY direction, peer, peer_workload, proto, dst_port
ORDER BY direction, bytes DESC, peer, proto, dst_port
