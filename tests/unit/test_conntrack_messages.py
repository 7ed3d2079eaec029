"""The conntrack sensor's ctnetlink decoder against messages encoded by pyroute2 (an independent
implementation of the same netlink attribute layout)."""

from __future__ import annotations

import random
import socket
import struct
from typing import Any

import pytest
from pyroute2.netlink.nfnetlink.nfctsocket import nfct_msg

from sensors.conntrack.messages import DESTROY, DUMP, NEW, ROW_FIELDS, Rows, decode, dump_request
from sensors.schema import address16


def _tuple(family: int, src: str, dst: str, proto: int, **ports: int) -> dict[str, Any]:
    v = "V4" if family == socket.AF_INET else "V6"
    proto_attrs: list[tuple[str, int]] = [("CTA_PROTO_NUM", proto)]
    proto_attrs += [(f"CTA_PROTO_{k.upper()}", v_) for k, v_ in ports.items()]
    return {"attrs": [("CTA_TUPLE_IP", {"attrs": [(f"CTA_IP_{v}_SRC", src), (f"CTA_IP_{v}_DST", dst)]}),
                      ("CTA_TUPLE_PROTO", {"attrs": proto_attrs})]}


def encode(msg_type: int, family: int, orig: dict[str, Any], reply: dict[str, Any], *, flags: int = 0,
           extra: list[tuple[str, Any]] | None = None) -> bytes:
    msg = nfct_msg()
    msg["header"]["type"] = (1 << 8) | msg_type
    msg["header"]["flags"] = flags
    msg["nfgen_family"] = family
    msg["attrs"] = [("CTA_TUPLE_ORIG", orig), ("CTA_TUPLE_REPLY", reply), *(extra or [])]
    msg.encode()
    return bytes(msg.data)


def row(rows: Rows, i: int) -> dict[str, Any]:
    """Row ``i`` as plain values (addresses as bytes)."""
    out: dict[str, Any] = {}
    for f in ROW_FIELDS:
        v = getattr(rows, f)[i]
        out[f] = bytes(v) if f.endswith(("_src", "_dst")) else v.tolist()
    out["key"] = rows.keys[i]
    return out


def test_tcp_destroy_with_dnat_counters_timestamps_zone_state() -> None:
    data = encode(
        2, socket.AF_INET,
        _tuple(socket.AF_INET, "10.244.0.10", "10.96.0.10", 6, src_port=40000, dst_port=80),
        _tuple(socket.AF_INET, "10.244.0.11", "10.244.0.10", 6, src_port=8080, dst_port=40000),
        extra=[("CTA_STATUS", 0x0E), ("CTA_ID", 123456), ("CTA_ZONE", 7),
               ("CTA_PROTOINFO", {"attrs": [("CTA_PROTOINFO_TCP", {"attrs": [("CTA_PROTOINFO_TCP_STATE", 7)]})]}),
               ("CTA_COUNTERS_ORIG", {"attrs": [("CTA_COUNTERS_PACKETS", 12), ("CTA_COUNTERS_BYTES", 2**40)]}),
               ("CTA_COUNTERS_REPLY", {"attrs": [("CTA_COUNTERS_PACKETS", 9), ("CTA_COUNTERS_BYTES", 4321)]}),
               ("CTA_TIMESTAMP", {"attrs": [("CTA_TIMESTAMP_START", 10**18), ("CTA_TIMESTAMP_STOP", 10**18 + 5)]})])
    for min_group in (0, 1):  # the walk, and the layout path for a group of one
        batch = decode(data, min_group=min_group)
        assert not batch.skipped and len(batch.rows) == 1 and (batch.messages, batch.destroys) == (1, 1)
        r = row(batch.rows, 0)
        assert (r["kind"], r["family"], r["proto"], r["zone"], r["ct_id"]) == (DESTROY, socket.AF_INET, 6, 7, 123456)
        assert (r["orig_src"], r["orig_dst"], r["orig_sport"], r["orig_dport"]) == (
            address16("10.244.0.10"), address16("10.96.0.10"), 40000, 80)
        assert (r["reply_src"], r["reply_dst"], r["reply_sport"], r["reply_dport"]) == (
            address16("10.244.0.11"), address16("10.244.0.10"), 8080, 40000)
        assert r["counters"] == [12, 2**40, 9, 4321]
        assert (r["start_ns"], r["stop_ns"], r["status"], r["tcp_state"]) == (10**18, 10**18 + 5, 0x0E, 7)
        assert r["key"][:14] == struct.pack(">IHQ", 123456, 7, 10**18) and r["key"].endswith(b"\x01")


