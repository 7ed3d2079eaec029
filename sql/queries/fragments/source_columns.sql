-- The source side of the egress queries: per namespace/workload when per_workload = 1, else one
-- '*' row (shared by egress_by_asn and egress_by_country).
if({per_workload:UInt8} = 1, src_namespace, '*')                                   AS namespace,
if({per_workload:UInt8} = 1, if(src_workload != '', src_workload, src_kind), '*') AS workload
