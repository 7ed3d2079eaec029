"""The wire format between stages: one Kafka message = one Arrow IPC stream = one record batch.

The schema name travels in the ``flowtally-schema`` header so a consumer can refuse a message it
does not understand before it parses a byte; ``flowtally-origin`` names the raw message a batch
was derived from (topic/partition/offset), which the sink turns into an insert deduplication
token so a replay anywhere upstream cannot double count.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pyarrow as pa

SCHEMA_HEADER = "flowtally-schema"
ORIGIN_HEADER = "flowtally-origin"

Headers = Sequence[tuple[str, bytes]]

# zstd inside the IPC stream (per buffer) rather than Kafka-level compression: no extra Python
# codec needed by every client, and consumers decompress straight into Arrow buffers.
_WRITE_OPTIONS = pa.ipc.IpcWriteOptions(compression="zstd")


class WireError(ValueError):
    """A Kafka message that is not a flowtally batch of the expected schema."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def encode_batch(table: pa.Table, schema_name: str) -> tuple[bytes, list[tuple[str, bytes]]]:
    """Serialise ``table`` as one Arrow IPC stream; returns the message value and headers."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema, options=_WRITE_OPTIONS) as writer:
        for batch in table.to_batches():
            writer.write_batch(batch)
    return sink.getvalue().to_pybytes(), [(SCHEMA_HEADER, schema_name.encode())]


def header(headers: Headers | dict[str, bytes] | None, name: str) -> bytes | None:
    """The value of header ``name`` (Kafka headers are a list of pairs; Faust gives a dict)."""
    if not headers:
        return None
    if isinstance(headers, dict):
        return headers.get(name)
    for key, value in headers:
        if key == name:
            return value
    return None


def decode_batch(value: bytes | None, headers: Headers | dict[str, bytes] | None, schema: pa.Schema,
                 schema_name: str,
                 fill_additive: Callable[[pa.Table], pa.Table] | None = None) -> pa.Table:
    """Parse a message produced by :func:`encode_batch`, checking it carries ``schema_name`` and
    has every column of ``schema`` with the right type. Raises :class:`WireError` otherwise.

    ``fill_additive`` adds the defaults of columns added to the schema after older writers
    (e.g. :func:`sensors.schema.with_additive_defaults`) before the check."""
    got = header(headers, SCHEMA_HEADER)
    if got is None:
        raise WireError("missing-schema-header", f"no {SCHEMA_HEADER} header")
    if got.decode(errors="replace") != schema_name:
        raise WireError("wrong-schema", f"expected {schema_name}, got {got.decode(errors='replace')}")
    if not value:
        raise WireError("empty", "message has no value")
    try:
        with pa.ipc.open_stream(pa.py_buffer(value)) as reader:
            table = reader.read_all()
    except (pa.ArrowInvalid, pa.ArrowException, OSError) as exc:
        raise WireError("not-arrow", str(exc)) from exc
    if fill_additive is not None:
        table = fill_additive(table)
    if table.schema.equals(schema):
        return table  # the usual case, a single comparison (the checks below cost ~0.5 ms a batch)
    present = set(table.column_names)
    missing = [f.name for f in schema if f.name not in present]
    if missing:
        raise WireError("missing-columns", ", ".join(missing))
    for field in schema:
        actual = table.schema.field(field.name).type
        if actual != field.type:
            raise WireError("wrong-type", f"{field.name}: expected {field.type}, got {actual}")
    return table.select(schema.names)
