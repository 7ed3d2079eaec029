"""The Arrow wire format: round trip and the errors a consumer relies on."""

from __future__ import annotations

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flowtally.wire import (
    MAX_NOTE_BYTES,
    MESSAGE_OVERHEAD,
    PART_HEADER,
    SCHEMA_HEADER,
    RowTooLarge,
    WireError,
    decode_batch,
    encode_batch,
    encode_pieces,
    header,
    note_header,
    part_of,
    write_stream,
)
from sensors.publisher import encode_messages
from sensors.schema import (
    ADDITIVE_COLUMNS,
    RAW_SCHEMA,
    SCHEMA_NAME,
    with_additive_defaults,
)
from tests.tables import random_raw_table


def test_round_trip_keeps_every_value() -> None:
    table = random_raw_table(1000)
    value, headers = encode_batch(table, SCHEMA_NAME)
    assert (SCHEMA_HEADER, b"raw.v1") in headers
    back = decode_batch(value, headers, RAW_SCHEMA, SCHEMA_NAME)
    assert back.equals(table)


@pytest.mark.parametrize(
    ("value", "headers", "reason"),
    [
        (b"\x00" * 40, [(SCHEMA_HEADER, b"raw.v1")], "not-arrow"),
        (b"whatever", [], "missing-schema-header"),
        (b"whatever", [(SCHEMA_HEADER, b"raw.v0")], "wrong-schema"),
        (b"", [(SCHEMA_HEADER, b"raw.v1")], "empty"),
    ],
)
def test_bad_messages_are_named(value: bytes, headers: list[tuple[str, bytes]], reason: str) -> None:
    with pytest.raises(WireError) as info:
        decode_batch(value, headers, RAW_SCHEMA, SCHEMA_NAME)
    assert info.value.reason == reason


def test_missing_column_is_refused() -> None:
    value, headers = encode_batch(random_raw_table(3).drop_columns(["bytes"]), SCHEMA_NAME)
    with pytest.raises(WireError, match="bytes"):
        decode_batch(value, headers, RAW_SCHEMA, SCHEMA_NAME)


def test_batch_from_an_older_sensor_reads_with_the_additive_defaults() -> None:
    table = random_raw_table(4)
    older = table.drop_columns(list(ADDITIVE_COLUMNS))
    value, headers = encode_batch(older, SCHEMA_NAME)
    with pytest.raises(WireError, match="nat_addr"):
        decode_batch(value, headers, RAW_SCHEMA, SCHEMA_NAME)
    back = decode_batch(value, headers, RAW_SCHEMA, SCHEMA_NAME, with_additive_defaults)
    assert back.equals(table)  # build_raw_table's defaults are the same "not reported" values
    assert back.column("nat_addr").to_pylist() == [b"\x00" * 16] * 4
    assert back.column("conn_state").to_pylist() == [""] * 4


def test_big_batches_are_split_to_fit_a_message() -> None:
    table = random_raw_table(50_000)
    messages = encode_messages(table, b"k", max_bytes=200_000)
    assert len(messages) > 1
    assert all(len(m.value) + MESSAGE_OVERHEAD <= 200_000 for m in messages)
    assert [part_of(m.headers) for m in messages] == [(i, len(messages)) for i in range(1, len(messages) + 1)]
    assert sum(m.flows for m in messages) == 50_000
    back = pa.concat_tables(decode_batch(m.value, m.headers, RAW_SCHEMA, SCHEMA_NAME) for m in messages)
    assert back.equals(table)


