"""Reading UDP datagrams out of captures. Frames and files are built byte by byte here (not with
dpkt, which the reader uses) so the tests check the reader against the formats themselves."""

from __future__ import annotations

import ipaddress
import struct
from pathlib import Path

import pytest

from sensors.netflow.pcap import CaptureCounts, NotACaptureError, UdpPacket, check_capture, iter_udp
from tests.oracle import shared_testdata

SRC4, DST4 = "192.0.2.10", "198.51.100.20"
SRC6, DST6 = "2001:db8::10", "2001:db8:1::20"
PAYLOAD = b"\x00\x09netflow-ish payload"
TS_US = 1_700_000_000_123_456  # microseconds


def mapped(text: str) -> bytes:
    addr = ipaddress.ip_address(text)
    return (ipaddress.IPv6Address(f"::ffff:{addr}") if addr.version == 4 else addr).packed


def ipv4(src: str, dst: str, proto: int, body: bytes, flags_offset: int = 0) -> bytes:
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(body), 1, flags_offset, 64, proto, 0,
                         ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed)
    return header + body


def ipv6(src: str, dst: str, next_header: int, body: bytes) -> bytes:
    return struct.pack("!IHBB16s16s", 6 << 28, len(body), next_header, 64,
                       ipaddress.IPv6Address(src).packed, ipaddress.IPv6Address(dst).packed) + body


def udp(sport: int, dport: int, payload: bytes) -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def udp4(payload: bytes = PAYLOAD, sport: int = 40000, dport: int = 2055) -> bytes:
    return ipv4(SRC4, DST4, 17, udp(sport, dport, payload))


def udp6(payload: bytes = PAYLOAD, sport: int = 40000, dport: int = 2055) -> bytes:
    return ipv6(SRC6, DST6, 17, udp(sport, dport, payload))


def ethernet(packet: bytes, vlans: tuple[int, ...] = ()) -> bytes:
    ethertype = 0x0800 if packet[0] >> 4 == 4 else 0x86DD
    tags = b"".join(struct.pack("!HH", 0x8100, vid) for vid in vlans)
    frame = b"\x02\x00\x00\x00\x00\x02" + b"\x02\x00\x00\x00\x00\x01" + tags + struct.pack("!H", ethertype) + packet
    return frame + b"\0" * max(0, 60 - len(frame))  # Ethernet pads short frames


def sll(packet: bytes) -> bytes:
    ethertype = 0x0800 if packet[0] >> 4 == 4 else 0x86DD
    return struct.pack("!HHH8sH", 0, 1, 6, b"\x02\0\0\0\0\x01\0\0", ethertype) + packet


def sll2(packet: bytes) -> bytes:
    ethertype = 0x0800 if packet[0] >> 4 == 4 else 0x86DD
    return struct.pack("!HHiHBB8s", ethertype, 0, 2, 1, 0, 6, b"\x02\0\0\0\0\x01\0\0") + packet


def null_le(packet: bytes) -> bytes:  # DLT_NULL: family in the writer's (here little-endian) order
    return struct.pack("<I", 2 if packet[0] >> 4 == 4 else 30) + packet


def loop_be(packet: bytes) -> bytes:  # DLT_LOOP: family big-endian
    return struct.pack("!I", 2 if packet[0] >> 4 == 4 else 24) + packet


def write_pcap(path: Path, linktype: int, frames: list[bytes], *, nano: bool = False, big_endian: bool = False,
               snaplen: int = 65535, ts_us: int = TS_US) -> Path:
    order = ">" if big_endian else "<"
    magic = 0xA1B23C4D if nano else 0xA1B2C3D4
    out = struct.pack(order + "IHHiIII", magic, 2, 4, 0, 0, snaplen, linktype)
    for i, frame in enumerate(frames):
        t = ts_us + i * 1000
        sub = (t % 1_000_000) * 1000 + 789 if nano else t % 1_000_000  # nano: add sub-µs digits
        captured = frame[:snaplen]
        out += struct.pack(order + "IIII", t // 1_000_000, sub, len(captured), len(frame)) + captured
    path.write_bytes(out)
    return path


def write_pcapng(path: Path, linktype: int, frames: list[bytes], ts_us: int = TS_US) -> Path:
    def block(block_type: int, body: bytes) -> bytes:
        body += b"\0" * (-len(body) % 4)
        length = 12 + len(body)
        return struct.pack("<II", block_type, length) + body + struct.pack("<I", length)

    out = block(0x0A0D0D0A, struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1))
    out += block(1, struct.pack("<HHI", linktype, 0, 65535))  # default resolution: microseconds
    for i, frame in enumerate(frames):
        t = ts_us + i * 1000
        out += block(6, struct.pack("<IIIII", 0, t >> 32, t & 0xFFFFFFFF, len(frame), len(frame)) + frame)
    path.write_bytes(out)
    return path


