"""Read UDP datagrams out of pcap and pcapng captures (for `flowtally decode` and tests).

Link types: Ethernet (with 802.1Q/QinQ VLAN tags), Linux cooked capture SLL (113) and SLL2
(276), raw IP (101, 228 IPv4, 229 IPv6, and 12/14 where some systems wrote raw IP) and BSD
loopback/null (0, 108). IPv4 and IPv6. Everything that is not a complete, unfragmented UDP
datagram is skipped and counted in :class:`CaptureCounts`.

pcapng files are read with the link type of their first interface (dpkt's reader does not tell
packets of different interfaces apart).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import ROUND_FLOOR, Decimal
from typing import Any, BinaryIO, NamedTuple

import dpkt

_V4_MAPPED_PREFIX = b"\x00" * 10 + b"\xff\xff"
_PCAP_MAGICS = {
    bytes.fromhex(m)
    for m in ("a1b2c3d4", "d4c3b2a1", "a1b23c4d", "4d3cb2a1", "a1b2cd34", "34cdb2a1")
}
_PCAPNG_MAGIC = bytes.fromhex("0a0d0d0a")

LINKTYPE_NULL = 0
LINKTYPE_ETHERNET = 1
LINKTYPE_LOOP = 108
LINKTYPE_LINUX_SLL = 113
LINKTYPE_LINUX_SLL2 = 276
LINKTYPE_RAW = (101, 12, 14)
LINKTYPE_IPV4 = 228
LINKTYPE_IPV6 = 229
SUPPORTED_LINKTYPES = frozenset(
    {LINKTYPE_NULL, LINKTYPE_ETHERNET, LINKTYPE_LOOP, LINKTYPE_LINUX_SLL, LINKTYPE_LINUX_SLL2,
     *LINKTYPE_RAW, LINKTYPE_IPV4, LINKTYPE_IPV6}
)


class NotACaptureError(ValueError):
    """The file is missing, unreadable, or not a pcap/pcapng capture of a supported link type."""

    def __init__(self, filename: str, reason: str) -> None:
        super().__init__(f"{filename}: {reason}")
        self.filename = filename
        self.reason = reason


class UdpPacket(NamedTuple):
    """One UDP datagram from a capture; addresses are 16 bytes, IPv4 in IPv4-mapped form."""

    timestamp_ms: int
    src_addr: bytes
    src_port: int
    dst_addr: bytes
    dst_port: int
    payload: bytes


@dataclass(slots=True)
class CaptureCounts:
    """What the reader saw; everything but ``udp`` was skipped."""

    frames: int = 0
    udp: int = 0
    non_ip: int = 0  # ARP, LLDP, unparsable link layer, ...
    non_udp: int = 0  # TCP, ICMP, ...
    fragments: int = 0  # IPv4/IPv6 fragments (not reassembled)
    truncated: int = 0  # frames cut by the snap length, UDP length beyond the captured bytes
    truncated_file: int = 0  # 1 when the file ends in the middle of a record

    def merge(self, other: CaptureCounts) -> None:
        """Add another file's counts to these."""
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def as_dict(self) -> dict[str, int]:
        """The counts as a plain dict."""
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


@dataclass(slots=True)
class _Reader:
    reader: Any  # dpkt.pcap.Reader or dpkt.pcapng.Reader (untyped)
    linktype: int


class _ShortReadDetector:
    """Wraps the capture file and notes reads that return fewer bytes than asked for.

    dpkt's readers hand out a record cut short by the end of the file as if it were complete;
    watching the reads lets the reader drop it and report the file as truncated instead.
    """

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.name = getattr(f, "name", "")
        self.short = False  # a read since the last reset returned less than requested
        self.partial = False  # ... and it returned some bytes (not a clean end of file)

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        if 0 < n != len(data):
            self.short = True
            self.partial = self.partial or bool(data)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._f.seek(offset, whence)

    def fileno(self) -> int:
        return self._f.fileno()

    def reset(self) -> None:
        self.short = self.partial = False


def _open(path: str, fileobj: Any) -> _Reader:
    magic = fileobj.read(4)
    fileobj.seek(0)
    try:
        if magic in _PCAP_MAGICS:
            reader: Any = dpkt.pcap.Reader(fileobj)
        elif magic == _PCAPNG_MAGIC:
            reader = dpkt.pcapng.Reader(fileobj)
        else:
            raise NotACaptureError(path, "not a pcap or pcapng capture")
    except (ValueError, dpkt.Error, struct.error) as exc:
        if isinstance(exc, NotACaptureError):
            raise
        raise NotACaptureError(path, f"not a readable pcap or pcapng capture ({exc})") from exc
    linktype = reader.datalink()
    if linktype not in SUPPORTED_LINKTYPES:
        raise NotACaptureError(path, f"unsupported link type {linktype}")
    return _Reader(reader, linktype)


