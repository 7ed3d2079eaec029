"""The compiled decode kernel (sensors/netflow/kernel.py) against the numpy reference code.

Whatever the kernel decodes must come out exactly as the numpy columns would (same table, row
for row, same counters, template and sequence state): on every real capture we keep, and on
generated v9 and IPFIX batches with random layouts (reduced-size and oversized fields, both
address families, every time source, uptime wrap, mixed templates, sampling announced in
options data, refreshes). The bulk-vs-walk tests in test_netflow_v9.py / test_netflow_ipfix.py
do the same on their hand-built awkward streams.
"""

from __future__ import annotations

import random
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sensors.netflow import kernel
from sensors.netflow.decoder import Datagram, DecodeStats, decode_datagrams, decode_payloads, flush_pending
from sensors.netflow.pcap import iter_udp
from sensors.netflow.templates import TemplateStore
from tests.oracle import DATA, shared_testdata
from tests.unit import test_netflow_ipfix as ipfix_build
from tests.unit import test_netflow_v9 as v9_build
from tests.unit.test_netflow_v9 import _state

EXPORTER = v9_build.EXPORTER_A
SECS = v9_build.SECS


def _captures() -> list[Path]:
    ours = sorted(DATA.glob("*.pcap"))
    shared = sorted(shared_testdata("netflow-pcaps").rglob("*.pcap"))
    assert len(ours) >= 5 and len(shared) >= 10, (ours, shared)
    return ours + shared


def _decode_both(datagrams: list[Datagram], chunk: int) -> int:
    """Decode ``datagrams`` with the kernel and with numpy, two ways each (per exporter in calls
    of ``chunk`` datagrams through decode_payloads, the bulk path; all at once through
    decode_datagrams, the walk), and require identical tables, counters and state. Returns the
    rows decoded."""
    by_exporter: dict[bytes, list[Datagram]] = defaultdict(list)
    for d in datagrams:
        by_exporter[d.exporter].append(d)
    rows = 0
    for compiled_store, numpy_store, run in (
            (TemplateStore(), TemplateStore(), "bulk"), (TemplateStore(), TemplateStore(), "walk")):
        kernel_stats, numpy_stats = DecodeStats(), DecodeStats()
        calls: list[list[Datagram]] = [datagrams] if run == "walk" else [
            part[i : i + chunk] for part in by_exporter.values() for i in range(0, len(part), chunk)]
        for call in calls:
            tables = []
            for compiled, store, stats in ((True, compiled_store, kernel_stats), (False, numpy_store, numpy_stats)):
                if run == "walk":
                    tables.append(decode_datagrams(call, store, stats, compiled=compiled))
                else:
                    tables.append(decode_payloads(call[0].exporter, [d.payload for d in call],
                                                  [d.received_ms for d in call], store, stats, compiled=compiled))
            assert tables[0].equals(tables[1], check_metadata=True)
            rows += tables[0].num_rows
        flush_pending(compiled_store, kernel_stats)
        flush_pending(numpy_store, numpy_stats)
        assert {k: (v.counters(), dict(v.errors)) for k, v in kernel_stats.by_exporter().items()} == {
            k: (v.counters(), dict(v.errors)) for k, v in numpy_stats.by_exporter().items()}
        assert _state(compiled_store) == _state(numpy_store)
    return rows


@pytest.mark.parametrize("chunk", [64, 9])
def test_real_captures_decode_the_same_with_the_kernel(chunk: int) -> None:
    total = 0
    for path in _captures():
        datagrams = [Datagram(p.src_addr, p.timestamp_ms, p.payload) for p in iter_udp(str(path))]
        total += _decode_both(datagrams, chunk)
    assert total > 2000  # 1,417 flows in the captures, decoded twice (bulk and walk)


def test_kernel_covers_the_usual_layouts_of_the_captures() -> None:
    """The kernel is not a no-op: the templates of softflowd, pmacctd and the generator get a
    kernel layout (so the equality tests above compare two implementations)."""
    from sensors.netflow import ipfix, v9
    from sensors.netflow.fields import Group

    for path in ("softflowd-v9.pcap", "softflowd-ipfix.pcap", "pmacctd-v9.pcap", "pmacctd-ipfix.pcap"):
        store = TemplateStore()
        decode_datagrams([Datagram(p.src_addr, p.timestamp_ms, p.payload) for p in iter_udp(str(DATA / path))],
                         store, DecodeStats())
        templates = [t for _, t in store if not t.is_options]
        assert templates, path
        for template in templates:
            if path.endswith("-v9.pcap"):
                assert v9.kernel_layout(template, Group()) is not None, (path, template)
            else:
                plan = ipfix._Plan(template)
                group = Group()
                group.counts.append(1)
                assert ipfix._kernel_layout(plan, group) is not None or plan.has_reverse or plan.gather is not None


