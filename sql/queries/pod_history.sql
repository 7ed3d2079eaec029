-- What one pod talked to, found by its pod UID (`metadata.uid` of the pod,
-- or from an older flow): unlike a namespace/name (pod_peers), a UID names one pod for ever,
-- so a deleted pod's history is its own even after a new pod reuses the name. Both directions,
-- per peer, protocol and destination port, over the last `minutes` minutes of flow end time
-- (0 = all time, as long as the per-pod rollup keeps it), sampling-scaled, with first and last
-- seen. From the per-pod rollup pod_traffic_1h and the raw flows for the partial
-- hour at the window's start (windows up to an hour: the raw flows alone), so the window is exact
-- to the millisecond.
-- params: uid String = none, minutes UInt32 = 0 (0 = all time)
SELECT {pod_columns}
FROM {pod_traffic}
WHERE pod_uid = {uid:String} AND {uid:String} != ''
GROUP BY direction, peer, peer_workload, proto, dst_port
ORDER BY direction, bytes DESC, peer, proto, dst_port
