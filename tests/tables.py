"""Synthetic `raw.v1` tables for tests of the wire format and of publishing."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from sensors.schema import build_raw_table, ipv4_to_mapped


def random_raw_table(n: int, seed: int = 7) -> pa.Table:
    """``n`` raw flows with random IPv4 addresses, bytes and packets (times fixed), from ``seed``."""
    rng = np.random.default_rng(seed)
    return build_raw_table({
        "src_addr": ipv4_to_mapped(rng.integers(0, 2**32, n, dtype=np.uint32)),
        "dst_addr": ipv4_to_mapped(rng.integers(0, 2**32, n, dtype=np.uint32)),
        "bytes": rng.integers(0, 10**9, n),
        "packets": rng.integers(1, 10**6, n),
        "start": np.full(n, 1_700_000_000_000),
        "end": np.full(n, 1_700_000_001_000),
    })
