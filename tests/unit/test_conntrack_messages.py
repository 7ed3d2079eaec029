"""The conntrack sensor's ctnetlink decoder against messages encoded by pyroute2 (an independent
implementation of the same netlink attribute layout)."""

from __future__ import annotations

import socket
import struct
from typing import Any

from pyroute2.netlink.nfnetlink.nfctsocket import nfct_msg

from sensors.conntrack.messages import DESTROY, DUMP, NEW, decode, dump_request
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
    batch = decode(data)
    assert not batch.skipped and len(batch.snapshots) == 1
    s = batch.snapshots[0]
    assert (s.kind, s.family, s.proto, s.zone, s.ct_id) == (DESTROY, socket.AF_INET, 6, 7, 123456)
    assert (s.orig.src, s.orig.dst, s.orig.sport, s.orig.dport) == (
        address16("10.244.0.10"), address16("10.96.0.10"), 40000, 80)
    assert (s.reply.src, s.reply.dst, s.reply.sport, s.reply.dport) == (
        address16("10.244.0.11"), address16("10.244.0.10"), 8080, 40000)
    assert (s.orig_packets, s.orig_bytes, s.reply_packets, s.reply_bytes) == (12, 2**40, 9, 4321)
    assert (s.start_ns, s.stop_ns, s.status, s.tcp_state, s.length) == (10**18, 10**18 + 5, 0x0E, 7, len(data))


def test_icmpv6_new_and_dump_rows_in_one_buffer() -> None:
    orig = _tuple(socket.AF_INET6, "fd00::1", "fd00::2", 58, icmpv6_id=77, icmpv6_type=128, icmpv6_code=0)
    reply = _tuple(socket.AF_INET6, "fd00::2", "fd00::1", 58, icmpv6_id=77, icmpv6_type=129, icmpv6_code=0)
    new = encode(0, socket.AF_INET6, orig, reply, flags=0x600)
    done = struct.pack("=IHHIIi", 20, 3, 2, 1, 0, 0)
    events = decode(new + new)
    assert [s.kind for s in events.snapshots] == [NEW, NEW] and not events.done
    s = events.snapshots[0]
    assert (s.orig.src, s.orig.sport, s.orig.dport, s.reply.dport) == (address16("fd00::1"), 77, 128 << 8, 129 << 8)
    assert s.orig_bytes == 0 and s.start_ns == 0  # no counters/timestamp attributes: 0
    dump = decode(new + done, dump=True)
    assert [s.kind for s in dump.snapshots] == [DUMP] and dump.done and not dump.interrupted


def test_errors_interrupted_dumps_and_truncation() -> None:
    error = struct.pack("=IHHIIi", 36, 2, 0, 1, 0, -16) + b"\0" * 16
    batch = decode(error)
    assert batch.errors == 1 and batch.last_error == 16
    interrupted = struct.pack("=IHHIIi", 20, 3, 0x12, 1, 0, 0)
    assert decode(interrupted).interrupted
    data = encode(0, socket.AF_INET, _tuple(socket.AF_INET, "1.2.3.4", "5.6.7.8", 17, src_port=1, dst_port=2),
                  _tuple(socket.AF_INET, "5.6.7.8", "1.2.3.4", 17, src_port=2, dst_port=1))
    assert decode(data[:-8]).skipped == 1 and not decode(data[:-8]).snapshots


def test_dump_request_is_a_ctnetlink_get_dump() -> None:
    msg = nfct_msg(dump_request(9))
    msg.decode()
    assert msg["header"]["type"] == (1 << 8) | 1 and msg["header"]["flags"] == 0x301
    assert msg["header"]["sequence_number"] == 9 and msg["nfgen_family"] == socket.AF_UNSPEC
