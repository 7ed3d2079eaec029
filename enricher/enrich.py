"""Enrichment of a raw batch: the raw columns plus the identity of both ends (pure)."""

from __future__ import annotations

import pyarrow as pa

from enricher.identity import IdentityIndex
from enricher.schema import ENRICHED_SCHEMA, SIDES
from sensors.schema import address_bytes


def enrich_batch(raw: pa.Table, index: IdentityIndex) -> pa.Table:
    """Return the `enriched.v1` table for a `raw.v1` table."""
    columns: dict[str, pa.Array | pa.ChunkedArray] = {name: raw.column(name) for name in raw.column_names}
    times = raw.column("end").combine_chunks().cast(pa.int64()).to_numpy(zero_copy_only=False)
    for side in SIDES:
        addresses = address_bytes(raw.column(f"{side}_addr"))
        for field, array in index.columns(addresses, times).items():
            columns[f"{side}_{field}"] = array
    return pa.Table.from_arrays([columns[name] for name in ENRICHED_SCHEMA.names], schema=ENRICHED_SCHEMA)
