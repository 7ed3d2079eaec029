"""The wire format between stages: one Kafka message = one Arrow IPC stream = one record batch.

The schema name travels in the ``flowtally-schema`` header so a consumer can refuse a message it
does not understand before it parses a byte; ``flowtally-origin`` names the raw message a batch
was derived from (topic/partition/offset), which the sink turns into an insert deduplication
token so a replay anywhere upstream cannot double count.

Buffers are compressed inside the IPC stream. Flow batches (raw.v1 from the sensors, enriched.v1
from the enricher) take their stage's ``compression`` setting, lz4 by default; the other messages
(completeness batches, dead-letter messages) use :data:`WRITE_OPTIONS`, zstd, the default of
:func:`encode_batch`. A reader decompresses any of them without being told which.

No message is larger than the configured limit (``kafka.max_message_bytes``) by construction:
:func:`encode_pieces` splits a table that does not fit into row slices, each its own message,
numbered in the ``flowtally-part`` header (``i/n``, 1-based; absent when there is one piece).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeAlias

import numpy as np
import pyarrow as pa

SCHEMA_HEADER = "flowtally-schema"
ORIGIN_HEADER = "flowtally-origin"
PART_HEADER = "flowtally-part"
#: Names one production of the pieces of a batch (the enricher: one id per time it handled a raw
#: message), so a consumer can tell a re-emission, perhaps split differently, from more pieces.
EMISSION_HEADER = "flowtally-emission"
#: Bytes of a Kafka message besides its value that :func:`encode_pieces` reserves: the key, the
#: headers and the record batch framing (61 bytes of batch header, up to 21 of record overhead).
MESSAGE_OVERHEAD = 2048

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


#: Longest diagnostic header value (an error text) a stage adds when it forwards a message, e.g.
#: to the DLQ: the forwarded value already uses the message limit but for MESSAGE_OVERHEAD, which
#: must hold the key, the original headers and these.
MAX_NOTE_BYTES = 1024


def note_header(text: str) -> bytes:
    """``text`` as a header value of at most :data:`MAX_NOTE_BYTES` (cut, with "…", if longer)."""
    data = text.encode()
    if len(data) <= MAX_NOTE_BYTES:
        return data
    return data[:MAX_NOTE_BYTES - 3].decode(errors="ignore").encode() + "…".encode()


class RowTooLarge(ValueError):
    """A single row whose encoded message exceeds the message limit: it cannot be split further."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"one row encodes to {size} bytes (+{MESSAGE_OVERHEAD} overhead), "
                         f"more than the message limit of {limit} bytes")
        self.size = size
        self.limit = limit


@dataclass(frozen=True, slots=True)
class Piece:
    """One message of a table split by :func:`encode_pieces`: its value, its headers (the
    caller's plus ``flowtally-part`` when there are several) and how many rows it holds."""

    value: pa.Buffer
    headers: list[tuple[str, bytes]]
    num_rows: int


def encode_pieces(table: pa.Table, limit: int, headers: Headers,
                  options: pa.ipc.IpcWriteOptions = WRITE_OPTIONS) -> list[Piece]:
    """``table`` as messages of at most ``limit`` bytes each, value plus :data:`MESSAGE_OVERHEAD`.

    The table is encoded whole; if that is too large its rows are split in halves (row slices,
    in order; in ``k`` equal slices at once when it is ``k`` > 2 times too large) and each is
    encoded again, recursively, until every piece fits. Concatenating
    the pieces' rows gives ``table`` exactly (a split piece's dictionary columns hold only the
    values its rows use: :func:`compact_dictionaries`). With more than one piece, piece ``i`` of ``n``
    carries the header ``flowtally-part: i/n`` (1-based). Raises :class:`RowTooLarge` when a single
    row does not fit (nothing is returned then: the caller decides about the whole table)."""
    budget = limit - MESSAGE_OVERHEAD
    if budget <= 0:
        raise ValueError(f"a message limit of {limit} bytes leaves no room for a value")
    encoded: list[tuple[pa.Buffer, int]] = []
    _split_to_fit(table, budget, limit, options, encoded)
    base = list(headers)
    if len(encoded) == 1:
        value, rows = encoded[0]
        return [Piece(value, base, rows)]
    n = len(encoded)
    return [Piece(value, [*base, (PART_HEADER, f"{i}/{n}".encode())], rows)
            for i, (value, rows) in enumerate(encoded, start=1)]


def _split_to_fit(table: pa.Table, budget: int, limit: int, options: pa.ipc.IpcWriteOptions,
                  out: list[tuple[pa.Buffer, int]]) -> None:
    value = write_stream(table, options)
    if len(value) <= budget:
        out.append((value, table.num_rows))
        return
    if table.num_rows <= 1:
        raise RowTooLarge(len(value), limit)
    # Halves; or, for a table several times too large, as many equal slices as its size says
    # (with a tenth to spare) at once: each halving level encodes every row again.
    parts = max(2, min(table.num_rows, math.ceil(len(value) / (0.9 * budget))))
    bounds = [table.num_rows * i // parts for i in range(parts + 1)]
    for start, end in itertools.pairwise(bounds):
        _split_to_fit(compact_dictionaries(table.slice(start, end - start)), budget, limit, options, out)


def compact_dictionaries(table: pa.Table) -> pa.Table:
    """``table`` with each dictionary column's dictionary reduced to the values its rows use.

    A slice keeps the whole dictionary of the array it was cut from, and the IPC writer writes
    all of it: half of an enriched batch with thousands of distinct pod names would still carry
    every name, and halving could never make it fit. The values are unchanged (the codes are
    renumbered; the dictionaries stay free of duplicates, which ClickHouse requires)."""
    if not any(pa.types.is_dictionary(f.type) for f in table.schema):
        return table
    columns = [pa.chunked_array([_compact(c) for c in col.chunks], col.type)
               if pa.types.is_dictionary(col.type) else col for col in table.columns]
    return pa.Table.from_arrays(columns, schema=table.schema)


def _compact(array: pa.DictionaryArray) -> pa.DictionaryArray:
    dictionary, indices = array.dictionary, array.indices
    if not len(dictionary) or not len(indices):
        return array
    codes = indices.fill_null(0).to_numpy(zero_copy_only=False)
    used = np.zeros(len(dictionary), dtype=bool)
    used[codes] = True
    if used.all():
        return array
    distinct = np.flatnonzero(used)
    position = np.zeros(len(dictionary), dtype=indices.type.to_pandas_dtype())
    position[distinct] = np.arange(len(distinct))
    mask = indices.is_null().to_numpy(zero_copy_only=False) if indices.null_count else None
    return pa.DictionaryArray.from_arrays(pa.array(position[codes], indices.type, mask=mask),
                                          dictionary.take(pa.array(distinct)), ordered=array.type.ordered)


def part_of(headers: Headers | dict[str, bytes] | None) -> tuple[int, int] | None:
    """``(i, n)`` of a message that is piece ``i`` of ``n`` (see :func:`encode_pieces`); None for
    a whole message. Raises :class:`WireError` for a malformed ``flowtally-part`` header."""
    raw = header(headers, PART_HEADER)
    if raw is None:
        return None
    try:
        i_text, n_text = raw.decode().split("/")
        i, n = int(i_text), int(n_text)
    except (UnicodeDecodeError, ValueError) as exc:
        raise WireError("bad-part-header", f"{PART_HEADER} {raw!r} is not i/n") from exc
    if not 1 <= i <= n:
        raise WireError("bad-part-header", f"{PART_HEADER} {raw!r}: i must be within 1..n")
    return i, n


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
