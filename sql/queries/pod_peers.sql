-- What one pod talked to over the last `minutes` minutes of flow end time (0 = all time), in both
-- directions, per peer, protocol and destination port, found by namespace and name (every pod
-- that had that name: pod_history separates them by UID). Same columns and source as
-- pod_history: the per-pod rollup pod_traffic_1h, and the raw flows for the partial hour at the
-- window's start (windows up to an hour: the raw flows alone). A flow between two pods of that
-- name (an old and a new pod seen in one flow, e.g. while an address was reattributed) is a flow
-- from the name to itself: counted once, outbound, as a flow from a pod to itself is.
-- params: namespace String = default, pod String = none, minutes UInt32 = 60 (0 = all time)
SELECT {pod_columns}
FROM {pod_traffic}
WHERE namespace = {namespace:String} AND name = {pod:String}
  AND NOT (direction = 'inbound' AND peer = concat(namespace, '/', name))
GROUP BY direction, peer, peer_workload, proto, dst_port
ORDER BY direction, bytes DESC, peer, proto, dst_port