@pytest.mark.parametrize("compression", ["none", "lz4", "zstd"])
def test_write_stream_equals_a_growing_stream(compression: str) -> None:
    """The presized buffer holds exactly the bytes Arrow's growing output stream would (whole,
    sliced and multi-chunk tables; a size too small for the stream takes the growing path)."""
    options = pa.ipc.IpcWriteOptions(compression=None if compression == "none" else compression)

    def growing(table: pa.Table) -> bytes:
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema, options=options) as writer:
            writer.write_table(table)
        return bytes(sink.getvalue().to_pybytes())

    table = random_raw_table(3000)
    chunked = pa.concat_tables([table.slice(0, 1000), table.slice(1000)])
    assert chunked.column(0).num_chunks == 2
    for t in (table, table.slice(7, 1234), table.slice(2999), chunked, table.slice(0, 0)):
        expected = growing(t)
        written = write_stream(t, options)
        assert written.size == len(expected) and written.to_pybytes() == expected
        assert write_stream(t, options, size=64).to_pybytes() == expected  # too small: grown instead
        assert decode_batch(written, [(SCHEMA_HEADER, SCHEMA_NAME.encode())], RAW_SCHEMA, SCHEMA_NAME).equals(t)


def test_messages_carry_arrow_buffers_of_the_encoded_batch() -> None:
    """A sensor's message value is the Arrow buffer itself (no bytes copy), and encode_batch still
    gives bytes: the same stream."""
    table = random_raw_table(500)
    (message,) = encode_messages(table, b"k")
    assert isinstance(message.value, pa.Buffer)
    value, _ = encode_batch(table, SCHEMA_NAME)
    assert isinstance(value, bytes) and message.value.to_pybytes() == value


def _read(value: pa.Buffer) -> pa.Table:
    with pa.ipc.open_stream(value) as reader:
        return reader.read_all()


# Rows of very different widths (a label column from empty to 3 KB): pieces must be cut by size,
# not by a row count.
_rows = st.lists(st.tuples(st.integers(-2**63, 2**63 - 1), st.text(max_size=3000)), max_size=120)


@settings(max_examples=60, deadline=None)
@given(rows=_rows, limit=st.integers(MESSAGE_OVERHEAD + 1500, MESSAGE_OVERHEAD + 40_000),
       compression=st.sampled_from([None, "lz4", "zstd"]))
def test_pieces_concatenate_to_the_input_and_each_fits(rows: list[tuple[int, str]], limit: int,
                                                       compression: str | None) -> None:
    table = pa.table({"n": pa.array([r[0] for r in rows], pa.int64()),
                      "label": pa.array([r[1] for r in rows], pa.string()),
                      # dictionary-encoded like the enriched identity columns (a few repeated values)
                      "name": pa.array([r[1][:40] for r in rows], pa.string()).dictionary_encode()})
    options = pa.ipc.IpcWriteOptions(compression=compression)
    base = [(SCHEMA_HEADER, b"test.v1"), ("flowtally-origin", b"t/0/5")]
    try:
        pieces = encode_pieces(table, limit, base, options)
    except RowTooLarge as exc:
        # only when some row alone does not fit
        assert any(len(write_stream(table.slice(i, 1), options)) + MESSAGE_OVERHEAD > limit
                   for i in range(table.num_rows))
        assert exc.limit == limit
        return
    assert all(len(p.value) + MESSAGE_OVERHEAD <= limit for p in pieces)
    assert sum(p.num_rows for p in pieces) == table.num_rows
    back = pa.concat_tables([_read(p.value) for p in pieces])
    assert back.schema.equals(table.schema) and back.to_pylist() == table.to_pylist()
    n = len(pieces)
    for i, piece in enumerate(pieces, start=1):
        assert piece.headers[:2] == base
        assert part_of(piece.headers) == (None if n == 1 else (i, n))
        assert (header(piece.headers, PART_HEADER) is None) == (n == 1)


def test_a_batch_that_fits_is_one_piece_without_a_part_header() -> None:
    table = random_raw_table(2000)
    (piece,) = encode_pieces(table, 1_048_576, [(SCHEMA_HEADER, SCHEMA_NAME.encode())])
    assert piece.headers == [(SCHEMA_HEADER, SCHEMA_NAME.encode())] and piece.num_rows == 2000
    assert decode_batch(piece.value, piece.headers, RAW_SCHEMA, SCHEMA_NAME).equals(table)


