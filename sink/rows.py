"""Row building: an `enriched.v1` batch -> the columns of the ``flows`` table (pure).

The table's column names differ from the wire names only where ClickHouse keywords would make
queries awkward (``start``/``end`` become ``flow_start``/``flow_end``).
"""

from __future__ import annotations

import pyarrow as pa

from enricher.schema import ENRICHED_SCHEMA

RENAMES = {"start": "flow_start", "end": "flow_end"}

FLOW_COLUMNS = tuple(RENAMES.get(name, name) for name in ENRICHED_SCHEMA.names)


def flow_rows(enriched: pa.Table) -> pa.Table:
    """The Arrow table to insert into ``flows`` (a rename, no copy of the data)."""
    return enriched.select(ENRICHED_SCHEMA.names).rename_columns(list(FLOW_COLUMNS))