EXPECTED = [
    UdpPacket(TS_US // 1000, mapped(SRC4), 40000, mapped(DST4), 2055, PAYLOAD),
    UdpPacket(TS_US // 1000 + 1, mapped(SRC6), 40000, mapped(DST6), 2055, PAYLOAD),
]

LINKTYPES = {
    "ethernet": (1, ethernet),
    "ethernet-vlan": (1, lambda p: ethernet(p, vlans=(100,))),
    "ethernet-qinq": (1, lambda p: ethernet(p, vlans=(100, 200))),
    "sll": (113, sll),
    "sll2": (276, sll2),
    "raw": (101, lambda p: p),
    "null": (0, null_le),
    "loop": (108, loop_be),
}


@pytest.mark.parametrize("name", sorted(LINKTYPES))
def test_linktypes_ipv4_and_ipv6(tmp_path: Path, name: str) -> None:
    linktype, wrap = LINKTYPES[name]
    path = write_pcap(tmp_path / f"{name}.pcap", linktype, [wrap(udp4()), wrap(udp6())])
    counts = CaptureCounts()
    assert list(iter_udp(str(path), counts)) == EXPECTED
    assert (counts.frames, counts.udp) == (2, 2)


def test_raw_ipv4_and_ipv6_linktypes(tmp_path: Path) -> None:
    v4 = write_pcap(tmp_path / "v4.pcap", 228, [udp4()])
    v6 = write_pcap(tmp_path / "v6.pcap", 229, [udp6()], ts_us=TS_US + 1000)
    assert list(iter_udp(str(v4))) + list(iter_udp(str(v6))) == EXPECTED


def test_pcapng_and_big_endian_pcap(tmp_path: Path) -> None:
    frames = [ethernet(udp4()), ethernet(udp6())]
    assert list(iter_udp(str(write_pcapng(tmp_path / "a.pcapng", 1, frames)))) == EXPECTED
    assert list(iter_udp(str(write_pcap(tmp_path / "b.pcap", 1, frames, big_endian=True)))) == EXPECTED


def test_nanosecond_timestamps_floor_to_milliseconds(tmp_path: Path) -> None:
    path = write_pcap(tmp_path / "ns.pcap", 1, [ethernet(udp4())], nano=True, ts_us=1_700_000_000_999_999)
    (packet,) = iter_udp(str(path))
    assert packet.timestamp_ms == 1_700_000_000_999  # .999999789 s floors to .999


def test_ethernet_padding_is_not_payload(tmp_path: Path) -> None:
    path = write_pcap(tmp_path / "pad.pcap", 1, [ethernet(udp4(b"\x00\x05"))])
    (packet,) = iter_udp(str(path))
    assert packet.payload == b"\x00\x05"


def test_non_udp_fragments_and_truncated_frames_are_skipped_and_counted(tmp_path: Path) -> None:
    arp = b"\xff" * 6 + b"\x02" + b"\0" * 5 + b"\x08\x06" + b"\0" * 28
    tcp = ethernet(ipv4(SRC4, DST4, 6, b"\0" * 20))
    first_fragment = ethernet(ipv4(SRC4, DST4, 17, udp(1, 2055, PAYLOAD), flags_offset=0x2000))  # MF
    later_fragment = ethernet(ipv4(SRC4, DST4, 17, b"rest of it", flags_offset=0x0003))  # offset 24
    v6_fragment = ethernet(ipv6(SRC6, DST6, 44, struct.pack("!BBHI", 17, 0, 0x0001, 7) + udp(1, 2055, PAYLOAD)))
    frames = [arp, tcp, first_fragment, later_fragment, v6_fragment, ethernet(udp4()),
              ethernet(udp4(b"x" * 200))]
    # A snap length that cuts the last frame's UDP payload short.
    path = write_pcap(tmp_path / "mixed.pcap", 1, frames, snaplen=120)
    counts = CaptureCounts()
    packets = list(iter_udp(str(path), counts))
    assert [p.payload for p in packets] == [PAYLOAD]
    assert counts.as_dict() == {"frames": 7, "udp": 1, "non_ip": 1, "non_udp": 1, "fragments": 3,
                                "truncated": 1, "truncated_file": 0}


@pytest.mark.parametrize("fmt", ["pcap", "pcapng"])
@pytest.mark.parametrize("cut", ["record data", "record header"])
def test_file_cut_in_the_middle_of_a_record(tmp_path: Path, fmt: str, cut: str) -> None:
    frames = [ethernet(udp4()), ethernet(udp6())]
    write = write_pcap if fmt == "pcap" else write_pcapng
    # Where the second record starts: the size of the same file with only the first frame.
    last_record = write(tmp_path / f"one.{fmt}", 1, frames[:1]).stat().st_size
    path = write(tmp_path / f"cut.{fmt}", 1, frames)
    data = path.read_bytes()
    end = last_record + (5 if cut == "record header" else 40)
    path.write_bytes(data[:end])
    counts = CaptureCounts()
    assert list(iter_udp(str(path), counts)) == EXPECTED[:1]  # the cut record is never yielded
    assert (counts.frames, counts.truncated_file) == (1, 1)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"this is not a capture at all", "not a pcap or pcapng capture"),
        (b"", "not a pcap or pcapng capture"),
        (struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 105), "unsupported link type 105"),
        (b"\x0a\x0d\x0d\x0a" + b"\0" * 8, "not a readable pcap or pcapng capture"),
    ],
)
def test_not_a_capture(tmp_path: Path, content: bytes, reason: str) -> None:
    path = tmp_path / "bad.pcap"
    path.write_bytes(content)
    with pytest.raises(NotACaptureError) as info:
        list(iter_udp(str(path)))
    assert isinstance(info.value, ValueError)
    assert info.value.filename == str(path)
    assert str(path) in str(info.value) and reason in str(info.value)
    with pytest.raises(NotACaptureError):
        check_capture(str(path))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(NotACaptureError, match="No such file"):
        list(iter_udp(str(tmp_path / "nope.pcap")))


def test_real_sll_ipv6_capture() -> None:
    # pmacct's test 112: Linux cooked capture (SLL), IPFIX over IPv6.
    path = shared_testdata("netflow-pcaps", "pmacct", "112-IPFIXv10-CISCO-options-map-reassignment__traffic-00.pcap")
    counts = CaptureCounts()
    packets = list(iter_udp(str(path), counts))
    assert len(packets) == 21 and counts.frames == 21
    assert all(p.src_addr[:12] != b"\0" * 10 + b"\xff\xff" for p in packets)  # IPv6 exporter
    assert {int.from_bytes(p.payload[:2], "big") for p in packets} == {10}
