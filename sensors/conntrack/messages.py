"""Decoding ctnetlink messages (pure): the bytes netlink hands over -> connection snapshots.

pyroute2's own decoder (``nfct_msg``) builds a tree of attribute objects per message and costs
about 170 µs per connection here, 20 times the budget of a sensor that must keep up with
``conntrack -E``. This module decodes what one wakeup read (hundreds of events, thousands of
dump rows) into columns (:class:`Rows`): messages that share a layout are read at fixed offsets
with numpy, about 1-2 µs per message; the rest go through a walk of the attributes with
``struct`` (:func:`_message`, ~10 µs), the reference the tests hold the fast path to. Tests
also check both against pyroute2's decoding of the same messages.

Layout (linux/netlink.h, linux/netfilter/nfnetlink.h, nfnetlink_conntrack.h): a buffer holds
netlink messages (16-byte header: length, type, flags, seq, pid, host byte order), each followed
by a 4-byte nfgenmsg (family, version, res_id) and attributes (length, type; 4-byte aligned;
values in network byte order, nested ones flagged NLA_F_NESTED).
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Union

import numpy as np

NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_MULTI = 0x2
NLM_F_DUMP_INTR = 0x10

NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_NEW = 0
IPCTNL_MSG_CT_GET = 1
IPCTNL_MSG_CT_DELETE = 2
MSG_NEW = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW
MSG_DELETE = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE

# What a snapshot is: a row of a dump, or an event.
DUMP, NEW, DESTROY = 0, 1, 2

# CTA_* attribute numbers (enum ctattr_type and its nested enums).
_CTA_TUPLE_ORIG, _CTA_TUPLE_REPLY, _CTA_STATUS, _CTA_PROTOINFO = 1, 2, 3, 4
_CTA_COUNTERS_ORIG, _CTA_COUNTERS_REPLY, _CTA_ID, _CTA_ZONE, _CTA_TIMESTAMP = 9, 10, 12, 18, 20
_NLA_TYPE_MASK = 0x3FFF

IPS_SEEN_REPLY = 1 << 1
IPS_ASSURED = 1 << 2
IPS_DST_NAT = 1 << 5

_HDR = struct.Struct("=IHHII")
#: What decode reads: bytes, or a memoryview of bytes (a reused receive buffer).
Buffer = Union[bytes, memoryview]  # noqa: UP007 (a runtime alias)
_NLA = struct.Struct("=HH")
_BE16 = struct.Struct(">H")
_BE32 = struct.Struct(">I")
_BE64 = struct.Struct(">Q")
_V4_PREFIX = b"\x00" * 10 + b"\xff\xff"
_ICMP_PROTOS = (socket.IPPROTO_ICMP, socket.IPPROTO_ICMPV6)


class Tuple(NamedTuple):
    """One direction's tuple. Addresses are 16 bytes (IPv4 mapped). For ICMP/ICMPv6 ``sport`` is
    the echo ID and ``dport`` is ``type << 8 | code`` (NetFlow's convention for ICMP)."""

    src: bytes
    dst: bytes
    sport: int
    dport: int


class Snapshot(NamedTuple):
    """A connection as one message described it (counters are cumulative since it started)."""

    kind: int  # DUMP, NEW or DESTROY
    family: int  # socket.AF_INET / AF_INET6
    proto: int
    zone: int
    ct_id: int
    start_ns: int  # CTA_TIMESTAMP start (0 when nf_conntrack_timestamp was off at its creation)
    stop_ns: int  # CTA_TIMESTAMP stop (DESTROY only; 0 = not given)
    orig: Tuple
    reply: Tuple
    status: int  # IPS_* bits
    tcp_state: int  # TCP_CONNTRACK_* (0 for other protocols)
    orig_packets: int
    orig_bytes: int
    reply_packets: int
    reply_bytes: int
    orig_raw: bytes  # the orig tuple attribute as the kernel sent it: part of the identity key
    length: int  # bytes of the netlink message


def _tuple(buf: bytes, off: int, end: int, proto_out: list[int]) -> Tuple:
    src = dst = b""
    sport = dport = 0
    icmp_type = icmp_code = 0
    proto = 0
    while off + 4 <= end:
        nla_len, nla_type = _NLA.unpack_from(buf, off)
        if nla_len < 4:
            break
        t = nla_type & _NLA_TYPE_MASK
        v = off + 4
        vend = off + nla_len
        if t == 1:  # CTA_TUPLE_IP
            while v + 4 <= vend:
                alen, atype = _NLA.unpack_from(buf, v)
                if alen < 4:
                    break
                a = atype & _NLA_TYPE_MASK
                if a == 1:
                    src = _V4_PREFIX + buf[v + 4:v + 8]
                elif a == 2:
                    dst = _V4_PREFIX + buf[v + 4:v + 8]
                elif a == 3:
                    src = buf[v + 4:v + 20]
                elif a == 4:
                    dst = buf[v + 4:v + 20]
                v += (alen + 3) & ~3
        elif t == 2:  # CTA_TUPLE_PROTO
            while v + 4 <= vend:
                alen, atype = _NLA.unpack_from(buf, v)
                if alen < 4:
                    break
                a = atype & _NLA_TYPE_MASK
                if a == 1:
                    proto = buf[v + 4]
                elif a == 2 or a == 4 or a == 7:  # src port, ICMP id, ICMPv6 id
                    sport = _BE16.unpack_from(buf, v + 4)[0]
                elif a == 3:
                    dport = _BE16.unpack_from(buf, v + 4)[0]
                elif a == 5 or a == 8:
                    icmp_type = buf[v + 4]
                elif a == 6 or a == 9:
                    icmp_code = buf[v + 4]
                v += (alen + 3) & ~3
        off += (nla_len + 3) & ~3
    if proto in _ICMP_PROTOS:
        dport = icmp_type << 8 | icmp_code
    proto_out[0] = proto
    return Tuple(src, dst, sport, dport)


def _counters(buf: bytes, off: int, end: int) -> tuple[int, int]:
    packets = nbytes = 0
    while off + 4 <= end:
        nla_len, nla_type = _NLA.unpack_from(buf, off)
        if nla_len < 4:
            break
        t = nla_type & _NLA_TYPE_MASK
        if t == 1:
            packets = _BE64.unpack_from(buf, off + 4)[0]
        elif t == 2:
            nbytes = _BE64.unpack_from(buf, off + 4)[0]
        elif t == 3:
            packets = _BE32.unpack_from(buf, off + 4)[0]
        elif t == 4:
            nbytes = _BE32.unpack_from(buf, off + 4)[0]
        off += (nla_len + 3) & ~3
    return packets, nbytes


def _message(buf: bytes, off: int, end: int, kind: int, length: int) -> Snapshot | None:
    family = buf[off]
    off += 4  # nfgenmsg
    orig = reply = None
    orig_raw = b""
    status = tcp_state = zone = ct_id = start = stop = 0
    op = ob = rp = rb = 0
    proto = [0]
    while off + 4 <= end:
        nla_len, nla_type = _NLA.unpack_from(buf, off)
        if nla_len < 4:
            break
        t = nla_type & _NLA_TYPE_MASK
        v = off + 4
        vend = off + nla_len
        if t == _CTA_TUPLE_ORIG:
            orig = _tuple(buf, v, vend, proto)
            orig_raw = buf[v:vend]
        elif t == _CTA_TUPLE_REPLY:
            reply = _tuple(buf, v, vend, [0])
        elif t == _CTA_COUNTERS_ORIG:
            op, ob = _counters(buf, v, vend)
        elif t == _CTA_COUNTERS_REPLY:
            rp, rb = _counters(buf, v, vend)
        elif t == _CTA_STATUS:
            status = _BE32.unpack_from(buf, v)[0]
        elif t == _CTA_ID:
            ct_id = _BE32.unpack_from(buf, v)[0]
        elif t == _CTA_ZONE:
            zone = _BE16.unpack_from(buf, v)[0]
        elif t == _CTA_TIMESTAMP:
            while v + 4 <= vend:
                alen, atype = _NLA.unpack_from(buf, v)
                if alen < 4:
                    break
                a = atype & _NLA_TYPE_MASK
                if a == 1:
                    start = _BE64.unpack_from(buf, v + 4)[0]
                elif a == 2:
                    stop = _BE64.unpack_from(buf, v + 4)[0]
                v += (alen + 3) & ~3
        elif t == _CTA_PROTOINFO and v + 12 <= vend:
            # CTA_PROTOINFO_TCP (1) / _SCTP (3), each with its STATE (1) first.
            inner_type = _NLA.unpack_from(buf, v)[1] & _NLA_TYPE_MASK
            if inner_type in (1, 3) and _NLA.unpack_from(buf, v + 4)[1] & _NLA_TYPE_MASK == 1:
                tcp_state = buf[v + 8]
        off += (nla_len + 3) & ~3
    if orig is None or reply is None:
        return None
    return Snapshot(kind, family, proto[0], zone, ct_id, start, stop, orig, reply, status, tcp_state,
                    op, ob, rp, rb, orig_raw, length)


def dump_request(seq: int, family: int = socket.AF_UNSPEC) -> bytes:
    """A ctnetlink GET request with NLM_F_DUMP: every entry of every zone, both families."""
    nlm_f_request, nlm_f_dump = 0x1, 0x300
    payload = struct.pack("=BBH", family, 0, 0)
    return _HDR.pack(16 + len(payload), (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET,
                     nlm_f_request | nlm_f_dump, seq, 0) + payload


# -- columnar decoding --------------------------------------------------------------------------
#
# The sensor decodes a whole wakeup's buffers at once into columns (:class:`Rows`). Messages of
# one type and length usually share their layout (the kernel writes the same attributes in the
# same order), so the first message of such a group is walked once (:func:`_layout`) and every
# other message whose attribute headers (length, type: all that steers the walk) equal the
# first's is read at the same offsets with numpy, for the whole group at once. Other messages,
# and groups too small for numpy to pay, go through :func:`_message`, the reference walk; a test
# checks both give the same rows.

ROW_FIELDS = ("kind", "family", "proto", "zone", "ct_id", "start_ns", "stop_ns", "status", "tcp_state",
               "counters", "orig_src", "orig_dst", "reply_src", "reply_dst",
               "orig_sport", "orig_dport", "reply_sport", "reply_dport")
_DTYPES = {"kind": np.uint8, "family": np.uint8, "proto": np.uint8, "zone": np.uint16, "ct_id": np.uint32,
           "start_ns": np.uint64, "stop_ns": np.uint64, "status": np.uint32, "tcp_state": np.uint8,
           "counters": np.uint64, "orig_src": np.uint8, "orig_dst": np.uint8, "reply_src": np.uint8,
           "reply_dst": np.uint8, "orig_sport": np.uint16, "orig_dport": np.uint16,
           "reply_sport": np.uint16, "reply_dport": np.uint16}
_WIDTH = {"counters": 4, "orig_src": 16, "orig_dst": 16, "reply_src": 16, "reply_dst": 16}
_KEY_END = b"\x01"  # ends every key: numpy's fixed-width bytes would drop trailing NULs
_MIN_GROUP = 6  # smaller groups are walked one by one (numpy's per-call cost would dominate)


@dataclass(slots=True)
class Rows:
    """Snapshots as columns (one row per dump row or event; addresses (n, 16), IPv4 mapped;
    ``counters`` (n, 4): orig packets, orig bytes, reply packets, reply bytes), and each row's
    connection identity ``keys[i]``: the raw bytes of conntrack ID, zone, start timestamp and
    orig tuple attribute, so a dump row of an unchanged connection is matched without decoding
    its tuple into Python objects."""

    kind: np.ndarray
    family: np.ndarray
    proto: np.ndarray
    zone: np.ndarray
    ct_id: np.ndarray
    start_ns: np.ndarray
    stop_ns: np.ndarray
    status: np.ndarray
    tcp_state: np.ndarray
    counters: np.ndarray
    orig_src: np.ndarray
    orig_dst: np.ndarray
    reply_src: np.ndarray
    reply_dst: np.ndarray
    orig_sport: np.ndarray
    orig_dport: np.ndarray
    reply_sport: np.ndarray
    reply_dport: np.ndarray
    keys: list[bytes]

    def __len__(self) -> int:
        return len(self.keys)

    def take(self, index: np.ndarray) -> Rows:
        """The rows at ``index`` (positions or a boolean mask), in that order."""
        picked = np.flatnonzero(index) if index.dtype == np.bool_ else index
        keys = self.keys
        columns: dict[str, Any] = {f: getattr(self, f)[picked] for f in ROW_FIELDS}
        return Rows(**columns, keys=[keys[i] for i in picked.tolist()])

    @staticmethod
    def empty() -> Rows:
        """No rows (one shared, read-only instance)."""
        return _EMPTY

    @staticmethod
    def concat(parts: list[Rows]) -> Rows:
        """``parts`` one after the other."""
        if len(parts) == 1:
            return parts[0]
        if not parts:
            return Rows.empty()
        columns: dict[str, Any] = {f: np.concatenate([getattr(p, f) for p in parts]) for f in ROW_FIELDS}
        return Rows(**columns, keys=[k for p in parts for k in p.keys])


def _empty() -> Rows:
    columns: dict[str, Any] = {f: np.zeros((0, _WIDTH[f]) if f in _WIDTH else 0, _DTYPES[f])
                               for f in ROW_FIELDS}
    for column in columns.values():
        column.flags.writeable = False
    return Rows(**columns, keys=[])


_EMPTY = _empty()


def snapshot_key(s: Snapshot) -> bytes:
    """The identity key of the connection ``s`` describes (see :class:`Rows`)."""
    return (s.ct_id.to_bytes(4, "big") + s.zone.to_bytes(2, "big") + s.start_ns.to_bytes(8, "big")
            + s.orig_raw + _KEY_END)


def _addr16(a: bytes) -> bytes:
    return a if len(a) == 16 else b"\x00" * 16


def rows_from_snapshots(snapshots: list[Snapshot]) -> Rows:
    """The rows of ``snapshots`` (the walk's output, and tests' hand-made connections)."""
    if not snapshots:
        return Rows.empty()
    cols = list(zip(*((s.kind, s.family, s.proto, s.zone, s.ct_id, s.start_ns, s.stop_ns, s.status,
                       s.tcp_state, s.orig.sport, s.orig.dport, s.reply.sport, s.reply.dport)
                      for s in snapshots), strict=True))
    n = len(snapshots)
    names = ("kind", "family", "proto", "zone", "ct_id", "start_ns", "stop_ns", "status", "tcp_state",
             "orig_sport", "orig_dport", "reply_sport", "reply_dport")
    scalars = dict(zip(names, cols, strict=True))

    def addresses(get: Any) -> np.ndarray:
        return np.frombuffer(b"".join(_addr16(get(s)) for s in snapshots), np.uint8).reshape(n, 16).copy()

    return Rows(
        **{f: np.array(scalars[f], dtype=_DTYPES[f]) for f in scalars},
        counters=np.array([(s.orig_packets, s.orig_bytes, s.reply_packets, s.reply_bytes) for s in snapshots],
                          dtype=np.uint64).reshape(n, 4),
        orig_src=addresses(lambda s: s.orig.src), orig_dst=addresses(lambda s: s.orig.dst),
        reply_src=addresses(lambda s: s.reply.src), reply_dst=addresses(lambda s: s.reply.dst),
        keys=[snapshot_key(s) for s in snapshots])


class _Layout(NamedTuple):
    """Where one message's values are, as offsets from its start (-1: absent), and the offsets
    of every attribute header the walk read (the bytes that must match for another message to
    share the layout). Tuples: (src, src size, dst, dst size, proto, sport, dport, icmp type,
    icmp code); counters: (packets, size, bytes, size)."""

    headers: tuple[int, ...]
    orig: tuple[int, ...]
    reply: tuple[int, ...]
    orig_raw: tuple[int, int]
    counters_orig: tuple[int, int, int, int]
    counters_reply: tuple[int, int, int, int]
    status: int
    ct_id: int
    zone: int
    start: int
    stop: int
    tcp_state: int


def _tuple_layout(buf: Buffer, base: int, off: int, end: int, headers: list[int]) -> tuple[int, ...] | None:
    # Mirrors _tuple: the same attributes, the last of a kind wins.
    src = src_size = dst = dst_size = proto = sport = dport = itype = icode = -1
    while off + 4 <= end:
        headers.append(off - base)
        nla_len, nla_type = _NLA.unpack_from(buf, off)
        if nla_len < 4:
            break
        t = nla_type & _NLA_TYPE_MASK
        v = off + 4
        vend = off + nla_len
        if vend > end:
            return None
        if t == 1 or t == 2:
            while v + 4 <= vend:
                headers.append(v - base)
                alen, atype = _NLA.unpack_from(buf, v)
                if alen < 4:
                    break
                a = atype & _NLA_TYPE_MASK
                x = v + 4 - base
                if v + alen > end:
                    return None
                if t == 1:
                    if (a in (1, 2) and alen < 8) or (a in (3, 4) and alen < 20):
                        return None
                    if a == 1:
                        src, src_size = x, 4
                    elif a == 2:
                        dst, dst_size = x, 4
                    elif a == 3:
                        src, src_size = x, 16
                    elif a == 4:
                        dst, dst_size = x, 16
                else:
                    if alen < (6 if a in (2, 3, 4, 7) else 5):
                        return None
                    if a == 1:
                        proto = x
                    elif a == 2 or a == 4 or a == 7:
                        sport = x
                    elif a == 3:
                        dport = x
                    elif a == 5 or a == 8:
                        itype = x
                    elif a == 6 or a == 9:
                        icode = x
                v += (alen + 3) & ~3
        off += (nla_len + 3) & ~3
    return (src, src_size, dst, dst_size, proto, sport, dport, itype, icode)


def _counters_layout(buf: Buffer, base: int, off: int, end: int,
                     headers: list[int]) -> tuple[int, int, int, int]:
    packets = psize = nbytes = bsize = -1
    while off + 4 <= end:
        headers.append(off - base)
        nla_len, nla_type = _NLA.unpack_from(buf, off)
        if nla_len < 4:
            break
        t = nla_type & _NLA_TYPE_MASK
        size = 8 if t in (1, 2) else 4
        if t in (1, 2, 3, 4) and (nla_len < 4 + size or off + 4 + size > end):
            return (-2, 0, 0, 0)
        if t == 1 or t == 3:
            packets, psize = off + 4 - base, size
        elif t == 2 or t == 4:
            nbytes, bsize = off + 4 - base, size
        off += (nla_len + 3) & ~3
    return (packets, psize, nbytes, bsize)


def _layout(buf: Buffer, base: int, end: int) -> _Layout | None:
    """The layout of the message at ``base`` (mirrors :func:`_message`), or None when a value
    would lie outside the message (such messages are left to the walk)."""
    headers: list[int] = []
    orig = reply = None
    orig_raw = (0, 0)
    co = cr = (-1, 0, -1, 0)
    status = ct_id = zone = start = stop = tcp_state = -1
    off = base + 20
    while off + 4 <= end:
        headers.append(off - base)
        nla_len, nla_type = _NLA.unpack_from(buf, off)
        if nla_len < 4:
            break
        t = nla_type & _NLA_TYPE_MASK
        v = off + 4
        vend = off + nla_len
        if vend > end:
            return None
        if t == _CTA_TUPLE_ORIG:
            orig = _tuple_layout(buf, base, v, vend, headers)
            orig_raw = (v - base, vend - base)
            if orig is None:
                return None
        elif t == _CTA_TUPLE_REPLY:
            reply = _tuple_layout(buf, base, v, vend, headers)
            if reply is None:
                return None
        elif t in (_CTA_COUNTERS_ORIG, _CTA_COUNTERS_REPLY):
            c = _counters_layout(buf, base, v, vend, headers)
            if c[0] == -2:
                return None
            if t == _CTA_COUNTERS_ORIG:
                co = c
            else:
                cr = c
        elif t in (_CTA_STATUS, _CTA_ID, _CTA_ZONE):
            if v + (2 if t == _CTA_ZONE else 4) > end:
                return None
            if t == _CTA_STATUS:
                status = v - base
            elif t == _CTA_ID:
                ct_id = v - base
            else:
                zone = v - base
        elif t == _CTA_TIMESTAMP:
            while v + 4 <= vend:
                headers.append(v - base)
                alen, atype = _NLA.unpack_from(buf, v)
                if alen < 4:
                    break
                a = atype & _NLA_TYPE_MASK
                if v + alen > end or (a in (1, 2) and alen < 12):
                    return None
                if a == 1:
                    start = v + 4 - base
                elif a == 2:
                    stop = v + 4 - base
                v += (alen + 3) & ~3
        elif t == _CTA_PROTOINFO and v + 12 <= vend:
            headers.append(v - base)
            headers.append(v + 4 - base)
            inner_type = _NLA.unpack_from(buf, v)[1] & _NLA_TYPE_MASK
            if inner_type in (1, 3) and _NLA.unpack_from(buf, v + 4)[1] & _NLA_TYPE_MASK == 1:
                tcp_state = v + 8 - base
        off += (nla_len + 3) & ~3
    if orig is None or reply is None:
        return None
    return _Layout(tuple(headers), orig, reply, orig_raw, co, cr, status, ct_id, zone, start, stop, tcp_state)


def _column(m: np.ndarray, off: int, size: int) -> np.ndarray:
    """The big-endian unsigned values of ``size`` bytes at ``off`` of each row of ``m`` (0 when
    ``off`` is -1), as uint64."""
    n = len(m)
    if off < 0:
        return np.zeros(n, np.uint64)
    if size == 1:
        return m[:, off].astype(np.uint64)
    return np.ascontiguousarray(m[:, off:off + size]).view(f">u{size}").reshape(n).astype(np.uint64)


def _address(m: np.ndarray, off: int, size: int) -> np.ndarray:
    out = np.zeros((len(m), 16), np.uint8)
    if size == 4:
        out[:, 10:12] = 0xFF
        out[:, 12:] = m[:, off:off + 4]
    elif size == 16:
        out[:] = m[:, off:off + 16]
    return out


def _tuple_columns(m: np.ndarray, t: tuple[int, ...]) -> tuple[np.ndarray, ...]:
    src, src_size, dst, dst_size, proto_at, sport_at, dport_at, itype, icode = t
    proto = _column(m, proto_at, 1)
    sport = _column(m, sport_at, 2)
    dport = _column(m, dport_at, 2)
    icmp = (proto == socket.IPPROTO_ICMP) | (proto == socket.IPPROTO_ICMPV6)
    if icmp.any():
        dport = np.where(icmp, _column(m, itype, 1) << np.uint64(8) | _column(m, icode, 1), dport)
    return _address(m, src, src_size), _address(m, dst, dst_size), proto, sport, dport


def _group_rows(m: np.ndarray, lay: _Layout, kind: int) -> Rows:
    """The rows of the messages ``m`` (one per row of bytes) that share ``lay``."""
    n = len(m)
    osrc, odst, proto, osport, odport = _tuple_columns(m, lay.orig)
    rsrc, rdst, _, rsport, rdport = _tuple_columns(m, lay.reply)
    counters = np.empty((n, 4), np.uint64)
    for i, (off, size) in enumerate((lay.counters_orig[:2], lay.counters_orig[2:],
                                     lay.counters_reply[:2], lay.counters_reply[2:])):
        counters[:, i] = _column(m, off, size)
    # The key: ID, zone, start, orig tuple attribute as sent, then _KEY_END.
    a, b = lay.orig_raw
    width = 14 + (b - a) + 1
    key = np.zeros((n, width), np.uint8)
    if lay.ct_id >= 0:
        key[:, 0:4] = m[:, lay.ct_id:lay.ct_id + 4]
    if lay.zone >= 0:
        key[:, 4:6] = m[:, lay.zone:lay.zone + 2]
    if lay.start >= 0:
        key[:, 6:14] = m[:, lay.start:lay.start + 8]
    key[:, 14:width - 1] = m[:, a:b]
    key[:, width - 1] = 1
    keys = key.view(f"S{width}").reshape(n).tolist()
    return Rows(kind=np.full(n, kind, np.uint8), family=m[:, 16].copy(), proto=proto.astype(np.uint8),
                zone=_column(m, lay.zone, 2).astype(np.uint16),
                ct_id=_column(m, lay.ct_id, 4).astype(np.uint32),
                start_ns=_column(m, lay.start, 8), stop_ns=_column(m, lay.stop, 8),
                status=_column(m, lay.status, 4).astype(np.uint32),
                tcp_state=_column(m, lay.tcp_state, 1).astype(np.uint8), counters=counters,
                orig_src=osrc, orig_dst=odst, reply_src=rsrc, reply_dst=rdst,
                orig_sport=osport.astype(np.uint16), orig_dport=odport.astype(np.uint16),
                reply_sport=rsport.astype(np.uint16), reply_dport=rdport.astype(np.uint16), keys=keys)


@dataclass(slots=True)
class Batch:
    """What the buffers of one wakeup held: rows, and how a dump stream ended if it did."""

    rows: Rows
    news: int = 0  # NEW events (counted, not decoded unless asked)
    destroys: int = 0  # DESTROY events
    messages: int = 0  # conntrack messages (events and dump rows)
    done: bool = False
    interrupted: bool = False
    errors: int = 0
    last_error: int = 0
    skipped: int = 0


def _split(data: Buffer, bounds: list[tuple[int, int]], dump: bool, news: bool,
           out: Batch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Start, length and kind of each message to decode, walking the headers one by one."""
    # Message boundaries stay within each datagram: a message never spans two.
    starts: list[int] = []
    lengths: list[int] = []
    kinds: list[int] = []
    unpack = _HDR.unpack_from
    for off, n in bounds:
        while off + 16 <= n:
            length, mtype, flags, _seq, _pid = unpack(data, off)
            if length < 16 or off + length > n:
                out.skipped += 1
                break
            if mtype in (MSG_NEW, MSG_DELETE):
                if flags & NLM_F_DUMP_INTR:
                    out.interrupted = True
                out.messages += 1
                if dump:
                    kind = DUMP
                elif mtype == MSG_DELETE:
                    kind = DESTROY
                    out.destroys += 1
                else:
                    kind = NEW
                    out.news += 1
                if kind != NEW or news:
                    if length < 20:
                        out.skipped += 1
                    else:
                        starts.append(off)
                        lengths.append(length)
                        kinds.append(kind)
            elif mtype == NLMSG_DONE:
                out.done = True
                if flags & NLM_F_DUMP_INTR:
                    out.interrupted = True
            elif mtype == NLMSG_ERROR:
                error = -struct.unpack_from("=i", data, off + 16)[0] if length >= 20 else 0
                if error:
                    out.errors += 1
                    out.last_error = error
            else:
                out.skipped += 1
            off += (length + 3) & ~3
    return np.array(starts, np.int64), np.array(lengths, np.int64), np.array(kinds, np.uint8)


def _one_per_datagram(arr: np.ndarray, start: np.ndarray, end: np.ndarray, dump: bool, news: bool,
                      out: Batch) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """The same as :func:`_split` with numpy when every datagram holds exactly one conntrack
    message (events come so), else None."""
    if int((end - start).min()) < 20:
        return None
    hdr = arr[start[:, None] + np.arange(8)]
    length = hdr[:, 0:4].copy().view(np.uint32).reshape(-1).astype(np.int64)  # host byte order
    mtype = hdr[:, 4:6].copy().view(np.uint16).reshape(-1)
    flags = hdr[:, 6:8].copy().view(np.uint16).reshape(-1)
    # The message fills its datagram (what follows it is too short to be another one).
    if not ((length >= 20) & (start + length <= end) & (end - start - ((length + 3) & ~3) < 16)).all():
        return None
    delete = mtype == MSG_DELETE
    if not (delete | (mtype == MSG_NEW)).all():
        return None
    if (flags & NLM_F_DUMP_INTR).any():
        out.interrupted = True
    n = len(end)
    out.messages += n
    if dump:
        return start, length, np.full(n, DUMP, np.uint8)
    destroys = int(delete.sum())
    out.destroys += destroys
    out.news += n - destroys
    kinds = np.where(delete, DESTROY, NEW).astype(np.uint8)
    if news:
        return start, length, kinds
    return start[delete], length[delete], kinds[delete]


def decode(data: Buffer, ends: Sequence[int] | np.ndarray | None = None, dump: bool = False, *,
           starts: Sequence[int] | np.ndarray | None = None, news: bool = False,
           min_group: int = _MIN_GROUP) -> Batch:
    """Decode every message of ``data`` (datagrams read from a ctnetlink socket: datagram i
    spans ``starts[i]:ends[i]``; ``starts`` None: back to back; ``ends`` None: one datagram)
    into rows, in the order received. ``dump``: the messages are dump rows; otherwise NEW events
    are only counted (they report nothing: see :mod:`sensors.conntrack.tracker`) unless
    ``news``. ``min_group`` 0 walks every message one by one (the reference, for tests). The
    rows share no memory with ``data``."""
    out = Batch(Rows.empty())
    arr = np.frombuffer(data, np.uint8)
    end = np.asarray(ends if ends is not None else [len(arr)], dtype=np.int64)
    start = np.asarray(starts, dtype=np.int64) if starts is not None else np.concatenate(([0], end[:-1]))
    found = None
    if min_group and len(end) >= min_group:
        found = _one_per_datagram(arr, start, end, dump, news, out)
    if found is None:
        found = _split(data, list(zip(start.tolist(), end.tolist(), strict=True)), dump, news, out)
    starts, lengths, kinds = found
    if not len(starts):
        return out
    # Group by (kind, length); big groups by layout, the rest walked.
    parts: list[Rows] = []
    order: list[np.ndarray] = []
    walk: list[int] = []
    if not min_group or len(starts) < min_group:
        walk = list(range(len(starts)))
    else:
        group_keys, group_of = np.unique(kinds.astype(np.int64) << 32 | lengths, return_inverse=True)
        group_of = group_of.reshape(-1)
        for g, group_key in enumerate(group_keys.tolist()):
            kind, length = group_key >> 32, group_key & 0xFFFFFFFF
            idx = np.flatnonzero(group_of == g) if len(group_keys) > 1 else np.arange(len(starts))
            if len(idx) < min_group:
                walk += idx.tolist()
                continue
            offs = starts[idx]
            m = arr[offs[:, None] + np.arange(length)]
            while len(idx) >= min_group:
                lay = _layout(data, int(offs[0]), int(offs[0]) + length)
                if lay is None:
                    walk.append(int(idx[0]))
                    idx, offs, m = idx[1:], offs[1:], m[1:]
                    continue
                cols = np.array([h + j for h in lay.headers for j in range(4)], np.int64)
                same = (m[:, cols] == m[0, cols]).all(axis=1)
                parts.append(_group_rows(m[same] if not same.all() else m, lay, kind))
                order.append(idx[same])
                rest = ~same
                idx, offs, m = idx[rest], offs[rest], m[rest]
            walk += idx.tolist()
    if walk:
        snaps: list[Snapshot] = []
        placed: list[int] = []
        start_list, length_list, kind_list = starts.tolist(), lengths.tolist(), kinds.tolist()
        for i in sorted(walk):
            at, length = start_list[i], length_list[i]
            message = bytes(data[at:at + length])  # data may be a reused buffer
            s = _message(message, 16, length, kind_list[i], length)
            if s is None:
                out.skipped += 1
            else:
                snaps.append(s)
                placed.append(i)
        if snaps:
            parts.append(rows_from_snapshots(snaps))
            order.append(np.array(placed))
    rows = Rows.concat(parts)
    if len(parts) > 1:
        rows = rows.take(np.argsort(np.concatenate(order), kind="stable"))
    out.rows = rows
    return out
