"""The enriched flow schema (`enriched.v1`), owned by the enricher: every raw column, then the
identity of each side of the flow, then what is known about public addresses, then the flow's
direction.

Identity columns are dictionary-encoded strings (ClickHouse reads them as LowCardinality); an
empty string means "not known". ``*_kind`` says what holds the address: a cluster owner kind
(pod, service, node, host-network), ``ignored`` (a pod or namespace annotated
``flowtally.io/ignore: "true"``: marked and counted, not named) or, for addresses no cluster
object holds, ``private`` or ``external``.

Additive columns (no version bump; the sink maps columns by name, migration 0003 adds them with
defaults so older rows read as empty):

- ``*_pod_uid``: the pod's UID (distinguishes two pods that had the same name or IP).
- ``*_asn``/``*_as_org``/``*_country``/``*_city``/``*_lat``/``*_lon``: MaxMind data for public
  addresses (0 / "" / NaN when unknown or not looked up).
- ``direction``: the rule is in :mod:`enricher.enrich`'s module docstring.
- ``nat_namespace``/``nat_service``: the service a translated record's initiator addressed
  (``nat_addr``'s owner when it is a ClusterIP service; "" when not translated or not a service),
  migration 0008. See :mod:`enricher.enrich` for how it also sets the service side's
  ``*_service``.
- ``*_labels``: the pod's chosen labels (the watcher's ``pod_labels`` setting) as a JSON object
  with sorted keys (``{"app":"cart","team":"shop"}``; "" without labels), migration 0011. One
  string per label set keeps the column dictionary-encoded (a cluster has few distinct sets).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from sensors.schema import RAW_SCHEMA
from sensors.schema import with_additive_defaults as with_raw_additive_defaults

SCHEMA_NAME = "enriched.v1"

#: Per side of the flow (``src_…``, ``dst_…``), in this order.
IDENTITY_FIELDS = ("kind", "namespace", "name", "workload", "workload_kind", "service", "node")
#: Identity fields added after the walking skeleton (kept after the geo columns' predecessors).
EXTRA_IDENTITY_FIELDS = ("pod_uid", "labels")
ALL_IDENTITY_FIELDS = IDENTITY_FIELDS + EXTRA_IDENTITY_FIELDS
SIDES = ("src", "dst")

_STRING = pa.dictionary(pa.int32(), pa.string())

IDENTITY_COLUMNS = tuple(f"{side}_{field}" for side in SIDES for field in IDENTITY_FIELDS)

#: Geo fields per side and their Arrow types.
GEO_FIELDS: dict[str, pa.DataType] = {
    "asn": pa.uint32(),
    "as_org": _STRING,
    "country": _STRING,
    "city": _STRING,
    "lat": pa.float32(),
    "lon": pa.float32(),
}

DIRECTIONS = ("other", "pod-to-pod", "pod-to-service", "ingress", "egress")

#: The addressed service of a translated (DNAT) record: ``nat_namespace``, ``nat_service``.
NAT_FIELDS = ("namespace", "service")

EXTRA_COLUMNS = (
    *(pa.field(f"{side}_pod_uid", _STRING, nullable=False) for side in SIDES),
    *(pa.field(f"{side}_{name}", typ, nullable=False) for side in SIDES for name, typ in GEO_FIELDS.items()),
    pa.field("direction", _STRING, nullable=False),
    *(pa.field(f"nat_{name}", _STRING, nullable=False) for name in NAT_FIELDS),
    *(pa.field(f"{side}_labels", _STRING, nullable=False) for side in SIDES),
)

ENRICHED_SCHEMA = pa.schema(
    [*RAW_SCHEMA, *(pa.field(name, _STRING, nullable=False) for name in IDENTITY_COLUMNS), *EXTRA_COLUMNS],
    metadata={"flowtally-schema": SCHEMA_NAME},
)


def with_additive_defaults(table: pa.Table) -> pa.Table:
    """``table`` with every additive column an older enricher did not write at its "not known"
    default, so its batches still read as ``enriched.v1`` during a rolling upgrade (the caller
    reorders columns by name): raw.v1's newer columns it did not pass on, and the enriched
    :data:`EXTRA_COLUMNS` ("" for strings, 0 for ASNs, NaN for coordinates, as the enricher
    writes "not known" and migration 0003 defaults them)."""
    table = with_raw_additive_defaults(table)
    n = table.num_rows
    for field in EXTRA_COLUMNS:
        if field.name in table.column_names:
            continue
        if pa.types.is_dictionary(field.type):
            column = pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), pa.array([""]))
        elif pa.types.is_floating(field.type):
            column = pa.array(np.full(n, np.nan, np.float32), field.type)
        else:
            column = pa.array(np.zeros(n, np.uint32), field.type)
        table = table.append_column(field, column)
    return table
