"""The compiled (numba) kernel of the NetFlow v9/IPFIX decoder: template records to `raw.v1` columns.

:func:`sensors.netflow.v9.group_columns` and the IPFIX equivalent build each output column with
a few numpy steps over strided views of the records (a byte-swapping ``astype`` per field, a
``repeat`` per header value, address assembly, time conversion): about twenty passes over the
data and as many temporary arrays per template layout. :func:`decode_records` does the same in
compiled loops, one per column, that read each field big-endian where the record lies (in the
batch's joined datagrams, no copy) and write the output column once, for all the records of
several layouts (so one decode call gives one column set, without a concatenation).

It covers the usual layouts (:func:`layout_of` says which), IPFIX records with
variable-length fields once repacked into fixed-size ones; the numpy code stays the reference
implementation, and the fallback for the rest: options data, IPFIX biflows, sampling fields in
the flow records, per-sampler-ID rates. Tests hold the two equal (tests/unit/test_netflow_v9.py,
test_netflow_ipfix.py, test_netflow_kernel.py).

The kernel is compiled in-process on first use: 5-6 CPU-s (measured on the development
machine), which the sensor spends in :func:`warm_up` before it receives, so no datagram waits
for the compiler. There is no on-disk cache (``cache=True``): it would bring a restart down to
0.2 CPU-s, but needs a writable directory (``NUMBA_CACHE_DIR``), which the sensor's container
does not have (read-only root filesystem), and numba fails a cached function it cannot store;
and most starts are new pods, which would compile anyway.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
from numba import njit

from sensors.netflow import fields as F

#: Time sources of a layout's start or end (first one the layout has, in the numpy code's order).
TIME_NONE, TIME_MS, TIME_S, TIME_SWITCHED, TIME_NTP, TIME_DELTA_US, TIME_SYSUPTIME = range(7)

# Slots of a layout row (int64): where each field the columns come from is, as (offset, length);
# length -1 when the template has no such field (0 is a field sent in zero bytes: read as 0).
_SIZE, _VERSION, _START_MODE, _END_MODE = 0, 1, 2, 3
_START, _END, _SRC_PORT, _DST_PORT, _PROTO, _BYTES, _PACKETS, _FLAGS, _IN_IF, _OUT_IF = (
    4, 6, 8, 10, 12, 14, 16, 18, 20, 22)
_SRC4, _DST4, _SRC6, _DST6 = 24, 26, 28, 30
LAYOUT_WIDTH = 32

#: Record fields that state a sampling rate (:func:`sensors.netflow.fields.record_rates`): layouts
#: with any of them stay on the numpy path.
_RECORD_RATE_FIELDS = frozenset({F.SAMPLER_RANDOM_INTERVAL, F.SAMPLING_INTERVAL, F.SAMPLING_SIZE,
                                 F.SAMPLING_POPULATION, F.SAMPLING_PACKET_INTERVAL, F.SAMPLING_PACKET_SPACE})

COLUMNS = ("time_received", "exporter", "observation_domain", "version", "start", "end", "src_addr",
           "dst_addr", "src_port", "dst_port", "proto", "bytes", "packets", "sampling_rate", "tcp_flags",
           "in_if", "out_if")


def layout_of(where: Mapping[int, tuple[int, int]], size: int, version: int,
              start_ids: Sequence[tuple[int, int]], end_ids: Sequence[tuple[int, int]]) -> np.ndarray | None:
    """The kernel's description of a fixed-size record layout (``where``: field type -> (offset,
    length), first occurrence, enterprise 0), or None when the layout needs the numpy path.

    ``start_ids`` / ``end_ids``: (field type, time mode) in order of preference, as the
    protocol's numpy code tries them (a TIME_NTP field only counts when it is 8 bytes long).
    """
    if _RECORD_RATE_FIELDS.intersection(where):
        return None
    row = np.full(LAYOUT_WIDTH, -1, dtype=np.int64)
    row[_SIZE], row[_VERSION] = size, version
    for mode_slot, slot, ids in ((_START_MODE, _START, start_ids), (_END_MODE, _END, end_ids)):
        row[mode_slot] = TIME_NONE
        for field_type, mode in ids:
            if field_type in where and (mode != TIME_NTP or where[field_type][1] == 8):
                row[mode_slot] = mode
                row[slot : slot + 2] = where[field_type]
                break
    for slot, choices in ((_SRC_PORT, (F.SRC_PORT,)), (_DST_PORT, (F.DST_PORT,)), (_PROTO, (F.PROTOCOL,)),
                          (_BYTES, (F.OCTET_DELTA, F.POST_OCTET_DELTA, F.OCTET_TOTAL)),
                          (_PACKETS, (F.PACKET_DELTA, F.POST_PACKET_DELTA, F.PACKET_TOTAL)),
                          (_FLAGS, (F.TCP_FLAGS,)), (_IN_IF, (F.INPUT_IF,)), (_OUT_IF, (F.OUTPUT_IF,)),
                          (_SRC4, (F.SRC_V4,)), (_DST4, (F.DST_V4,)), (_SRC6, (F.SRC_V6,)),
                          (_DST6, (F.DST_V6,))):
        for field_type in choices:
            if field_type in where:
                row[slot : slot + 2] = where[field_type]
                break
    return row


@njit(cache=False, nogil=True, inline="always")
def _uint(buf: np.ndarray, pos: int, length: int) -> np.uint64:
    """A big-endian unsigned field of any length (0 bytes or absent: 0; more than 8: its low 64
    bits)."""
    value = np.uint64(0)
    if length <= 0:
        return value
    if length > 8:
        pos += length - 8
        length = 8
    for k in range(length):
        value = (value << np.uint64(8)) | np.uint64(buf[pos + k])
    return value


# Plain loops throughout, no array slicing: numba compiles slice assignments into much more
# code (seconds of compile time each).
# The kernel works column by column: each helper below fills one output column (or two) for
# every record of every data set, with the layout's choices (field length, time source) made
# once per data set, outside the loop over its records. Helpers are separate compiled functions
# taking arrays, called a few times per batch: numba would count references to the arrays at
# every call, so they are never called per record.


@njit(cache=False, nogil=True)
def _read_column(buf: np.ndarray, chunk_start: np.ndarray, chunk_count: np.ndarray, chunk_layout: np.ndarray,
                 layouts: np.ndarray, slot: int, out: np.ndarray) -> None:
    """out[row] (uint64) = the field at ``slot`` of each record, big-endian; 0 where the layout
    has no such field. The one place that reads fields: the other columns convert its output."""
    row = 0
    for c in range(len(chunk_start)):
        lay = layouts[chunk_layout[c]]
        size, at, n = lay[_SIZE], chunk_start[c] + lay[slot], chunk_count[c]
        length = lay[slot + 1]
        # One loop per usual length, so that the length test is not made per record.
        if length == 4:
            for r in range(n):
                p = at + r * size
                out[row + r] = ((np.uint64(buf[p]) << np.uint64(24))
                                | (np.uint64(buf[p + 1]) << np.uint64(16))
                                | (np.uint64(buf[p + 2]) << np.uint64(8))
                                | np.uint64(buf[p + 3]))
        elif length == 2:
            for r in range(n):
                p = at + r * size
                out[row + r] = (np.uint64(buf[p]) << np.uint64(8)) | np.uint64(buf[p + 1])
        elif length == 1:
            for r in range(n):
                out[row + r] = buf[at + r * size]
        else:
            for r in range(n):
                out[row + r] = _uint(buf, at + r * size, length)
        row += n


@njit(cache=False, nogil=True)
def _narrow(values: np.ndarray, out: np.ndarray) -> None:
    """out = values cast to out's type (the low bits, as numpy's astype)."""
    for r in range(len(values)):
        out[r] = values[r]


@njit(cache=False, nogil=True)
def _time_column(raw: np.ndarray, chunk_count: np.ndarray, chunk_layout: np.ndarray, layouts: np.ndarray,
                 chunk_export_ms: np.ndarray, chunk_base: np.ndarray, mode_slot: int,
                 out: np.ndarray) -> None:
    """The start (or end) of every record in UTC ms from its time field's value (``raw``, from
    :func:`_read_column`), exactly as the numpy code converts it (same integer wrap-around); the
    export time where the layout has none."""
    row = 0
    for c in range(len(chunk_count)):
        n, export_ms, base = chunk_count[c], chunk_export_ms[c], chunk_base[c]
        mode = layouts[chunk_layout[c], mode_slot]
        if mode == TIME_SWITCHED:  # v9 FIRST/LAST_SWITCHED, relative to the header's sysUptime
            for r in range(row, row + n):
                age = base - np.int64(raw[r])
                out[r] = export_ms - (((age + 0x7FFFFFFF) & 0xFFFFFFFF) - 0x7FFFFFFF)
        elif mode == TIME_MS:
            for r in range(row, row + n):
                out[r] = np.int64(raw[r])
        elif mode == TIME_S:
            for r in range(row, row + n):
                out[r] = np.int64(raw[r]) * 1000
        elif mode == TIME_NTP:
            for r in range(row, row + n):
                secs = np.int64(raw[r] >> np.uint64(32)) - 2_208_988_800
                frac = np.int64(raw[r] & np.uint64(0xFFFFFFFF))
                out[r] = secs * 1000 + ((frac * 1000) >> 32)
        elif mode == TIME_DELTA_US:
            for r in range(row, row + n):
                out[r] = export_ms - np.int64(raw[r]) // 1000
        elif mode == TIME_SYSUPTIME and base >= 0:  # the 32-bit wrap nearest the export time
            for r in range(row, row + n):
                t = base + np.int64(raw[r])
                out[r] = t + np.int64(np.rint((export_ms - t) / 4294967296.0)) * 4294967296
        else:  # no time field, or uptime-relative without a known systemInitTimeMilliseconds
            for r in range(row, row + n):
                out[r] = export_ms
        row += n


@njit(cache=False, nogil=True)
def _one_time_for_both(chunk_count: np.ndarray, chunk_layout: np.ndarray, layouts: np.ndarray,
                       start: np.ndarray, end: np.ndarray) -> None:
    """A record with only a start or only an end time uses it for both."""
    row = 0
    for c in range(len(chunk_count)):
        n = chunk_count[c]
        start_mode, end_mode = layouts[chunk_layout[c], _START_MODE], layouts[chunk_layout[c], _END_MODE]
        if start_mode == TIME_NONE and end_mode != TIME_NONE:
            for r in range(row, row + n):
                start[r] = end[r]
        elif end_mode == TIME_NONE and start_mode != TIME_NONE:
            for r in range(row, row + n):
                end[r] = start[r]
        row += n


@njit(cache=False, nogil=True)
def _nonzero(buf: np.ndarray, at: int, length: int) -> bool:
    """True when one of the ``length`` bytes at ``at`` is not 0 (a plain loop: numba)."""
    for k in range(max(length, 0)):  # noqa: SIM110
        if buf[at + k] != 0:
            return True
    return False


@njit(cache=False, nogil=True)
def _address_column(buf: np.ndarray, chunk_start: np.ndarray, chunk_count: np.ndarray,
                    chunk_layout: np.ndarray, layouts: np.ndarray, slot4: int, slot6: int,
                    mapped: np.uint64, out: np.ndarray, words: np.ndarray) -> None:
    """The source (or destination) address, (n, 16) uint8 (``words``: the same memory as (n, 2)
    uint64): IPv4 in IPv4-mapped form (``mapped``: bytes 8-15 of ::ffff:0.0.0.0 in memory
    order), IPv6 right-aligned; a record of a template with both families is IPv6 when both its
    IPv4 addresses are 0.0.0.0 and an IPv6 one is set (:func:`sensors.netflow.fields.addresses`)."""
    row = 0
    for c in range(len(chunk_start)):
        lay = layouts[chunk_layout[c]]
        size, n = lay[_SIZE], chunk_count[c]
        s4_o, s4_l, d4_o, d4_l = lay[_SRC4], lay[_SRC4 + 1], lay[_DST4], lay[_DST4 + 1]
        s6_o, s6_l, d6_o, d6_l = lay[_SRC6], lay[_SRC6 + 1], lay[_DST6], lay[_DST6 + 1]
        o4, l4, o6, l6 = lay[slot4], lay[slot4 + 1], lay[slot6], lay[slot6 + 1]
        has4 = s4_l >= 0 or d4_l >= 0
        has6 = s6_l >= 0 or d6_l >= 0
        take = min(l6, 16)
        at = chunk_start[c]
        for i in range(row, row + n):
            use6 = has6
            if has6 and has4:
                use6 = (np.uint32(_uint(buf, at + s4_o, s4_l)) == 0
                        and np.uint32(_uint(buf, at + d4_o, d4_l)) == 0
                        and (_nonzero(buf, at + s6_o, s6_l) or _nonzero(buf, at + d6_o, d6_l)))
            words[i, 0] = 0
            if use6:
                words[i, 1] = 0
                for k in range(take):
                    out[i, 16 - take + k] = buf[at + o6 + l6 - take + k]
            elif l4 == 4:
                words[i, 1] = mapped
                out[i, 12] = buf[at + o4]
                out[i, 13] = buf[at + o4 + 1]
                out[i, 14] = buf[at + o4 + 2]
                out[i, 15] = buf[at + o4 + 3]
            else:
                words[i, 1] = mapped
                v4 = np.uint32(_uint(buf, at + o4, l4))
                out[i, 12] = np.uint8(v4 >> np.uint32(24))
                out[i, 13] = np.uint8((v4 >> np.uint32(16)) & np.uint32(0xFF))
                out[i, 14] = np.uint8((v4 >> np.uint32(8)) & np.uint32(0xFF))
                out[i, 15] = np.uint8(v4 & np.uint32(0xFF))
            at += size
        row += n


@njit(cache=False, nogil=True)
def _context_columns(chunk_count: np.ndarray, chunk_layout: np.ndarray, layouts: np.ndarray,
                     chunk_domain: np.ndarray, chunk_exporter: np.ndarray, chunk_received: np.ndarray,
                     chunk_rate: np.ndarray, exporters: np.ndarray, time_received: np.ndarray,
                     exporter: np.ndarray, domain: np.ndarray, version: np.ndarray,
                     sampling: np.ndarray) -> None:
    """The columns that come from the data set's context, not its records (``exporters`` and
    ``exporter``: 16-byte addresses as (m, 2) uint64 words); a sampling rate of 0 reads as 1,
    rates beyond 32 bits as the largest 32-bit one."""
    row = 0
    for c in range(len(chunk_count)):
        n = chunk_count[c]
        received = chunk_received[c]
        dom = np.uint32(chunk_domain[c])
        rate = np.uint32(min(max(chunk_rate[c], 1), 0xFFFFFFFF))
        ex0, ex1 = exporters[chunk_exporter[c], 0], exporters[chunk_exporter[c], 1]
        ver = np.uint16(layouts[chunk_layout[c], _VERSION])
        for r in range(row, row + n):
            time_received[r] = received
            domain[r] = dom
            version[r] = ver
            sampling[r] = rate
            exporter[r, 0] = ex0
            exporter[r, 1] = ex1
        row += n


@njit(cache=False, nogil=True)
def _records(buf: np.ndarray, chunk_start: np.ndarray, chunk_count: np.ndarray, chunk_layout: np.ndarray,
             chunk_export_ms: np.ndarray, chunk_base: np.ndarray, chunk_domain: np.ndarray,
             chunk_exporter: np.ndarray, chunk_received: np.ndarray, chunk_rate: np.ndarray,
             layouts: np.ndarray, exporters: np.ndarray, mapped: np.uint64, time_received: np.ndarray,
             exporter: np.ndarray, domain: np.ndarray, version: np.ndarray, start: np.ndarray,
             end: np.ndarray, src_addr: np.ndarray, src_words: np.ndarray, dst_addr: np.ndarray,
             dst_words: np.ndarray, src_port: np.ndarray, dst_port: np.ndarray, proto: np.ndarray,
             nbytes: np.ndarray, packets: np.ndarray, sampling: np.ndarray, tcp_flags: np.ndarray,
             in_if: np.ndarray, out_if: np.ndarray) -> None:
    where = (chunk_start, chunk_count, chunk_layout, layouts)
    _context_columns(chunk_count, chunk_layout, layouts, chunk_domain, chunk_exporter, chunk_received,
                     chunk_rate, exporters, time_received, exporter, domain, version, sampling)
    raw = np.empty(len(time_received), dtype=np.uint64)
    _read_column(buf, *where, _START, raw)
    _time_column(raw, chunk_count, chunk_layout, layouts, chunk_export_ms, chunk_base, _START_MODE, start)
    _read_column(buf, *where, _END, raw)
    _time_column(raw, chunk_count, chunk_layout, layouts, chunk_export_ms, chunk_base, _END_MODE, end)
    _one_time_for_both(chunk_count, chunk_layout, layouts, start, end)
    _address_column(buf, *where, _SRC4, _SRC6, mapped, src_addr, src_words)
    _address_column(buf, *where, _DST4, _DST6, mapped, dst_addr, dst_words)
    _read_column(buf, *where, _BYTES, nbytes)
    _read_column(buf, *where, _PACKETS, packets)
    _read_column(buf, *where, _SRC_PORT, raw)
    _narrow(raw, src_port)
    _read_column(buf, *where, _DST_PORT, raw)
    _narrow(raw, dst_port)
    _read_column(buf, *where, _PROTO, raw)
    _narrow(raw, proto)
    _read_column(buf, *where, _FLAGS, raw)
    _narrow(raw, tcp_flags)
    _read_column(buf, *where, _IN_IF, raw)
    _narrow(raw, in_if)
    _read_column(buf, *where, _OUT_IF, raw)
    _narrow(raw, out_if)


#: Bytes 8-15 of an IPv4-mapped address with its IPv4 part zero, as one word in memory order.
_MAPPED_HIGH = np.frombuffer(b"\x00\x00\xff\xff\x00\x00\x00\x00", dtype=np.uint64)[0]


def decode_records(buf: np.ndarray, starts: np.ndarray, counts: Sequence[int], layout: Sequence[int],
                   export_ms: Sequence[int], base: Sequence[int], domain: Sequence[int],
                   exporter: Sequence[int], received: Sequence[int], rate: Sequence[int],
                   layouts: np.ndarray, exporters: np.ndarray) -> dict[str, np.ndarray]:
    """`raw.v1` columns for data sets of fixed-size records, in the order given.

    Per data set (parallel sequences): where its records start in ``buf`` (uint8), its record
    count (``counts[i]`` whole records of ``layouts[layout[i]]``), the header's export time in
    ms, the base of uptime-relative times (v9 sysUptime; IPFIX systemInitTimeMilliseconds or
    -1), observation domain, index of the exporter's row in ``exporters`` ((m, 16) uint8),
    receive time (UTC ms) and sampling rate.
    """
    n = int(sum(counts))
    out: dict[str, np.ndarray] = {
        "time_received": np.empty(n, dtype=np.int64), "exporter": np.empty((n, 16), dtype=np.uint8),
        "observation_domain": np.empty(n, dtype=np.uint32), "version": np.empty(n, dtype=np.uint16),
        "start": np.empty(n, dtype=np.int64), "end": np.empty(n, dtype=np.int64),
        "src_addr": np.empty((n, 16), dtype=np.uint8), "dst_addr": np.empty((n, 16), dtype=np.uint8),
        "src_port": np.empty(n, dtype=np.uint16), "dst_port": np.empty(n, dtype=np.uint16),
        "proto": np.empty(n, dtype=np.uint8), "bytes": np.empty(n, dtype=np.uint64),
        "packets": np.empty(n, dtype=np.uint64), "sampling_rate": np.empty(n, dtype=np.uint32),
        "tcp_flags": np.empty(n, dtype=np.uint8), "in_if": np.empty(n, dtype=np.uint32),
        "out_if": np.empty(n, dtype=np.uint32),
    }

    def ints(values: Sequence[int]) -> np.ndarray:
        return np.asarray(values, dtype=np.int64)

    src, dst = out["src_addr"], out["dst_addr"]
    _records(buf, starts, ints(counts), ints(layout), ints(export_ms), ints(base), ints(domain),
             ints(exporter), ints(received), ints(rate), layouts,
             # A writable copy (a few bytes): one array kind whatever the caller's is, so the
             # kernel compiled by warm_up() is the one used (numba compiles one per kind).
             np.array(exporters, dtype=np.uint8, order="C").view(np.uint64), _MAPPED_HIGH,
             out["time_received"], out["exporter"].view(np.uint64), out["observation_domain"], out["version"],
             out["start"], out["end"], src, src.view(np.uint64), dst, dst.view(np.uint64),
             out["src_port"], out["dst_port"], out["proto"], out["bytes"], out["packets"],
             out["sampling_rate"], out["tcp_flags"], out["in_if"], out["out_if"])
    return out


def _records_buffer(groups: Sequence[F.Group]) -> tuple[np.ndarray, np.ndarray]:
    """One buffer holding the records of every data set of ``groups``, and where each set
    starts in it: the buffer most sets were sliced from (a bulk batch's joined datagrams,
    :attr:`~sensors.netflow.fields.Group.source`), with the few sets that came from elsewhere
    (walked one by one, or held for their template) appended to a copy of it."""
    main = max(groups, key=lambda g: len(g.chunks)).source
    offsets = np.asarray([o for g in groups
                          for o in (g.offsets if g.source is main else [-1] * len(g.chunks))], dtype=np.int64)
    elsewhere = np.flatnonzero(offsets < 0)
    if main is not None and not len(elsewhere):
        return np.frombuffer(main, dtype=np.uint8), offsets
    chunks = [c for g in groups for c in g.chunks]
    pieces: list[bytes | memoryview] = [main] if main is not None else []
    at = len(main) if main is not None else 0
    for i in elsewhere.tolist():
        pieces.append(chunks[i])
        offsets[i] = at
        at += len(chunks[i])
    return np.frombuffer(b"".join(pieces), dtype=np.uint8), offsets


def grouped_columns(groups: Sequence[tuple[F.Group, np.ndarray | None]],
                    fallback: Callable[[int], list[dict[str, np.ndarray]]],
                    exporters: np.ndarray) -> list[dict[str, np.ndarray]]:
    """Columns of the groups of one decode call, in order: each run of groups with a kernel
    layout in one :func:`decode_records` call, a group without one (None) by ``fallback(index)``
    (the numpy code). Groups without records are skipped."""
    out: list[dict[str, np.ndarray]] = []
    run: list[tuple[F.Group, np.ndarray]] = []

    def flush() -> None:
        if not run:
            return
        counts: list[int] = []
        which: list[int] = []
        export_ms: list[int] = []
        base: list[int] = []
        domain: list[int] = []
        exporter: list[int] = []
        received: list[int] = []
        rate: list[int] = []
        for k, (group, _) in enumerate(run):
            counts += group.counts
            which += [k] * len(group.counts)
            export_ms += group.export_ms
            base += group.base
            domain += group.domain
            exporter += group.exporter
            received += group.received
            rate += group.sampling
        if sum(counts):
            buf, starts = _records_buffer([group for group, _ in run])
            layouts = np.stack([layout for _, layout in run])
            out.append(decode_records(buf, starts, counts, which, export_ms, base, domain, exporter, received,
                                      rate, layouts, exporters))
        run.clear()

    for i, (group, layout) in enumerate(groups):
        if layout is None:
            flush()
            if sum(group.counts):
                out.extend(fallback(i))
        else:
            run.append((group, layout))
    flush()
    return out


def warm_up() -> None:
    """Compile the kernel now (5-6 CPU-s) rather than on the first decoded batch."""
    where = {F.SRC_V4: (0, 4), F.DST_V4: (4, 4), F.OCTET_DELTA: (8, 4), F.START_UPTIME: (12, 4)}
    layout = layout_of(where, 16, 9, [(F.START_UPTIME, TIME_SWITCHED)], [])
    assert layout is not None
    # A read-only buffer, as the datagrams' bytes are: numba compiles one version per array kind.
    buf = np.frombuffer(bytes(16), dtype=np.uint8)
    decode_records(buf, np.zeros(1, dtype=np.int64), [1], [0], [0], [0], [0], [0], [0], [1],
                   np.stack([layout]), np.frombuffer(bytes(16), dtype=np.uint8).reshape(1, 16))
