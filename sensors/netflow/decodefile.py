"""`flowtally decode FILE...`: decode NetFlow packets from captures and print JSON lines.

All files are decoded in order with one template store, as one collector would have received
them: ``flowtally decode template.pcap data.pcap`` decodes the data of the second file with the
template of the first. The exporter of each packet is its source IP address and its receive time
the capture timestamp. One JSON object per flow record goes to stdout; a summary of packets,
records and errors (by reason) goes to stderr at the end.

Datagrams are decoded in chunks; within a chunk the decoder still applies templates in packet
order. Data sets that come before their template (in the same packet, as in akvorado's
``data+templates.pcap``, or in an earlier packet or file) are held and decoded once the
template arrives; at the end of the input, whatever still waits is counted as
``missing_template_expired`` (where tshark reports "no template found").
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from typing import BinaryIO

import numpy as np
import orjson
import pyarrow as pa

from sensors.netflow.decoder import Datagram, decode_datagrams, flush_pending
from sensors.netflow.pcap import CaptureCounts, NotACaptureError, check_capture, iter_udp
from sensors.netflow.stats import DecodeStats
from sensors.netflow.templates import TemplateStore
from sensors.schema import DETAIL_COLUMNS, address_bytes, address_text

CHUNK = 1000


def run(args: argparse.Namespace) -> int:
    """Decode ``args.files`` (UDP to any of ``args.port``, or any port if empty) to stdout."""
    files: list[str] = list(args.files)
    ports = frozenset(args.port or ())
    try:
        for path in files:  # fail before printing anything if a file cannot be read at all
            check_capture(path)
    except NotACaptureError as exc:
        print(f"flowtally decode: {exc}", file=sys.stderr)
        return 1

    templates = TemplateStore()
    stats = DecodeStats()
    counts = CaptureCounts()
    out = sys.stdout.buffer
    status = 0
    try:
        for path in files:
            try:
                for chunk in _chunks(path, ports, counts):
                    _write(decode_datagrams(chunk, templates, stats), out)
            except NotACaptureError as exc:
                print(f"flowtally decode: {exc}", file=sys.stderr)
                status = 1
        # The input is over: data still waiting for a template will never be decoded.
        flush_pending(templates, stats)
        out.flush()
    except BrokenPipeError:
        # `flowtally decode x.pcap | head`: the reader is gone. Point stdout at /dev/null so the
        # interpreter's final flush does not fail again, and stop quietly.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return status
    print(_summary(len(files), stats, counts), file=sys.stderr)
    return status


def _chunks(path: str, ports: frozenset[int], counts: CaptureCounts) -> Iterator[list[Datagram]]:
    chunk: list[Datagram] = []
    for packet in iter_udp(path, counts):
        if ports and packet.dst_port not in ports:
            continue
        chunk.append(Datagram(packet.src_addr, packet.timestamp_ms, packet.payload))
        if len(chunk) >= CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _addresses(column: pa.ChunkedArray | pa.Array) -> list[str]:
    """Printable addresses; each distinct address is formatted once."""
    raw = address_bytes(column)
    if len(raw) == 0:
        return []
    unique, inverse = np.unique(raw.view("V16").ravel(), return_inverse=True)
    labels = [address_text(u.tobytes()) for u in unique]
    return [labels[i] for i in inverse.ravel()]


def _iso(column: pa.ChunkedArray | pa.Array) -> list[str]:
    """UTC ISO 8601 with milliseconds and a Z, e.g. "2024-01-02T03:04:05.678Z"."""
    ms = column.cast(pa.int64()).to_numpy().astype("datetime64[ms]")
    return [s + "Z" for s in np.datetime_as_string(ms, unit="ms").tolist()]


_INT_COLUMNS = (
    "version", "observation_domain", "src_port", "dst_port", "proto", "bytes", "packets",
    "sampling_rate", "tcp_flags", "in_if", "out_if", *DETAIL_COLUMNS,
)


def _write(table: pa.Table, out: BinaryIO) -> None:
    """One JSON object per row (CLI output only: the decoder itself stays columnar)."""
    if table.num_rows == 0:
        return
    exporter = _addresses(table["exporter"])
    src = _addresses(table["src_addr"])
    dst = _addresses(table["dst_addr"])
    start, end, received = _iso(table["start"]), _iso(table["end"]), _iso(table["time_received"])
    ints = {name: table[name].to_pylist() for name in _INT_COLUMNS}
    lines = []
    for i in range(table.num_rows):
        lines.append(
            orjson.dumps(
                {
                    "exporter": exporter[i],
                    "version": ints["version"][i],
                    "observation_domain": ints["observation_domain"][i],
                    "time_received": received[i],
                    "src_addr": src[i],
                    "dst_addr": dst[i],
                    "src_port": ints["src_port"][i],
                    "dst_port": ints["dst_port"][i],
                    "proto": ints["proto"][i],
                    "bytes": ints["bytes"][i],
                    "packets": ints["packets"][i],
                    "start": start[i],
                    "end": end[i],
                    "sampling_rate": ints["sampling_rate"][i],
                    "tcp_flags": ints["tcp_flags"][i],
                    "in_if": ints["in_if"][i],
                    "out_if": ints["out_if"][i],
                    **{name: ints[name][i] for name in DETAIL_COLUMNS},
                }
            )
        )
    lines.append(b"")
    out.write(b"\n".join(lines))


def _summary(n_files: int, stats: DecodeStats, counts: CaptureCounts) -> str:
    errors = stats.errors_by_reason()
    error_text = ", ".join(f"{reason}={n}" for reason, n in sorted(errors.items())) or "none"
    skipped = {k: v for k, v in counts.as_dict().items() if k not in ("frames", "udp") and v}
    skipped_text = ", ".join(f"{k}={v}" for k, v in skipped.items()) or "none"
    return (
        f"flowtally decode: {n_files} file(s), {counts.frames} frames, {stats.packets} UDP packets decoded, "
        f"{stats.records} flow records, {stats.options_records} options records, "
        f"{stats.templates} templates; errors: {error_text}; frames skipped: {skipped_text}"
    )
