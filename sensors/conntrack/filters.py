"""Which connections the sensor leaves out (pure): loopback, its own Kafka traffic, chosen CIDRs
and ports. A connection is judged on its orig tuple and the reply source (the peer that
answered), so a filter on a backend address also catches connections to it through a ClusterIP.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable

import numpy as np

from sensors.conntrack.messages import Rows
from sensors.schema import address16

_V4_LOOPBACK = b"\x00" * 10 + b"\xff\xff\x7f"
_V6_LOOPBACK = b"\x00" * 15 + b"\x01"
_PORT_PROTOS = (socket.IPPROTO_TCP, socket.IPPROTO_UDP, socket.IPPROTO_SCTP, socket.IPPROTO_UDPLITE)

#: Returns, for a batch of rows, which to keep and how many were skipped for each reason
#: ("loopback", "kafka", "cidr", "port").
Filter = Callable[[Rows], tuple[np.ndarray, dict[str, int]]]


def _network16(cidr: str) -> tuple[int, int]:
    """(network, mask) of ``cidr`` as 128-bit integers over 16-byte (IPv4-mapped) addresses."""
    net = ipaddress.ip_network(cidr, strict=False)
    if net.version == 4:
        base = int.from_bytes(address16(str(net.network_address)), "big")
        prefix = 96 + net.prefixlen
    else:
        base = int(net.network_address)
        prefix = net.prefixlen
    mask = ((1 << prefix) - 1) << (128 - prefix) if prefix else 0
    return base & mask, mask


def _halves(addresses: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n, 16) addresses as two big-endian 64-bit halves."""
    words = np.ascontiguousarray(addresses).view(">u8").reshape(-1, 2)
    return words[:, 0], words[:, 1]


def make_filter(*, loopback: bool = True, endpoints: Iterable[tuple[bytes, int]] = (),
                cidrs: Iterable[str] = (), ports: Iterable[int] = ()) -> Filter:
    """A filter skipping loopback connections (``loopback``), connections to any of
    ``endpoints`` ((16-byte address, port): the Kafka brokers), with an end in ``cidrs``, or
    (TCP/UDP/SCTP) with an end on one of ``ports``. A row is counted under the first reason
    that applies, in that order."""
    endpoint_list = [(np.frombuffer(a, np.uint8), p) for a, p in sorted(set(endpoints))]
    networks = [(b >> 64, b & (2**64 - 1), m >> 64, m & (2**64 - 1)) for b, m in map(_network16, cidrs)]
    port_list = np.array(sorted(set(ports)), dtype=np.uint16)
    v4_loop = np.frombuffer(_V4_LOOPBACK, np.uint8)
    v6_loop = np.frombuffer(_V6_LOOPBACK, np.uint8)

    def skip(rows: Rows) -> tuple[np.ndarray, dict[str, int]]:
        n = len(rows)
        keep = np.ones(n, dtype=bool)
        counts: dict[str, int] = {}
        if not n:
            return keep, counts

        def drop(reason: str, hit: np.ndarray) -> None:
            hit = hit & keep
            k = int(hit.sum())
            if k:
                counts[reason] = k
                keep[hit] = False

        o_src, o_dst, r_src = rows.orig_src, rows.orig_dst, rows.reply_src
        if loopback:
            drop("loopback", (o_src[:, :13] == v4_loop).all(axis=1) | (o_dst[:, :13] == v4_loop).all(axis=1)
                 | (o_src == v6_loop).all(axis=1) | (o_dst == v6_loop).all(axis=1))
        for address, port in endpoint_list:
            drop("kafka", ((o_dst == address).all(axis=1) & (rows.orig_dport == port))
                 | ((r_src == address).all(axis=1) & (rows.reply_sport == port)))
        if networks:
            hit = np.zeros(n, dtype=bool)
            for a in (o_src, o_dst, r_src):
                hi, lo = _halves(a)
                for base_hi, base_lo, mask_hi, mask_lo in networks:
                    hit |= ((hi & np.uint64(mask_hi)) == base_hi) & ((lo & np.uint64(mask_lo)) == base_lo)
            drop("cidr", hit)
        if len(port_list):
            has_ports = np.isin(rows.proto, _PORT_PROTOS)
            on_port = (np.isin(rows.orig_sport, port_list) | np.isin(rows.orig_dport, port_list)
                       | np.isin(rows.reply_sport, port_list))
            drop("port", has_ports & on_port)
        return keep, counts

    return skip


def resolve_endpoints(bootstrap: str) -> list[tuple[bytes, int]]:
    """The (16-byte address, port) pairs of a Kafka bootstrap list; names are resolved once
    (unresolvable ones are left out: they cannot be connected to either)."""
    out: list[tuple[bytes, int]] = []
    for server in bootstrap.split(","):
        host, _, port = server.strip().rpartition(":")
        host = host.strip("[]")
        try:
            infos = socket.getaddrinfo(host, int(port), proto=socket.IPPROTO_TCP)
        except (OSError, ValueError):
            continue
        for info in infos:
            out.append((address16(str(info[4][0])), int(port)))
    return sorted(set(out))
