"""What the sensor's output alone costs: the same batches encoded and published, nothing received.

    .venv/bin/python -m tests.benchmarks.transport_floor --bootstrap HOST:PORT [--flows N]
        [--rate R] [--format v9|ipfix] [--batch-flows 16384] [--coalesce-ms 50] [--compression lz4]

Run by ``bench_sensor --floor`` beside the sensor and nfcapd. It first receives the generator's
stream on a plain socket and decodes it into the batches the sensor would build (records counted
from the headers up to ``batch_max_flows``, as the collector does); none of that is measured.
Then, in a process tuned like the sensor (:data:`sensors.netflow.collector.MEMORY`), it
encodes each batch with Arrow IPC (the sensor's compression) and hands it to the sensor's
:class:`~sensors.publisher.Publisher` on the real broker, paced as the batches filled while the
stream arrived, and measures its CPU from the first batch until Kafka acknowledged the last.

The result is the part of the sensor's CPU per flow that does not depend on how datagrams are
received and decoded: Arrow IPC, compression, the Kafka client and the kernel's share of sending.
A sensor whose receiving and decoding cost nothing would still cost this much. Prints one JSON
line: CPU seconds (user, system, and within them Arrow IPC encoding), flows, batches, message
bytes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import threading
import time

import pyarrow as pa
from prometheus_client import REGISTRY

from flowtally import kafka
from flowtally.kafka import TopicSettings
from flowtally.process import apply as apply_memory_policy
from flowtally.settings import KafkaSettings
from sensors.netflow.collector import MEMORY
from sensors.netflow.decoder import decode_payloads
from sensors.netflow.receiver import estimate_records, open_udp_socket
from sensors.netflow.stats import DecodeStats
from sensors.netflow.templates import TemplateStore
from sensors.publisher import Publisher, encode_messages
from sensors.schema import address16


def capture(flows: int, rate: float, fmt: str) -> tuple[list[tuple[bytes, float]], int]:
    """The generator's stream as it arrived: (payload, seconds since the first datagram), and
    the flows the generator reports sent."""
    sock = open_udp_socket("127.0.0.1", 0, receive_buffer=64 << 20)
    sock.settimeout(0.2)
    port = sock.getsockname()[1]
    got: list[tuple[bytes, float]] = []
    done = threading.Event()

    def receive() -> None:
        t0 = None
        while True:
            try:
                data = sock.recv(65535)
            except TimeoutError:
                if done.is_set():  # the generator has finished and the socket is empty
                    return
                continue
            now = time.monotonic()
            t0 = now if t0 is None else t0
            got.append((data, now - t0))

    thread = threading.Thread(target=receive, daemon=True)
    thread.start()
    sent = subprocess.run([sys.executable, "-m", "flowtally.dev.generator", "netflow", "--to", f"127.0.0.1:{port}",
                    "--flows", str(flows), "--rate", str(rate), "--format", fmt, "--json"],
                          check=True, capture_output=True, text=True)
    done.set()
    thread.join(30)
    sock.close()
    return got, int(json.loads(sent.stdout.strip().splitlines()[-1])["flows"])


def batches(stream: list[tuple[bytes, float]], batch_flows: int, coalesce_ms: float) -> list[tuple[pa.Table, float]]:
    """The sensor's batches of the stream and the time each was complete: the collector takes
    what arrived in each ``coalesce_ms`` wakeup at once and decodes an exporter's datagrams once
    their header counts reach ``batch_flows``."""
    exporter = address16("127.0.0.1")
    templates = TemplateStore()
    received_ms = time.time_ns() // 1_000_000
    out: list[tuple[pa.Table, float]] = []
    pending: list[bytes] = []
    records = 0
    window = coalesce_ms / 1000 or 1e-9
    for i, (payload, at) in enumerate(stream):
        pending.append(payload)
        records += estimate_records(payload)
        last = i == len(stream) - 1
        wakeup_ends = last or stream[i + 1][1] // window != at // window
        if (wakeup_ends and records >= batch_flows) or last:
            table = decode_payloads(exporter, pending, [received_ms] * len(pending), templates, DecodeStats())
            out.append((table, at))
            pending, records = [], 0
    return out


async def publish(settings: KafkaSettings, work: list[tuple[pa.Table, float]], compression: str) -> dict[str, float]:
    """Encode and publish ``work`` at its pace; CPU from the first batch to the last acknowledgement."""
    topics = TopicSettings()

    async def prepare() -> None:
        await kafka.ensure_topics(settings, topics, timeout=5.0)

    publisher = Publisher(lambda: kafka.producer(settings), settings.topic("raw"), 256, prepare=prepare)
    await publisher.start()
    while not publisher.connected:
        await asyncio.sleep(0.1)
    flows = sum(t.num_rows for t, _ in work)
    wire = 0
    encoding = 0.0  # CPU inside encode_messages; the rest is the Kafka client's and the loop's
    before = os.times()
    t0 = time.monotonic()
    for table, at in work:
        delay = t0 + at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        start = time.thread_time()
        messages = encode_messages(table, b"127.0.0.1", compression=compression)
        encoding += time.thread_time() - start
        for message in messages:
            wire += len(message.value)
            publisher.offer(message)
    # The publisher settles acknowledgements as later messages come; stopping drains them all
    # (and closes the producer, a few milliseconds).
    await publisher.stop()
    after = os.times()
    published = REGISTRY.get_sample_value("flowtally_sensor_flows_published_total") or 0
    if published != flows:
        raise SystemExit(f"Kafka acknowledged {published:.0f} of {flows} flows")
    return {"user": after.user - before.user, "system": after.system - before.system, "encode": encoding,
            "flows": flows,
            "batches": len(work), "wire_bytes": wire}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topic-prefix", default=f"floor{int(time.time())}")
    parser.add_argument("--flows", type=int, default=1_000_000)
    parser.add_argument("--rate", type=float, default=100_000)
    parser.add_argument("--format", choices=("v9", "ipfix"), default="v9")
    parser.add_argument("--batch-flows", type=int, default=16384, help="the sensor's batch_max_flows")
    parser.add_argument("--coalesce-ms", type=float, default=50.0, help="the sensor's receive_coalesce_ms")
    parser.add_argument("--compression", choices=("none", "lz4", "zstd"), default="lz4")
    args = parser.parse_args()
    stream, sent = capture(args.flows, args.rate, args.format)
    work = batches(stream, args.batch_flows, args.coalesce_ms)
    decoded = sum(table.num_rows for table, _ in work)
    if decoded != sent:  # a datagram lost on loopback would make the floor look cheaper
        raise SystemExit(f"captured {decoded} of the {sent} flows sent")
    del stream
    apply_memory_policy(MEMORY)
    settings = KafkaSettings(bootstrap=args.bootstrap, topic_prefix=args.topic_prefix)
    result = asyncio.run(publish(settings, work, args.compression))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
