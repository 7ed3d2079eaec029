-- The select list of pod_history and pod_peers over {pod_traffic} rows, grouped by
-- direction, peer, peer_workload, proto, dst_port.
    direction,
    peer,
    peer_workload,
    proto,
    dst_port,
    sum(scaled_bytes)   AS bytes,
    sum(scaled_packets) AS packets,
    sum(flows)          AS flows,
    min(first_seen)     AS first_seen,
    max(last_seen)      AS last_seen
