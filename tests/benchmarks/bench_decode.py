"""Decoder throughput on one core: `python -m tests.benchmarks.bench_decode [--flows N]`.

Builds big batches of export packets in memory (v9; IPFIX with a fixed-length template; IPFIX
with a variable-length field) and times both ways into the decoder, printing CPU-seconds per
million flows and flows/s:

- ``walk``: :func:`decode_datagrams`, one datagram at a time (what ``flowtally decode`` does
  with a capture, and the path every unusual datagram takes);
- ``batch``: :func:`decode_payloads` on one exporter's datagrams as the collector hands them
  over (``batch_max_flows`` worth per call), where the usual datagrams are decoded in bulk.
  This is the live sensor's decode cost.

Pure CPU: no sockets, no Kafka. The packets are built once with numpy so only decoding is timed.
"""

from __future__ import annotations

import argparse
import struct
import time

import numpy as np

from sensors.netflow.collector import NetflowSettings
from sensors.netflow.decoder import Datagram, decode_datagrams, decode_payloads
from sensors.netflow.stats import DecodeStats
from sensors.netflow.templates import TemplateStore

EXPORTER = b"\x00" * 10 + b"\xff\xff" + bytes([192, 0, 2, 1])
RECEIVED_MS = 1_700_000_000_000
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


def bench(name: str, packets: list[bytes], flows: int, walk_batch: int, repeat: int) -> None:
    """Print the best of ``repeat`` runs of each path, in CPU-seconds per million flows."""
    datagrams = [Datagram(EXPORTER, RECEIVED_MS, p) for p in packets]
    collector_batch = max(1, NetflowSettings.model_fields["batch_max_flows"].default // PER_PACKET)

    def walk(templates: TemplateStore, stats: DecodeStats) -> int:
        return sum(decode_datagrams(datagrams[i:i + walk_batch], templates, stats).num_rows
                   for i in range(0, len(datagrams), walk_batch))

    def batch(templates: TemplateStore, stats: DecodeStats) -> int:
        rows = 0
        for i in range(0, len(packets), collector_batch):
            payloads = packets[i:i + collector_batch]
            rows += decode_payloads(EXPORTER, payloads, [RECEIVED_MS] * len(payloads), templates, stats).num_rows
        return rows

    for path, run, per_call in (("walk", walk, walk_batch), ("batch", batch, collector_batch)):
        best = float("inf")
        for _ in range(repeat):
            templates, stats = TemplateStore(), DecodeStats()
            t0 = time.process_time()
            rows = run(templates, stats)
            best = min(best, time.process_time() - t0)
            # Every flow decoded, none lost or in error: a faster path that dropped records
            # would otherwise look good.
            assert rows == flows and not stats.errors_by_reason(), (name, path, rows, flows, stats.as_dict())
        print(f"{name:14s} {path:5s} {per_call:>5d} datagrams/call  {flows:>9,d} flows  "
              f"{best / flows * 1e6:6.3f} CPU-s per million flows  {flows / best / 1e6:6.2f} M flows/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flows", type=int, default=600_000)
    parser.add_argument("--batch", type=int, default=1000, help="datagrams per decode_datagrams call (the walk path)")
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
    for name, make in cases.items():
        if args.only and name not in args.only:
            continue
        bench(name, make(), n, args.batch, args.repeat)


if __name__ == "__main__":
    main()
