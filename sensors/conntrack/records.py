"""Deltas -> raw.v1 columns (pure).

Each delta gives up to two records, one per direction that moved:

- orig direction: src = orig source (the initiator), dst = reply source (the peer that answered,
  e.g. the backend pod behind a ClusterIP), the orig counters' delta, ``initiator`` 1;
- reply direction: src = reply source, dst = orig source, the reply counters' delta,
  ``initiator`` 2.

When the orig destination is not the reply source (DNAT: ClusterIP, NodePort), both records
carry ``nat_addr``/``nat_port`` = the orig destination the client addressed. ICMP: src_port 0,
dst_port ``type << 8 | code`` of that direction. ``start`` is the connection's start (conntrack
timestamp; the report time when the kernel had none), ``end`` the report time, or the kernel's
stop time for a DESTROY.
"""

from __future__ import annotations

import socket
from typing import Any

import numpy as np
import pyarrow as pa

from sensors.conntrack.messages import (
    DESTROY,
    IPS_ASSURED,
    IPS_SEEN_REPLY,
    Snapshot,
)
from sensors.conntrack.tracker import Delta
from sensors.schema import build_raw_table

_ICMP_PROTOS = (socket.IPPROTO_ICMP, socket.IPPROTO_ICMPV6)
_NO_ADDR = b"\x00" * 16

# TCP_CONNTRACK_* (linux/netfilter/nf_conntrack_tcp.h)
_TCP_SYN_SENT, _TCP_SYN_RECV, _TCP_ESTABLISHED = 1, 2, 3
_TCP_CLOSING = (4, 5, 6, 7)  # FIN_WAIT, CLOSE_WAIT, LAST_ACK, TIME_WAIT
_TCP_CLOSE = 8


def conn_state(s: Snapshot) -> str:
    """One of sensors.schema.CONN_STATES for the connection as ``s`` saw it."""
    replied = bool(s.status & IPS_SEEN_REPLY)
    if s.proto != socket.IPPROTO_TCP:
        return "established" if replied else "unreplied"
    state = s.tcp_state
    if state == _TCP_ESTABLISHED:
        return "established"
    if state in _TCP_CLOSING:
        return "closing"
    if state == _TCP_CLOSE:
        # A reset ended a connection that had been established (ASSURED), or answered the SYN:
        # the kernel then kills the entry at once, before it marks it SEEN_REPLY.
        if s.status & IPS_ASSURED:
            return "closing"
        return "refused" if replied or s.reply_packets else "unreplied"
    if not replied:
        return "unreplied"
    # SYN_RECV / SYN_SENT2: the peer answered the SYN but the handshake never completed.
    return "established" if s.status & IPS_ASSURED else "unreplied"


def build_columns(deltas: list[Delta], now_ms: int, *, exporter: bytes = _NO_ADDR) -> dict[str, Any]:
    """The raw.v1 columns of the records of ``deltas`` (see the module docstring)."""
    time_received: list[int] = []
    domain: list[int] = []
    start: list[int] = []
    end: list[int] = []
    src: list[bytes] = []
    dst: list[bytes] = []
    sport: list[int] = []
    dport: list[int] = []
    proto: list[int] = []
    nbytes: list[int] = []
    packets: list[int] = []
    nat_addr: list[bytes] = []
    nat_port: list[int] = []
    initiator: list[int] = []
    state: list[str] = []
    states: dict[tuple[int, int, int, bool], str] = {}
    for d in deltas:
        s = d.snapshot
        o, r = s.orig, s.reply
        stop_ms = s.stop_ns // 1_000_000 if s.kind == DESTROY and s.stop_ns else now_ms
        start_ms = s.start_ns // 1_000_000 if s.start_ns else stop_ms
        start_ms = min(start_ms, stop_ms)
        translated = o.dst != r.src or (o.dport != r.sport and s.proto not in _ICMP_PROTOS)
        na, np_ = (o.dst, o.dport) if translated else (_NO_ADDR, 0)
        if s.proto in _ICMP_PROTOS:
            na, np_ = (o.dst, 0) if o.dst != r.src else (_NO_ADDR, 0)
        skey = (s.proto, s.tcp_state, s.status & (IPS_SEEN_REPLY | IPS_ASSURED), s.reply_packets > 0)
        st = states.get(skey)
        if st is None:
            st = states[skey] = conn_state(s)
        icmp = s.proto in _ICMP_PROTOS
        if d.orig_packets or d.orig_bytes:
            src.append(o.src)
            dst.append(r.src)
            sport.append(0 if icmp else o.sport)
            dport.append(o.dport if icmp else r.sport)
            nbytes.append(d.orig_bytes)
            packets.append(d.orig_packets)
            initiator.append(1)
            time_received.append(now_ms)
            domain.append(s.zone)
            start.append(start_ms)
            end.append(stop_ms)
            proto.append(s.proto)
            nat_addr.append(na)
            nat_port.append(np_)
            state.append(st)
        if d.reply_packets or d.reply_bytes:
            src.append(r.src)
            dst.append(o.src)
            sport.append(0 if icmp else r.sport)
            dport.append(r.dport if icmp else o.sport)
            nbytes.append(d.reply_bytes)
            packets.append(d.reply_packets)
            initiator.append(2)
            time_received.append(now_ms)
            domain.append(s.zone)
            start.append(start_ms)
            end.append(stop_ms)
            proto.append(s.proto)
            nat_addr.append(na)
            nat_port.append(np_)
            state.append(st)
    n = len(src)
    return {
        "time_received": np.array(time_received, dtype=np.int64),
        "exporter": np.frombuffer(exporter * n, dtype=np.uint8).reshape(n, 16),
        "observation_domain": np.array(domain, dtype=np.uint32),
        "version": np.zeros(n, dtype=np.uint16),
        "start": np.array(start, dtype=np.int64),
        "end": np.array(end, dtype=np.int64),
        "src_addr": np.frombuffer(b"".join(src), dtype=np.uint8).reshape(n, 16),
        "dst_addr": np.frombuffer(b"".join(dst), dtype=np.uint8).reshape(n, 16),
        "src_port": np.array(sport, dtype=np.uint16),
        "dst_port": np.array(dport, dtype=np.uint16),
        "proto": np.array(proto, dtype=np.uint8),
        "bytes": np.array(nbytes, dtype=np.uint64),
        "packets": np.array(packets, dtype=np.uint64),
        "nat_addr": np.frombuffer(b"".join(nat_addr), dtype=np.uint8).reshape(n, 16),
        "nat_port": np.array(nat_port, dtype=np.uint16),
        "initiator": np.array(initiator, dtype=np.uint8),
        "conn_state": state,
    }


def build_table(deltas: list[Delta], now_ms: int, observer: str, *, exporter: bytes = _NO_ADDR) -> pa.Table:
    """A raw.v1 table of the records of ``deltas`` (observer = the node name)."""
    return build_raw_table(build_columns(deltas, now_ms, exporter=exporter), observer=observer)
