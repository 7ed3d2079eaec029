"""`flowtally sensor conntrack`: the node's kernel connection tracking table as raw flow records."""
