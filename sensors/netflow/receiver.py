"""The UDP socket of a sensor: dual-stack bind, big buffer, kernel drop counter, batched reads.

asyncio's datagram endpoint makes one callback (and one address tuple and bytes object) per
datagram and cannot return ancillary data, so the kernel's drop counter (``SO_RXQ_OVFL``) would
be out of reach. :class:`UdpReceiver` instead registers the socket with ``loop.add_reader`` and,
on each wakeup, drains it with non-blocking ``recvmsg`` calls until ``EAGAIN`` (or a per-wakeup
budget, so the loop still serves timers and the Kafka producer), then hands the whole batch to
its callback as parallel lists: payloads, source hosts, and one receive time for the wakeup.

``SO_RXQ_OVFL``: the kernel attaches to a datagram the socket's cumulative count of datagrams it
dropped because the receive buffer was full, when that count is non-zero. The receiver keeps the
highest value seen in :attr:`UdpReceiver.kernel_drops` (0 until a drop happened).

``SO_REUSEPORT`` (``reuse_port=True``): several processes bind the same port and the kernel
spreads datagrams between their sockets by a hash of the 4-tuple, so one exporter (one source
address and port) always lands on the same socket, and its templates stay in one process.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import struct
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

SO_RXQ_OVFL = getattr(socket, "SO_RXQ_OVFL", 40)  # Linux; missing from Python's socket module
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
MAX_DATAGRAM = 65535
_ANC_SIZE = socket.CMSG_SPACE(4)
_SOL_SOCKET = int(socket.SOL_SOCKET)
_U32 = struct.Struct("=I")
_MSG_TRUNC = int(socket.MSG_TRUNC)  # a plain int: `int & MsgFlag` builds an enum member per call

#: Called once per wakeup with (payloads, source hosts, receive time in UTC ms).
OnDatagrams = Callable[[list[bytes], list[str], int], None]


def open_udp_socket(host: str, port: int, *, receive_buffer: int, reuse_port: bool = False) -> socket.socket:
    """A bound, non-blocking UDP socket with ``SO_RXQ_OVFL`` on.

    ``host`` ``::`` (or ``[::]``) binds dual-stack: IPv6 and IPv4 (as ``::ffff:a.b.c.d``) on
    one socket. Any other IPv6 address binds IPv6 only; an IPv4 address binds IPv4 only.
    """
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if host == "::" else 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:  # with CAP_NET_ADMIN, beyond net.core.rmem_max; otherwise what the kernel allows
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, receive_buffer)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        granted = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // 2  # the kernel doubles it
        if granted < receive_buffer:
            log.warning("UDP receive buffer is %d bytes, not the %d asked for: raise net.core.rmem_max "
                        "or bursts will be dropped by the kernel", granted, receive_buffer)
        sock.setsockopt(socket.SOL_SOCKET, SO_RXQ_OVFL, 1)
        sock.bind((host, port))
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on UDP {host}:{port}: {exc}") from exc
    return sock


class UdpReceiver:
    """Reads ``sock`` from the running loop in batches; explicit :meth:`start` and :meth:`stop`."""

    def __init__(self, sock: socket.socket, on_datagrams: OnDatagrams, *, budget: int = 2048) -> None:
        self._sock = sock
        self._on_datagrams = on_datagrams
        self._budget = budget
        self._loop: asyncio.AbstractEventLoop | None = None
        self.kernel_drops = 0  # cumulative, as reported by the kernel
        self.truncated = 0  # datagrams longer than MAX_DATAGRAM (cannot happen with UDP over IP)
        self.errors = 0

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._sock.getsockname()[:2]
        return str(host), int(port)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._sock.fileno(), self._readable)

    def stop(self, *, drain: bool = True) -> None:
        """Stop reading; with ``drain``, hand over what the socket buffer still holds first."""
        if self._loop is not None:
            self._loop.remove_reader(self._sock.fileno())
            self._loop = None
            if drain:
                while self._read_batch() == self._budget:
                    pass
        self._sock.close()

    def _readable(self) -> None:
        self._read_batch()

    def _read_batch(self) -> int:
        """Up to ``budget`` datagrams from the socket, handed over in one call; how many."""
        payloads: list[bytes] = []
        hosts: list[str] = []
        append_payload = payloads.append
        append_host = hosts.append
        recvmsg = self._sock.recvmsg
        try:
            for _ in range(self._budget):
                data, anc, flags, addr = recvmsg(MAX_DATAGRAM, _ANC_SIZE)
                append_payload(data)
                append_host(addr[0])
                if anc:
                    self._ancillary(anc)
                if flags & _MSG_TRUNC:
                    self.truncated += 1
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as exc:  # e.g. ICMP errors reported on the socket: not fatal
            if exc.errno not in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH):
                log.warning("UDP receive error: %s", exc)
            self.errors += 1
        if payloads:
            self._on_datagrams(payloads, hosts, time.time_ns() // 1_000_000)
        return len(payloads)

    def _ancillary(self, anc: list[tuple[int, int, bytes]]) -> None:
        for level, kind, data in anc:
            if level == _SOL_SOCKET and kind == SO_RXQ_OVFL and len(data) >= 4:
                drops = _U32.unpack_from(data)[0]
                if drops > self.kernel_drops:
                    self.kernel_drops = drops
