"""raw.v1's flow details through the later stages: the enricher passes them on, and the sink
reads an enriched batch of an older enricher (without them, or without the enriched additive
columns) at their "not reported" defaults."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
from aiokafka.structs import ConsumerRecord

from enricher.enrich import enrich_batch
from enricher.identity import IdentityIndex
from enricher.schema import ENRICHED_SCHEMA, EXTRA_COLUMNS
from enricher.schema import SCHEMA_NAME as ENRICHED
from flowtally.wire import encode_batch
from sensors.schema import DETAIL_COLUMNS, NUMPY_DTYPES, address_bytes, build_raw_table
from sink.rows import RENAMES
from sink.service import decode
from tests.tables import random_raw_table


def _with_details(n: int) -> pa.Table:
    base = random_raw_table(n)
    rng = np.random.default_rng(3)
    columns = {name: base.column(name).to_numpy() for name in ("bytes", "packets")}
    columns |= {name: address_bytes(base.column(name)) for name in ("src_addr", "dst_addr")}
    columns |= {"start": np.full(n, 1_700_000_000_000), "end": np.full(n, 1_700_000_001_000)}
    columns |= {name: rng.integers(1, 200, n).astype(NUMPY_DTYPES[name]) for name in DETAIL_COLUMNS}
    return build_raw_table(columns)


def _message(table: pa.Table, offset: int = 0) -> ConsumerRecord:
    value, headers = encode_batch(table, ENRICHED)
    return ConsumerRecord("t.flows.enriched", 0, offset, 0, 0, None, value, None, 0, len(value), headers)


def test_the_enricher_passes_the_details_on_and_the_sink_stores_them() -> None:
    raw = _with_details(50)
    enriched = enrich_batch(raw, IdentityIndex())
    assert enriched.schema.equals(ENRICHED_SCHEMA)
    consumed = decode(_message(enriched))
    assert consumed.error is None and consumed.rows is not None
    for name in DETAIL_COLUMNS:
        assert consumed.rows.column(RENAMES.get(name, name)).to_pylist() == raw.column(name).to_pylist()
    assert any(any(raw.column(name).to_pylist()) for name in DETAIL_COLUMNS)


def test_an_older_enrichers_batch_reads_with_the_details_at_zero() -> None:
    enriched = enrich_batch(_with_details(20), IdentityIndex())
    older = enriched.drop_columns(list(DETAIL_COLUMNS))
    consumed = decode(_message(older, offset=5))
    assert consumed.error is None and consumed.rows is not None
    assert consumed.rows.num_rows == 20
    for name in DETAIL_COLUMNS:
        assert consumed.rows.column(name).to_pylist() == [0] * 20
    assert consumed.rows.column("bytes").to_pylist() == enriched.column("bytes").to_pylist()


def test_an_enricher_older_than_the_geo_and_label_columns_reads_at_their_defaults() -> None:
    enriched = enrich_batch(_with_details(10), IdentityIndex())
    extras = [f.name for f in EXTRA_COLUMNS]
    consumed = decode(_message(enriched.drop_columns(extras)))
    assert consumed.error is None and consumed.rows is not None
    assert consumed.rows.column("src_asn").to_pylist() == [0] * 10
    assert consumed.rows.column("dst_labels").to_pylist() == [""] * 10
    assert all(math.isnan(v) for v in consumed.rows.column("src_lat").to_pylist())
    assert consumed.rows.column("direction").to_pylist() == [""] * 10  # not known, not "other"
    assert set(extras) <= set(consumed.rows.column_names)
