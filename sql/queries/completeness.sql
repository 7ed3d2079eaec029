-- How complete the data is: per time bucket of `step` minutes over the last `minutes` minutes
-- (0 = all retained), per stage (sensor-netflow, sensor-conntrack, enricher), exporter (`::` =
-- the kernel's socket drops, whose sender is unknown) and observer: export packets and bytes
-- received, flow records decoded, sequence gaps (records/packets the exporter's sequence numbers
-- say were lost), drops by reason (decode errors, Kafka backpressure, kernel socket drops) and
-- the enricher's counts (unknown addresses, ignored, late, duplicates dropped, flows whose time
-- was implausible: clamped or sent to the DLQ, a broken exporter clock). From the
-- `completeness` table (rows are deltas: summed here). `stage` narrows it ('*' = all).
-- params: minutes UInt32 = 60 (0 = all time), step UInt32 = 1, stage String = *
SELECT
    toStartOfInterval(minute, toIntervalMinute(greatest({step:UInt32}, 1))) AS time,
    stage,
    toString(exporter)        AS exporter,
    observation_domain,
    observer,
    sum(packets)              AS packets,
    sum(bytes)                AS bytes,
    sum(records)              AS records,
    sum(sequence_lost)        AS sequence_lost,
    sum(decode_errors)        AS decode_errors,
    sum(dropped_backpressure) AS dropped_backpressure,
    sum(kernel_drops)         AS kernel_drops,
    sum(unknown_addresses)    AS unknown_addresses,
    sum(ignored)              AS ignored,
    sum(late)                 AS late,
    sum(duplicates_dropped)   AS duplicates_dropped,
    sum(implausible_time)     AS implausible_time
FROM completeness
WHERE ({minutes:UInt32} = 0 OR minute >= toStartOfMinute(now() - toIntervalMinute({minutes:UInt32})))
  AND ({stage:String} = '*' OR stage = {stage:String})
GROUP BY time, stage, exporter, observation_domain, observer
ORDER BY time, stage, exporter, observation_domain, observer
