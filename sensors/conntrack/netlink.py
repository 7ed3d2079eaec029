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

import ctypes
import errno
import os
import socket

import numpy as np
from pyroute2.netlink import NETLINK_NETFILTER

from sensors.conntrack.messages import dump_request

SOL_NETLINK = 270
NETLINK_BROADCAST_ERROR = 4
SO_RCVBUFFORCE = 33
# nfnetlink multicast groups (enum nfnetlink_groups): bit (group - 1) of the bind mask.
NFNLGRP_CONNTRACK_NEW = 1
NFNLGRP_CONNTRACK_DESTROY = 3
EVENT_GROUPS = (1 << (NFNLGRP_CONNTRACK_NEW - 1)) | (1 << (NFNLGRP_CONNTRACK_DESTROY - 1))
RECV_SIZE = 1 << 17  # the most one dump datagram may need (a dump chunk is at most 32 KiB)
#: Dump datagrams are received one after the other into one buffer of this size (plus
#: RECV_SIZE of room), so a wakeup's chunks are decoded in one pass.
READ_BYTES = 1 << 20
#: Events: one datagram each, received with recvmmsg(2), up to EVENT_SLOTS per system call,
#: each into a slot of EVENT_SLOT_BYTES (an event message is a few hundred bytes; the kernel
#: sizes it from the attributes it may carry, far below this).
EVENT_SLOTS = 512
EVENT_SLOT_BYTES = 8192
_MSG_DONTWAIT = 0x40


class Reader:
    """Receives dump datagrams back to back into one reused buffer."""

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


class _IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class _MsgHdr(ctypes.Structure):
    _fields_ = [("name", ctypes.c_void_p), ("namelen", ctypes.c_uint32), ("iov", ctypes.POINTER(_IoVec)),
                ("iovlen", ctypes.c_size_t), ("control", ctypes.c_void_p), ("controllen", ctypes.c_size_t),
                ("flags", ctypes.c_int)]


class _MMsgHdr(ctypes.Structure):
    _fields_ = [("hdr", _MsgHdr), ("len", ctypes.c_uint)]


_libc = ctypes.CDLL(None, use_errno=True)


class BatchReader:
    """Many datagrams per system call (recvmmsg(2)), each into a slot of one reused buffer: a
    system call and a Python call per event cost about as much as decoding it."""

    def __init__(self, sock: socket.socket, slots: int = EVENT_SLOTS,
                 slot_bytes: int = EVENT_SLOT_BYTES) -> None:
        self._fd = sock.fileno()
        self._slots = slots
        self._slot_bytes = slot_bytes
        self._buf = ctypes.create_string_buffer(slots * slot_bytes)
        self._iov = (_IoVec * slots)()
        self._msgs = (_MMsgHdr * slots)()
        base = ctypes.addressof(self._buf)
        for i in range(slots):
            self._iov[i].base = base + i * slot_bytes
            self._iov[i].len = slot_bytes
            self._msgs[i].hdr.iov = ctypes.pointer(self._iov[i])
            self._msgs[i].hdr.iovlen = 1
        self.view = memoryview(self._buf).cast("B")
        # Received lengths, read from the headers' msg_len fields with numpy.
        size = ctypes.sizeof(_MMsgHdr)
        self._lens = np.frombuffer(memoryview(self._msgs).cast("B"), np.uint8).reshape(slots, size)
        self._len_at = _MMsgHdr.len.offset
        self.starts = np.arange(slots, dtype=np.int64) * slot_bytes

    def read(self) -> tuple[memoryview, np.ndarray, np.ndarray, bool]:
        """The datagrams waiting (up to the number of slots): the buffer (valid until the next
        read), where each datagram starts and ends in it, and whether the kernel reported an
        overrun (ENOBUFS)."""
        overrun = False
        count = 0
        for _ in range(4):  # an error is reported once, before the datagrams that follow it
            count = _libc.recvmmsg(self._fd, self._msgs, self._slots, _MSG_DONTWAIT, None)
            if count >= 0:
                break
            err = ctypes.get_errno()
            if err in (errno.EAGAIN, errno.EWOULDBLOCK):
                count = 0
                break
            if err == errno.ENOBUFS:
                overrun = True
                continue
            if err == errno.EINTR:
                continue
            raise OSError(err, os.strerror(err))
        count = max(count, 0)
        at = self._len_at
        lengths = self._lens[:count, at:at + 4].copy().view(np.uint32).reshape(count).astype(np.int64)
        starts = self.starts[:count]
        return self.view, starts, starts + lengths, overrun


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
        self._reader = BatchReader(self.sock)

    def fileno(self) -> int:
        return self.sock.fileno()

    def read(self) -> tuple[memoryview, np.ndarray, np.ndarray, bool]:
        """The events waiting (up to EVENT_SLOTS datagrams): the buffer (valid until the next
        read), where each datagram starts and ends in it, and whether the kernel reported an
        overrun (ENOBUFS: events were dropped)."""
        return self._reader.read()

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
