"""Insert groups (sink/groups.py): bounds, duplicate origins, and the exact re-forming of a
recorded group after a restart."""

from __future__ import annotations

import pyarrow as pa
import pytest
from aiokafka.structs import ConsumerRecord

from flowtally.wire import EMISSION_HEADER, ORIGIN_HEADER, PART_HEADER
from sink.groups import Consumed, GroupLimits, Intent, PartitionGroups, split_origin
from sink.service import decode, origin_of


def _item(offset: int, origin: str, rows: int = 10) -> Consumed:
    return Consumed(offset, origin, pa.table({"bytes": pa.array(range(offset * 1000, offset * 1000 + rows),
                                                                 pa.uint64())}))


def _groups(max_rows: int = 1000, window: int = 100) -> PartitionGroups:
    tokens = iter(f"t{i}" for i in range(100))
    return PartitionGroups("enriched", 3, GroupLimits(max_rows, 1 << 30, 2.0), window,
                           token=lambda *_: next(tokens))


def test_a_group_is_a_prefix_within_the_row_limit_and_a_larger_message_goes_alone() -> None:
    g = _groups(max_rows=25)
    for offset, rows in [(0, 10), (1, 10), (2, 10), (3, 100), (4, 5)]:
        g.add(_item(offset, f"raw/0/{offset}", rows), now=0.0)
    assert g.full() and g.ready(0.0)
    first = g.take()
    assert first is not None
    assert (first.intent.first_offset, first.intent.last_offset) == (0, 1)
    assert first.intent.origins == ("raw/0/0", "raw/0/1") and not first.recorded
    second = g.take()
    assert second is not None and second.intent.origins == ("raw/0/2",)
    third = g.take()
    assert third is not None and third.intent.origins == ("raw/0/3",) and third.num_rows == 100
    fourth = g.take()
    assert fourth is not None and fourth.intent.origins == ("raw/0/4",)
    assert g.take() is None and len(g) == 0


def test_the_table_of_a_group_is_one_record_batch_with_every_row() -> None:
    g = _groups()
    for offset in range(4):
        g.add(_item(offset, f"raw/0/{offset}"), now=0.0)
    group = g.take()
    assert group is not None
    table = group.table()
    assert table is not None and table.num_rows == 40 and len(table.to_batches()) == 1
    assert table["bytes"].to_pylist() == [v for o in range(4) for v in range(o * 1000, o * 1000 + 10)]
    # each message's rows are now a slice of that table (for inserting them one by one)
    assert [c.rows["bytes"].to_pylist() for c in group.included if c.rows is not None] == [
        list(range(o * 1000, o * 1000 + 10)) for o in range(4)]


def test_a_group_waits_for_rows_or_the_maximum_wait() -> None:
    g = _groups(max_rows=1000)
    g.add(_item(0, "raw/0/0"), now=10.0)
    g.add(_item(1, "raw/0/1"), now=11.0)
    assert not g.ready(11.9) and g.deadline() == 12.0
    assert g.ready(12.0)


def test_duplicate_origins_in_a_group_and_after_a_committed_group_are_skipped() -> None:
    g = _groups()
    g.add(_item(0, "raw/0/0"), 0.0)
    g.add(_item(1, "raw/0/1"), 0.0)
    g.add(_item(2, "raw/0/0"), 0.0)  # the enricher re-emitted raw/0/0 right away
    first = g.take()
    assert first is not None
    assert [c.offset for c in first.included] == [0, 1] and [c.offset for c in first.duplicates] == [2]
    g.landed(first)
    g.add(_item(3, "raw/0/1"), 0.0)  # ... and raw/0/1 after the group was committed
    g.add(_item(4, "raw/0/4"), 0.0)
    second = g.take()
    assert second is not None
    assert [c.offset for c in second.duplicates] == [3] and second.intent.origins == ("raw/0/4",)
    assert (second.intent.first_offset, second.intent.last_offset) == (3, 4)


def test_an_undecodable_message_is_set_aside_and_does_not_end_the_group() -> None:
    g = _groups()
    g.add(_item(0, "raw/0/0"), 0.0)
    g.add(Consumed(1, "raw/0/1", None, ValueError("not arrow")), 0.0)
    g.add(_item(2, "raw/0/2"), 0.0)
    group = g.take()
    assert group is not None
    assert [c.offset for c in group.undecodable] == [1] and group.intent.origins == ("raw/0/0", "raw/0/2")


