"""The conntrack sensor's pure parts: the delta tracker (incl. a property test over random
interleavings of traffic, dumps, DESTROYs, lost and rebroadcast events) and the record builder."""

from __future__ import annotations

import socket
from collections import defaultdict

from hypothesis import given, settings
from hypothesis import strategies as st

from sensors.conntrack.filters import make_filter
from sensors.conntrack.messages import (
    DESTROY,
    DUMP,
    IPS_ASSURED,
    IPS_SEEN_REPLY,
    NEW,
    Snapshot,
    Tuple,
    rows_from_snapshots,
)
from sensors.conntrack.records import build_columns, build_table, conn_state
from sensors.conntrack.tracker import Deltas, Tracker, key_of
from sensors.schema import RAW_SCHEMA, address16, address_text

CLIENT, CLUSTER_IP, BACKEND = address16("10.244.0.10"), address16("10.96.0.10"), address16("10.244.0.11")


def snap(kind: int, ident: int, counters: tuple[int, int, int, int], *, proto: int = 6, start_ns: int = 10**18,
         tcp_state: int = 3, status: int = IPS_SEEN_REPLY | IPS_ASSURED, stop_ns: int = 0, zone: int = 0,
         orig: Tuple | None = None, reply: Tuple | None = None) -> Snapshot:
    orig = orig or Tuple(CLIENT, CLUSTER_IP, 40000 + ident, 80)
    reply = reply or Tuple(BACKEND, CLIENT, 8080, 40000 + ident)
    raw = orig.src + orig.dst + bytes([proto]) + orig.sport.to_bytes(2, "big") + orig.dport.to_bytes(2, "big")
    return Snapshot(kind, socket.AF_INET, proto, zone, ident, start_ns, stop_ns, orig, reply, status, tcp_state,
                    *counters, raw, 200)


#: What a tracker reported for one row: (conntrack ID, orig packets, orig bytes, reply packets, reply bytes).
Reported = tuple[int, int, int, int, int]


def upd(t: Tracker, snapshots: list[Snapshot], now: float) -> list[Reported]:
    """``t.update`` on the rows of ``snapshots``; what it reported, by conntrack ID."""
    deltas = t.update(rows_from_snapshots(snapshots), now)
    return [(snapshots[i].ct_id, *c) for i, c in zip(deltas.positions, deltas.counters, strict=True)]


def state(s: Snapshot) -> str:
    return conn_state(s.proto, s.tcp_state, s.status, s.reply_packets)


def c4(counters: list[int]) -> tuple[int, int, int, int]:
    return counters[0], counters[1], counters[2], counters[3]


