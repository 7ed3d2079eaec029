"""NetFlow v5: a fixed 24-byte header and up to 30 fixed 48-byte records per packet.

Packets are only validated and sliced as they arrive (:meth:`V5Batch.add`); all records of one
decode call are converted together with a single ``np.frombuffer`` on a structured dtype
(:meth:`V5Batch.columns`), so there is no Python work per record.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

import numpy as np

from sensors.schema import icmp_from_port, ipv4_to_mapped

if TYPE_CHECKING:
    from sensors.netflow.stats import ExporterStats
    from sensors.netflow.templates import TemplateStore

VERSION = 5
# version, count, sysUptime, unix secs, unix nsecs, sequence, engine type, engine ID, sampling
HEADER = struct.Struct("!HHIIIIBBH")
HEADER_LENGTH = HEADER.size  # 24
RECORD = np.dtype(
    [
        ("src_addr", ">u4"),
        ("dst_addr", ">u4"),
        ("next_hop", ">u4"),
        ("in_if", ">u2"),
        ("out_if", ">u2"),
        ("packets", ">u4"),
        ("bytes", ">u4"),
        ("first", ">u4"),
        ("last", ">u4"),
        ("src_port", ">u2"),
        ("dst_port", ">u2"),
        ("pad1", "u1"),
        ("tcp_flags", "u1"),
        ("proto", "u1"),
        ("tos", "u1"),
        ("src_as", ">u2"),
        ("dst_as", ">u2"),
        ("src_mask", "u1"),
        ("dst_mask", "u1"),
        ("pad2", ">u2"),
    ]
)
RECORD_LENGTH = RECORD.itemsize  # 48
assert RECORD_LENGTH == 48

_AGE_WRAP = 1 << 32
_AGE_NEGATIVE = 1 << 31


def uptime_to_unix_ms(export_ms: np.ndarray, sys_uptime: np.ndarray, switched: np.ndarray) -> np.ndarray:
    """Turn router-uptime timestamps (FIRST/LAST_SWITCHED) into UTC milliseconds.

    ``export_ms`` is the header's wall-clock export time and ``sys_uptime`` the header's uptime,
    both per record. The age of the timestamp is ``sysUptime - switched`` modulo 2**32, so a
    router whose 32-bit millisecond uptime wrapped (every 49.7 days) between the flow and the
    export still gives the right time. An age above 2**31 means the switch time lies *after* the
    header's uptime (exporters that stamp the header first), i.e. a small negative age.
    """
    # ((age + 2**31 - 1) mod 2**32) - (2**31 - 1) maps ages above 2**31 to age - 2**32 in one pass.
    age = sys_uptime.astype(np.int64) - switched.astype(np.int64)
    age += _AGE_NEGATIVE - 1
    age &= _AGE_WRAP - 1
    age -= _AGE_NEGATIVE - 1
    return export_ms.astype(np.int64, copy=False) - age


class V5Batch:
    """The v5 packets of one decode call, gathered for one columnar conversion."""

    __slots__ = (
        "_chunks", "_counts", "_domain", "_export_ms", "_exporter", "_received", "_sampling", "_uptime",
    )

    def __init__(self) -> None:
        self._chunks: list[memoryview] = []
        self._counts: list[int] = []
        self._export_ms: list[int] = []
        self._uptime: list[int] = []
        self._sampling: list[int] = []
        self._domain: list[int] = []
        self._exporter: list[int] = []
        self._received: list[int] = []

    def add(self, payload: bytes, exporter_index: int, received_ms: int, counts: ExporterStats,
            state: TemplateStore | None = None, exporter: bytes = b"") -> None:
        """Validate one v5 packet and keep its records for :meth:`columns`; count what was seen.

        With ``state``, the header's flow sequence number is checked per (exporter, engine) and
        gaps counted (see :mod:`sensors.netflow.sequence`)."""
        if len(payload) < HEADER_LENGTH:
            counts.error("truncated_header")
            return
        header = HEADER.unpack_from(payload)
        _, count, uptime, secs, nsecs, sequence, engine_type, engine_id, sampling = header
        end = HEADER_LENGTH + count * RECORD_LENGTH
        # Shorter than the header's count says: the records cannot be trusted to line up. Longer
        # is tolerated (trailing bytes are ignored), as other collectors do.
        if len(payload) < end:
            counts.error("count_mismatch")
            return
        if state is not None:
            from sensors.netflow.sequence import track

            track(state, (VERSION, exporter, (engine_type << 8) | engine_id), sequence, count, False, counts)
        if count == 0:
            return
        self._chunks.append(memoryview(payload)[HEADER_LENGTH:end])
        self._counts.append(count)
        self._export_ms.append(secs * 1000 + nsecs // 1_000_000)
        self._uptime.append(uptime)
        # Low 14 bits: the interval; the top two bits are the sampling mode. 0 means unsampled.
        self._sampling.append((sampling & 0x3FFF) or 1)
        # v5 has no source ID; the engine type and ID identify the exporting engine instead
        # (as nfdump does), so they stand in for the observation domain.
        self._domain.append((engine_type << 8) | engine_id)
        self._exporter.append(exporter_index)
        self._received.append(received_ms)
        counts.records += count

    def __len__(self) -> int:
        return sum(self._counts)

    def columns(self, exporters: np.ndarray) -> dict[str, np.ndarray] | None:
        """Convert every gathered record at once; ``exporters`` is the (m, 16) address table that
        the exporter indexes given to :meth:`add` refer to. None if there were no records."""
        if not self._counts:
            return None
        rec = np.frombuffer(b"".join(self._chunks), dtype=RECORD)
        counts = np.asarray(self._counts, dtype=np.int64)

        def per_record(values: list[int], dtype: type[np.generic] = np.int64) -> np.ndarray:
            return np.repeat(np.asarray(values, dtype=dtype), counts)

        export_ms = per_record(self._export_ms)
        uptime = per_record(self._uptime)
        n = len(rec)
        proto, dst_port = rec["proto"].astype(np.uint8), rec["dst_port"].astype(np.uint16)
        icmp_type, icmp_code = icmp_from_port(proto, dst_port)  # v5 has no ICMP field: the port's
        return {
            "time_received": per_record(self._received),
            "exporter": exporters[per_record(self._exporter)],
            "observation_domain": per_record(self._domain, np.uint32),
            "version": np.full(n, VERSION, dtype=np.uint16),
            "start": uptime_to_unix_ms(export_ms, uptime, rec["first"]),
            "end": uptime_to_unix_ms(export_ms, uptime, rec["last"]),
            "src_addr": ipv4_to_mapped(rec["src_addr"]),
            "dst_addr": ipv4_to_mapped(rec["dst_addr"]),
            "src_port": rec["src_port"].astype(np.uint16),
            "dst_port": dst_port,
            "proto": proto,
            "bytes": rec["bytes"].astype(np.uint64),
            "packets": rec["packets"].astype(np.uint64),
            "sampling_rate": per_record(self._sampling, np.uint32),
            "tcp_flags": rec["tcp_flags"].astype(np.uint8),
            "in_if": rec["in_if"].astype(np.uint32),
            "out_if": rec["out_if"].astype(np.uint32),
            "icmp_type": icmp_type,
            "icmp_code": icmp_code,
        }
