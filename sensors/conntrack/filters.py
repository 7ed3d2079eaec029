"""Which connections the sensor leaves out (pure): loopback, its own Kafka traffic, chosen CIDRs
and ports. A connection is judged on its orig tuple and the reply source (the peer that
answered), so a filter on a backend address also catches connections to it through a ClusterIP.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable

from sensors.conntrack.messages import Snapshot
from sensors.schema import address16

_V4_LOOPBACK = b"\x00" * 10 + b"\xff\xff\x7f"
_V6_LOOPBACK = b"\x00" * 15 + b"\x01"
_PORT_PROTOS = (socket.IPPROTO_TCP, socket.IPPROTO_UDP, socket.IPPROTO_SCTP, socket.IPPROTO_UDPLITE)

#: Returns the reason to skip a snapshot ("loopback", "kafka", "cidr", "port") or None.
Filter = Callable[[Snapshot], str | None]


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


def make_filter(*, loopback: bool = True, endpoints: Iterable[tuple[bytes, int]] = (),
                cidrs: Iterable[str] = (), ports: Iterable[int] = ()) -> Filter:
    """A filter skipping loopback connections (``loopback``), connections to any of
    ``endpoints`` ((16-byte address, port): the Kafka brokers), with an end in ``cidrs``, or
    (TCP/UDP/SCTP) with an end on one of ``ports``."""
    endpoint_set = frozenset(endpoints)
    networks = [_network16(c) for c in cidrs]
    port_set = frozenset(ports)

    def skip(s: Snapshot) -> str | None:
        o = s.orig
        if loopback and (o.src.startswith(_V4_LOOPBACK) or o.dst.startswith(_V4_LOOPBACK)
                         or o.src == _V6_LOOPBACK or o.dst == _V6_LOOPBACK):
            return "loopback"
        if endpoint_set and ((o.dst, o.dport) in endpoint_set
                             or (s.reply.src, s.reply.sport) in endpoint_set):
            return "kafka"
        if networks:
            for address in (o.src, o.dst, s.reply.src):
                value = int.from_bytes(address, "big")
                if any(value & mask == base for base, mask in networks):
                    return "cidr"
        if port_set and s.proto in _PORT_PROTOS and (
                o.sport in port_set or o.dport in port_set or s.reply.sport in port_set):
            return "port"
        return None

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
