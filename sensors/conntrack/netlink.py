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
RECV_SIZE = 1 << 17


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

    def fileno(self) -> int:
        return self.sock.fileno()

    def read(self, max_buffers: int) -> tuple[list[bytes], bool]:
        """Up to ``max_buffers`` buffers waiting on the socket, and whether the kernel reported
        an overrun (ENOBUFS: events were dropped since the last read)."""
        out: list[bytes] = []
        recv = self.sock.recv
        overrun = False
        for _ in range(max_buffers):
            try:
                out.append(recv(RECV_SIZE))
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                overrun = True
        return out, overrun

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

    def fileno(self) -> int:
        return self.sock.fileno()

    def read(self, max_buffers: int) -> list[bytes]:
        """Up to ``max_buffers`` chunks that have arrived."""
        out: list[bytes] = []
        for _ in range(max_buffers):
            try:
                out.append(self.sock.recv(RECV_SIZE))
            except BlockingIOError:
                break
        return out

    def close(self) -> None:
        self.sock.close()