def totals(reported: list[Reported]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    for d in reported:
        t = out[d[0]]
        for i, v in enumerate(d[1:]):
            t[i] += v
    return out


def test_dump_deltas_then_destroy_remainder() -> None:
    t = Tracker()
    t.begin_dump(0.0)
    assert [d[1:] for d in upd(t, [snap(DUMP, 1, (2, 100, 1, 60))], 0.0)] == [(2, 100, 1, 60)]
    t.end_dump(0.0)
    t.begin_dump(1.0)
    assert [d[1:] for d in upd(t, [snap(DUMP, 1, (5, 400, 1, 60))], 1.0)] == [(3, 300, 0, 0)]
    t.end_dump(1.0)
    t.begin_dump(2.0)
    assert upd(t, [snap(DUMP, 1, (5, 400, 1, 60))], 2.0) == []  # nothing new: no record
    t.end_dump(2.0)
    assert [d[1:] for d in upd(t, [snap(DESTROY, 1, (6, 450, 3, 160))], 3.0)] == [(1, 50, 2, 100)]
    assert not t.live


def test_new_events_report_nothing_and_short_connections_report_once() -> None:
    t = Tracker()
    assert upd(t, [snap(NEW, 7, (1, 60, 0, 0))], 0.0) == []
    assert [d[1:] for d in upd(t, [snap(DESTROY, 7, (3, 180, 2, 120))], 0.1)] == [(3, 180, 2, 120)]


def test_stale_dump_row_and_duplicate_destroy_count_nothing() -> None:
    t = Tracker()
    t.begin_dump(0.0)
    # The DESTROY is read before the dump row the kernel produced earlier.
    assert len(upd(t, [snap(DESTROY, 1, (4, 400, 4, 400))], 0.0)) == 1
    assert upd(t, [snap(DUMP, 1, (3, 300, 2, 200))], 0.0) == []
    t.end_dump(0.0)
    assert upd(t, [snap(DESTROY, 1, (4, 400, 4, 400))], 5.0) == []  # rebroadcast later
    assert not t.live


def test_reused_id_is_another_connection() -> None:
    t = Tracker()
    upd(t, [snap(DESTROY, 1, (1, 60, 1, 60), start_ns=1)], 0.0)
    assert len(upd(t, [snap(DESTROY, 1, (1, 60, 1, 60), start_ns=2)], 0.0)) == 1


def test_baseline_dump_reports_only_what_follows() -> None:
    t = Tracker()
    t.begin_dump(0.0, baseline=True)
    assert upd(t, [snap(DUMP, 1, (10, 1000, 10, 1000))], 0.0) == []
    t.end_dump(0.0)
    assert [d[1:] for d in upd(t, [snap(DESTROY, 1, (11, 1100, 10, 1000))], 1.0)] == [(1, 100, 0, 0)]


def test_absent_connection_is_given_up_and_a_late_destroy_reports_the_rest() -> None:
    t = Tracker(lost_after_s=10, tombstone_s=10)
    t.begin_dump(0.0)
    upd(t, [snap(DUMP, 1, (1, 100, 0, 0))], 0.0)
    t.end_dump(0.0)
    for now in (5.0, 11.0, 16.0):
        t.begin_dump(now)
        t.end_dump(now)
    assert t.lost == 1 and not t.live
    assert [d[1:] for d in upd(t, [snap(DESTROY, 1, (2, 150, 1, 40))], 17.0)] == [(1, 50, 1, 40)]


def test_tombstones_expire() -> None:
    t = Tracker(tombstone_s=1.0)
    upd(t, [snap(DESTROY, 1, (1, 60, 0, 0))], 0.0)
    t.begin_dump(0.5)
    t.end_dump(0.5)
    assert t.tombstones  # not yet: 1 s
    t.begin_dump(2.0)
    t.end_dump(2.0)
    assert not t.tombstones



@settings(max_examples=300, deadline=None)
@given(st.data())
def test_sum_of_reports_equals_final_counters(data: st.DataObject) -> None:
    """Random interleavings of traffic, dumps read in chunks, DESTROYs delivered late (in an
    overrun's redelivery) or twice (rebroadcast), NEW events, complete and interrupted dumps:
    per connection, the deltas add up to the kernel's final counters, never more.

    The guarantee holds for DESTROYs that arrive within the tracker's windows (here 30 s): the
    model reads every event at most 20 s after the kernel sent it."""
    t = Tracker(tombstone_s=30.0, lost_after_s=30.0)
    now = 0.0
    alive: dict[int, list[int]] = {}
    final: dict[int, list[int]] = {}
    events: list[Snapshot] = []  # DESTROY/NEW not yet read
    sent_at: list[float] = []  # when the kernel sent each of them
    destroyed_at: dict[int, float] = {}
    dump_rows: list[Snapshot] | None = None
    reported: list[Reported] = []
    next_id = 1
    for _ in range(data.draw(st.integers(5, 80))):
        now += data.draw(st.sampled_from([0.0, 0.1, 0.5, 2.0]))
        if sent_at and now - sent_at[0] > 20:
            reported += upd(t, events, now)
            events, sent_at = [], []
        action = data.draw(st.sampled_from(["open", "traffic", "traffic", "dump", "read_dump", "destroy",
                                            "read_events", "duplicate"]))
        if action == "open":
            alive[next_id] = [0, 0, 0, 0]
            events.append(snap(NEW, next_id, (0, 0, 0, 0)))
            sent_at.append(now)
            next_id += 1
        elif action == "traffic" and alive:
            ident = data.draw(st.sampled_from(sorted(alive)))
            direction = data.draw(st.sampled_from([0, 2]))
            n = data.draw(st.integers(1, 5))
            alive[ident][direction] += n
            alive[ident][direction + 1] += n * data.draw(st.integers(40, 1500))
        elif action == "dump" and dump_rows is None:
            t.begin_dump(now)
            dump_rows = [snap(DUMP, i, c4(c)) for i, c in sorted(alive.items())]
        elif action == "read_dump" and dump_rows is not None:
            k = data.draw(st.integers(0, len(dump_rows)))
            reported += upd(t, dump_rows[:k], now)
            dump_rows = dump_rows[k:]
            if not dump_rows:
                t.end_dump(now, complete=data.draw(st.booleans()))
                dump_rows = None
        elif action == "destroy" and alive:
            ident = data.draw(st.sampled_from(sorted(alive)))
            final[ident] = alive.pop(ident)
            destroyed_at[ident] = now
            events.append(snap(DESTROY, ident, c4(final[ident])))
            sent_at.append(now)
        elif action == "read_events" and events:
            k = data.draw(st.integers(1, len(events)))
            # An overrun loses NEW events (never DESTROYs: the kernel redelivers them).
            batch = [e for e in events[:k] if e.kind == DESTROY or not data.draw(st.booleans())]
            reported += upd(t, batch, now)
            events, sent_at = events[k:], sent_at[k:]
        elif action == "duplicate" and [i for i in final if now - destroyed_at[i] < 10]:
            ident = data.draw(st.sampled_from(sorted(i for i in final if now - destroyed_at[i] < 10)))
            events.append(snap(DESTROY, ident, c4(final[ident])))
            sent_at.append(now)
    # Drain: finish the dump, read every event; then one more full dump and destroy the rest.
    if dump_rows is not None:
        reported += upd(t, dump_rows, now)
        t.end_dump(now)
    reported += upd(t, events, now)
    for ident in sorted(alive):
        final[ident] = alive.pop(ident)
        reported += upd(t, [snap(DESTROY, ident, c4(final[ident]))], now)
    got = totals(reported)
    for ident, counters in final.items():
        assert got.get(ident, [0, 0, 0, 0]) == counters, ident
    assert set(got) <= set(final)
    assert all(any(d[1:]) for d in reported)  # no empty records


# -- records ---------------------------------------------------------------------------------------

def test_records_both_directions_dnat_and_initiator() -> None:
    s = snap(DESTROY, 1, (3, 300, 2, 5000), stop_ns=2_000_000_000, start_ns=1_000_000_000)
    rows, deltas = rows_from_snapshots([s]), Deltas([0], [(3, 300, 2, 5000)])
    columns = build_columns(rows, deltas, now_ms=9_999, exporter=address16("192.0.2.1"))
    table = build_table(rows, deltas, 9_999, "node-1", exporter=address16("192.0.2.1"))
    assert table.schema == RAW_SCHEMA
    rows = table.to_pylist()
    assert len(rows) == 2 and len(columns["src_port"]) == 2
    orig, reply = rows
    assert (address_text(orig["src_addr"]), address_text(orig["dst_addr"])) == ("10.244.0.10", "10.244.0.11")
    assert (orig["src_port"], orig["dst_port"], orig["bytes"], orig["packets"]) == (40001, 8080, 300, 3)
    assert (address_text(reply["src_addr"]), address_text(reply["dst_addr"])) == ("10.244.0.11", "10.244.0.10")
    assert (reply["src_port"], reply["dst_port"], reply["bytes"], reply["packets"]) == (8080, 40001, 5000, 2)
    assert [r["initiator"] for r in rows] == [1, 2]
    assert {address_text(r["nat_addr"]) for r in rows} == {"10.96.0.10"} and {r["nat_port"] for r in rows} == {80}
    for r in rows:
        assert r["observer"] == "node-1" and r["version"] == 0 and address_text(r["exporter"]) == "192.0.2.1"
        assert int(r["start"].timestamp() * 1000) == 1000 and int(r["end"].timestamp() * 1000) == 2000
        assert r["conn_state"] == "established" and r["sampling_rate"] == 1


def test_records_untranslated_one_direction_icmp_zone() -> None:
    orig = Tuple(CLIENT, BACKEND, 77, 8 << 8)
    reply = Tuple(BACKEND, CLIENT, 77, 0)
    s = snap(DUMP, 2, (1, 84, 0, 0), proto=1, tcp_state=0, status=0, orig=orig, reply=reply, zone=5, start_ns=0)
    rows = build_table(rows_from_snapshots([s]), Deltas([0], [(1, 84, 0, 0)]), 5_000, "n").to_pylist()
    assert len(rows) == 1
    r = rows[0]
    assert (r["src_port"], r["dst_port"], r["proto"], r["observation_domain"]) == (0, 2048, 1, 5)
    assert r["nat_addr"] == b"\0" * 16 and r["nat_port"] == 0
    assert r["conn_state"] == "unreplied"
    assert int(r["start"].timestamp() * 1000) == 5_000  # no kernel timestamp: the report time


def test_conn_states() -> None:
    assert state(snap(DUMP, 1, (1, 60, 0, 0), tcp_state=1, status=0, proto=6)) == "unreplied"
    assert state(snap(DESTROY, 1, (1, 60, 1, 40), tcp_state=8, status=0, proto=6)) == "refused"
    assert state(snap(DESTROY, 1, (9, 600, 9, 900), tcp_state=7, proto=6)) == "closing"
    assert state(snap(DUMP, 1, (9, 600, 9, 900), tcp_state=3, proto=6)) == "established"
    assert state(snap(DUMP, 1, (1, 60, 1, 60), proto=17, tcp_state=0, status=IPS_SEEN_REPLY)) == "established"
    assert state(snap(DUMP, 1, (1, 60, 0, 0), proto=17, tcp_state=0, status=0)) == "unreplied"


def test_key_tells_zones_and_start_times_apart() -> None:
    a = snap(DUMP, 1, (0, 0, 0, 0), zone=1)
    assert key_of(a) != key_of(snap(DUMP, 1, (0, 0, 0, 0), zone=2))
    assert key_of(a) != key_of(snap(DUMP, 1, (0, 0, 0, 0), zone=1, start_ns=5))


def test_filters_count_each_row_under_its_first_reason() -> None:
    kafka = address16("10.0.0.5")
    rows = [
        snap(DESTROY, 1, (1, 60, 0, 0), orig=Tuple(address16("127.0.0.1"), address16("127.0.0.1"), 5, 6)),
        snap(DESTROY, 2, (1, 60, 0, 0), orig=Tuple(address16("::1"), address16("::1"), 5, 6)),
        snap(DESTROY, 3, (1, 60, 0, 0), orig=Tuple(CLIENT, kafka, 40000, 9092)),  # to Kafka
        snap(DESTROY, 4, (1, 60, 0, 0), reply=Tuple(kafka, CLIENT, 9092, 40004)),  # Kafka behind a DNAT
        snap(DESTROY, 5, (1, 60, 0, 0), orig=Tuple(CLIENT, kafka, 40000, 9093)),  # another port: kept
        snap(DESTROY, 6, (1, 60, 0, 0), orig=Tuple(CLIENT, address16("192.168.7.9"), 1, 2)),
        snap(DESTROY, 7, (1, 60, 0, 0), reply=Tuple(address16("2001:db8::7"), CLIENT, 1, 2)),
        snap(DESTROY, 8, (1, 60, 0, 0), orig=Tuple(CLIENT, BACKEND, 1, 5353), proto=17),
        snap(DESTROY, 9, (1, 60, 0, 0), orig=Tuple(CLIENT, BACKEND, 8, 5353), proto=1),  # ICMP: no ports
        snap(DESTROY, 10, (1, 60, 0, 0)),
    ]
    skip = make_filter(endpoints=[(kafka, 9092)], cidrs=["192.168.0.0/16", "2001:db8::/32"], ports=[5353])
    keep, counts = skip(rows_from_snapshots(rows))
    assert [r.ct_id for r, k in zip(rows, keep, strict=True) if k] == [5, 9, 10]
    assert counts == {"loopback": 2, "kafka": 2, "cidr": 2, "port": 1}
    keep, counts = make_filter(loopback=False)(rows_from_snapshots(rows))
    assert keep.all() and counts == {}


def test_tombstones_of_both_lifetimes_expire_in_turn() -> None:
    # Given up (lost_after_s 10) before an ended connection (tombstone_s 1) was buried: the
    # younger one still goes first.
    t = Tracker(tombstone_s=1.0, lost_after_s=10.0)
    t.begin_dump(0.0)
    upd(t, [snap(DUMP, 1, (1, 100, 0, 0))], 0.0)
    t.end_dump(0.0)
    for now in (5.0, 11.0, 16.0):
        t.begin_dump(now)
        t.end_dump(now)
    assert t.lost == 1 and len(t.tombstones) == 1
    upd(t, [snap(DESTROY, 2, (1, 60, 0, 0))], 17.0)
    t.begin_dump(20.0)
    t.end_dump(20.0)
    assert list(t.tombstones) == [key_of(snap(DUMP, 1, (0, 0, 0, 0)))]
    t.begin_dump(27.0)
    t.end_dump(27.0)
    assert not t.tombstones
