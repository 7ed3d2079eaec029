"""Decoder throughput on one core: `python -m tests.benchmarks.bench_decode [--flows N]`.

Builds big batches of export packets in memory (v9; IPFIX with a fixed-length template; IPFIX
with a variable-length field) and times, in the same run, each way of decoding them: the bulk
path the sensor takes (:func:`decode_payloads` of one exporter's batch) with the compiled
kernel's columns and with the numpy reference code, and the datagram-by-datagram walk
(:func:`decode_datagrams`). Prints flows/s, us per flow and numpy / kernel. Pure CPU: no
sockets, no Kafka. The packets are built once with numpy so only decoding is timed.
"""

from __future__ import annotations

import argparse
import struct
import time

import numpy as np

from sensors.netflow import kernel
from sensors.netflow.decoder import Datagram, DecodeStats, decode_datagrams, decode_payloads
from sensors.netflow.templates import TemplateStore

EXPORTER = b"\x00" * 10 + b"\xff\xff" + bytes([192, 0, 2, 1])
# src, dst, sport, dport, proto, flags, bytes, packets, start(ms), end(ms), in, out
FIELDS = [(8, 4), (12, 4), (7, 2), (11, 2), (4, 1), (6, 1), (1, 8), (2, 8), (152, 8), (153, 8), (10, 4), (14, 4)]
V9_FIELDS = [(8, 4), (12, 4), (7, 2), (11, 2), (4, 1), (6, 1), (1, 4), (2, 4), (22, 4), (21, 4), (10, 2), (14, 2)]
PER_PACKET = 30


def _records(fields: list[tuple[int, int]], n: int, rng: np.random.Generator) -> np.ndarray:
    size = sum(length for _, length in fields)
    return rng.integers(0, 256, size=(n, size), dtype=np.uint8)


def v9_packets(n_flows: int, rng: np.random.Generator) -> list[bytes]:
    """v9: one template packet, then data packets of PER_PACKET records."""
    body = struct.pack("!HH", 256, len(V9_FIELDS)) + b"".join(struct.pack("!HH", t, n) for t, n in V9_FIELDS)
    tpl = struct.pack("!HHIIII", 9, 1, 1000, 1_700_000_000, 0, 0) + struct.pack("!HH", 0, 4 + len(body)) + body
    recs = _records(V9_FIELDS, n_flows, rng)
    out = [tpl]
    for seq, i in enumerate(range(0, n_flows, PER_PACKET), 1):
        data = recs[i:i + PER_PACKET].tobytes()
        out.append(struct.pack("!HHIIII", 9, PER_PACKET, 3_600_000, 1_700_000_000, seq, 0)
                   + struct.pack("!HH", 256, 4 + len(data)) + data)
    return out


def ipfix_packets(n_flows: int, rng: np.random.Generator, varlen: bool) -> list[bytes]:
    """IPFIX: one template message, then messages of PER_PACKET records; ``varlen`` adds an
    interfaceName-like variable-length field (82) of 0-12 bytes to every record."""
    fields = FIELDS + ([(82, 0xFFFF)] if varlen else [])
    tbody = struct.pack("!HH", 256, len(fields)) + b"".join(struct.pack("!HH", t, n) for t, n in fields)
    tset = struct.pack("!HH", 2, 4 + len(tbody)) + tbody
    out = [struct.pack("!HHIII", 10, 16 + len(tset), 1_700_000_000, 0, 0) + tset]
    recs = _records(FIELDS, n_flows, rng)
    seq = 0
    for i in range(0, n_flows, PER_PACKET):
        chunk = recs[i:i + PER_PACKET]
        if varlen:
            data = b"".join(r.tobytes() + bytes([k % 13]) + b"e" * (k % 13) for k, r in enumerate(chunk))
        else:
            data = chunk.tobytes()
        dset = struct.pack("!HH", 256, 4 + len(data)) + data
        out.append(struct.pack("!HHIII", 10, 16 + len(dset), 1_700_000_000, seq, 0) + dset)
        seq += len(chunk)
    return out


def bench(name: str, packets: list[bytes], flows: int, batch: int, repeat: int, how: str) -> float:
    """Best of ``repeat`` runs of one way of decoding (``how``: bulk-kernel, bulk-numpy,
    walk-kernel, walk-numpy) in calls of ``batch`` datagrams; returns CPU-seconds per flow."""
    compiled = how.endswith("kernel")
    datagrams = [Datagram(EXPORTER, 1_700_000_000_000, p) for p in packets]
    received = [d.received_ms for d in datagrams]
    best = float("inf")
    for _ in range(repeat):
        templates, stats = TemplateStore(), DecodeStats()
        t0 = time.process_time()
        rows = 0
        for i in range(0, len(datagrams), batch):
            if how.startswith("bulk"):
                rows += decode_payloads(EXPORTER, packets[i:i + batch], received[i:i + batch], templates, stats,
                                        compiled=compiled).num_rows
            else:
                rows += decode_datagrams(datagrams[i:i + batch], templates, stats, compiled=compiled).num_rows
        best = min(best, time.process_time() - t0)
        assert rows == flows, (name, rows, flows, stats.as_dict())
    per_flow = best / flows
    print(f"{name:13s} {how:12s} {flows:>9d} flows  {best:6.3f} CPU-s  {1 / per_flow / 1e6:6.2f} M flows/s  "
          f"{per_flow * 1e6:6.3f} us/flow")
    return per_flow


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flows", type=int, default=600_000)
    parser.add_argument("--batch", type=int, default=552,
                        help="datagrams per decode call (552: ~16k flows, a sensor batch at full speed)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--only", choices=["v9", "ipfix", "ipfix-varlen"], action="append")
    args = parser.parse_args()
    rng = np.random.default_rng(1)
    n = args.flows - args.flows % PER_PACKET
    cases = {
        "v9": lambda: v9_packets(n, rng),
        "ipfix": lambda: ipfix_packets(n, rng, varlen=False),
        "ipfix-varlen": lambda: ipfix_packets(n, rng, varlen=True),
    }
    t0 = time.perf_counter()
    kernel.warm_up()
    print(f"kernel compiled in {time.perf_counter() - t0:.2f} s (wall)")
    for name, make in cases.items():
        if args.only and name not in args.only:
            continue
        packets = make()
        cost = {how: bench(name, packets, n, args.batch, args.repeat, how)
                for how in ("bulk-numpy", "bulk-kernel", "walk-numpy", "walk-kernel")}
        print(f"{name:13s} numpy / kernel: bulk {cost['bulk-numpy'] / cost['bulk-kernel']:.2f}x, "
              f"walk {cost['walk-numpy'] / cost['walk-kernel']:.2f}x")


if __name__ == "__main__":
    main()
