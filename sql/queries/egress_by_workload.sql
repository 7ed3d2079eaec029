-- Traffic leaving the cluster (destination kind `external`) by source workload over the last
-- `minutes` minutes (0 = all time), from the rollups. Bytes and packets are sampling-scaled.
-- Per destination ASN and organisation, or per country: egress_by_asn, egress_by_country.
-- params: minutes UInt32 = 60 (0 = all time), limit UInt32 = 20
SELECT
    src_namespace AS namespace,
    if(src_workload != '', src_workload, src_kind) AS workload,
    sum(scaled_bytes)   AS bytes,
    sum(scaled_packets) AS packets,
    sum(flows)          AS flows
FROM
{rollup}
WHERE dst_kind = 'external'
GROUP BY namespace, workload
ORDER BY bytes DESC, namespace, workload
LIMIT {limit:UInt32}
