"""The raw flow record schema (`raw.v1`), owned by the sensors.

Every sensor (NetFlow/IPFIX, conntrack) publishes batches with exactly these columns; later stages
import this module and never define raw columns of their own. Addresses are 16-byte IPv6 (IPv4 in
IPv4-mapped form ``::ffff:a.b.c.d``) so one column type covers both families and maps to
ClickHouse's ``IPv6``. Times are UTC milliseconds.

Extending the schema: add a column at the end with a default that means "not reported", bump
nothing for additive changes that old readers can ignore, and bump the version for anything else.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa

SCHEMA_NAME = "raw.v1"

TIMESTAMP = pa.timestamp("ms", tz="UTC")
ADDRESS = pa.binary(16)

RAW_SCHEMA = pa.schema(
    [
        # Who observed the flow and when it was received.
        pa.field("time_received", TIMESTAMP, nullable=False),
        pa.field("exporter", ADDRESS, nullable=False),  # exporter address, or the node's address
        pa.field("observation_domain", pa.uint32(), nullable=False),  # v9 source ID / IPFIX domain
        pa.field("observer", pa.dictionary(pa.int32(), pa.string()), nullable=False),  # node name or ""
        pa.field("version", pa.uint16(), nullable=False),  # 5, 9, 10 (IPFIX); 0 for conntrack
        # The flow.
        pa.field("start", TIMESTAMP, nullable=False),
        pa.field("end", TIMESTAMP, nullable=False),
        pa.field("src_addr", ADDRESS, nullable=False),
        pa.field("dst_addr", ADDRESS, nullable=False),
        pa.field("src_port", pa.uint16(), nullable=False),
        pa.field("dst_port", pa.uint16(), nullable=False),
        pa.field("proto", pa.uint8(), nullable=False),
        pa.field("bytes", pa.uint64(), nullable=False),  # as sent by the exporter, not scaled
        pa.field("packets", pa.uint64(), nullable=False),
        pa.field("sampling_rate", pa.uint32(), nullable=False),  # 1 = unsampled; queries scale
        pa.field("tcp_flags", pa.uint8(), nullable=False),
        pa.field("in_if", pa.uint32(), nullable=False),
        pa.field("out_if", pa.uint32(), nullable=False),
        # Additive since the conntrack sensor (issue 5); NetFlow sensors leave the defaults.
        # src/dst are always the two ends that exchanged the packets (dst_addr: the peer that
        # answered). When the initiator addressed something else that was translated (DNAT: a
        # ClusterIP, a NodePort), nat_addr/nat_port keep what it addressed, on the records of
        # both directions of the connection; :: and 0 mean "not translated / not known".
        pa.field("nat_addr", ADDRESS, nullable=False),
        pa.field("nat_port", pa.uint16(), nullable=False),
        # Who opened the connection: 0 not known, 1 the src side, 2 the dst side (a reply
        # direction record of a connection the dst opened).
        pa.field("initiator", pa.uint8(), nullable=False),
        # Connection state when reported; one of CONN_STATES ("" = not reported).
        pa.field("conn_state", pa.dictionary(pa.int32(), pa.string()), nullable=False),
        # Additive since issue 4's flow details, where the exporter sends them (0 = not reported):
        # flow_direction 1 ingress, 2 egress (IPFIX flowDirection 61, +1); ICMP type and code of
        # ICMP/ICMPv6 records (0 for other protocols); the 802.1Q VLAN IDs on the way in (src)
        # and out (dst); the top MPLS label (20 bits).
        pa.field("flow_direction", pa.uint8(), nullable=False),
        pa.field("icmp_type", pa.uint8(), nullable=False),
        pa.field("icmp_code", pa.uint8(), nullable=False),
        pa.field("src_vlan", pa.uint16(), nullable=False),
        pa.field("dst_vlan", pa.uint16(), nullable=False),
        pa.field("mpls_label", pa.uint32(), nullable=False),
    ],
    metadata={"flowtally-schema": SCHEMA_NAME},
)

#: numpy dtype of each non-address, non-string column, for decoders that build columns.
NUMPY_DTYPES: dict[str, np.dtype[Any]] = {
    "time_received": np.dtype("int64"),
    "observation_domain": np.dtype("uint32"),
    "version": np.dtype("uint16"),
    "start": np.dtype("int64"),
    "end": np.dtype("int64"),
    "src_port": np.dtype("uint16"),
    "dst_port": np.dtype("uint16"),
    "proto": np.dtype("uint8"),
    "bytes": np.dtype("uint64"),
    "packets": np.dtype("uint64"),
    "sampling_rate": np.dtype("uint32"),
    "tcp_flags": np.dtype("uint8"),
    "in_if": np.dtype("uint32"),
    "out_if": np.dtype("uint32"),
    "nat_port": np.dtype("uint16"),
    "initiator": np.dtype("uint8"),
    "flow_direction": np.dtype("uint8"),
    "icmp_type": np.dtype("uint8"),
    "icmp_code": np.dtype("uint8"),
    "src_vlan": np.dtype("uint16"),
    "dst_vlan": np.dtype("uint16"),
    "mpls_label": np.dtype("uint32"),
}

ADDRESS_COLUMNS = ("exporter", "src_addr", "dst_addr", "nat_addr")
STRING_COLUMNS = ("observer", "conn_state")

#: The flow details NetFlow/IPFIX exporters may send (see RAW_SCHEMA), all "not reported" at 0.
DETAIL_COLUMNS = ("flow_direction", "icmp_type", "icmp_code", "src_vlan", "dst_vlan", "mpls_label")
ICMP_PROTOCOLS = (1, 58)  # ICMP, ICMPv6


def icmp_from_port(proto: np.ndarray, dst_port: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ICMP type and code (uint8 each) from the destination port, where NetFlow v5 (which has no
    ICMP field), exporters such as pmacctd and conntrack put them (``type << 8 | code``); 0 for
    records that are not ICMP or ICMPv6."""
    icmp = (proto == ICMP_PROTOCOLS[0]) | (proto == ICMP_PROTOCOLS[1])
    port = np.where(icmp, dst_port, 0).astype(np.uint16)
    return (port >> 8).astype(np.uint8), (port & 0xFF).astype(np.uint8)


