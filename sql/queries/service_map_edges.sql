-- The service map's edges for Grafana's Node Graph panel over the last `minutes` minutes (0 = all
-- time): one edge per (source, target) node pair (ids as in service_map_nodes), with the bytes
-- sent (mainstat) and the average rate in bytes/s over the window (secondarystat; over the data's
-- own span in the rollups when minutes = 0). Bytes are sampling-scaled. From the rollups.
-- params: minutes UInt32 = 60 (0 = all time)
SELECT
    concat(source, ' -> ', target) AS id,
    if(src_workload != '', concat(src_namespace, '/', src_workload),
       if(src_service != '', concat(src_namespace, '/', src_service), src_kind)) AS source,
    if(dst_workload != '', concat(dst_namespace, '/', dst_workload),
       if(dst_service != '', concat(dst_namespace, '/', dst_service), dst_kind)) AS target,
    sum(scaled_bytes) AS mainstat,
    round(mainstat / {window_seconds}, 3) AS secondarystat
FROM
{rollup}
GROUP BY source, target
ORDER BY mainstat DESC, id
