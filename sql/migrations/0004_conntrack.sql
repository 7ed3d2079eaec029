-- Columns of the conntrack sensor (raw.v1 additive columns, issue 5): the address and port the
-- initiator used before DNAT (a ClusterIP or NodePort; '::' and 0 when not translated), which
-- side opened the connection (0 unknown, 1 src, 2 dst) and the connection state when reported
-- ('' for NetFlow). They sit after out_if, in the raw schema's order. Rollups are unchanged.
ALTER TABLE flows
    ADD COLUMN IF NOT EXISTS nat_addr     IPv6 DEFAULT '::' AFTER out_if,
    ADD COLUMN IF NOT EXISTS nat_port     UInt16 DEFAULT 0 AFTER nat_addr,
    ADD COLUMN IF NOT EXISTS initiator    UInt8 DEFAULT 0 AFTER nat_port,
    ADD COLUMN IF NOT EXISTS conn_state   LowCardinality(String) DEFAULT '' AFTER initiator;
