"""Enrichment of a raw batch (pure): the raw columns, the identity of both ends at the flow's
time, MaxMind data for public addresses and the flow's direction.

Direction (per flow record, from the two kinds; NetFlow records are one-way, so a reply is
labelled by where *its* packets go):

=================================================  ==================
src kind                      dst kind             direction
=================================================  ==================
pod, host-network             pod, host-network    ``pod-to-pod``
pod, host-network, node       service (ClusterIP)  ``pod-to-service``
private, external             any cluster kind     ``ingress``
pod, host-network, node       private, external    ``egress``
anything else (node->pod, unknown->unknown, ignored)  ``other``
=================================================  ==================

A flow to a pod IP that an EndpointSlice lists (after kube-proxy's DNAT) stays ``pod-to-pod``;
its ``dst_service`` names the service.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from enricher.geo import GeoDatabases, GeoStats, empty_columns
from enricher.identity import EXTERNAL, IdentityIndex, LookupStats
from enricher.schema import DIRECTIONS, ENRICHED_SCHEMA, SIDES
from sensors.schema import address_bytes

_DIRECTION_DICT = pa.array(list(DIRECTIONS), pa.string())
# Kind classes: 0 other/unknown, 1 pod-like, 2 service, 3 node, 4 outside (private/external).
_KIND_CLASS = {"pod": 1, "host-network": 1, "service": 2, "node": 3, "private": 4, "external": 4}
# _DIRECTION_TABLE[src class, dst class] -> index into DIRECTIONS
_DIRECTION_TABLE = np.zeros((5, 5), dtype=np.int32)
_DIRECTION_TABLE[1, 1] = DIRECTIONS.index("pod-to-pod")
_DIRECTION_TABLE[[1, 3], 2] = DIRECTIONS.index("pod-to-service")
_DIRECTION_TABLE[4, 1:4] = DIRECTIONS.index("ingress")
_DIRECTION_TABLE[[1, 3], 4] = DIRECTIONS.index("egress")


@dataclass
class EnrichStats:
    """What enrichment counted (accumulated over batches)."""

    sides: dict[str, LookupStats] = field(default_factory=lambda: {s: LookupStats() for s in SIDES})
    geo: GeoStats = field(default_factory=GeoStats)


def _kind_classes(kind: pa.DictionaryArray) -> np.ndarray:
    per_value = np.array([_KIND_CLASS.get(v, 0) for v in kind.dictionary.to_pylist()], dtype=np.int32)
    return per_value[kind.indices.to_numpy(zero_copy_only=False)]


def direction_codes(src_kind: pa.DictionaryArray, dst_kind: pa.DictionaryArray) -> pa.DictionaryArray:
    """The ``direction`` column for two kind columns (the rule in the module docstring)."""
    codes = _DIRECTION_TABLE[_kind_classes(src_kind), _kind_classes(dst_kind)]
    return pa.DictionaryArray.from_arrays(pa.array(codes, pa.int32()), _DIRECTION_DICT)


def enrich_batch(raw: pa.Table, index: IdentityIndex, geo: GeoDatabases | None = None,
                 stats: EnrichStats | None = None) -> pa.Table:
    """Return the `enriched.v1` table for a `raw.v1` table."""
    columns: dict[str, pa.Array | pa.ChunkedArray] = {name: raw.column(name) for name in raw.column_names}
    times = raw.column("end").combine_chunks().cast(pa.int64()).to_numpy(zero_copy_only=False)
    n = raw.num_rows
    for side in SIDES:
        addresses = address_bytes(raw.column(f"{side}_addr"))
        identity = index.columns(addresses, times, stats.sides[side] if stats else None)
        for name, array in identity.items():
            columns[f"{side}_{name}"] = array
        kind = identity["kind"]
        if geo is not None and n:
            ext_code = kind.dictionary.to_pylist().index(EXTERNAL)
            public = kind.indices.to_numpy(zero_copy_only=False) == ext_code
            geo_cols = geo.columns(addresses, public, stats.geo if stats else None)
        else:
            geo_cols = empty_columns(n)
        for name, array in geo_cols.items():
            columns[f"{side}_{name}"] = array
    columns["direction"] = direction_codes(columns["src_kind"], columns["dst_kind"])
    return pa.Table.from_arrays([columns[name] for name in ENRICHED_SCHEMA.names], schema=ENRICHED_SCHEMA)
