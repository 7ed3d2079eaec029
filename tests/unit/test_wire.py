"""The Arrow wire format: round trip and the errors a consumer relies on."""

from __future__ import annotations

import pyarrow as pa
import pytest

from flowtally.wire import SCHEMA_HEADER, WireError, decode_batch, encode_batch, write_stream
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
    assert all(len(m.value) <= 200_000 for m in messages)
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
