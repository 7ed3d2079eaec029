"""Implausible flow times (enricher/times.py) and their use in enrich_batch."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from enricher.enrich import EnrichStats, enrich_batch
from enricher.identity import IdentityIndex
from enricher.times import TimeWindow, check_times, implausible
from sensors.completeness import CompletenessAccumulator
from sensors.schema import RAW_SCHEMA, build_raw_table, ipv4_to_mapped

DAY = 86_400_000
NOW = 1_765_000_000_000  # a receive time (ms)


def _raw(ends: list[int], starts: list[int] | None = None, received: int = NOW) -> pa.Table:
    n = len(ends)
    end = np.array(ends, dtype=np.int64)
    return build_raw_table({
        "time_received": np.full(n, received, dtype=np.int64),
        "start": np.array(starts, dtype=np.int64) if starts is not None else end - 1000,
        "end": end, "bytes": np.arange(1, n + 1), "packets": np.ones(n),
        "src_addr": ipv4_to_mapped(np.full(n, 0x0A000001, dtype=np.uint32)),
        "dst_addr": ipv4_to_mapped(np.full(n, 0x0A000002, dtype=np.uint32)),
    })


def test_the_window_is_around_the_receive_time_and_its_edges_are_plausible() -> None:
    window = TimeWindow(max_age_ms=DAY, max_future_ms=300_000)
    received = np.full(6, NOW, dtype=np.int64)
    ends = np.array([NOW, NOW - DAY, NOW - DAY - 1, NOW + 300_000, NOW + 300_001, 0], dtype=np.int64)
    assert implausible(received, ends, window).tolist() == [False, False, True, False, True, True]


def test_no_receive_time_is_never_judged_and_extreme_values_do_not_overflow() -> None:
    window = TimeWindow()
    extremes = np.array([np.iinfo(np.int64).min, np.iinfo(np.int64).max, 0], dtype=np.int64)
    assert implausible(np.zeros(3, dtype=np.int64), extremes, window).tolist() == [False, False, False]
    assert implausible(np.full(3, NOW, dtype=np.int64), extremes, window).tolist() == [True, True, True]


def test_clamp_moves_the_end_to_the_receive_time_and_keeps_a_plausible_duration() -> None:
    window = TimeWindow(max_age_ms=DAY, max_future_ms=300_000, policy="clamp")
    ends = [NOW - 5000, NOW + 150 * DAY, 0, NOW - 3 * DAY]
    starts = [NOW - 9000, NOW + 150 * DAY - 60_000, -10 * DAY, NOW - 3 * DAY + 10]  # last: start > end
    checked = check_times(_raw(ends, starts), window)
    assert checked.implausible.tolist() == [False, True, True, True]
    assert checked.count == 3 and checked.rejected is None
    table = checked.table
    assert table.schema == RAW_SCHEMA
    as_ms = table.column("end").cast(pa.int64()).to_pylist()
    assert as_ms == [NOW - 5000, NOW, NOW, NOW]
    # durations: 60 s kept; 10 days capped to max_age; negative becomes 0
    assert table.column("start").cast(pa.int64()).to_pylist() == [NOW - 9000, NOW - 60_000, NOW - DAY, NOW]
    assert table.column("bytes").to_pylist() == [1, 2, 3, 4]  # nothing else changed, nothing dropped


def test_dlq_takes_the_rows_out_with_their_original_values() -> None:
    window = TimeWindow(policy="dlq")
    raw = _raw([NOW - 1, NOW + 2 * DAY, NOW - 2, 5])
    checked = check_times(raw, window)
    assert checked.table.column("bytes").to_pylist() == [1, 3]
    assert checked.rejected is not None
    assert checked.rejected.column("bytes").to_pylist() == [2, 4]
    assert checked.rejected.column("end").cast(pa.int64()).to_pylist() == [NOW + 2 * DAY, 5]


def test_a_plausible_batch_is_returned_as_it_is() -> None:
    raw = _raw([NOW - 1, NOW - 2])
    checked = check_times(raw, TimeWindow())
    assert checked.table is raw and checked.count == 0


def test_window_limits() -> None:
    with pytest.raises(ValueError, match="max_age_ms"):
        TimeWindow(max_age_ms=91 * DAY)
    with pytest.raises(ValueError, match="policy"):
        TimeWindow(policy="drop")  # type: ignore[arg-type]


@pytest.mark.parametrize("policy", ["clamp", "dlq"])
def test_enrich_batch_counts_implausible_times_in_stats_and_completeness(policy: str) -> None:
    window = TimeWindow(policy=policy)  # type: ignore[arg-type]
    ends = [NOW - 1000] * 5 + [NOW + (1 + d) * DAY for d in range(150)]  # 150 days of a broken clock
    stats = EnrichStats()
    acc = CompletenessAccumulator(stage="enricher")
    enriched = enrich_batch(_raw(ends), IdentityIndex(()), stats=stats, completeness=acc, now_ms=NOW,
                            time_window=window)
    assert stats.implausible_time == {policy: 150}
    assert stats.flows_in == 155
    rows = acc.take().to_pylist()
    assert [r["implausible_time"] for r in rows] == [150]
    days = {e // DAY for e in enriched.column("end").cast(pa.int64()).to_pylist()}
    if policy == "clamp":
        assert enriched.num_rows == 155 and stats.flows_out == 155
        assert days == {NOW // DAY}  # one partition instead of 151
        assert stats.implausible_rows == []
    else:
        assert enriched.num_rows == 5 and stats.flows_out == 5
        assert [t.num_rows for t in stats.implausible_rows] == [150]


def test_enrich_batch_leaves_rows_without_a_receive_time_alone() -> None:
    raw = _raw([NOW + 400 * DAY, 0], received=0)
    stats = EnrichStats()
    enriched = enrich_batch(raw, IdentityIndex(()), stats=stats, time_window=TimeWindow())
    assert stats.implausible_time == {}
    assert enriched.column("end").cast(pa.int64()).to_pylist() == [NOW + 400 * DAY, 0]
