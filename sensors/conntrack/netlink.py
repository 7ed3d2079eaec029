"""The ctnetlink sockets (the shell around :mod:`sensors.conntrack.messages`).

Two sockets, so that dump replies never queue behind (or get lost with) events:

- the event socket, bound to the NEW and DESTROY multicast groups, with NETLINK_BROADCAST_ERROR
  set: when our receive buffer is full the kernel gets an error for a DESTROY it could not
  deliver and redelivers it later (reliable event delivery, as conntrackd uses), so an overrun
  (ENOBUFS on our side) loses NEW events, never the final counters of a connection;
- a dump socket per full dump (a GET request with NLM_F_DUMP; the kernel sends the table in
  chunks as we read, so a dump does not overrun).

The socket numbers and request format are those pyroute2 (``pyroute2.netlink``,
``pyroute2.netlink.nfnetlink.nfctsocket``) defines; the messages are decoded by our own
decoder (see :mod:`sensors.conntrack.messages` for why), which the tests check against
pyroute2's.
"""

from __future__ import annotations

import errno
import socket

from pyroute2.netlink import NETLINK_NETFILTER

from sensors.conntrack.messages import dump_request

SOL_NETLINK = 270
NETLINK_BROADCAST_ERROR = 4
SO_RCVBUFFORCE = 33
# nfnetlink multicast groups (enum nfnetlink_groups): bit (group - 1) of the bind mask.
NFNLGRP_CONNTRACK_NEW = 1
NFNLGRP_CONNTRACK_DESTROY = 3
EVENT_GROUPS = (1 << (NFNLGRP_CONNTRACK_NEW - 1)) | (1 << (NFNLGRP_CONNTRACK_DESTROY - 1))
RECV_SIZE = 1 << 17  # the most one datagram may need (a dump chunk is at most 32 KiB)
#: Datagrams are received one after the other into one buffer of this size (plus RECV_SIZE of
#: room), so a wakeup's messages are decoded in one pass without a bytes object per datagram.
READ_BYTES = 1 << 20


class Reader:
    """Receives datagrams back to back into one reused buffer."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buf = bytearray(READ_BYTES + RECV_SIZE)
        self._view = memoryview(self._buf)

    def read(self, max_datagrams: int) -> tuple[bytes, list[int], bool]:
        """Up to ``max_datagrams`` datagrams waiting (fewer when the buffer fills): their bytes,
        where each ends, and whether the kernel reported an overrun (ENOBUFS)."""
        recv_into = self._sock.recv_into
        view = self._view
        ends: list[int] = []
        pos = 0
        overrun = False
        for _ in range(max_datagrams):
            try:
                n = recv_into(view[pos:pos + RECV_SIZE])
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                overrun = True
                continue
            pos += n
            ends.append(pos)
            if pos >= READ_BYTES:
                break
        return bytes(view[:pos]), ends, overrun


def _set_rcvbuf(sock: socket.socket, size: int) -> int:
    """Set the receive buffer, beyond rmem_max when allowed (SO_RCVBUFFORCE needs NET_ADMIN);
    returns what the kernel granted."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, size)
    except PermissionError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
    return int(sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))


class EventSocket:
    """Non-blocking NEW/DESTROY event socket."""

    def __init__(self, receive_buffer: int) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            self.receive_buffer = _set_rcvbuf(self.sock, receive_buffer)
            self.sock.setsockopt(SOL_NETLINK, NETLINK_BROADCAST_ERROR, 1)
            self.sock.bind((0, EVENT_GROUPS))
            self.sock.setblocking(False)
        except BaseException:
            self.sock.close()
            raise
        self._reader = Reader(self.sock)

    def fileno(self) -> int:
        return self.sock.fileno()

    def read(self, max_datagrams: int) -> tuple[bytes, list[int], bool]:
        """The events waiting (up to ``max_datagrams`` datagrams): bytes, where each datagram
        ends, and whether the kernel reported an overrun (ENOBUFS: events were dropped)."""
        return self._reader.read(max_datagrams)

    def close(self) -> None:
        self.sock.close()


class DumpSocket:
    """One full dump of the table: send the request, then read chunks until NLMSG_DONE."""

    def __init__(self, seq: int, receive_buffer: int = 4 << 20) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            _set_rcvbuf(self.sock, receive_buffer)
            self.sock.bind((0, 0))
            self.sock.send(dump_request(seq))
            self.sock.setblocking(False)
        except BaseException:
            self.sock.close()
            raise
        self._reader = Reader(self.sock)

    def fileno(self) -> int:
        return self.sock.fileno()

    def read(self, max_datagrams: int) -> tuple[bytes, list[int]]:
        """The chunks that have arrived (up to ``max_datagrams``): bytes, where each ends."""
        data, ends, _ = self._reader.read(max_datagrams)
        return data, ends

    def close(self) -> None:
        self.sock.close()
