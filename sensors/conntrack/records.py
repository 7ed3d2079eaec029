"""Deltas -> raw.v1 columns (pure).

Each delta gives up to two records, one per direction that moved:

- orig direction: src = orig source (the initiator), dst = reply source (the peer that answered,
  e.g. the backend pod behind a ClusterIP), the orig counters' delta, ``initiator`` 1;
- reply direction: src = reply source, dst = orig source, the reply counters' delta,
  ``initiator`` 2.

When the orig destination is not the reply source (DNAT: ClusterIP, NodePort), both records
carry ``nat_addr``/``nat_port`` = the orig destination the client addressed. ICMP: src_port 0,
dst_port ``type << 8 | code`` of that direction (also in ``icmp_type``/``icmp_code``). ``start``
is the connection's start (conntrack timestamp; the report time when the kernel had none),
``end`` the report time, or the kernel's stop time for a DESTROY.
"""

from __future__ import annotations

import socket
from typing import Any

import numpy as np
import pyarrow as pa

from sensors.conntrack.messages import DESTROY, IPS_ASSURED, IPS_SEEN_REPLY, Rows
from sensors.conntrack.tracker import Deltas
from sensors.schema import build_raw_table, icmp_from_port

_NO_ADDR = b"\x00" * 16

# TCP_CONNTRACK_* (linux/netfilter/nf_conntrack_tcp.h)
_TCP_SYN_SENT, _TCP_SYN_RECV, _TCP_ESTABLISHED = 1, 2, 3
_TCP_CLOSING = (4, 5, 6, 7)  # FIN_WAIT, CLOSE_WAIT, LAST_ACK, TIME_WAIT
_TCP_CLOSE = 8


def conn_state(proto: int, tcp_state: int, status: int, reply_packets: int) -> str:
    """One of sensors.schema.CONN_STATES for a connection as one snapshot saw it."""
    replied = bool(status & IPS_SEEN_REPLY)
    if proto != socket.IPPROTO_TCP:
        return "established" if replied else "unreplied"
    state = tcp_state
    if state == _TCP_ESTABLISHED:
        return "established"
    if state in _TCP_CLOSING:
        return "closing"
    if state == _TCP_CLOSE:
        # A reset ended a connection that had been established (ASSURED), or answered the SYN:
        # the kernel then kills the entry at once, before it marks it SEEN_REPLY.
        if status & IPS_ASSURED:
            return "closing"
        return "refused" if replied or reply_packets else "unreplied"
    if not replied:
        return "unreplied"
    # SYN_RECV / SYN_SENT2: the peer answered the SYN but the handshake never completed.
    return "established" if status & IPS_ASSURED else "unreplied"


def _states(rows: Rows) -> np.ndarray:
    """conn_state of each row, as an object array (computed once per distinct input)."""
    code = (rows.proto.astype(np.uint32) << 16 | rows.tcp_state.astype(np.uint32) << 8
            | (rows.status & (IPS_SEEN_REPLY | IPS_ASSURED)).astype(np.uint32) << 1
            | (rows.counters[:, 2] > 0).astype(np.uint32))
    distinct, inverse = np.unique(code, return_inverse=True)
    names = np.array([conn_state(int(c) >> 16, int(c) >> 8 & 0xFF, int(c) >> 1 & 0x7F, int(c) & 1)
                      for c in distinct.tolist()], dtype=object)
    return names[inverse.reshape(-1)]


def build_columns(rows: Rows, deltas: Deltas, now_ms: int, *, exporter: bytes = _NO_ADDR) -> dict[str, Any]:
    """The raw.v1 columns of the records of ``deltas`` over ``rows`` (see the module docstring),
    orig-direction record before reply-direction record of each connection."""
    # Positions only increase (a row reports at most once): as many as rows = every row.
    r = rows if len(deltas.positions) == len(rows) else rows.take(np.asarray(deltas.positions, np.int64))
    m = len(r)
    d = np.asarray(deltas.counters, dtype=np.uint64).reshape(m, 4)
    icmp = (r.proto == socket.IPPROTO_ICMP) | (r.proto == socket.IPPROTO_ICMPV6)
    now = np.int64(now_ms)
    stop_ms = np.where((r.kind == DESTROY) & (r.stop_ns != 0), (r.stop_ns // 1_000_000).astype(np.int64), now)
    start_ms = np.where(r.start_ns != 0, (r.start_ns // 1_000_000).astype(np.int64), stop_ms)
    start_ms = np.minimum(start_ms, stop_ms)
    # DNAT: the client addressed something else than what answered (ICMP: the address only).
    translated = (r.orig_dst != r.reply_src).any(axis=1) | ((r.orig_dport != r.reply_sport) & ~icmp)
    nat_addr = np.where(translated[:, None], r.orig_dst, np.uint8(0))
    nat_port = np.where(translated & ~icmp, r.orig_dport, 0).astype(np.uint16)
    zero16 = np.zeros(m, np.uint16)
    # Both directions side by side, then only those that moved: (m, 2) -> 2m rows.
    moved = np.stack([(d[:, 0] | d[:, 1]) != 0, (d[:, 2] | d[:, 3]) != 0], axis=1).reshape(-1)

    def pair(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.stack([a, b], axis=1).reshape((2 * m, *a.shape[1:]))[moved]

    def both(a: np.ndarray) -> np.ndarray:
        return np.repeat(a, 2, axis=0)[moved]

    n = int(moved.sum())
    proto = both(r.proto)
    dst_port = pair(np.where(icmp, r.orig_dport, r.reply_sport), np.where(icmp, r.reply_dport, r.orig_sport))
    icmp_type, icmp_code = icmp_from_port(proto, dst_port)
    return {
        "time_received": np.full(n, now_ms, dtype=np.int64),
        "exporter": np.frombuffer(exporter * n, dtype=np.uint8).reshape(n, 16),
        "observation_domain": both(r.zone).astype(np.uint32),
        "version": np.zeros(n, dtype=np.uint16),
        "start": both(start_ms),
        "end": both(stop_ms),
        "src_addr": pair(r.orig_src, r.reply_src),
        "dst_addr": pair(r.reply_src, r.orig_src),
        "src_port": pair(np.where(icmp, zero16, r.orig_sport), np.where(icmp, zero16, r.reply_sport)),
        "dst_port": dst_port,
        "proto": proto,
        "icmp_type": icmp_type,
        "icmp_code": icmp_code,
        "bytes": pair(d[:, 1], d[:, 3]),
        "packets": pair(d[:, 0], d[:, 2]),
        "nat_addr": both(nat_addr),
        "nat_port": both(nat_port),
        "initiator": pair(np.ones(m, np.uint8), np.full(m, 2, np.uint8)),
        "conn_state": both(_states(r)) if m else np.zeros(0, dtype=object),
    }


def build_table(rows: Rows, deltas: Deltas, now_ms: int, observer: str, *,
                exporter: bytes = _NO_ADDR) -> pa.Table:
    """A raw.v1 table of the records of ``deltas`` over ``rows`` (observer = the node name)."""
    return build_raw_table(build_columns(rows, deltas, now_ms, exporter=exporter), observer=observer)