def test_the_duplicate_memory_forgets_groups_past_the_window() -> None:
    g = _groups(window=10)
    g.add(_item(0, "raw/0/0"), 0.0)
    first = g.take()
    assert first is not None
    g.landed(first)
    g.add(_item(20, "raw/0/20"), 0.0)
    second = g.take()
    assert second is not None
    g.landed(second)  # offset 21 next: group [0, 0] ended more than 10 offsets ago
    g.add(_item(21, "raw/0/0"), 0.0)
    third = g.take()
    assert third is not None and third.intent.origins == ("raw/0/0",)


def test_a_recorded_group_at_the_committed_offset_is_re_formed_exactly() -> None:
    """The sink crashed after recording (and maybe inserting) group [10, 14] but before its
    commit: the replay takes the same messages, skips the same duplicate, keeps the same token."""
    recorded = [
        Intent("enriched", 3, 4, 9, "old", ("raw/0/4", "raw/0/5")),  # committed earlier
        Intent("enriched", 3, 10, 14, "tok-A", ("raw/0/10", "raw/0/11", "raw/0/13", "raw/0/14")),
    ]
    g = _groups(max_rows=20)  # smaller than the group: a re-formed group keeps its recorded shape
    g.resume(10, recorded)
    assert g.pending == recorded[1]
    for offset, origin in [(10, "raw/0/10"), (11, "raw/0/11"), (12, "raw/0/5"), (13, "raw/0/13")]:
        g.add(_item(offset, origin), 0.0)
    assert not g.ready(1e9) and g.take() is None  # offset 14 not fetched yet
    g.add(_item(14, "raw/0/14"), 0.0)
    g.add(_item(15, "raw/0/15"), 0.0)
    assert g.ready(0.0)
    group = g.take()
    assert group is not None and group.recorded and group.intent.token == "tok-A"
    assert [c.offset for c in group.included] == [10, 11, 13, 14]
    assert [c.offset for c in group.duplicates] == [12]
    g.landed(group)
    nxt = g.take()
    assert nxt is not None and not nxt.recorded and nxt.intent.first_offset == 15 and nxt.intent.token == "t0"


def test_intents_that_never_landed_do_not_hide_messages() -> None:
    """A stale intent past the committed offset (recorded, never inserted, superseded) must not
    feed the duplicate memory; of two intents at the committed offset the latest is re-formed."""
    recorded = [
        Intent("enriched", 3, 10, 12, "stale", ("raw/0/10", "raw/0/11", "raw/0/12")),
        Intent("enriched", 3, 10, 11, "latest", ("raw/0/10", "raw/0/11")),
        Intent("enriched", 3, 12, 13, "never", ("raw/0/12", "raw/0/13")),
    ]
    g = _groups()
    g.resume(10, recorded)
    assert g.pending is not None and g.pending.token == "latest"
    for offset in range(10, 14):
        g.add(_item(offset, f"raw/0/{offset}"), 0.0)
    group = g.take()
    assert group is not None and [c.offset for c in group.included] == [10, 11]
    g.landed(group)
    rest = g.take()
    assert rest is not None and [c.offset for c in rest.included] == [12, 13] and not rest.duplicates


@pytest.mark.parametrize("start", [0, 5])
def test_resume_without_a_recorded_group_forms_fresh_ones(start: int) -> None:
    g = _groups()
    g.resume(start, [Intent("enriched", 3, 0, 4, "done", ("raw/0/0",))] if start else [])
    assert g.pending is None
    g.add(_item(start, "raw/0/0"), 0.0)
    g.add(_item(start + 1, "raw/0/x"), 0.0)
    group = g.take()
    assert group is not None
    assert group.intent.origins == (("raw/0/x",) if start else ("raw/0/0", "raw/0/x"))


def _record(offset: int, headers: list[tuple[str, bytes]]) -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord("enriched", 3, offset, 0, 0, b"k", b"", None, 1, 0, headers)


def test_pieces_of_one_raw_message_are_distinct_origins() -> None:
    whole = _record(5, [(ORIGIN_HEADER, b"raw/0/7")])
    pieces = [_record(6 + i, [(ORIGIN_HEADER, b"raw/0/8"), (PART_HEADER, f"{i}/3".encode()),
                              (EMISSION_HEADER, b"e1")]) for i in (1, 2, 3)]
    assert origin_of(whole) == "raw/0/7" and split_origin("raw/0/7") == ("raw/0/7", "")
    assert [origin_of(p) for p in pieces] == ["raw/0/8#e1:1/3", "raw/0/8#e1:2/3", "raw/0/8#e1:3/3"]
    assert split_origin("raw/0/8#e1:2/3") == ("raw/0/8", "e1")
    assert origin_of(_record(9, [])) == "enriched/3/9"  # no origin: the message itself
    # a malformed part header makes the message undecodable (to the DLQ), not a crash
    bad = decode(_record(10, [(ORIGIN_HEADER, b"raw/0/9"), (PART_HEADER, b"x")]))
    assert bad.rows is None and bad.error is not None and bad.origin == "raw/0/9#:x"


