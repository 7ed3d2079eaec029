-- Traffic leaving the cluster (destination kind `external`) by destination ASN and organisation
-- over the last `minutes` minutes of flow end time (0 = all time), sampling-scaled, from the
-- rollups (minute-aligned windows up to a day, hour-aligned beyond). ASN 0 / organisation '' =
-- not in the ASN database (or no database configured); the organisation is the one the ASN
-- database gave (the greatest name if it changed; '' for rows rolled up by an older flowtally
-- that did not keep the organisation in the rollups).
-- `per_workload` = 1 splits each ASN by source namespace/workload; `namespace` / `workload`
-- narrow it to one namespace or workload ('*' = all).
-- params: minutes UInt32 = 60 (0 = all time), per_workload UInt8 = 0, namespace String = *, workload String = *, limit UInt32 = 20
SELECT
    {source_columns},
    dst_asn             AS asn,
    max(dst_as_org)     AS organisation,
    sum(scaled_bytes)   AS bytes,
    sum(scaled_packets) AS packets,
    sum(flows)          AS flows
FROM {rollup}
WHERE dst_kind = 'external' AND {source_filter}
GROUP BY namespace, workload, asn
ORDER BY bytes DESC, namespace, workload, asn
LIMIT {limit:UInt32}