def check_capture(path: str) -> None:
    """Raise :class:`NotACaptureError` unless ``path`` opens as a supported capture."""
    try:
        with open(path, "rb") as f:
            _open(path, f)
    except OSError as exc:
        raise NotACaptureError(path, exc.strerror or str(exc)) from exc


def iter_udp(path: str, counts: CaptureCounts | None = None) -> Iterator[UdpPacket]:
    """Yield every complete UDP datagram of a pcap or pcapng file, in file order.

    ``counts`` (optional) is updated as frames are read, including what was skipped. Raises
    :class:`NotACaptureError` if the file cannot be opened or is not a supported capture; a file
    that ends in the middle of a record stops quietly (counted as ``truncated_file``).
    """
    if counts is None:
        counts = CaptureCounts()
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed in the finally below; the generator may pause
    except OSError as exc:
        raise NotACaptureError(path, exc.strerror or str(exc)) from exc
    try:
        watched = _ShortReadDetector(f)
        opened = _open(path, watched)
        frames = iter(opened.reader)
        while True:
            watched.reset()
            try:
                ts, frame = next(frames)
            except StopIteration:
                if watched.partial:
                    counts.truncated_file += 1
                return
            except (dpkt.Error, ValueError, struct.error):
                counts.truncated_file += 1
                return
            if watched.short:  # the file ends inside this record
                counts.truncated_file += 1
                return
            counts.frames += 1
            packet = _udp(opened.linktype, frame, counts)
            if packet is None:
                continue
            counts.udp += 1
            src, sport, dst, dport, payload = packet
            yield UdpPacket(_timestamp_ms(ts), src, sport, dst, dport, payload)
    finally:
        f.close()


def _timestamp_ms(ts: float | Decimal) -> int:
    """Capture time in whole milliseconds (floor). dpkt gives a Decimal for nanosecond pcaps and
    a float otherwise; the float of a microsecond timestamp is within 1e-4 ms of the exact value,
    so a half-microsecond nudge before the floor makes it exact."""
    if isinstance(ts, Decimal):
        return int((ts * 1000).to_integral_value(rounding=ROUND_FLOOR))
    return math.floor(ts * 1000 + 0.0005)


def _udp(linktype: int, frame: bytes, counts: CaptureCounts) -> tuple[bytes, int, bytes, int, bytes] | None:
    try:
        ip = _network_layer(linktype, frame)
    except (dpkt.Error, struct.error, ValueError, IndexError):
        counts.truncated += 1
        return None
    if isinstance(ip, dpkt.ip.IP):
        if ip.mf or ip.offset:
            counts.fragments += 1
            return None
        src, dst = _V4_MAPPED_PREFIX + ip.src, _V4_MAPPED_PREFIX + ip.dst
    elif isinstance(ip, dpkt.ip6.IP6):
        if 44 in ip.extension_hdrs:  # fragment header
            counts.fragments += 1
            return None
        src, dst = ip.src, ip.dst
    else:
        counts.non_ip += 1
        return None
    if ip.p != dpkt.ip.IP_PROTO_UDP:
        counts.non_udp += 1
        return None
    udp = ip.data
    if not isinstance(udp, dpkt.udp.UDP):
        counts.truncated += 1
        return None
    payload = bytes(udp.data)
    # The UDP length is authoritative (Ethernet pads short frames); fewer bytes mean the frame was
    # cut by the snap length and the datagram is incomplete.
    want = udp.ulen - 8
    if want < 0 or len(payload) < want:
        counts.truncated += 1
        return None
    return src, udp.sport, dst, udp.dport, payload[:want]


def _network_layer(linktype: int, frame: bytes) -> object:
    """The dpkt IP/IP6 object of a frame, or something else for non-IP frames."""
    if linktype == LINKTYPE_ETHERNET:
        return dpkt.ethernet.Ethernet(frame).data  # dpkt strips 802.1Q/QinQ tags itself
    if linktype == LINKTYPE_LINUX_SLL:
        return dpkt.sll.SLL(frame).data
    if linktype == LINKTYPE_LINUX_SLL2:
        return dpkt.sll2.SLL2(frame).data
    if linktype in (LINKTYPE_NULL, LINKTYPE_LOOP):
        # The 4-byte family is in the writer's byte order (NULL) or big-endian (LOOP), and IPv6
        # has three values across BSDs; the IP version nibble is unambiguous.
        frame = frame[4:]
    return _raw_ip(frame)


def _raw_ip(frame: bytes) -> object:
    if not frame:
        return None
    version = frame[0] >> 4
    if version == 4:
        return dpkt.ip.IP(frame)
    if version == 6:
        return dpkt.ip6.IP6(frame)
    return None

