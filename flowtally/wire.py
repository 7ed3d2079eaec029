"""The wire format between stages: one Kafka message = one Arrow IPC stream = one record batch.

The schema name travels in the ``flowtally-schema`` header so a consumer can refuse a message it
does not understand before it parses a byte; ``flowtally-origin`` names the raw message a batch
was derived from (topic/partition/offset), which the sink turns into an insert deduplication
token so a replay anywhere upstream cannot double count.

Buffers are compressed inside the IPC stream. Flow batches (raw.v1 from the sensors, enriched.v1
from the enricher) take their stage's ``compression`` setting, lz4 by default; the other messages
(completeness batches, dead-letter messages) use :data:`WRITE_OPTIONS`, zstd, the default of
:func:`encode_batch`. A reader decompresses any of them without being told which.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeAlias

import pyarrow as pa

SCHEMA_HEADER = "flowtally-schema"
ORIGIN_HEADER = "flowtally-origin"

Headers = Sequence[tuple[str, bytes]]
#: A message value: bytes, or an Arrow buffer (which Kafka clients take as any bytes-like object;
#: the sensors hand theirs over without copying it into bytes).
Value: TypeAlias = bytes | pa.Buffer

# Compression inside the IPC stream (per buffer) rather than Kafka-level compression: no extra
# Python codec needed by every client, and consumers decompress straight into Arrow buffers.
# zstd for the completeness batches and dead-letter messages (a small share of the traffic); the
# flow batches are written with their stage's ``compression`` setting, lz4 by default, which costs
# about half of zstd's CPU (the numbers are in sensors/publisher.py).
WRITE_OPTIONS = pa.ipc.IpcWriteOptions(compression="zstd")


class WireError(ValueError):
    """A Kafka message that is not a flowtally batch of the expected schema."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def write_stream(table: pa.Table, options: pa.ipc.IpcWriteOptions = WRITE_OPTIONS,
                 size: int | None = None) -> pa.Buffer:
    """``table`` as one Arrow IPC stream (a record batch per chunk), in a buffer of its exact size.

    The stream is written into one allocation of ``size`` bytes (default: the worst case, every
    buffer stored uncompressed plus framing) and shrunk after: a growing output stream
    reallocates and copies the message several times on the way to ~0.5 MB (and faults fresh
    pages in each time), and the shrink gives the unused tail back without moving the bytes.
    A stream that does not fit ``size`` is written again into a growing stream."""
    buffer = pa.allocate_buffer(_worst_case_size(table) if size is None else size, resizable=True)
    sink = pa.FixedSizeBufferWriter(buffer)
    try:
        with pa.ipc.new_stream(sink, table.schema, options=options) as writer:
            writer.write_table(table)
    except OSError:  # "write out of bounds": the size was short; grow instead
        stream = pa.BufferOutputStream()
        with pa.ipc.new_stream(stream, table.schema, options=options) as writer:
            writer.write_table(table)
        return stream.getvalue()
    buffer.resize(sink.tell(), shrink_to_fit=True)
    return buffer


def _worst_case_size(table: pa.Table) -> int:
    """An upper bound of the IPC stream of ``table``: its buffers (a compressed buffer is at most
    ~0.4 % bigger than its input, lz4 and zstd alike), per buffer an 8-byte length, padding and
    a codec frame, and the schema and batch metadata."""
    data = table.get_total_buffer_size()
    chunks = table.column(0).num_chunks if table.num_columns else 1
    buffers = 4 * max(1, table.num_columns) * max(1, chunks)  # at most validity, offsets, data, dictionary
    return data + data // 128 + 96 * buffers + 16_384 + 256 * table.num_columns


def encode_batch(table: pa.Table, schema_name: str) -> tuple[bytes, list[tuple[str, bytes]]]:
    """Serialise ``table`` as one Arrow IPC stream; returns the message value and headers."""
    return write_stream(table).to_pybytes(), [(SCHEMA_HEADER, schema_name.encode())]


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


def decode_batch(value: Value | None, headers: Headers | dict[str, bytes] | None, schema: pa.Schema,
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