def test_icmpv6_new_events_counted_and_decoded_on_request_and_dump_rows() -> None:
    orig = _tuple(socket.AF_INET6, "fd00::1", "fd00::2", 58, icmpv6_id=77, icmpv6_type=128, icmpv6_code=0)
    reply = _tuple(socket.AF_INET6, "fd00::2", "fd00::1", 58, icmpv6_id=77, icmpv6_type=129, icmpv6_code=0)
    new = encode(0, socket.AF_INET6, orig, reply, flags=0x600)
    done = struct.pack("=IHHIIi", 20, 3, 2, 1, 0, 0)
    events = decode(new + new)
    assert (events.news, events.destroys, events.messages, len(events.rows)) == (2, 0, 2, 0) and not events.done
    events = decode(new + new, news=True)
    assert events.rows.kind.tolist() == [NEW, NEW]
    r = row(events.rows, 0)
    assert (r["orig_src"], r["orig_sport"], r["orig_dport"], r["reply_dport"]) == (
        address16("fd00::1"), 77, 128 << 8, 129 << 8)
    assert r["counters"] == [0, 0, 0, 0] and r["start_ns"] == 0  # no counters/timestamp attributes: 0
    dump = decode(new + done, dump=True)
    assert dump.rows.kind.tolist() == [DUMP] and dump.done and not dump.interrupted


def test_errors_interrupted_dumps_and_truncation() -> None:
    error = struct.pack("=IHHIIi", 36, 2, 0, 1, 0, -16) + b"\0" * 16
    batch = decode(error)
    assert batch.errors == 1 and batch.last_error == 16
    interrupted = struct.pack("=IHHIIi", 20, 3, 0x12, 1, 0, 0)
    assert decode(interrupted).interrupted
    data = encode(2, socket.AF_INET, _tuple(socket.AF_INET, "1.2.3.4", "5.6.7.8", 17, src_port=1, dst_port=2),
                  _tuple(socket.AF_INET, "5.6.7.8", "1.2.3.4", 17, src_port=2, dst_port=1))
    assert decode(data[:-8]).skipped == 1 and not len(decode(data[:-8]).rows)
    # A truncated datagram ends there: the next datagram is still read.
    both = decode(data[:-8] + data, [len(data) - 8, 2 * len(data) - 8])
    assert both.skipped == 1 and len(both.rows) == 1 and both.rows.ct_id.tolist() == [0]


