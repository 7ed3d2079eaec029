-- What one pod talked to over the last `minutes` minutes (0 = all retained raw history), in both
-- directions, per peer, protocol and destination port, from `flows` (pods are not in the
-- rollups). The pod is found by namespace and name, so a deleted pod is found as long as its
-- flows are retained; by pod UID once the enrichment carries it (issue 6).
-- params: namespace String = default, pod String = none, minutes UInt32 = 60 (0 = all time)
SELECT
    if(src_namespace = {namespace:String} AND src_name = {pod:String}, 'outbound', 'inbound') AS direction,
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
WHERE ((src_namespace = {namespace:String} AND src_name = {pod:String})
       OR (dst_namespace = {namespace:String} AND dst_name = {pod:String}))
  AND ({minutes:UInt32} = 0 OR flow_end >= now64(3) - toIntervalMinute({minutes:UInt32}))
GROUP BY direction, peer, peer_workload, proto, dst_port
ORDER BY direction, bytes DESC, peer, proto, dst_port