# --- generated batches ------------------------------------------------------------------------

# Field pools: (type, lengths the exporter may use). Reduced-size (and oversized) encodings of
# counters, ports and interfaces; odd address lengths are legal on the wire and must decode alike.
_PORTS = [(7, (2, 1, 4)), (11, (2, 3)), (4, (1, 2)), (6, (1, 2)), (10, (2, 4, 1)), (14, (4, 2, 3))]
_COUNTERS = [((1, 2), (4, 8, 3, 5, 2)), ((23, 24), (4, 8, 6)), ((85, 86), (8, 4, 7))]
_V4 = [(8, (4, 4, 4, 3, 5)), (12, (4, 4, 4, 2, 9))]
_V6 = [(27, (16, 16, 8, 17)), (28, (16, 16, 4))]
_FILLER = [(60, (1,)), (61, (1, 3)), (89, (4,)), (5, (1,))]


def _layout(rng: random.Random, times: list[tuple[tuple[int, int], tuple[int, ...]]]) -> list[tuple[int, int]]:
    fields: list[tuple[int, int]] = []
    family = rng.choice(["v4", "v4", "v6", "both"])
    if family in ("v4", "both"):
        fields += [(t, rng.choice(ls)) for t, ls in _V4 if rng.random() < 0.95]
    if family in ("v6", "both"):
        fields += [(t, rng.choice(ls)) for t, ls in _V6 if rng.random() < 0.95]
    fields += [(t, rng.choice(ls)) for t, ls in _PORTS if rng.random() < 0.9]
    pair, lengths = rng.choice(_COUNTERS)
    fields += [(t, rng.choice(lengths)) for t in pair if rng.random() < 0.95]
    if rng.random() < 0.2:  # a second, later counter pair: the first one found wins
        fields += [(t, rng.choice(lengths)) for t in rng.choice(_COUNTERS)[0]]
    pair, lengths = rng.choice(times)
    fields += [(t, rng.choice(lengths)) for t in pair if rng.random() < 0.9]
    fields += [(t, rng.choice(ls)) for t, ls in _FILLER if rng.random() < 0.4]
    if rng.random() < 0.1:
        fields.append((48, 1))  # a sampler ID: numpy when the exporter announced samplers
    rng.shuffle(fields)
    return fields or [(1, 4)]


def _records(rng: random.Random, fields: list[tuple[int, int]], n: int, near: dict[int, int]) -> bytes:
    """``n`` records of random bytes, with time fields near ``near[type]`` (so uptime-relative
    times land on both sides of the 32-bit wrap), often IPv4 addresses of 0.0.0.0 (both or one
    of them), and IPFIX
    variable-length values (``ipfix_build.VAR``) of 0-300 bytes (1- and 3-byte length prefixes)."""
    out = bytearray()
    for _ in range(n):
        zero4 = rng.random() < 0.3
        for ftype, length in fields:
            if length == ipfix_build.VAR:
                value = rng.randbytes(rng.choice([0, 1, 5, 12, 254, 255, 300]))
                out += (bytes([len(value)]) if len(value) < 255 else b"\xff" + len(value).to_bytes(2, "big")) + value
            elif ftype in near and length <= 8:
                out += ((near[ftype] + rng.randint(-5000, 5000)) % (1 << (8 * length))).to_bytes(length, "big")
            elif (ftype in (8, 12) and (zero4 or rng.random() < 0.15)) or (ftype in (27, 28) and rng.random() < 0.1):
                out += bytes(length)
            else:
                out += rng.randbytes(length)
    return bytes(out)


_V9_TIMES = [((22, 21), (4, 4, 4, 2, 8)), ((152, 153), (8, 8, 6)), ((150, 151), (4, 4, 8)), ((22, 153), (4, 8))]