def _stream(seed: int, per_datagram: int = 0) -> tuple[bytes, list[int], list[dict[str, Any]]]:
    """Random messages of many layouts (families, protocols, optional attributes, 32/64-bit
    counters, oddly ordered attributes), ``per_datagram`` in each datagram (0: one or three),
    and what pyroute2 says each holds."""
    rng = random.Random(seed)
    messages: list[bytes] = []
    expected: list[dict[str, Any]] = []
    for _ in range(400):
        family = rng.choice([socket.AF_INET, socket.AF_INET6])
        v6 = family == socket.AF_INET6
        a, b, c = (f"fd00::{rng.randrange(1, 9)}", f"fd00::{rng.randrange(9, 19)}", "fd00::99") if v6 else (
            f"10.0.0.{rng.randrange(1, 9)}", f"10.1.0.{rng.randrange(1, 9)}", "10.2.0.1")
        proto = rng.choice([6, 17, 132, 58 if v6 else 1])
        if proto in (1, 58):
            p = "icmpv6_" if v6 else "icmp_"
            kw = {p + "id": rng.randrange(65536), p + "type": 128 if v6 else 8, p + "code": rng.randrange(3)}
            rkw = {p + "id": kw[p + "id"], p + "type": 129 if v6 else 0, p + "code": 0}
        else:
            kw = {"src_port": rng.randrange(65536), "dst_port": rng.randrange(65536)}
            rkw = {"src_port": rng.randrange(65536), "dst_port": kw["src_port"]}
        dnat = rng.random() < 0.3
        orig = _tuple(family, a, b, proto, **kw)
        reply = _tuple(family, c if dnat else b, a, proto, **rkw)
        extra: list[tuple[str, Any]] = [("CTA_STATUS", rng.choice([0, 2, 6, 0x3E])), ("CTA_ID", rng.randrange(2**32))]
        if rng.random() < 0.3:
            extra.insert(0, ("CTA_ZONE", rng.randrange(1, 65536)))
        wide = rng.random() < 0.8
        for name in ("CTA_COUNTERS_ORIG", "CTA_COUNTERS_REPLY"):
            if rng.random() < 0.9:
                pk, by = ("CTA_COUNTERS_PACKETS", "CTA_COUNTERS_BYTES") if wide else (
                    "CTA_COUNTERS32_PACKETS", "CTA_COUNTERS32_BYTES")
                top = 2**63 if wide else 2**32
                extra.append((name, {"attrs": [(pk, rng.randrange(top)), (by, rng.randrange(top))]}))
        if rng.random() < 0.9:
            ts = [("CTA_TIMESTAMP_START", rng.randrange(2**63))]
            if rng.random() < 0.5:
                ts.append(("CTA_TIMESTAMP_STOP", rng.randrange(2**63)))
            extra.append(("CTA_TIMESTAMP", {"attrs": ts}))
        if proto == 6 and rng.random() < 0.8:
            extra.append(("CTA_PROTOINFO", {"attrs": [("CTA_PROTOINFO_TCP", {"attrs": [
                ("CTA_PROTOINFO_TCP_STATE", rng.randrange(1, 10))]})]}))
        if rng.random() < 0.2:
            extra.append(("CTA_MARK", rng.randrange(2**32)))
        if rng.random() < 0.1:
            rng.shuffle(extra)
        data = encode(rng.choice([0, 2]), family, orig, reply, extra=extra)
        messages.append(data)
        msg = nfct_msg(data)
        msg.decode()
        expected.append(msg)
    # Datagrams: mostly one message, sometimes several.
    out = b""
    ends: list[int] = []
    i = 0
    while i < len(messages):
        k = per_datagram or rng.choice([1, 1, 1, 3])
        out += b"".join(messages[i:i + k])
        ends.append(len(out))
        i += k
    return out, ends, expected


def _slotted(data: bytes, ends: list[int], seed: int, slot: int = 1024) -> tuple[bytearray, list[int], list[int]]:
    """The datagrams of ``data`` each at the start of a ``slot``-byte slot, random bytes after."""
    rng = random.Random(seed)
    out = bytearray(rng.randbytes(slot * len(ends)))
    starts = [i * slot for i in range(len(ends))]
    slot_ends = []
    for at, (a, b) in zip(starts, zip([0, *ends[:-1]], ends, strict=True), strict=True):
        out[at:at + b - a] = data[a:b]
        slot_ends.append(at + b - a)
    return out, starts, slot_ends


def _value(msg: Any, *path: str) -> Any:
    node = msg
    for name in path[:-1]:
        node = node.get_attr(name)
        if node is None:
            return None
    return node.get_attr(path[-1])


