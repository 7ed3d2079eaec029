"""Split planning of the sink (sink/split.py): day chunks and halving of rejected messages."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from sink import split
from sink.split import Chunk, Part, Span

DAY = split.MS_PER_DAY


def test_day_numbers_floor_before_the_epoch_and_at_midnight() -> None:
    ends = pa.array([0, DAY - 1, DAY, -1, 150 * DAY + 5], pa.timestamp("ms", tz="UTC"))
    assert split.day_numbers(ends).tolist() == [0, 0, 1, -1, 150]
    chunked = pa.chunked_array([ends[:2], ends[2:]])
    assert split.day_numbers(chunked).tolist() == [0, 0, 1, -1, 150]


def test_a_group_within_the_limit_is_one_insert_with_the_group_token() -> None:
    days = np.array([5, 5, 6, 7, 7, 7])
    chunks = split.plan_chunks("T", [(10, 2), (11, 0), (12, 4)], days, max_partitions=3)
    assert chunks == [Chunk("T", None, (Part(10, 0, 2), Part(12, 2, 4)))]


def test_rows_on_too_many_days_are_cut_into_day_chunks_in_day_order() -> None:
    # message 0: days 3, 1, 2 ; message 1: days 1, 4, 5, 3
    days = np.array([3, 1, 2, 1, 4, 5, 3])
    chunks = split.plan_chunks("T", [(100, 3), (101, 4)], days, max_partitions=2)
    assert [c.token for c in chunks] == ["T/d0", "T/d1", "T/d2"]
    # chunk 0: days {1, 2}; chunk 1: days {3, 4}; chunk 2: day 5 — rows keep the group's order
    assert [c.indices.tolist() for c in chunks if c.indices is not None] == [[1, 2, 3], [0, 4, 6], [5]]
    assert chunks[0].parts == (Part(100, 0, 2), Part(101, 2, 1))
    assert chunks[1].parts == (Part(100, 0, 1), Part(101, 1, 2))
    assert chunks[2].parts == (Part(101, 0, 1),)
    for chunk in chunks:
        assert chunk.indices is not None
        assert len(np.unique(days[chunk.indices])) <= 2
        assert chunk.num_rows == len(chunk.indices)
    assert sorted(np.concatenate([c.indices for c in chunks if c.indices is not None]).tolist()) == list(range(7))


def test_150_days_beside_a_valid_stream_make_two_chunks_of_at_most_100_days() -> None:
    valid = np.full(5000, 20_000)
    broken = 19_000 + np.arange(150)
    days = np.concatenate([valid[:2500], broken, valid[2500:]])
    chunks = split.plan_chunks("topic/0/0-9/abc", [(0, 2500), (1, 150), (2, 2500)], days, 100)
    assert len(chunks) == 2
    assert [len(np.unique(days[c.indices])) for c in chunks if c.indices is not None] == [100, 51]
    assert chunks[1].num_rows == 5000 + 50  # the valid day is the last of the 151
    # the same rows plan the same chunks (a re-formed group repeats the same tokens)
    again = split.plan_chunks("topic/0/0-9/abc", [(0, 2500), (1, 150), (2, 2500)], days.copy(), 100)
    assert [(c.token, c.parts) for c in again] == [(c.token, c.parts) for c in chunks]


def test_plan_chunks_checks_its_input() -> None:
    with pytest.raises(ValueError, match="3 days for 2 rows"):
        split.plan_chunks("T", [(0, 2)], np.array([1, 2, 3]), 10)
    with pytest.raises(ValueError, match="at least 1"):
        split.plan_chunks("T", [(0, 1)], np.array([1]), 0)


def test_tokens_of_messages_and_ranges_derive_from_the_insert_token() -> None:
    assert split.message_token("T/d1", 42) == "T/d1/42"
    assert split.span_token("T", Span(42, 8, 15, 2)) == "T/42/8-15"


def test_halving_stops_at_min_rows_and_max_depth() -> None:
    span = split.whole(Part(7, 0, 10))
    assert span == Span(7, 0, 9, 0)
    assert split.halves(span, min_rows=1, max_depth=8) == (Span(7, 0, 4, 1), Span(7, 5, 9, 1))
    assert split.halves(Span(7, 5, 9, 1), 1, 8) == (Span(7, 5, 6, 2), Span(7, 7, 9, 2))
    assert split.halves(Span(7, 3, 3, 4), 1, 8) is None  # one row
    assert split.halves(span, min_rows=10, max_depth=8) is None  # small enough
    assert split.halves(Span(7, 0, 9, 8), 1, 8) is None  # deep enough


def test_halving_a_message_finds_one_bad_row_within_the_depth() -> None:
    """Simulates the shell's loop: every range holding row 37 is rejected."""
    bad = 37
    pending = [split.whole(Part(0, 0, 1000))]
    rejected: list[Span] = []
    inserted = 0
    inserts = 0
    while pending:
        span = pending.pop(0)
        halves = split.halves(span, min_rows=1, max_depth=10)
        if halves is None:
            rejected.append(span)
            continue
        for half in halves:
            inserts += 1
            if half.first <= bad <= half.last:
                pending.append(half)
            else:
                inserted += half.count
    assert [(s.first, s.last) for s in rejected] == [(37, 37)]  # 1000 rows: one row after <= 10 halvings
    assert inserted == 999
    assert inserts == 2 * rejected[0].depth


def test_as_enriched_restores_the_wire_names() -> None:
    rows = pa.table({"flow_start": [1], "flow_end": [2], "bytes": [3]})
    assert split.as_enriched(rows).column_names == ["start", "end", "bytes"]


def test_few_distinct_days_far_apart_are_one_insert() -> None:
    """What counts is distinct days, not their range: days 0 and 5000 are two partitions."""
    assert len(split.plan_chunks("T", [(0, 3)], np.array([0, 5000, 0]), 2)) == 1
    assert len(split.plan_chunks("T", [(0, 100)], np.arange(100), 100)) == 1  # exactly at the limit
    assert len(split.plan_chunks("T", [(0, 101)], np.arange(101), 100)) == 2
    assert split.plan_chunks("T", [(0, 0)], np.array([], dtype=np.int64), 100) == [Chunk("T", None, ())]
