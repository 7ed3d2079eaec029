-- The flow details NetFlow/IPFIX exporters send (raw.v1 additive columns, issue 4), 0 where an
-- exporter sends none: flow_direction (1 ingress, 2 egress: IPFIX flowDirection + 1), the ICMP
-- type and code of ICMP/ICMPv6 flows, the 802.1Q VLAN IDs in and out, the top MPLS label. They
-- sit after conn_state, in the raw schema's order. Rows stored before read as 0. Rollups are
-- unchanged.
ALTER TABLE flows
    ADD COLUMN IF NOT EXISTS flow_direction UInt8 DEFAULT 0 AFTER conn_state,
    ADD COLUMN IF NOT EXISTS icmp_type      UInt8 DEFAULT 0 AFTER flow_direction,
    ADD COLUMN IF NOT EXISTS icmp_code      UInt8 DEFAULT 0 AFTER icmp_type,
    ADD COLUMN IF NOT EXISTS src_vlan       UInt16 DEFAULT 0 AFTER icmp_code,
    ADD COLUMN IF NOT EXISTS dst_vlan       UInt16 DEFAULT 0 AFTER src_vlan,
    ADD COLUMN IF NOT EXISTS mpls_label     UInt32 DEFAULT 0 AFTER dst_vlan;