def test_a_big_batch_splits_in_order_into_numbered_pieces() -> None:
    table = random_raw_table(40_000)
    whole = len(write_stream(table))
    pieces = encode_pieces(table, 256 * 1024, [(SCHEMA_HEADER, SCHEMA_NAME.encode())])
    assert whole > 256 * 1024 and len(pieces) >= whole // (256 * 1024)
    assert [part_of(p.headers) for p in pieces] == [(i, len(pieces)) for i in range(1, len(pieces) + 1)]
    assert all(len(p.value) <= 256 * 1024 - MESSAGE_OVERHEAD for p in pieces)
    back = pa.concat_tables(decode_batch(p.value, p.headers, RAW_SCHEMA, SCHEMA_NAME) for p in pieces)
    assert back.equals(table)


def test_split_pieces_carry_only_the_dictionary_values_they_use() -> None:
    """An enriched-like batch where every row has its own 100-byte name (dictionary-encoded): a
    slice would still carry all 20,000 names (2 MB), so only compacted pieces can fit."""
    names = [f"{i:06d}-" + "abcdefghij" * 9 + "xyz" for i in range(20_000)]
    table = pa.table({"n": pa.array(range(20_000), pa.int64()),
                      "name": pa.array(names).dictionary_encode()})
    options = pa.ipc.IpcWriteOptions(compression=None)
    assert len(write_stream(table.slice(0, 1), options)) > 1_000_000  # the whole dictionary
    pieces = encode_pieces(table, 256 * 1024, [], options)
    assert len(pieces) > 8 and all(len(p.value) + MESSAGE_OVERHEAD <= 256 * 1024 for p in pieces)
    tables = [_read(p.value) for p in pieces]
    assert all(len(t.column("name").chunk(0).dictionary) == t.num_rows for t in tables)
    assert pa.concat_tables(tables).to_pylist() == table.to_pylist()


def test_a_row_too_large_for_any_message_is_refused() -> None:
    table = pa.table({"label": pa.array(["x" * 10, "y" * 200_000, "z"])})
    with pytest.raises(RowTooLarge, match="more than the message limit of 65536"):
        encode_pieces(table, 65_536, [], pa.ipc.IpcWriteOptions(compression=None))
    with pytest.raises(ValueError, match="no room"):
        encode_pieces(table, MESSAGE_OVERHEAD, [])


@pytest.mark.parametrize("value", [b"1", b"0/2", b"3/2", b"a/b", b"1/2/3", b"\xff/1"])
def test_a_malformed_part_header_is_named(value: bytes) -> None:
    with pytest.raises(WireError) as err:
        part_of([(PART_HEADER, value)])
    assert err.value.reason == "bad-part-header"
    assert part_of([(PART_HEADER, b"2/3")]) == (2, 3) and part_of({PART_HEADER: b"1/1"}) == (1, 1)
    assert part_of([]) is None and part_of(None) is None


def test_a_sensor_row_that_cannot_fit_is_dropped_and_counted() -> None:
    from prometheus_client import REGISTRY

    def dropped() -> float:
        return REGISTRY.get_sample_value("flowtally_sensor_flows_dropped_total",
                                         {"reason": "message_too_large"}) or 0.0

    before = dropped()
    table = random_raw_table(3)
    assert encode_messages(table, b"k", max_bytes=MESSAGE_OVERHEAD + 100) == []
    assert dropped() - before == 3
    messages = encode_messages(table, b"k", max_bytes=MESSAGE_OVERHEAD + 100_000)
    assert [m.flows for m in messages] == [3] and messages[0].headers == [(SCHEMA_HEADER, SCHEMA_NAME.encode())]


def test_note_headers_are_cut_to_fit_the_message_overhead() -> None:
    assert note_header("short") == b"short"
    long = note_header("é" * 2000)  # two bytes each: cut on a character boundary
    assert len(long) <= MAX_NOTE_BYTES and long.decode().endswith("…") and long.decode()[0] == "é"