def _v9_stream(seed: int) -> list[bytes]:
    rng = random.Random(seed)
    uptime = rng.choice([3_600_000, 0xFFFF_F000, 2000, 0x8000_0000, rng.randrange(1 << 32)])
    secs = SECS + rng.randint(-10, 10)
    near = {22: uptime - 3000, 21: uptime - 1000, 152: secs * 1000 - 3000, 153: secs * 1000, 150: secs - 3,
            151: secs}
    layouts = {256 + k: _layout(rng, _V9_TIMES) for k in range(rng.randint(1, 3))}
    tpl = v9_build.template_flowset(*layouts.items())
    out = [v9_build.v9_packet(tpl, sequence=0, uptime=uptime, secs=secs)]
    seq = 1
    for _ in range(rng.randint(8, 60)):
        tid = rng.choice(list(layouts))
        data = v9_build.data_flowset(tid, _records(rng, layouts[tid], rng.randint(0, 6), near))
        sets = [tpl, data] if rng.random() < 0.1 else [data]
        if rng.random() < 0.05:  # sampling 1:N announced for the source ID, or per sampler ID 1
            opts = v9_build.options_template_flowset(300, [(1, 4)], [(48, 1), (34, 4)])
            sets = [opts, v9_build.data_flowset(300, bytes(4) + bytes([rng.choice([0, 1])])
                                                + rng.randint(0, 1000).to_bytes(4, "big")), *sets]
        uptime = (uptime + rng.randint(0, 2000)) % (1 << 32)
        out.append(v9_build.v9_packet(*sets, sequence=seq, uptime=uptime, secs=secs))
        seq += 1 if rng.random() < 0.97 else 3
    return out


_IPFIX_TIMES = [((152, 153), (8, 8, 4)), ((156, 157), (8, 8, 4)), ((154, 155), (8,)), ((150, 151), (4, 8)),
                ((158, 159), (4, 8)), ((22, 21), (4, 4, 8)), ((152, 21), (8, 4))]


