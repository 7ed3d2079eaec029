"""The compiled (numba) kernel of the NetFlow v9/IPFIX decoder: template records to `raw.v1` columns.

:func:`sensors.netflow.v9.group_columns` and the IPFIX equivalent build each output column with
a few numpy steps over strided views of the records (a byte-swapping ``astype`` per field, a
``repeat`` per header value, address assembly, time conversion): about twenty passes over the
data and as many temporary arrays per template layout. :func:`decode_records` does the same in
one compiled loop over the records, reading each field big-endian where the record lies (in the
batch's joined datagrams, no copy) and writing every output column once, for all the records of
several layouts (so one decode call gives one column set, without a concatenation).

It covers the usual layouts (:func:`layout_of` says which), IPFIX records with
variable-length fields once repacked into fixed-size ones; the numpy code stays the reference
implementation, and the fallback for the rest: options data, IPFIX biflows, sampling fields in
the flow records, per-sampler-ID rates. Tests hold the two equal (tests/unit/test_netflow_v9.py,
test_netflow_ipfix.py, test_netflow_kernel.py).

The kernel is compiled in-process on first use: about 3 CPU-s (measured on the development
machine), which the sensor spends in :func:`warm_up` before it receives, so no datagram waits
for the compiler. There is no on-disk cache (``cache=True``): it would bring a restart down to
about 0.2 CPU-s, but needs a writable directory (``NUMBA_CACHE_DIR``), which the sensor's container
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


# Plain loops throughout, no array slicing: numba compiles slice assignments into much more
# code (seconds of compile time each).


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
def _low8(offset: int, length: int) -> tuple[int, int]:
    """Where the low 64 bits of a field are: a field longer than 8 bytes keeps its last 8."""
    if length > 8:
        return offset + length - 8, 8
    return offset, length


@njit(cache=False, nogil=True)
def _convert(raw: np.uint64, mode: int, export_ms: int, base: int) -> np.int64:
    """A start or end time in UTC ms from its field's value, exactly as the numpy code converts
    it (same integer wrap-around); the export time where there is no field."""
    if mode == TIME_SWITCHED:  # v9 FIRST/LAST_SWITCHED, relative to the header's sysUptime
        age = base - np.int64(raw)
        return export_ms - (((age + 0x7FFFFFFF) & 0xFFFFFFFF) - 0x7FFFFFFF)
    if mode == TIME_MS:
        return np.int64(raw)
    if mode == TIME_S:
        return np.int64(raw) * 1000
    if mode == TIME_NTP:
        secs = np.int64(raw >> np.uint64(32)) - 2_208_988_800
        frac = np.int64(raw & np.uint64(0xFFFFFFFF))
        return secs * 1000 + ((frac * 1000) >> 32)
    if mode == TIME_DELTA_US:
        return export_ms - np.int64(raw) // 1000
    if mode == TIME_SYSUPTIME and base >= 0:  # the 32-bit wrap nearest the export time
        t = base + np.int64(raw)
        return t + np.int64(np.rint((export_ms - t) / 4294967296.0)) * 4294967296
    return np.int64(export_ms)  # no time field, or uptime-relative without systemInitTimeMilliseconds


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
    """Every column of every record, record by record (one pass over the datagrams' bytes).

    Written out in one loop on purpose: numba counts references to the arrays passed to a
    helper at every call, so per-record helpers take scalars only; each field is read with the
    same short big-endian loop (``_low8`` clipped its offset and length once per data set).
    """
    _context_columns(chunk_count, chunk_layout, layouts, chunk_domain, chunk_exporter, chunk_received,
                     chunk_rate, exporters, time_received, exporter, domain, version, sampling)
    eight = np.uint64(8)
    row = 0
    for c in range(len(chunk_start)):
        lay = layouts[chunk_layout[c]]
        size, n = lay[_SIZE], chunk_count[c]
        export_ms, base = chunk_export_ms[c], chunk_base[c]
        start_mode, end_mode = lay[_START_MODE], lay[_END_MODE]
        t0_o, t0_l = _low8(lay[_START], lay[_START + 1])
        t1_o, t1_l = _low8(lay[_END], lay[_END + 1])
        sp_o, sp_l = _low8(lay[_SRC_PORT], lay[_SRC_PORT + 1])
        dp_o, dp_l = _low8(lay[_DST_PORT], lay[_DST_PORT + 1])
        pr_o, pr_l = _low8(lay[_PROTO], lay[_PROTO + 1])
        fl_o, fl_l = _low8(lay[_FLAGS], lay[_FLAGS + 1])
        by_o, by_l = _low8(lay[_BYTES], lay[_BYTES + 1])
        pk_o, pk_l = _low8(lay[_PACKETS], lay[_PACKETS + 1])
        in_o, in_l = _low8(lay[_IN_IF], lay[_IN_IF + 1])
        ou_o, ou_l = _low8(lay[_OUT_IF], lay[_OUT_IF + 1])
        s4_o, s4_l = _low8(lay[_SRC4], lay[_SRC4 + 1])
        d4_o, d4_l = _low8(lay[_DST4], lay[_DST4 + 1])
        s6_o, s6_l, d6_o, d6_l = lay[_SRC6], lay[_SRC6 + 1], lay[_DST6], lay[_DST6 + 1]
        has4 = lay[_SRC4 + 1] >= 0 or lay[_DST4 + 1] >= 0
        has6 = s6_l >= 0 or d6_l >= 0
        s6_take, d6_take = min(s6_l, 16), min(d6_l, 16)
        at = chunk_start[c]
        for i in range(row, row + n):
            v = np.uint64(0)
            for k in range(t0_l):
                v = (v << eight) | np.uint64(buf[at + t0_o + k])
            t0 = _convert(v, start_mode, export_ms, base)
            v = np.uint64(0)
            for k in range(t1_l):
                v = (v << eight) | np.uint64(buf[at + t1_o + k])
            t1 = _convert(v, end_mode, export_ms, base)
            if start_mode == TIME_NONE and end_mode != TIME_NONE:
                t0 = t1
            elif end_mode == TIME_NONE and start_mode != TIME_NONE:
                t1 = t0
            start[i] = t0
            end[i] = t1
            v = np.uint64(0)
            for k in range(sp_l):
                v = (v << eight) | np.uint64(buf[at + sp_o + k])
            src_port[i] = v
            v = np.uint64(0)
            for k in range(dp_l):
                v = (v << eight) | np.uint64(buf[at + dp_o + k])
            dst_port[i] = v
            v = np.uint64(0)
            for k in range(pr_l):
                v = (v << eight) | np.uint64(buf[at + pr_o + k])
            proto[i] = v
            v = np.uint64(0)
            for k in range(fl_l):
                v = (v << eight) | np.uint64(buf[at + fl_o + k])
            tcp_flags[i] = v
            v = np.uint64(0)
            for k in range(by_l):
                v = (v << eight) | np.uint64(buf[at + by_o + k])
            nbytes[i] = v
            v = np.uint64(0)
            for k in range(pk_l):
                v = (v << eight) | np.uint64(buf[at + pk_o + k])
            packets[i] = v
            v = np.uint64(0)
            for k in range(in_l):
                v = (v << eight) | np.uint64(buf[at + in_o + k])
            in_if[i] = v
            v = np.uint64(0)
            for k in range(ou_l):
                v = (v << eight) | np.uint64(buf[at + ou_o + k])
            out_if[i] = v
            # Addresses: IPv4 mapped, IPv6 right-aligned; with both families in the template, a
            # record is IPv6 when its IPv4 addresses are 0.0.0.0 and an IPv6 one is set.
            s4 = np.uint64(0)
            for k in range(s4_l):
                s4 = (s4 << eight) | np.uint64(buf[at + s4_o + k])
            d4 = np.uint64(0)
            for k in range(d4_l):
                d4 = (d4 << eight) | np.uint64(buf[at + d4_o + k])
            s4, d4 = s4 & np.uint64(0xFFFFFFFF), d4 & np.uint64(0xFFFFFFFF)
            use6 = has6
            if has6 and has4:
                use6 = False
                if s4 == 0 and d4 == 0:
                    for k in range(max(s6_l, 0)):
                        use6 = use6 or buf[at + s6_o + k] != 0
                    for k in range(max(d6_l, 0)):
                        use6 = use6 or buf[at + d6_o + k] != 0
            src_words[i, 0] = 0
            dst_words[i, 0] = 0
            if use6:
                src_words[i, 1] = 0
                dst_words[i, 1] = 0
                for k in range(s6_take):
                    src_addr[i, 16 - s6_take + k] = buf[at + s6_o + s6_l - s6_take + k]
                for k in range(d6_take):
                    dst_addr[i, 16 - d6_take + k] = buf[at + d6_o + d6_l - d6_take + k]
            else:
                src_words[i, 1] = mapped
                dst_words[i, 1] = mapped
                for k in range(4):
                    shift = np.uint64(24 - 8 * k)
                    src_addr[i, 12 + k] = (s4 >> shift) & np.uint64(0xFF)
                    dst_addr[i, 12 + k] = (d4 >> shift) & np.uint64(0xFF)
            at += size
        row += n


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
    """Compile the kernel now (about 3 CPU-s) rather than on the first decoded batch."""
    where = {F.SRC_V4: (0, 4), F.DST_V4: (4, 4), F.OCTET_DELTA: (8, 4), F.START_UPTIME: (12, 4)}
    layout = layout_of(where, 16, 9, [(F.START_UPTIME, TIME_SWITCHED)], [])
    assert layout is not None
    # A read-only buffer, as the datagrams' bytes are: numba compiles one version per array kind.
    buf = np.frombuffer(bytes(16), dtype=np.uint8)
    decode_records(buf, np.zeros(1, dtype=np.int64), [1], [0], [0], [0], [0], [0], [0], [1],
                   np.stack([layout]), np.frombuffer(bytes(16), dtype=np.uint8).reshape(1, 16))
