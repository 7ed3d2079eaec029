-- One service's peers: who sends to it (inbound) and whom it sends to (outbound) over the last
-- `minutes` minutes (0 = all time), per peer and destination port bucket (ports >= 32768 are 0),
-- from the rollups (minute-aligned windows up to a day, hour-aligned beyond). `service` matches the service, or
-- the workload when the service is empty. Bytes and packets are sampling-scaled.
-- params: namespace String = default, service String = kubernetes, minutes UInt32 = 60 (0 = all time)
SELECT direction, peer, proto, dst_port, sum(scaled_bytes) AS bytes, sum(scaled_packets) AS packets,
       sum(flows) AS flows
FROM
(
    SELECT
        if(dst_namespace = {namespace:String}
           AND (dst_service = {service:String} OR dst_workload = {service:String}), 'inbound', 'outbound') AS direction,
        if(direction = 'inbound',
           if(src_service != '', concat(src_namespace, '/', src_service),
              if(src_workload != '', concat(src_namespace, '/', src_workload), src_kind)),
           if(dst_service != '', concat(dst_namespace, '/', dst_service),
              if(dst_workload != '', concat(dst_namespace, '/', dst_workload), dst_kind))) AS peer,
        proto, dst_port, scaled_bytes, scaled_packets, flows
    FROM
    {rollup}
    WHERE (dst_namespace = {namespace:String} AND (dst_service = {service:String} OR dst_workload = {service:String}))
       OR (src_namespace = {namespace:String} AND (src_service = {service:String} OR src_workload = {service:String}))
)
GROUP BY direction, peer, proto, dst_port
ORDER BY direction, bytes DESC, peer, proto, dst_port