def _ntp(ms: int) -> int:
    return ((ms // 1000 + 2_208_988_800) << 32) | ((ms % 1000) << 32) // 1000


def _ipfix_stream(seed: int) -> list[bytes]:
    rng = random.Random(seed)
    secs = SECS + rng.randint(-10, 10)
    init = rng.choice([None, secs * 1000 - 3_600_000, secs * 1000 - 0xFFFF_F000 - 5000])
    up = secs * 1000 - (init or 0)
    near = {152: secs * 1000 - 3000, 153: secs * 1000, 156: _ntp(secs * 1000 - 3000), 157: _ntp(secs * 1000),
            154: _ntp(secs * 1000 - 10), 155: _ntp(secs * 1000), 150: secs - 3, 151: secs, 158: 3_000_000,
            159: 1000, 22: up - 3000, 21: up - 1000}
    layouts = {256 + k: _layout(rng, _IPFIX_TIMES) for k in range(rng.randint(1, 3))}
    for fields in layouts.values():
        if rng.random() < 0.3:  # a variable-length field (interfaceName): repacked, then the kernel
            fields.insert(rng.randrange(len(fields) + 1), (82, ipfix_build.VAR))
    tpl = ipfix_build.template_set(*layouts.items())  # type: ignore[arg-type]
    out = [ipfix_build.message(tpl, secs=secs)]
    if init is not None:
        opts = ipfix_build.options_template_set(400, [(149, 4)], [(160, 8)])
        out.append(ipfix_build.message(opts, ipfix_build.data_set(400, bytes(4) + init.to_bytes(8, "big")),
                                       secs=secs))
    seq = 0
    for _ in range(rng.randint(8, 60)):
        tid = rng.choice(list(layouts))
        n = rng.randint(0, 6)
        data = ipfix_build.data_set(tid, _records(rng, layouts[tid], n, near))
        sets = [tpl, data] if rng.random() < 0.1 else [data]
        out.append(ipfix_build.message(*sets, secs=secs, sequence=seq))
        seq += n if rng.random() < 0.97 else n + 2
    return out


_PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_PROPERTY
@given(seed=st.integers(0, 2**32 - 1), chunk=st.sampled_from([8, 13, 64]))
def test_generated_v9_batches_decode_the_same_with_the_kernel(seed: int, chunk: int) -> None:
    stream = _v9_stream(seed)
    datagrams = [Datagram(EXPORTER, SECS * 1000 + i, p) for i, p in enumerate(stream)]
    _decode_both(datagrams, chunk)


@_PROPERTY
@given(seed=st.integers(0, 2**32 - 1), chunk=st.sampled_from([8, 13, 64]))
def test_generated_ipfix_batches_decode_the_same_with_the_kernel(seed: int, chunk: int) -> None:
    stream = _ipfix_stream(seed)
    datagrams = [Datagram(EXPORTER, SECS * 1000 + i, p) for i, p in enumerate(stream)]
    _decode_both(datagrams, chunk)


def test_generated_streams_reach_the_kernel() -> None:
    """Most generated layouts are ones the kernel takes (else the property tests would compare
    numpy with itself)."""
    from sensors.netflow import ipfix, v9
    from sensors.netflow.fields import Group

    taken = total = 0
    for seed in range(40):
        for make, version in ((_v9_stream, 9), (_ipfix_stream, 10)):
            store = TemplateStore()
            decode_datagrams([Datagram(EXPORTER, SECS * 1000, p) for p in make(seed)], store, DecodeStats())
            for _, template in store:
                if template.is_options:
                    continue
                total += 1
                if version == 9:
                    taken += v9.kernel_layout(template, Group()) is not None
                else:
                    group = Group()
                    group.counts.append(1)
                    taken += ipfix._kernel_layout(ipfix._Plan(template), group) is not None
    assert total > 100 and taken > 0.7 * total, (taken, total)


def test_fields_of_any_length_read_like_numpy() -> None:
    """The kernel's big-endian reads against numpy's (fields.uint) for every length 0-12, as
    the bytes counter (uint64) and as a port (uint16: the low bits, as astype)."""
    from sensors.netflow import fields as F

    rng = np.random.default_rng(5)
    size = 13
    buf = rng.integers(0, 256, size=size * 50, dtype=np.uint8).tobytes()
    raw = np.frombuffer(buf, dtype=np.uint8)
    for length in range(13):
        layout = kernel.layout_of({1: (0, length), 7: (0, length)}, size, 9, (), ())
        assert layout is not None
        out = kernel.decode_records(raw, np.zeros(1, dtype=np.int64), [50], [0], [0], [0], [0], [0], [0], [1],
                                    np.stack([layout]), np.zeros((1, 16), dtype=np.uint8))
        assert np.array_equal(out["bytes"], F.uint(buf, 50, size, 0, length)), length
        assert np.array_equal(out["src_port"], F.uint(buf, 50, size, 0, length, dtype=np.uint16)), length


def test_warm_up_compiles_the_version_the_decoder_uses() -> None:
    """The sensor compiles the kernel before it receives (warm_up): decoding real batches after
    it must not compile another version (seconds of CPU in the middle of the stream)."""
    from sensors.netflow.generator import (
        encode_ipfix_packets,
        encode_packets,
        synthetic_cluster,
        synthetic_flows,
    )

    kernel.warm_up()
    assert len(kernel._records.signatures) == 1
    cols = synthetic_flows(synthetic_cluster(2), 3000, (2, 0), SECS * 1000 - 2000, span_ms=1000)
    v9_packets = encode_packets(cols, source_id=1, sequence=0, unix_secs=SECS, uptime_ms=3_600_000).packets
    ipfix_packets = encode_ipfix_packets(cols, domain=1, sequence=0, export_secs=SECS).packets
    for packets in (v9_packets, ipfix_packets):
        store, stats = TemplateStore(), DecodeStats()
        assert decode_payloads(EXPORTER, packets, [SECS * 1000] * len(packets), store, stats).num_rows == 3000
        walked = decode_datagrams([Datagram(EXPORTER, SECS * 1000, p) for p in packets], TemplateStore(), stats)
        assert walked.num_rows == 3000
    assert len(kernel._records.signatures) == 1, kernel._records.signatures
    table = decode_datagrams([Datagram(EXPORTER, SECS * 1000, v9_build.v9_packet(
        v9_build.template_flowset((256, v9_build.V4_FIELDS)),
        v9_build.data_flowset(256, v9_build.record(v9_build.V4_FIELDS, v9_build.flow(
            "10.0.0.1", "10.0.0.2", 1, 2, 6, 1234, 5)))))], TemplateStore(), DecodeStats())
    assert isinstance(table, pa.Table) and table["bytes"].to_pylist() == [1234]