def _pieces(raw: str, emission: str, n: int) -> list[str]:
    return [f"{raw}#{emission}:{i}/{n}" for i in range(1, n + 1)]


def test_the_pieces_of_a_raw_message_are_all_inserted_and_their_replay_is_skipped() -> None:
    """A raw message split into three pieces: all three go into the group (keyed on the raw
    origin alone, pieces 2 and 3 would be dropped as duplicates of piece 1); the enricher
    re-emitting the same three pieces after a crash, within the group or after it landed, adds
    nothing; and a group re-formed after a sink restart takes the same three pieces."""
    g = _groups()
    parts = _pieces("raw/0/8", "e1", 3)
    g.add(_item(0, "raw/0/7"), 0.0)
    for offset, origin in enumerate(parts, start=1):
        g.add(_item(offset, origin), 0.0)
    g.add(_item(4, parts[0]), 0.0)  # the same piece twice (a producer retry)
    g.add(_item(5, "raw/0/8#e2:1/2"), 0.0)  # re-emitted at once, split in two this time
    first = g.take()
    assert first is not None
    assert first.intent.origins == ("raw/0/7", *parts) and first.num_rows == 40
    assert [c.offset for c in first.duplicates] == [4, 5]
    g.landed(first)
    # re-emitted after the group was committed: the same split, another split, one whole message
    for offset, origin in enumerate([*_pieces("raw/0/8", "e3", 3), *_pieces("raw/0/8", "e4", 4), "raw/0/8"],
                                    start=6):
        g.add(_item(offset, origin), 0.0)
    second = g.take()
    assert second is not None and second.included == [] and len(second.duplicates) == 8
    # the sink restarts inside a recorded group of pieces: exactly those pieces again
    h = _groups()
    h.resume(1, [Intent("enriched", 3, 1, 4, "tok-P", tuple(parts))])
    for offset, origin in enumerate([*parts, parts[1]], start=1):
        h.add(_item(offset, origin), 0.0)
    reformed = h.take()
    assert reformed is not None and reformed.recorded and reformed.intent.token == "tok-P"
    assert [c.offset for c in reformed.included] == [1, 2, 3] and [c.offset for c in reformed.duplicates] == [4]


def test_the_first_emission_of_a_raw_message_wins_across_groups_and_restarts() -> None:
    """Pieces of one emission may span groups (other messages between them); a whole message
    first and pieces later (or the other way round) are one raw message too; a sink resuming
    after committed groups remembers which emission each raw origin had."""
    g = _groups(max_rows=25)
    g.add(_item(0, "raw/0/1#a:1/3"), 0.0)
    g.add(_item(1, "raw/0/1#a:2/3"), 0.0)
    g.add(_item(2, "raw/0/2"), 0.0)  # whole
    g.add(_item(3, "raw/0/1#a:3/3"), 0.0)  # the last piece, in the next group (row limit)
    g.add(_item(4, "raw/0/1#b:1/1"), 0.0)
    g.add(_item(5, "raw/0/2#c:1/2"), 0.0)
    first = g.take()
    assert first is not None and first.intent.origins == ("raw/0/1#a:1/3", "raw/0/1#a:2/3")
    g.landed(first)
    second = g.take()
    assert second is not None and second.intent.origins == ("raw/0/2", "raw/0/1#a:3/3")
    assert [c.offset for c in second.duplicates] == [4, 5]
    # a restart after both groups: the recorded intents rebuild the memory of emissions
    h = _groups()
    h.resume(6, [first.intent, second.intent])
    for offset, origin in [(6, "raw/0/1#d:2/2"), (7, "raw/0/2#e:1/2"), (8, "raw/0/3#f:1/2"), (9, "raw/0/3#f:2/2")]:
        h.add(_item(offset, origin), 0.0)
    third = h.take()
    assert third is not None and third.intent.origins == ("raw/0/3#f:1/2", "raw/0/3#f:2/2")
    assert [c.offset for c in third.duplicates] == [6, 7]
    # the memory of emissions forgets with the window like the rest
    w = _groups(window=10)
    w.add(_item(0, "raw/0/1#a:1/2"), 0.0)
    w.add(_item(1, "raw/0/1#a:2/2"), 0.0)
    old = w.take()
    assert old is not None
    w.landed(old)
    w.add(_item(30, "raw/0/30"), 0.0)
    mid = w.take()
    assert mid is not None
    w.landed(mid)
    w.add(_item(31, "raw/0/1#z:1/1"), 0.0)
    late = w.take()
    assert late is not None and late.intent.origins == ("raw/0/1#z:1/1",)
