"""Per-connection deltas (pure, no I/O): what to report for each snapshot so that everything
reported for a connection adds up to the kernel's final counters exactly.

A connection is identified by (conntrack ID, orig tuple, zone, start time): IDs are reused, the
tuple and the start timestamp tell a reused ID from the connection that had it before.

Rules (counters are cumulative and only grow, so "what is new" is ``seen - reported``):

- A dump row reports ``counters - last reported`` and remembers the counters.
- A DESTROY reports the remainder and forgets the connection. The kernel redelivers a DESTROY
  it could not deliver (the sensor sets NETLINK_BROADCAST_ERROR), so an overrun loses NEW
  events, never the final counters -- but a redelivered DESTROY can come many seconds late
  while the socket keeps overrunning, and it is broadcast again to *every* listener, so one
  that had it already gets it twice.
- So a DESTROY leaves a tombstone with the final counters: neither a dump row read after it
  (dumps and events come on two sockets) nor the same DESTROY again counts the connection
  twice. A tombstone goes once a dump that started after it has ended *and* ``tombstone_s``
  have passed; beyond ``max_tombstones`` the oldest go first.
- A connection absent from the complete dumps of ``lost_after_s`` (and at least
  ``absent_dumps`` of them) whose DESTROY has not come is forgotten and counted in ``lost``
  (what it did since its last report is unknown); it too leaves a tombstone, so a DESTROY that
  was merely late reports only the remainder.
- NEW events report nothing (a connection's first report is its first dump row or its DESTROY).
- With ``baseline`` (the first dump after start), dump rows only set the reference counters:
  what connections did before the sensor started was reported by the previous sensor, or is
  not attributable to a time.

Times (``now``) are the caller's monotonic seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from sensors.conntrack.messages import DESTROY, DUMP, Rows, Snapshot, snapshot_key

Key = bytes  # conntrack id, zone, start ns, orig tuple attribute: see messages.Rows
Counters = tuple[int, int, int, int]  # orig packets, orig bytes, reply packets, reply bytes


class Deltas(NamedTuple):
    """What to report for a batch of rows: the rows that moved, and by how much since the
    previous report (orig packets, orig bytes, reply packets, reply bytes)."""

    positions: list[int]
    counters: list[Counters]


def key_of(s: Snapshot) -> Key:
    """The identity of the connection ``s`` describes."""
    return snapshot_key(s)


@dataclass
class Tracker:
    """Last reported counters of each live connection, and the rules above."""

    tombstone_s: float = 60.0
    lost_after_s: float = 60.0
    absent_dumps: int = 2
    max_tombstones: int = 2_000_000
    #: live connections: key -> (orig packets, orig bytes, reply packets, reply bytes, last dump seen)
    live: dict[Key, tuple[int, int, int, int, int]] = field(default_factory=dict)
    #: ended connections: key -> (the four final counters, tracker clock when buried, not removed
    #: before this time). Plain tuples of numbers: the garbage collector stops tracking them,
    #: which matters with hundreds of thousands of them.
    tombstones: dict[Key, tuple[int, int, int, int, int, float]] = field(default_factory=dict)
    lost: int = 0  # connections forgotten without a DESTROY
    _clock: int = 0
    _dump: int = 0  # number of the current/last dump
    _dump_started: int = -1  # clock at the start of the running dump, -1 = none running
    _dump_times: dict[int, float] = field(default_factory=dict)  # dump number -> start time
    _baseline: bool = False

    @property
    def dumping(self) -> bool:
        return self._dump_started >= 0

    def begin_dump(self, now: float, baseline: bool = False) -> None:
        """A full dump starts (its rows follow through :meth:`update`)."""
        self._clock += 1
        self._dump += 1
        self._dump_started = self._clock
        self._dump_times[self._dump] = now
        self._baseline = baseline

    def end_dump(self, now: float, complete: bool = True) -> None:
        """The dump ended. ``complete`` False (interrupted, failed): no conclusion is drawn from
        which connections it did not list."""
        started, self._dump_started = self._dump_started, -1
        self._baseline = False
        if started < 0:
            return
        # Tombstones are kept in burial order (clock and caller time both non-decreasing), so the
        # scan stops at the first that is too young or, give or take the difference between the
        # two lifetimes, expires later: the rest expire later still. (With a caller clock going
        # backwards, tombstones would only stay longer: never a double count.)
        slack = abs(self.tombstone_s - self.lost_after_s)
        doomed = []
        for key, t in self.tombstones.items():
            if t[4] >= started or t[5] > now + slack:
                break
            if t[5] <= now:
                doomed.append(key)
        for key in doomed:
            del self.tombstones[key]
        if not complete:
            return
        dump = self._dump
        times = self._dump_times
        gone = [k for k, v in self.live.items()
                if dump - v[4] >= self.absent_dumps and now - times.get(v[4] + 1, 0.0) >= self.lost_after_s]
        for key in gone:
            v = self.live.pop(key)
            self._bury(key, (v[0], v[1], v[2], v[3]), now + self.lost_after_s)
        self.lost += len(gone)
        oldest = min((v[4] for v in self.live.values()), default=dump)
        for number in [d for d in times if d <= oldest and d < dump]:
            del times[number]

    def _bury(self, key: Key, counters: Counters, until: float) -> None:
        self.tombstones.pop(key, None)
        self.tombstones[key] = (*counters, self._clock, until)
        if len(self.tombstones) > self.max_tombstones:
            del self.tombstones[next(iter(self.tombstones))]

    def update(self, rows: Rows, now: float) -> Deltas:
        """Take a batch of rows (dump rows or events, in the order read); the deltas to report."""
        index: list[int] = []
        out: list[Counters] = []
        live = self.live
        tombstones = self.tombstones
        self._clock += 1
        dump = self._dump
        baseline = self._baseline
        clock = self._clock
        tomb_until = now + self.tombstone_s
        max_tombstones = self.max_tombstones
        kinds = rows.kind.tolist()
        for i, (kind, key, c) in enumerate(zip(kinds, rows.keys, rows.counters.tolist(), strict=True)):
            if kind != DUMP and kind != DESTROY:
                continue  # NEW: nothing to report yet
            op, ob, rp, rb = c
            last: tuple[int | float, ...] | None
            if kind == DESTROY:
                last = live.pop(key, None)
                buried = tombstones.pop(key, None)
                if last is None:
                    last = buried
                if last is not None:  # the larger of the two (an older copy reports nothing)
                    op, ob, rp, rb = max(op, last[0]), max(ob, last[1]), max(rp, last[2]), max(rb, last[3])
                    delta = (op - last[0], ob - last[1], rp - last[2], rb - last[3])
                else:
                    delta = (op, ob, rp, rb)
                # Buried (last in order: the oldest tombstones go first beyond the limit).
                tombstones[key] = (op, ob, rp, rb, clock, tomb_until)
                if len(tombstones) > max_tombstones:
                    del tombstones[next(iter(tombstones))]
            else:
                last = live.get(key)
                if last is None:
                    t = tombstones.get(key)
                    if t is not None:  # a row older than its DESTROY, or of a connection given up
                        op, ob, rp, rb = max(op, t[0]), max(ob, t[1]), max(rp, t[2]), max(rb, t[3])
                        tombstones[key] = (op, ob, rp, rb, t[4], t[5])
                        if op != t[0] or ob != t[1] or rp != t[2] or rb != t[3]:
                            index.append(i)
                            out.append((op - t[0], ob - t[1], rp - t[2], rb - t[3]))
                        continue
                    live[key] = (op, ob, rp, rb, dump)
                    if baseline:
                        continue
                    delta = (op, ob, rp, rb)
                elif op == last[0] and ob == last[1] and rp == last[2] and rb == last[3]:
                    # Unchanged since the last report (most rows of a dump): only seen again.
                    live[key] = (op, ob, rp, rb, dump)
                    continue
                else:
                    op, ob, rp, rb = max(op, last[0]), max(ob, last[1]), max(rp, last[2]), max(rb, last[3])
                    delta = (op - last[0], ob - last[1], rp - last[2], rb - last[3])
                    live[key] = (op, ob, rp, rb, dump)
            if delta[0] or delta[1] or delta[2] or delta[3]:
                index.append(i)
                out.append(delta)
        return Deltas(index, out)
