-- Traffic leaving the cluster (destination kind `external`) by destination country (ISO code;
-- '' = unknown) over the last `minutes` minutes of flow end time (0 = all time), sampling-scaled,
-- from the rollups (minute-aligned windows up to a day, hour-aligned beyond), with the number of
-- distinct destination addresses the workloads opened connections to in that window (from the
-- first-seen table, whose last_seen says whether a destination was seen since the window's start;
-- replies to connections opened from outside are in the bytes, not in the destinations).
-- `per_workload` = 1 splits each country by source namespace/workload; `namespace` / `workload`
-- narrow it ('*' = all).
-- params: minutes UInt32 = 60 (0 = all time), per_workload UInt8 = 0, namespace String = *, workload String = *, limit UInt32 = 50
SELECT t.namespace, t.workload, t.country, t.bytes, t.packets, t.flows, d.destinations
FROM
(
    SELECT
        {source_columns},
        dst_country         AS country,
        sum(scaled_bytes)   AS bytes,
        sum(scaled_packets) AS packets,
        sum(flows)          AS flows
    FROM {rollup}
    WHERE dst_kind = 'external' AND {source_filter}
    GROUP BY namespace, workload, country
) AS t
LEFT JOIN
(
    -- A (workload, destination) seen since the window's start has a row with last_seen after it
    -- (merged or not), so no grouping per destination is needed first.
    SELECT
        {source_columns},
        dst_country                          AS country,
        toUInt64(uniqExact(dst_addr))        AS destinations
    FROM first_seen_external
    WHERE last_seen >= {window_start} AND {source_filter}
    GROUP BY namespace, workload, country
) AS d ON t.namespace = d.namespace AND t.workload = d.workload AND t.country = d.country
ORDER BY t.bytes DESC, t.namespace, t.workload, t.country
LIMIT {limit:UInt32}
