"""The UDP receiver on a real loopback socket: coalesced reads, timer polling while datagrams keep
coming, back to waiting on the socket when idle, and pauses bounded by the receive buffer."""

from __future__ import annotations

import asyncio
import socket
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sensors.netflow.receiver import (
    Run,
    UdpReceiver,
    domains_many,
    estimate_records,
    estimate_records_many,
    open_udp_socket,
    source_address,
)
from tests.oracle import domain_of


async def _exchange(coalesce_ms: float, bursts: int, per_burst: int) -> tuple[list[bytes], UdpReceiver, bool]:
    """Send ``bursts`` bursts of numbered datagrams, 20 ms apart; returns what the receiver
    handed over (in order), the receiver, and whether it was back on the socket when idle."""
    got: list[bytes] = []
    sources: set[bytes] = set()

    def on_datagrams(runs: list[Run], received_ms: int) -> None:
        assert received_ms > 0
        for run in runs:
            sources.add(run.source)
            got.extend(run.payloads)
            assert run.records == len(run.payloads)  # not NetFlow: 1 each

    sock = open_udp_socket("127.0.0.1", 0, receive_buffer=4 << 20)
    receiver = UdpReceiver(sock, on_datagrams, coalesce_ms=coalesce_ms)
    receiver.start()
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sender.bind(("127.0.0.1", 0))
        for b in range(bursts):
            for i in range(per_burst):
                sender.sendto(f"{b}:{i}".encode(), receiver.address)
            await asyncio.sleep(0.02)
        for _ in range(100):  # bounded wait: 2 s
            if len(got) == bursts * per_burst:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(3 * coalesce_ms / 1000 + 0.05)  # an empty timer read: back on the socket
        loop = asyncio.get_running_loop()
        waiting = loop.remove_reader(sock.fileno())  # True only if it was registered
        if waiting:
            loop.add_reader(sock.fileno(), receiver._readable)
    finally:
        sender.close()
        receiver.stop()
    assert sources == {source_address("127.0.0.1")}
    return got, receiver, waiting



def test_coalesced_reads_keep_order_and_return_to_the_socket() -> None:
    got, receiver, waiting = asyncio.run(_exchange(coalesce_ms=50, bursts=10, per_burst=30))
    assert got == [f"{b}:{i}".encode() for b in range(10) for i in range(30)]
    assert waiting
    # 10 bursts 20 ms apart, read every 50 ms: far fewer reads than bursts.
    assert 1 <= receiver.wakeups <= 7
    assert receiver.kernel_drops == 0


def test_without_coalescing_every_burst_is_read() -> None:
    got, receiver, waiting = asyncio.run(_exchange(coalesce_ms=0, bursts=5, per_burst=10))
    assert got == [f"{b}:{i}".encode() for b in range(5) for i in range(10)]
    assert waiting and receiver.wakeups >= 5


def test_pause_is_bounded_by_the_receive_buffer() -> None:
    sock = open_udp_socket("127.0.0.1", 0, receive_buffer=65536)
    try:
        receiver = UdpReceiver(sock, lambda runs, ms: None, coalesce_ms=100)
        limit = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        receiver._last_read -= 0.010
        receiver._read_bytes = limit  # a buffer's worth read in 10 ms
        pause = receiver._pause()
        assert 0.002 < pause < 0.004  # half the buffer at twice that rate: 2.5 ms, not 100
        receiver._last_read -= 1.0
        receiver._read_bytes = 1000  # a trickle: the full pause
        assert receiver._pause() == 0.1
    finally:
        sock.close()


_STARTS = st.sampled_from([b"\x00\x05", b"\x00\x09", b"\x00\x0a", b"\x00\x63", b"\x01\x09", b"", b"\x00"])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(_STARTS, st.binary(max_size=6)), min_size=1, max_size=20))
def test_estimate_records_many_equals_estimate_records(parts: list[tuple[bytes, bytes]]) -> None:
    """The per-call estimate reads the headers as the per-datagram one does (short ones too,
    with stale bytes after them as in the receive buffer's slots)."""
    payloads = [start + rest for start, rest in parts]
    heads = np.full((len(payloads), 4), 0xEE, dtype=np.uint8)
    for i, p in enumerate(payloads):
        heads[i, : min(4, len(p))] = list(p[:4])
    lengths = np.array([len(p) for p in payloads], dtype=np.uint32)
    assert estimate_records_many(heads, lengths).tolist() == [estimate_records(p) for p in payloads]


def _headers() -> list[bytes]:
    """Datagrams whose observation domains differ: v9 (source ID), IPFIX (domain ID), v5 (engine
    type/ID), too short for their version, and not NetFlow; longest first, so that shorter
    ones land in receive slots holding stale bytes of earlier ones."""
    v9 = struct.pack("!HHIIII", 9, 3, 1, 2, 3, 0x01020304) + b"\x00" * 40
    ipfix = struct.pack("!HHIII", 10, 60, 1, 2, 77) + b"\x00" * 44
    v5 = struct.pack("!HHIIIIBBH", 5, 1, 1, 2, 3, 4, 0x0A, 0x0B, 0) + b"\x00" * 48
    return [v9, ipfix, v5, v9[:19], ipfix[:15], v5[:21], b"\x00\x09", b"hello", v9]


@pytest.mark.parametrize("multi", [True, False])
def test_runs_carry_lengths_and_domains_of_their_datagrams(multi: bool) -> None:
    """What the receiver copies from the receive buffer per call (lengths, header bytes) gives
    what reading every payload on its own does (len, domain_of), with recvmmsg and without."""
    payloads = _headers() * 20
    runs: list[Run] = []

    async def exchange() -> None:
        sock = open_udp_socket("127.0.0.1", 0, receive_buffer=4 << 20)
        receiver = UdpReceiver(sock, lambda got, ms: runs.extend(got), multi=multi)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            for payload in payloads:
                sender.sendto(payload, receiver.address)
            receiver.start()
            for _ in range(100):  # bounded wait: 2 s
                if sum(len(r.payloads) for r in runs) == len(payloads):
                    break
                await asyncio.sleep(0.02)
        receiver.stop()

    asyncio.run(exchange())
    got = [p for r in runs for p in r.payloads]
    assert got == payloads
    assert np.concatenate([c for r in runs for c in r.lengths]).tolist() == [len(p) for p in payloads]
    lengths = np.concatenate([c for r in runs for c in r.lengths])
    heads = np.concatenate([c for r in runs for c in r.heads])
    assert domains_many(heads, lengths).tolist() == [domain_of(p) for p in payloads]
    assert all(sum(map(len, r.lengths)) == len(r.payloads) == sum(map(len, r.heads)) for r in runs)