#: Columns added to raw.v1 after it was first published. A reader given a batch from an older
#: sensor fills them with their "not reported" default (:func:`with_additive_defaults`).
ADDITIVE_COLUMNS = ("nat_addr", "nat_port", "initiator", "conn_state", *DETAIL_COLUMNS)

#: Values of ``conn_state``: "" not reported (NetFlow); "established" a reply was seen (TCP:
#: the handshake completed); "unreplied" nothing came back (UDP/ICMP without answer, TCP SYN
#: without SYN-ACK); "refused" TCP answered by a reset before it was established;
#: "closing" TCP in FIN/close states when reported.
CONN_STATES = ("", "established", "unreplied", "refused", "closing")


def ipv4_to_mapped(v4: np.ndarray) -> np.ndarray:
    """Turn IPv4 addresses (uint32 host order, or (n, 4) uint8 network order) into (n, 16) uint8
    IPv4-mapped IPv6 addresses."""
    if v4.ndim == 1:
        v4 = v4.astype(">u4").view(np.uint8).reshape(-1, 4)
    out = np.zeros((len(v4), 16), dtype=np.uint8)
    out[:, 10:12] = 0xFF
    out[:, 12:16] = v4
    return out


def address_array(addresses: np.ndarray) -> pa.FixedSizeBinaryArray:
    """Wrap an (n, 16) uint8 array as an Arrow fixed_size_binary(16) column without copying rows."""
    addresses = np.ascontiguousarray(addresses, dtype=np.uint8)
    if addresses.ndim != 2 or addresses.shape[1] != 16:
        raise ValueError(f"addresses must have shape (n, 16), got {addresses.shape}")
    return pa.FixedSizeBinaryArray.from_buffers(
        ADDRESS, len(addresses), [None, pa.py_buffer(addresses.tobytes())]
    )