@pytest.mark.parametrize("seed", range(6))
def test_layout_path_equals_the_walk_and_pyroute2(seed: int) -> None:
    data, ends, expected = _stream(seed)
    single = _stream(seed, per_datagram=1)  # as events come: numpy reads the headers too
    # A dump's last chunk ends with NLMSG_DONE.
    done = struct.pack("=IHHIIi", 20, 3, 2, 1, 0, 0)
    for dump in (False, True):
        for data_, ends_ in ((data, ends), single[:2], (data + done, [*ends[:-1], ends[-1] + 20])):
            fast = decode(data_, ends_, dump=dump, news=True, min_group=2)
            walk = decode(data_, ends_, dump=dump, news=True, min_group=0)
            assert (fast.messages, fast.skipped, len(fast.rows)) == (len(expected), 0, len(expected))
            assert (fast.news, fast.destroys, fast.done) == (walk.news, walk.destroys, walk.done)
            assert fast.done == (data_ is not data and data_ is not single[0])
            for i in range(len(expected)):
                assert row(fast.rows, i) == row(walk.rows, i), i
        # As recvmmsg leaves them: one datagram per slot of a reused buffer, garbage between.
        slotted, starts, slot_ends = _slotted(*single[:2], seed)
        for min_group in (0, 2):
            got = decode(memoryview(slotted), slot_ends, dump=dump, starts=starts, news=True, min_group=min_group)
            assert len(got.rows) == len(expected)
            assert all(row(got.rows, i) == row(walk.rows, i) for i in range(len(expected)))
        events = decode(*single[:2], dump=dump)  # NEW events only counted
        kinds = walk.rows.kind.tolist()
        assert (events.news, events.destroys) == ((0, 0) if dump else (kinds.count(NEW), kinds.count(DESTROY)))
        assert len(events.rows) == (len(expected) if dump else kinds.count(DESTROY))
    rows = decode(data, ends, news=True, min_group=2).rows
    for i, msg in enumerate(expected):
        r = row(rows, i)
        assert r["kind"] == (DESTROY if msg["header"]["type"] & 0xFF == 2 else NEW)
        assert r["ct_id"] == _value(msg, "CTA_ID") and r["zone"] == (_value(msg, "CTA_ZONE") or 0)
        v = "V6" if msg["nfgen_family"] == socket.AF_INET6 else "V4"
        for d, tup in (("orig", "CTA_TUPLE_ORIG"), ("reply", "CTA_TUPLE_REPLY")):
            assert r[d + "_src"] == address16(_value(msg, tup, "CTA_TUPLE_IP", f"CTA_IP_{v}_SRC"))
            assert r[d + "_dst"] == address16(_value(msg, tup, "CTA_TUPLE_IP", f"CTA_IP_{v}_DST"))
        counters = []
        for name in ("CTA_COUNTERS_ORIG", "CTA_COUNTERS_REPLY"):
            for what in ("PACKETS", "BYTES"):
                value = _value(msg, name, f"CTA_COUNTERS_{what}")
                counters.append(value if value is not None else _value(msg, name, f"CTA_COUNTERS32_{what}") or 0)
        assert r["counters"] == counters
        assert r["start_ns"] == (_value(msg, "CTA_TIMESTAMP", "CTA_TIMESTAMP_START") or 0)
        assert r["stop_ns"] == (_value(msg, "CTA_TIMESTAMP", "CTA_TIMESTAMP_STOP") or 0)
        if r["proto"] == 6:
            assert r["tcp_state"] == (_value(msg, "CTA_PROTOINFO", "CTA_PROTOINFO_TCP", "CTA_PROTOINFO_TCP_STATE") or 0)


def test_dump_request_is_a_ctnetlink_get_dump() -> None:
    msg = nfct_msg(dump_request(9))
    msg.decode()
    assert msg["header"]["type"] == (1 << 8) | 1 and msg["header"]["flags"] == 0x301
    assert msg["header"]["sequence_number"] == 9 and msg["nfgen_family"] == socket.AF_UNSPEC
