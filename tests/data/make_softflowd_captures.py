#!/usr/bin/env python3
"""Regenerate the golden softflowd captures in this folder (see README.md).

1. Build ``traffic.pcap`` with dpkt: a fixed set of IPv4 and IPv6 TCP, UDP and ICMP flows with
   known packet and byte counts (IP total length, as NetFlow counts them). The expected totals are
   written to ``traffic-expected.json``.
2. For each export format, start dumpcap on the loopback interface filtered on a UDP port, run
   Debian's softflowd on the traffic (``softflowd -r traffic.pcap -n 127.0.0.1:PORT -v V``; in -r
   mode it expires every flow when it reaches the end of the file), then stop the capture and keep
   the exported packets as ``softflowd-*.pcap``.

Run as root (dumpcap on ``lo``) from anywhere: ``python3 tests/data/make_softflowd_captures.py``.
The captures carry the time they were made, so a rerun changes the files but not their flows.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import dpkt

HERE = Path(__file__).resolve().parent
BASE_MS = 1_704_164_645_000  # 2024-01-02T03:04:05Z; whole milliseconds keep the truth exact
MAC_A = b"\x02\x00\x00\x00\x00\x0a"
MAC_B = b"\x02\x00\x00\x00\x00\x0b"

# output file, softflowd version argument, extra softflowd arguments, UDP port
EXPORTS = [
    ("softflowd-v5.pcap", "5", ["-a"], 20555),
    ("softflowd-v9.pcap", "9", ["-a"], 20556),
    ("softflowd-v9-abstime.pcap", "9", ["-A", "milli"], 20557),
    ("softflowd-ipfix.pcap", "10", ["-a"], 20558),
]


class Traffic:
    """Collects frames and the per-direction truth (packets, IP bytes) of every flow."""

    def __init__(self) -> None:
        self.frames: list[tuple[int, bytes]] = []
        self.truth: Counter[tuple[str, str, int, int, int, str]] = Counter()
        self.ms = BASE_MS
        self.first_ms: dict[tuple[str, str, int, int, int], int] = {}
        self.last_ms: dict[tuple[str, str, int, int, int], int] = {}

    def add(self, ip: dpkt.ip.IP | dpkt.ip6.IP6, sport: int, dport: int, dt_ms: int = 10) -> None:
        v6 = isinstance(ip, dpkt.ip6.IP6)
        eth = dpkt.ethernet.Ethernet(
            src=MAC_A, dst=MAC_B, type=dpkt.ethernet.ETH_TYPE_IP6 if v6 else dpkt.ethernet.ETH_TYPE_IP, data=ip
        )
        frame = bytes(eth)
        self.ms += dt_ms
        self.frames.append((self.ms, frame))
        family = socket.AF_INET6 if v6 else socket.AF_INET
        src, dst = socket.inet_ntop(family, ip.src), socket.inet_ntop(family, ip.dst)
        proto = ip.nxt if v6 else ip.p
        ip_bytes = len(bytes(ip))
        flow = (src, dst, sport, dport, proto)
        self.truth[(*flow, "bytes")] += ip_bytes
        self.truth[(*flow, "packets")] += 1
        self.first_ms.setdefault(flow, self.ms)
        self.last_ms[flow] = self.ms

    def write(self, path: Path) -> None:
        with path.open("wb") as f:
            writer = dpkt.pcap.Writer(f, linktype=dpkt.pcap.DLT_EN10MB)
            for ms, frame in self.frames:
                writer.writepkt(frame, ts=ms / 1000)


def ip4(src: str, dst: str, proto: int, payload: dpkt.Packet) -> dpkt.ip.IP:
    ip = dpkt.ip.IP(src=socket.inet_aton(src), dst=socket.inet_aton(dst), p=proto, ttl=64, data=payload)
    ip.len = 20 + len(bytes(payload))
    return ip


def ip6(src: str, dst: str, proto: int, payload: dpkt.Packet) -> dpkt.ip6.IP6:
    raw = bytes(payload)
    ip = dpkt.ip6.IP6(
        src=socket.inet_pton(socket.AF_INET6, src), dst=socket.inet_pton(socket.AF_INET6, dst),
        nxt=proto, hlim=64, plen=len(raw), data=payload,
    )
    ip.extension_hdrs = {}
    return ip


def tcp(sport: int, dport: int, flags: int, size: int, seq: int = 1000) -> dpkt.tcp.TCP:
    return dpkt.tcp.TCP(sport=sport, dport=dport, seq=seq, flags=flags, win=65535, data=b"x" * size)


def udp(sport: int, dport: int, size: int) -> dpkt.udp.UDP:
    u = dpkt.udp.UDP(sport=sport, dport=dport, data=b"u" * size)
    u.ulen = 8 + size
    return u


def tcp_conversation(tr: Traffic, make_ip, a: str, b: str, sport: int, dport: int, segments: list[int]) -> None:
    """Handshake, data segments from a to b (each acked), FIN exchange."""
    syn, ack, fin, psh = dpkt.tcp.TH_SYN, dpkt.tcp.TH_ACK, dpkt.tcp.TH_FIN, dpkt.tcp.TH_PUSH
    tr.add(make_ip(a, b, 6, tcp(sport, dport, syn, 0)), sport, dport)
    tr.add(make_ip(b, a, 6, tcp(dport, sport, syn | ack, 0)), dport, sport)
    tr.add(make_ip(a, b, 6, tcp(sport, dport, ack, 0)), sport, dport)
    for size in segments:
        tr.add(make_ip(a, b, 6, tcp(sport, dport, psh | ack, size)), sport, dport)
        tr.add(make_ip(b, a, 6, tcp(dport, sport, ack, 0)), dport, sport)
    tr.add(make_ip(a, b, 6, tcp(sport, dport, fin | ack, 0)), sport, dport)
    tr.add(make_ip(b, a, 6, tcp(dport, sport, fin | ack, 0)), dport, sport)
    tr.add(make_ip(a, b, 6, tcp(sport, dport, ack, 0)), sport, dport)


def build_traffic() -> Traffic:
    tr = Traffic()
    # IPv4 TCP: a bulk transfer and a short request.
    tcp_conversation(tr, ip4, "10.1.0.1", "10.2.0.1", 40001, 443, [1000] * 20 + [517])
    tcp_conversation(tr, ip4, "10.1.0.3", "10.2.0.3", 40003, 80, [300, 200, 100])
    # IPv4 UDP: DNS-like queries and answers.
    for i in range(15):
        tr.add(ip4("10.1.0.2", "10.2.0.2", 17, udp(5353, 53, 40 + i)), 5353, 53)
        tr.add(ip4("10.2.0.2", "10.1.0.2", 17, udp(53, 5353, 120 + i)), 53, 5353)
    # IPv4 ICMP echo request/reply (ports are 0 in NetFlow for ICMP unless the exporter encodes
    # type/code into them; softflowd puts type/code in the destination port of v5 records).
    for seq in range(10):
        echo = dpkt.icmp.ICMP.Echo(id=7, seq=seq, data=b"p" * 56)
        tr.add(ip4("10.1.0.4", "10.2.0.4", 1, dpkt.icmp.ICMP(type=8, code=0, data=echo)), 0, 0)
        tr.add(ip4("10.2.0.4", "10.1.0.4", 1, dpkt.icmp.ICMP(type=0, code=0, data=echo)), 0, 0)
    # Many small IPv4 UDP flows so that the v5 export needs several packets (30 records each).
    for i in range(60):
        for _ in range(2):
            tr.add(ip4(f"10.3.{i // 200}.{i % 200 + 1}", "10.4.0.1", 17, udp(30000 + i, 9000, 64 + i)), 30000 + i, 9000, 2)
    # IPv6 TCP, UDP and ICMPv6 (softflowd exports these with v9 and IPFIX only).
    tcp_conversation(tr, ip6, "fd00::1", "fd00::2", 41000, 8080, [1200] * 12)
    for i in range(10):
        tr.add(ip6("fd00::3", "fd00::4", 17, udp(50123, 123, 48 + i)), 50123, 123)
    for seq in range(5):
        echo6 = dpkt.icmp6.ICMP6.Echo(id=9, seq=seq, data=b"q" * 32)
        tr.add(ip6("fd00::5", "fd00::6", 58, dpkt.icmp6.ICMP6(type=128, code=0, data=echo6)), 0, 0)
    return tr


def capture_export(traffic: Path, out: Path, version: str, extra: list[str], port: int, tmp: Path) -> None:
    softflowd = shutil.which("softflowd") or shutil.which("softflowd", path="/usr/sbin:/sbin") or sys.exit(
        "softflowd not found (apt-get install softflowd)"
    )
    with loopback_capture(port, out, tmp):
        _run_softflowd(softflowd, traffic, version, extra, port, tmp / f"{out.stem}.ctl", tmp)


@contextlib.contextmanager
def loopback_capture(port: int, out: Path, tmp: Path) -> Iterator[None]:
    """Capture UDP to ``port`` on lo with dumpcap while the body runs; copy the capture to ``out``."""
    dumpcap = shutil.which("dumpcap") or sys.exit("dumpcap not found (apt-get install tshark)")
    raw = tmp / out.name
    # -P: classic pcap (Linux captures lo as Ethernet), the format every tool reads.
    cap = subprocess.Popen(
        [dumpcap, "-q", "-P", "-i", "lo", "-f", f"udp dst port {port}", "-w", str(raw)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 10
    while not raw.exists() and time.monotonic() < deadline:  # dumpcap creates the file once capturing
        time.sleep(0.05)
    time.sleep(0.5)
    try:
        yield
        time.sleep(1.0)  # the exporter's last datagrams reach the capture
    finally:
        cap.send_signal(signal.SIGINT)
        cap.wait(timeout=10)
    shutil.copyfile(raw, out)


def _run_softflowd(softflowd: str, traffic: Path, version: str, extra: list[str], port: int,
                   ctl: Path, tmp: Path) -> None:
    flows = subprocess.Popen(
        [softflowd, "-d", "-r", str(traffic), "-n", f"127.0.0.1:{port}", "-v", version, *extra,
         "-p", str(tmp / "softflowd.pid"), "-c", str(ctl)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    # softflowd 1.1.0 in -r mode blocks in accept() on its control socket at the top of each main
    # loop iteration, so it only reads the file (and, next time round, notices EOF, expires every
    # flow and exits) when a client connects. A harmless "statistics" request drives it along.
    softflowctl = shutil.which("softflowctl") or "/usr/sbin/softflowctl"
    deadline = time.monotonic() + 30
    while flows.poll() is None:
        if time.monotonic() > deadline:
            flows.kill()
            sys.exit("softflowd did not finish reading the traffic")
        if ctl.exists():
            subprocess.run([softflowctl, "-c", str(ctl), "statistics"], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=5, check=False)
        time.sleep(0.2)
    if flows.returncode != 0:
        sys.exit(f"softflowd exited with {flows.returncode}")


def main() -> int:
    if os.geteuid() != 0:
        print("run as root: dumpcap needs to capture on lo", file=sys.stderr)
        return 1
    tr = build_traffic()
    traffic = HERE / "traffic.pcap"
    tr.write(traffic)
    expected = [
        {"src": f[0], "dst": f[1], "sport": f[2], "dport": f[3], "proto": f[4],
         "bytes": tr.truth[(*f, "bytes")], "packets": tr.truth[(*f, "packets")],
         "first_ms": first, "last_ms": tr.last_ms[f]}
        for f, first in tr.first_ms.items()
    ]
    (HERE / "traffic-expected.json").write_text(json.dumps(expected, indent=1) + "\n")
    print(f"traffic.pcap: {len(tr.frames)} frames, {len(expected)} unidirectional flows")
    with tempfile.TemporaryDirectory(prefix="softflowd-") as tmp:
        for name, version, extra, port in EXPORTS:
            capture_export(traffic, HERE / name, version, extra, port, Path(tmp))
            print(f"{name}: {(HERE / name).stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