def address_bytes(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """The inverse of :func:`address_array`: an (n, 16) uint8 view of an address column."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if len(column) == 0:
        return np.zeros((0, 16), dtype=np.uint8)
    buf = column.buffers()[1]
    flat = np.frombuffer(buf, dtype=np.uint8, count=(column.offset + len(column)) * 16)
    return flat.reshape(-1, 16)[column.offset :]


def build_raw_table(columns: Mapping[str, Any], observer: str | None = None) -> pa.Table:
    """Build a `raw.v1` table from decoder output.

    ``columns`` maps column names to numpy arrays (addresses as (n, 16) uint8, times as int64
    milliseconds since the epoch). Missing optional columns get their "not reported" default
    (0, or 1 for ``sampling_rate``); ``observer`` fills the observer column when not given.
    """
    n = _row_count(columns)
    arrays: list[pa.Array] = []
    for field in RAW_SCHEMA:
        name = field.name
        value = columns.get(name)
        if value is None and name not in STRING_COLUMNS and name != "sampling_rate":
            arrays.append(pa.Array.from_buffers(field.type, n, [None, _zeros(n * field.type.byte_width)]))
            continue
        if name in ADDRESS_COLUMNS:
            value = np.ascontiguousarray(value, dtype=np.uint8)
            if value.shape != (n, 16):
                raise ValueError(f"{name} must have shape (n, 16), got {value.shape}")
            # Wrapped without a copy, like the numeric columns below (address_array's tobytes
            # copied each address column once more: ~0.05 CPU-s per million NetFlow flows).
            arrays.append(pa.FixedSizeBinaryArray.from_buffers(ADDRESS, n, [None, pa.py_buffer(value)]))
        elif name in STRING_COLUMNS:
            if value is None:
                arrays.append(_constant_string(n, observer or "" if name == "observer" else ""))
            else:
                arrays.append(pa.array(value, pa.string()).dictionary_encode())
        else:
            dtype = NUMPY_DTYPES[name]
            if value is None:
                value = np.ones(n, dtype=dtype)  # sampling_rate: unsampled
            value = np.ascontiguousarray(value, dtype=dtype)
            if field.type == TIMESTAMP:
                # From the int64 buffer directly: pa.array(..., type=timestamp) goes through
                # pyarrow's pandas-compatible path, which imports pandas (a CPU-second) and costs
                # more per call than the zero-copy wrap.
                arrays.append(pa.Array.from_buffers(TIMESTAMP, n, [None, pa.py_buffer(value)]))
            else:
                arrays.append(pa.array(value, type=field.type))
    return pa.Table.from_arrays(arrays, schema=RAW_SCHEMA)


def _constant_string(n: int, value: str) -> pa.DictionaryArray:
    indices = pa.Array.from_buffers(pa.int32(), n, [None, _zeros(4 * n)])
    return pa.DictionaryArray.from_arrays(indices, pa.array([value]))


_ZEROS = [pa.py_buffer(b"")]


def _zeros(nbytes: int) -> pa.Buffer:
    """``nbytes`` zero bytes from one shared, read-only buffer (grown when a batch needs more):
    the columns a sensor does not report (NetFlow's conntrack columns, the details most
    exporters leave out) are views of it instead of fresh zeroed arrays per batch."""
    if _ZEROS[0].size < nbytes:
        _ZEROS[0] = pa.py_buffer(bytes(max(nbytes, 2 * _ZEROS[0].size)))
    return _ZEROS[0].slice(0, nbytes)


def with_additive_defaults(table: pa.Table) -> pa.Table:
    """``table`` with any missing :data:`ADDITIVE_COLUMNS` added with their "not reported"
    defaults, so batches from sensors older than a column still read as ``raw.v1``."""
    n = table.num_rows
    for name in ADDITIVE_COLUMNS:
        if name in table.column_names:
            continue
        field = RAW_SCHEMA.field(name)
        if name in ADDRESS_COLUMNS:
            column: pa.Array = address_array(np.zeros((n, 16), dtype=np.uint8))
        elif name in STRING_COLUMNS:
            column = _constant_string(n, "")
        else:
            column = pa.array(np.zeros(n, dtype=NUMPY_DTYPES[name]), type=field.type)
        table = table.append_column(field, column)
    return table


def _row_count(columns: Mapping[str, Any]) -> int:
    lengths = {len(v) for v in columns.values() if v is not None}
    if len(lengths) > 1:
        raise ValueError(f"columns have different lengths: {sorted(lengths)}")
    return lengths.pop() if lengths else 0


def empty_raw_table() -> pa.Table:
    """A `raw.v1` table with no rows."""
    return RAW_SCHEMA.empty_table()


def with_observer(table: pa.Table, observer: str) -> pa.Table:
    """``table`` with every row's observer set to ``observer`` (e.g. the sensor's node name)."""
    index = table.schema.get_field_index("observer")
    column = _constant_string(table.num_rows, observer)
    return table.set_column(index, table.schema.field(index), column)


_V4_MAPPED_PREFIX = b"\x00" * 10 + b"\xff\xff"


def address_text(address: bytes) -> str:
    """Printable form of a 16-byte address (IPv4-mapped ones as plain dotted IPv4)."""
    if address[:12] == _V4_MAPPED_PREFIX:
        return str(ipaddress.IPv4Address(address[12:]))
    return str(ipaddress.IPv6Address(address))


def address16(text: str) -> bytes:
    """The 16-byte form of an IPv4 or IPv6 address string (IPv4 mapped)."""
    ip = ipaddress.ip_address(text.split("%")[0])
    return b"\x00" * 10 + b"\xff\xff" + ip.packed if ip.version == 4 else ip.packed
