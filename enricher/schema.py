"""The enriched flow schema (`enriched.v1`), owned by the enricher: every raw column, then the
identity of each side of the flow.

Identity columns are dictionary-encoded strings (ClickHouse reads them as LowCardinality); an
empty string means "not known". ``*_kind`` says what holds the address: a cluster owner kind
(pod, service, node, host-network) or, for addresses no cluster object holds, ``private`` or
``external``.
"""

from __future__ import annotations

import pyarrow as pa

from sensors.schema import RAW_SCHEMA

SCHEMA_NAME = "enriched.v1"

#: Per side of the flow (``src_…``, ``dst_…``), in this order.
IDENTITY_FIELDS = ("kind", "namespace", "name", "workload", "workload_kind", "service", "node")
SIDES = ("src", "dst")

_STRING = pa.dictionary(pa.int32(), pa.string())

IDENTITY_COLUMNS = tuple(f"{side}_{field}" for side in SIDES for field in IDENTITY_FIELDS)

ENRICHED_SCHEMA = pa.schema(
    [*RAW_SCHEMA, *(pa.field(name, _STRING, nullable=False) for name in IDENTITY_COLUMNS)],
    metadata={"flowtally-schema": SCHEMA_NAME},
)
