"""Per-connection deltas (pure, no I/O): what to report for each snapshot so that everything
reported for a connection adds up to the kernel's final counters exactly.

A connection is identified by (conntrack ID, orig tuple, zone, start time): IDs are reused, the
tuple and the start timestamp tell a reused ID from the connection that had it before.

Rules (counters are cumulative and only grow, so "what is new" is ``seen - reported``):

- A dump row reports ``counters - last reported`` and remembers the counters.
- A DESTROY reports the remainder and forgets the connection. The kernel redelivers a DESTROY
  it could not deliver (the sensor sets NETLINK_BROADCAST_ERROR), so an overrun loses NEW
  events, never DESTROYs.
- A dump row read *after* the connection's DESTROY was handled (the dump and the events come on
  two sockets) must not bring it back: while a dump is running, each DESTROY leaves a tombstone
  with the final counters; tombstones go when a dump that started after them ends.
- A connection absent from ``absent_dumps`` complete dumps in a row whose DESTROY never came is
  forgotten (counted in ``lost``: what it did since its last report is unknown); it keeps a
  tombstone for ``lost_grace_dumps`` dumps in case its DESTROY is merely late, so a late DESTROY
  reports only the remainder.
- NEW events report nothing (a connection's first report is its first dump row or its DESTROY).
- With ``baseline`` (the first dump after start), dump rows only set the reference counters:
  what connections did before the sensor started was reported by the previous sensor, or is
  not attributable to a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from sensors.conntrack.messages import DESTROY, DUMP, Snapshot

Key = tuple[int, int, int, bytes]  # conntrack id, zone, start ns, orig tuple attribute


class Delta(NamedTuple):
    """What to report for one snapshot: counters since the previous report."""

    snapshot: Snapshot
    orig_packets: int
    orig_bytes: int
    reply_packets: int
    reply_bytes: int


def key_of(s: Snapshot) -> Key:
    """The identity of the connection ``s`` describes."""
    return (s.ct_id, s.zone, s.start_ns, s.orig_raw)


@dataclass(slots=True)
class _Tombstone:
    counters: list[int]  # orig packets, orig bytes, reply packets, reply bytes
    born: int  # tracker clock when it was made
    expires_after: int  # number of dump ends it survives once a dump started after ``born``


@dataclass
class Tracker:
    """Last reported counters of each live connection, and the rules above."""

    absent_dumps: int = 2
    lost_grace_dumps: int = 3
    #: live connections: key -> [orig packets, orig bytes, reply packets, reply bytes, last dump seen]
    live: dict[Key, list[int]] = field(default_factory=dict)
    tombstones: dict[Key, _Tombstone] = field(default_factory=dict)
    lost: int = 0  # connections forgotten without a DESTROY
    _clock: int = 0
    _dump: int = 0  # number of the current/last dump
    _dump_started: int = -1  # clock at the start of the running dump, -1 = none running
    _baseline: bool = False

    @property
    def dumping(self) -> bool:
        return self._dump_started >= 0

    def begin_dump(self, baseline: bool = False) -> None:
        """A full dump starts (its rows follow through :meth:`update`)."""
        self._clock += 1
        self._dump += 1
        self._dump_started = self._clock
        self._baseline = baseline

    def end_dump(self, complete: bool = True) -> None:
        """The dump ended. ``complete`` False (interrupted, failed): no conclusion is drawn from
        which connections it did not list."""
        started, self._dump_started = self._dump_started, -1
        self._baseline = False
        if started < 0:
            return
        for key in [k for k, t in self.tombstones.items() if t.born < started]:
            tomb = self.tombstones[key]
            if tomb.expires_after <= 1:
                del self.tombstones[key]
            else:
                tomb.expires_after -= 1
        if not complete:
            return
        dump = self._dump
        gone = [k for k, v in self.live.items() if dump - v[4] >= self.absent_dumps]
        for key in gone:
            counters = self.live.pop(key)
            self.tombstones[key] = _Tombstone(counters[:4], self._clock, self.lost_grace_dumps)
        self.lost += len(gone)

    def update(self, snapshots: list[Snapshot]) -> list[Delta]:
        """Take a batch of snapshots (dump rows or events, in the order read); the deltas to report."""
        out: list[Delta] = []
        live = self.live
        tombstones = self.tombstones
        self._clock += 1
        dump = self._dump
        for s in snapshots:
            kind = s.kind
            if kind != DUMP and kind != DESTROY:
                continue  # NEW: nothing to report yet
            key = (s.ct_id, s.zone, s.start_ns, s.orig_raw)
            now = (s.orig_packets, s.orig_bytes, s.reply_packets, s.reply_bytes)
            if kind == DESTROY:
                last = live.pop(key, None)
                if last is None:
                    tomb = tombstones.get(key)
                    last = tomb.counters if tomb is not None else None
                if last is None:
                    delta = now
                    final = list(now)
                else:
                    delta, final = _delta(now, last)
                if self._dump_started >= 0 or key in tombstones:
                    tombstones[key] = _Tombstone(final, self._clock, 1)
            else:
                last = live.get(key)
                if last is None:
                    tomb = tombstones.get(key)
                    if tomb is not None:  # a dump row older than its DESTROY (or lost): stale
                        delta, tomb.counters = _delta(now, tomb.counters)
                        if any(delta):
                            out.append(Delta(s, *delta))
                        continue
                    live[key] = [*now, dump]
                    if self._baseline:
                        continue
                    delta = now
                else:
                    delta, final = _delta(now, last)
                    final.append(dump)
                    live[key] = final
            if any(delta):
                out.append(Delta(s, *delta))
        return out


def _delta(now: tuple[int, int, int, int], last: list[int]) -> tuple[tuple[int, int, int, int], list[int]]:
    """Counters since ``last`` (never negative: an older snapshot read late reports nothing) and
    the new reference (the larger of the two)."""
    op, ob, rp, rb = now
    lop, lob, lrp, lrb = last[0], last[1], last[2], last[3]
    delta = (max(op - lop, 0), max(ob - lob, 0), max(rp - lrp, 0), max(rb - lrb, 0))
    return delta, [max(op, lop), max(ob, lob), max(rp, lrp), max(rb, lrb)]
