"""The UDP socket of a sensor: dual-stack bind, big buffer, kernel drop counter, batched reads.

asyncio's datagram endpoint makes one callback (and one address tuple and bytes object) per
datagram and cannot return ancillary data, so the kernel's drop counter (``SO_RXQ_OVFL``) would
be out of reach. :class:`UdpReceiver` instead registers the socket with ``loop.add_reader`` and,
on each wakeup, drains it with ``recvmmsg(2)`` (through ctypes on libc: up to :data:`VLEN`
datagrams per system call, into one preallocated buffer) until ``EAGAIN`` or a per-wakeup budget
(so the loop still serves timers and the Kafka producer), then hands the whole batch to its
callback grouped by source address: a list of :class:`Run` (16-byte source address, payloads,
the flow records their headers announce, read for all datagrams of a call at once) and one
receive time for the wakeup. Where libc has no ``recvmmsg`` it falls back to one ``recvmsg`` per
datagram, with the same result.

Wakeups cost more than datagrams at the rates exporters send (measured: about 0.5 ms of CPU per
wakeup, against a few microseconds per datagram): with ``coalesce_ms`` > 0, after a read that
drained the socket the receiver stops watching it and reads again on a timer that long after,
letting the kernel queue what arrives meanwhile, so one wakeup takes many datagrams; while reads
keep finding datagrams it stays on the timer (no epoll registration per wakeup), and a read that
finds nothing puts it back to waiting for the socket. The pause is shortened when, at the rate of
the last read, the socket's receive buffer would fill beyond half meanwhile (the collector asks
for 32 MB; a buffer the kernel capped at net.core.rmem_max gets shorter pauses); whatever it
cannot hold is still counted by the kernel (below).

``SO_RXQ_OVFL``: the kernel attaches to a datagram the socket's cumulative count of datagrams it
dropped because the receive buffer was full, when that count is non-zero. The receiver keeps the
highest value seen in :attr:`UdpReceiver.kernel_drops` (0 until a drop happened). The count is
cumulative and attached to every datagram queued after the first drop, so with ``recvmmsg`` only
the last datagram of each call needs to be looked at.

``SO_REUSEPORT`` (``reuse_port=True``): several processes bind the same port and the kernel
spreads datagrams between their sockets by a hash of the 4-tuple, so one exporter (one source
address and port) always lands on the same socket, and its templates stay in one process.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import itertools
import logging
import mmap
import socket
import struct
import time
from collections.abc import Callable

import numpy as np

from flowtally.process import libc

log = logging.getLogger(__name__)

SO_RXQ_OVFL = getattr(socket, "SO_RXQ_OVFL", 40)  # Linux; missing from Python's socket module
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
MAX_DATAGRAM = 65535
_ANC_SIZE = socket.CMSG_SPACE(4)
_SOL_SOCKET = int(socket.SOL_SOCKET)
_U32 = struct.Struct("=I")
_CMSG_HEADER = struct.Struct("@Nii")  # struct cmsghdr: cmsg_len (size_t), cmsg_level, cmsg_type
_MSG_TRUNC = int(socket.MSG_TRUNC)  # a plain int: `int & MsgFlag` builds an enum member per call

#: Bytes the kernel charges a queued datagram beyond its payload (skb and slab rounding, roughly).
_OVERHEAD = 768
#: Datagrams per recvmmsg call. Each gets a MAX_DATAGRAM slot (16 MiB of address space in all,
#: mapped lazily: only the pages datagrams reach become resident, about one per slot). Measured
#: receiving 1 M v9 flows at 100 k/s with 50 ms coalescing (~170 datagrams per wakeup), user +
#: system CPU: 64 cost 0.26-0.30 CPU-s per million flows, 256 0.21-0.24 (fewer calls, each with
#: a fixed Python cost).
VLEN = 256
_V4_MAPPED_PREFIX = b"\x00" * 10 + b"\xff\xff"



#: Bytes of a datagram's header read for all datagrams of a recvmmsg call at once: version,
#: count and the observation domain (v9 source ID at 16, IPFIX domain at 12, v5 engine at 20).
HEAD = 22


class Run:
    """Consecutive datagrams of one source address in one wakeup: the 16-byte address (IPv4
    mapped), the payloads, the flow records their headers announce (:func:`estimate_records`)
    and, in chunks of numpy arrays (one per system call), their lengths (int64) and first
    :data:`HEAD` bytes ((n, HEAD) uint8, zero-padded where shorter), copied from the receive
    buffer for a whole call at once: the completeness accounting reads the observation domains
    from them (:func:`domains_many`) once per decoded batch, without taking every payload apart
    again (measured per flush of ~530 datagrams: 126 us from the payloads, 25 us from the
    copied headers; per call, reading the domains in place cost as much as it saved)."""

    __slots__ = ("heads", "lengths", "payloads", "records", "source")

    def __init__(self, source: bytes) -> None:
        self.source = source
        self.payloads: list[bytes] = []
        self.records = 0
        self.lengths: list[np.ndarray] = []
        self.heads: list[np.ndarray] = []


def split_run(run: Run, keep: int) -> tuple[Run, Run]:
    """The first ``keep`` datagrams of ``run`` and the rest, as two runs of the same source
    (records re-estimated from each part's header bytes)."""
    head, tail = Run(run.source), Run(run.source)
    head.payloads, tail.payloads = run.payloads[:keep], run.payloads[keep:]
    left = keep
    for lengths, heads in zip(run.lengths, run.heads, strict=True):
        take = min(left, len(lengths))
        if take:
            head.lengths.append(lengths[:take])
            head.heads.append(heads[:take])
        if take < len(lengths):
            tail.lengths.append(lengths[take:])
            tail.heads.append(heads[take:])
        left -= take
    for part in (head, tail):
        part.records = sum(int(estimate_records_many(h, ln).sum()) for h, ln in zip(part.heads, part.lengths,
                                                                                      strict=True))
    return head, tail


#: Called once per wakeup with the runs and the receive time in UTC ms.
OnDatagrams = Callable[[list[Run], int], None]


def estimate_records(payload: bytes) -> int:
    """The flow records a NetFlow datagram's header announces, at least 1: v5 flows, v9 records
    (templates included), IPFIX by length (about 50 bytes a record); 1 for anything else."""
    if len(payload) >= 4:
        version = (payload[0] << 8) | payload[1]
        if version in (5, 9):
            return max(1, (payload[2] << 8) | payload[3])
        if version == 10:
            return max(1, ((payload[2] << 8) | payload[3]) // 50)
    return 1


def estimate_records_many(heads: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """:func:`estimate_records` of many datagrams at once, from their first 4 bytes (an (n, 4)
    uint8 array; bytes past a datagram's length are ignored) and their lengths."""
    version = heads[:, 0].astype(np.int64) << 8 | heads[:, 1]
    count = heads[:, 2].astype(np.int64) << 8 | heads[:, 3]
    out = np.ones(len(heads), dtype=np.int64)
    whole = lengths >= 4
    counted = whole & ((version == 5) | (version == 9))
    out[counted] = np.maximum(1, count[counted])
    ipfix = whole & (version == 10)
    out[ipfix] = np.maximum(1, count[ipfix] // 50)
    return out


def domains_many(heads: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The observation domain in the NetFlow header (v9 source ID, IPFIX observation domain ID,
    v5 engine type << 8 | engine ID, as the decoders record it; 0 if there is none) of many
    datagrams at once (uint32), from their first :data:`HEAD` bytes (an (n, >= HEAD) uint8
    array; bytes past a datagram's length are never read as a domain: the length checks
    exclude them) and their lengths."""
    zero = heads[:, 0] == 0
    out = np.zeros(len(heads), dtype=np.uint32)
    v9 = zero & (heads[:, 1] == 9) & (lengths >= 20)
    out[v9] = np.ascontiguousarray(heads[v9, 16:20]).view(">u4").ravel()
    ipfix = zero & (heads[:, 1] == 10) & (lengths >= 16)
    out[ipfix] = np.ascontiguousarray(heads[ipfix, 12:16]).view(">u4").ravel()
    v5 = zero & (heads[:, 1] == 5) & (lengths >= 22)
    out[v5] = heads[v5, 20].astype(np.uint32) << 8 | heads[v5, 21]
    return out


def header_bytes(payloads: list[bytes]) -> np.ndarray:
    """The first :data:`HEAD` bytes of each payload, zero-padded: an (n, HEAD) uint8 array."""
    joined = b"".join([p[:HEAD].ljust(HEAD, b"\0") for p in payloads])
    return np.frombuffer(joined, dtype=np.uint8).reshape(len(payloads), HEAD)


def source_address(host: str) -> bytes:
    """A socket address's host as the 16 bytes the receiver hands over (IPv4 mapped)."""
    host = host.split("%")[0]
    if ":" in host:
        return socket.inet_pton(socket.AF_INET6, host)
    return _V4_MAPPED_PREFIX + socket.inet_pton(socket.AF_INET, host)


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class _Msghdr(ctypes.Structure):
    _fields_ = [("name", ctypes.c_void_p), ("namelen", ctypes.c_uint32), ("iov", ctypes.POINTER(_Iovec)),
                ("iovlen", ctypes.c_size_t), ("control", ctypes.c_void_p), ("controllen", ctypes.c_size_t),
                ("flags", ctypes.c_int)]


class _Mmsghdr(ctypes.Structure):
    _fields_ = [("hdr", _Msghdr), ("len", ctypes.c_uint)]


_NAME_SIZE = 28  # sizeof(struct sockaddr_in6), enough for sockaddr_in too
_MMSG = np.dtype({"names": ["namelen", "controllen", "flags", "len"],
                  "formats": ["u4", "u8", "i4", "u4"],
                  "offsets": [_Mmsghdr.hdr.offset + _Msghdr.namelen.offset,
                              _Mmsghdr.hdr.offset + _Msghdr.controllen.offset,
                              _Mmsghdr.hdr.offset + _Msghdr.flags.offset, _Mmsghdr.len.offset],
                  "itemsize": ctypes.sizeof(_Mmsghdr)})


def _libc_recvmmsg() -> Callable[..., int] | None:
    func = getattr(libc(), "recvmmsg", None)
    if func is None:
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int, ctypes.c_void_p]
    func.restype = ctypes.c_int
    return func


_RECVMMSG = _libc_recvmmsg()


class _MultiReader:
    """recvmmsg(2) into preallocated buffers: the message headers, their iovecs, one
    MAX_DATAGRAM slot per datagram, the source addresses and the ancillary data."""

    def __init__(self, fd: int, family: int) -> None:
        self.fd = fd
        self.v6 = family == socket.AF_INET6
        self.data = mmap.mmap(-1, VLEN * MAX_DATAGRAM)  # zero pages until written: see VLEN
        self.view = memoryview(self.data)
        self.names = ctypes.create_string_buffer(VLEN * _NAME_SIZE)
        self.control = ctypes.create_string_buffer(VLEN * _ANC_SIZE)
        self.iovecs = (_Iovec * VLEN)()
        self.headers = (_Mmsghdr * VLEN)()
        base = ctypes.addressof(ctypes.c_char.from_buffer(self.data))
        names, control = ctypes.addressof(self.names), ctypes.addressof(self.control)
        for i in range(VLEN):
            self.iovecs[i].base = base + i * MAX_DATAGRAM
            self.iovecs[i].len = MAX_DATAGRAM
            hdr = self.headers[i].hdr
            hdr.name = names + i * _NAME_SIZE
            hdr.iov = ctypes.pointer(self.iovecs[i])
            hdr.iovlen = 1
            hdr.control = control + i * _ANC_SIZE
        # The fields the kernel writes back, and the source addresses, as numpy views.
        self.fields = np.frombuffer(memoryview(self.headers).cast("B"), dtype=_MMSG)
        names_view = np.frombuffer(memoryview(self.names).cast("B"), dtype=np.uint8)
        self.name_bytes = names_view.reshape(VLEN, _NAME_SIZE)
        # The first HEAD bytes of every slot (version, count and domain of a NetFlow header),
        # and the fields read back after every call, as views made once.
        self.heads = np.frombuffer(self.view, dtype=np.uint8).reshape(VLEN, MAX_DATAGRAM)[:, :HEAD]
        self.namelen, self.controllen = self.fields["namelen"], self.fields["controllen"]
        self.flags, self.lengths = self.fields["flags"], self.fields["len"]
        self.ptr = ctypes.addressof(self.headers)


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

    def __init__(self, sock: socket.socket, on_datagrams: OnDatagrams, *, budget: int = 2048,
                 coalesce_ms: float = 0.0, multi: bool = True) -> None:
        """``coalesce_ms``: pause after a read that drained the socket (see the module docstring);
        ``multi``: use recvmmsg where libc has it."""
        self._sock = sock
        self._on_datagrams = on_datagrams
        self._budget = budget
        self._coalesce_s = coalesce_ms / 1000
        self._loop: asyncio.AbstractEventLoop | None = None
        self._paused: asyncio.Handle | None = None
        # The socket's buffer limit as the kernel accounts it (SO_RCVBUF reports the doubled value).
        self._buffer_limit = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        self._last_read = time.monotonic()
        self._read_bytes = 0  # payload + _OVERHEAD per datagram, in the current read
        self._multi = _MultiReader(sock.fileno(), sock.family) if multi and _RECVMMSG is not None else None
        self.kernel_drops = 0  # cumulative, as reported by the kernel
        self.truncated = 0  # datagrams longer than MAX_DATAGRAM (cannot happen with UDP over IP)
        self.errors = 0
        self.wakeups = 0  # reads handed to the callback (datagrams / wakeups = batching achieved)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._sock.getsockname()[:2]
        return str(host), int(port)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._sock.fileno(), self._readable)

    def stop(self, *, drain: bool = True) -> None:
        """Stop reading; with ``drain``, hand over what the socket buffer still holds first."""
        if self._paused is not None:
            self._paused.cancel()
            self._paused = None
        if self._loop is not None:
            self._loop.remove_reader(self._sock.fileno())
            self._loop = None
            if drain:
                while self._read_batch() == self._budget:
                    pass
        self._sock.close()

    def _readable(self) -> None:
        """The socket became readable (event mode)."""
        if self._read_batch() < self._budget and self._coalesce_s > 0 and self._loop is not None:
            # Drained: let datagrams gather in the kernel for a while instead of waking per few,
            # and poll on a timer while they keep coming (no epoll registration per wakeup).
            self._loop.remove_reader(self._sock.fileno())
            self._paused = self._loop.call_later(self._pause(), self._poll)

    def _poll(self) -> None:
        """A timer read (poll mode): the next one after a pause while datagrams keep coming, back
        to waiting for the socket once a read finds nothing."""
        self._paused = None
        if self._loop is None:
            return
        count = self._read_batch()
        if self._loop is None:  # stopped by the callback
            return
        if count == 0:
            self._loop.add_reader(self._sock.fileno(), self._readable)
        elif count >= self._budget:
            self._paused = self._loop.call_soon(self._poll)
        else:
            self._paused = self._loop.call_later(self._pause(), self._poll)

    def _pause(self) -> float:
        """``coalesce_ms``, shortened so that at the rate of the last read the socket buffer
        fills to at most half of its size meanwhile (a small buffer would overflow otherwise)."""
        now = time.monotonic()
        elapsed, self._last_read = now - self._last_read, now
        if self._read_bytes <= 0 or elapsed <= 0:
            return self._coalesce_s
        # The kernel charges each queued datagram's whole buffer (its truesize) to the socket:
        # counted as payload + _OVERHEAD, with a margin of 2 for what a burst adds.
        rate = 2 * self._read_bytes / elapsed
        return max(0.0005, min(self._coalesce_s, self._buffer_limit / 2 / rate))

    def _read_batch(self) -> int:
        """Up to ``budget`` datagrams from the socket, handed over in one call; how many."""
        runs: list[Run] = []
        self._read_bytes = 0
        try:
            count = self._read_multi(runs) if self._multi is not None else self._read_single(runs)
        except OSError as exc:  # e.g. ICMP errors reported on the socket: not fatal
            if exc.errno not in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH):
                log.warning("UDP receive error: %s", exc)
            self.errors += 1
            count = sum(len(r.payloads) for r in runs)
        if runs:
            self.wakeups += 1
            self._on_datagrams(runs, time.time_ns() // 1_000_000)
        return count

    def _read_single(self, runs: list[Run]) -> int:
        """One recvmsg per datagram (where libc has no recvmmsg)."""
        recvmsg = self._sock.recvmsg
        count = 0
        last_host = None
        run = Run(b"")
        try:
            for _ in range(self._budget):
                data, anc, flags, addr = recvmsg(MAX_DATAGRAM, _ANC_SIZE)
                if addr[0] != last_host:
                    last_host = addr[0]
                    run = Run(source_address(last_host))
                    runs.append(run)
                run.payloads.append(data)
                run.records += estimate_records(data)
                count += 1
                self._read_bytes += len(data) + _OVERHEAD
                if anc:
                    self._ancillary(anc)
                if flags & _MSG_TRUNC:
                    self.truncated += 1
        except (BlockingIOError, InterruptedError):
            pass
        for run in runs:
            lengths = np.fromiter(map(len, run.payloads), dtype=np.int64, count=len(run.payloads))
            run.lengths, run.heads = [lengths], [header_bytes(run.payloads)]
        return count

    def _read_multi(self, runs: list[Run]) -> int:
        """recvmmsg calls until EAGAIN or the budget; each call's datagrams copied out at once."""
        reader = self._multi
        assert reader is not None and _RECVMMSG is not None
        view = reader.view
        count = 0
        while count < self._budget:
            want = min(VLEN, self._budget - count)
            reader.namelen[:want] = _NAME_SIZE  # in/out fields: the kernel overwrote them
            reader.controllen[:want] = _ANC_SIZE
            n = _RECVMMSG(reader.fd, reader.ptr, want, socket.MSG_DONTWAIT, None)
            if n < 0:
                err = ctypes.get_errno()
                if err in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR):
                    break
                raise OSError(err, f"recvmmsg: {errno.errorcode.get(err, err)}")
            if n == 0:
                break
            count += n
            sizes = reader.lengths[:n]
            lengths = sizes.tolist()
            self._read_bytes += sum(lengths) + _OVERHEAD * n
            payloads = [bytes(view[i * MAX_DATAGRAM : i * MAX_DATAGRAM + ln]) for i, ln in enumerate(lengths)]
            truncated = reader.flags[:n] & _MSG_TRUNC
            if truncated.any():
                self.truncated += int(np.count_nonzero(truncated))
            if reader.controllen[n - 1]:  # cumulative: the newest datagram has the newest count
                self._control(reader, n - 1)
            heads = reader.heads[:n]
            records = estimate_records_many(heads, sizes)
            self._split_by_source(reader, n, payloads, records, sizes.astype(np.int64),
                                  heads.copy(), runs)
            if n < want:
                break  # the socket is drained: a further call would only say EAGAIN
        return count

    def _split_by_source(self, reader: _MultiReader, n: int, payloads: list[bytes], records: np.ndarray,
                         lengths: np.ndarray, heads: np.ndarray, runs: list[Run]) -> None:
        """Runs of consecutive datagrams from one source address (usually one run per call)."""
        # sockaddr_in6.sin6_addr (IPv4 arrives mapped on a dual-stack socket), or sockaddr_in.sin_addr
        addrs = reader.name_bytes[:n, 8:24] if reader.v6 else reader.name_bytes[:n, 4:8]
        if n == 1 or (addrs == addrs[0]).all():
            bounds = [0, n]
        else:
            change = np.flatnonzero((addrs[1:] != addrs[:-1]).any(axis=1)) + 1
            bounds = [0, *change.tolist(), n]
        for a, b in itertools.pairwise(bounds):
            raw = addrs[a].tobytes()
            source = raw if reader.v6 else _V4_MAPPED_PREFIX + raw
            if not runs or runs[-1].source != source:
                runs.append(Run(source))
            run = runs[-1]
            run.payloads.extend(payloads[a:b])
            run.records += int(records[a:b].sum())
            run.lengths.append(lengths[a:b])
            run.heads.append(heads[a:b])

    def _control(self, reader: _MultiReader, i: int) -> None:
        """The SO_RXQ_OVFL count in datagram ``i``'s ancillary data, if there."""
        raw = reader.control.raw[i * _ANC_SIZE : (i + 1) * _ANC_SIZE]
        length = int(reader.fields["controllen"][i])
        pos = 0
        while pos + _CMSG_HEADER.size <= length:
            cmsg_len, level, kind = _CMSG_HEADER.unpack_from(raw, pos)
            if cmsg_len < _CMSG_HEADER.size:
                break
            if level == _SOL_SOCKET and kind == SO_RXQ_OVFL and cmsg_len >= _CMSG_HEADER.size + 4:
                drops = _U32.unpack_from(raw, pos + _CMSG_HEADER.size)[0]
                if drops > self.kernel_drops:
                    self.kernel_drops = drops
            pos += (cmsg_len + 7) & ~7

    def _ancillary(self, anc: list[tuple[int, int, bytes]]) -> None:
        for level, kind, data in anc:
            if level == _SOL_SOCKET and kind == SO_RXQ_OVFL and len(data) >= 4:
                drops = _U32.unpack_from(data)[0]
                if drops > self.kernel_drops:
                    self.kernel_drops = drops
