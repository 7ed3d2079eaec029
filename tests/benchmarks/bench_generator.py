"""How fast the load generator is: `python -m tests.benchmarks.bench_generator [--flows N]`.

Prints flows/s for drawing flows, for drawing + encoding them, and for the whole sender
(`run_netflow` at rate 0) into a local UDP socket drained by another process, and whether that
process received every datagram.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing as mp
import socket
import sys
import time
from multiprocessing.connection import Connection

from flowtally.dev import generator as gen

_CHUNK = 20_000
# Lets root exceed net.core.rmem_max; Python does not export the constant (33 on Linux).
_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33 if sys.platform == "linux" else socket.SO_RCVBUF)


def _drain(conn: Connection) -> None:
    """Receive datagrams until 1 s of silence, then report how many arrived."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, _RCVBUFFORCE, 64 << 20)
    except OSError:  # not root: as much as rmem_max allows
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 20)
    sock.bind(("127.0.0.1", 0))
    conn.send(sock.getsockname()[1])
    count = 0
    sock.settimeout(5.0)  # the sender's start-up
    try:
        while True:
            sock.recv(65535)
            count += 1
            sock.settimeout(1.0)
    except TimeoutError:
        pass
    conn.send(count)


def main() -> None:
    """Run the three measurements and print them."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--flows", type=int, default=1_000_000)
    opts = parser.parse_args()
    cluster = gen.synthetic_cluster(1)
    now_ms = time.time_ns() // 1_000_000
    chunks = max(1, opts.flows // _CHUNK)

    t0 = time.perf_counter()
    for i in range(chunks):
        gen.synthetic_flows(cluster, _CHUNK, (1, i), now_ms)
    t_gen = time.perf_counter() - t0

    t0 = time.perf_counter()
    for i in range(chunks):
        cols = gen.synthetic_flows(cluster, _CHUNK, (1, i), now_ms)
        gen.encode_v9(cols, source_id=1, sequence=0, unix_secs=now_ms // 1000 + 2, uptime_ms=10**7)
    t_enc = time.perf_counter() - t0
    n = chunks * _CHUNK
    print(f"synthetic_flows            {n / t_gen:>12,.0f} flows/s")
    print(f"synthetic_flows+encode_v9  {n / t_enc:>12,.0f} flows/s")

    parent, child = mp.Pipe()
    proc = mp.get_context("spawn").Process(target=_drain, args=(child,))
    proc.start()
    port = parent.recv()
    out = io.StringIO()
    args = argparse.Namespace(
        to=f"127.0.0.1:{port}", flows=opts.flows, rate=0.0, seed=1, source_id=1, json=True
    )
    with contextlib.redirect_stdout(out):
        gen.run_netflow(args)
    report = json.loads(out.getvalue())
    received = parent.recv()
    proc.join()
    print(
        f"run_netflow (rate 0)       {report['rate']:>12,.0f} flows/s  "
        f"({report['flows']:,} flows, {report['datagrams']:,} datagrams in {report['elapsed_s']:.2f} s; "
        f"receiver got {received:,}, send retries {report['send_retries']})"
    )


if __name__ == "__main__":
    main()
