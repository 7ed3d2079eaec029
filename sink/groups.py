"""Insert groups: consecutive enriched messages of one Kafka partition inserted as one insert,
with an identity a replay reproduces exactly (pure: no Kafka, no ClickHouse).

Why: every insert pays a roughly fixed cost per table and materialized view (measured with
``python -m tests.benchmarks.bench_sink``), so one message (a few thousand rows) per insert kept
the sink at a fraction of a native insert. A group is bounded by rows, bytes and a maximum wait.

The exactly-once rule for groups (the shell, :mod:`sink.service`, does the I/O in this order):

1. *Before* the insert, the group's **intent** is recorded durably (ClickHouse table
   ``sink_groups``, migration 0010): partition, first and last offset, the deduplication token
   and the raw origins of the messages it inserts.
2. The group is inserted with that token (ClickHouse keeps the token per table and per view).
3. Only then is ``last + 1`` committed to Kafka.

After a crash the partition resumes at its committed offset. If a recorded intent starts there,
:meth:`PartitionGroups.take` re-forms *exactly* that group — the same offsets, the same messages
included, the same token — so if it had landed (in ``flows`` or in any view) ClickHouse drops
it. If no intent starts there, nothing was inserted past the commit and a fresh group is formed.

Upstream duplicates (the enricher re-emitting a raw batch at a new offset after its own crash)
carry the same raw origin (``flowtally-origin``): a message whose origin is in a group recorded
earlier in the partition (within ``window_messages`` offsets), or earlier in the same group, is
skipped and counted. Only groups that are committed feed that memory (intents at or past the
committed offset are either the one being re-formed or never inserted), so a recorded intent that
never landed cannot hide a message. The enricher keys its output like its input, so a re-emit
lands in the partition of the original; the memory is per partition.

A raw batch the enricher had to split to fit the message limit arrives as pieces
(``flowtally-part: i/n``, ``flowtally-emission``: one id per time the enricher handled the raw
message); each piece is its own origin, ``<raw origin>#<emission>:i/n``
(:func:`sink.service.origin_of`), so the pieces of one raw message are all inserted. The *first
emission* of a raw origin wins as a whole: a piece (or a whole message) of the same raw origin
from another emission is a duplicate, even if it was split differently — a re-processed batch
may enrich to other sizes (identity, GeoIP and the observed nodes may have changed meanwhile), so
matching pieces by number alone could count rows twice. Inexact only if the enricher died while
publishing the pieces of one batch (some in Kafka, some not): the re-emission is dropped, so the
pieces that never made it are missing (counted by nothing; the window is the milliseconds of
one batch's sends, against the commit interval for a whole-message replay).

On a ClickHouse cluster ``sink_groups`` is replicated like the other tables; a sink that moves to
a replica lagging behind the one that recorded a group could miss that intent and form a fresh
group over messages that had landed. Keep the sink on one replica per shard (or insert with
``insert_quorum``) there.
"""

from __future__ import annotations

import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa


@dataclass(frozen=True)
class GroupLimits:
    """When a forming group is flushed (whichever comes first)."""

    max_rows: int
    max_bytes: int
    max_wait_s: float


@dataclass(frozen=True)
class Intent:
    """A group as recorded before its insert (one row of ``sink_groups``)."""

    topic: str
    partition: int
    first_offset: int
    last_offset: int
    token: str
    origins: tuple[str, ...]


@dataclass
class Consumed:
    """One consumed message: its offset and raw origin, its decoded rows or why it is not a
    batch, and the Kafka record itself (kept for the DLQ)."""

    offset: int
    origin: str
    rows: pa.Table | None
    error: Exception | None = None
    record: Any = None

    @property
    def nbytes(self) -> int:
        return self.rows.nbytes if self.rows is not None else 0

    @property
    def num_rows(self) -> int:
        return self.rows.num_rows if self.rows is not None else 0


@dataclass
class Group:
    """The messages of one insert. ``recorded``: the intent is already in ClickHouse (a group
    re-formed after a restart), so it must not be recorded again."""

    intent: Intent
    recorded: bool
    included: list[Consumed] = field(default_factory=list)
    duplicates: list[Consumed] = field(default_factory=list)
    undecodable: list[Consumed] = field(default_factory=list)

    @property
    def num_rows(self) -> int:
        return sum(c.num_rows for c in self.included)

    def table(self) -> pa.Table | None:
        """The rows to insert as one contiguous table (None: nothing to insert).

        One record batch, not a chunked table: ClickHouse reads each Arrow record batch as its
        own block, and each block is a part per table and view (the cost grouping removes).
        Each message's rows become a zero-copy slice of it, so the messages' own buffers are
        freed (one copy of the group in memory, not two)."""
        tables = [c.rows for c in self.included if c.rows is not None and c.rows.num_rows]
        if not tables:
            return None
        combined = pa.concat_tables(tables).combine_chunks()
        start = 0
        for item in self.included:
            count = item.num_rows
            item.rows = combined.slice(start, count)
            start += count
        return combined


def new_token(topic: str, partition: int, first: int, last: int) -> str:
    """A group's deduplication token: its place in Kafka plus a random part, so a topic that is
    re-created (offsets from 0 again) never collides with the tokens ClickHouse still keeps."""
    return f"{topic}/{partition}/{first}-{last}/{uuid.uuid4().hex[:12]}"


def split_origin(origin: str) -> tuple[str, str]:
    """(raw origin, emission) of an origin key: a piece's key is ``<raw>#<emission>:i/n``, a
    whole message's is the raw origin itself (emission "")."""
    base, sep, rest = origin.partition("#")
    return base, (rest.partition(":")[0] if sep else "")


class PartitionGroups:
    """Forms the groups of one partition, in offset order (see the module doc)."""

    def __init__(self, topic: str, partition: int, limits: GroupLimits, window_messages: int,
                 token: Callable[[str, int, int, int], str] = new_token) -> None:
        self.topic = topic
        self.partition = partition
        self._limits = limits
        self._window = window_messages
        self._token = token
        self._forming: list[Consumed] = []
        self._rows = 0
        self._bytes = 0
        self._since: float | None = None
        #: the recorded group the partition resumed at, to re-form exactly
        self._pending: Intent | None = None
        #: origin -> last offset of the committed group holding it (offset order)
        self._seen: OrderedDict[str, int] = OrderedDict()
        #: raw origin -> (its first emission, last offset of a committed group holding it)
        self._emissions: OrderedDict[str, tuple[str, int]] = OrderedDict()

    def resume(self, start_offset: int, recorded: Iterable[Intent]) -> None:
        """Resume at ``start_offset`` (the committed offset) given the partition's recorded
        intents, oldest recorded first: the one starting there is re-formed (the latest, should a
        stale one exist), those before it are committed and feed the duplicate memory, the rest
        never landed and are ignored."""
        self._pending = None
        self._seen.clear()
        self._emissions.clear()
        recorded = list(recorded)
        committed = [i for i in recorded if i.last_offset < start_offset]
        for intent in sorted(committed, key=lambda i: i.last_offset):
            self._remember(intent)
        for intent in recorded:
            if intent.first_offset == start_offset:
                self._pending = intent
        self._prune(start_offset)

    @property
    def pending(self) -> Intent | None:
        """The recorded group still to re-form, if any."""
        return self._pending

    def add(self, item: Consumed, now: float) -> None:
        """Append the partition's next message."""
        if self._since is None:
            self._since = now
        self._forming.append(item)
        self._rows += item.num_rows
        self._bytes += item.nbytes

    def __len__(self) -> int:
        return len(self._forming)

    def full(self) -> bool:
        """A whole group (or more) is waiting: stop fetching this partition meanwhile."""
        return self._rows >= self._limits.max_rows or self._bytes >= self._limits.max_bytes

    def deadline(self) -> float | None:
        """When the forming group is due by the maximum wait (None: nothing is forming)."""
        return None if self._since is None else self._since + self._limits.max_wait_s

    def ready(self, now: float) -> bool:
        """Whether a group can be taken now."""
        if not self._forming:
            return False
        if self._pending is not None:
            return self._forming[-1].offset >= self._pending.last_offset
        deadline = self.deadline()
        return self.full() or (deadline is not None and now >= deadline)

    def take(self) -> Group | None:
        """The next group (None if a re-formed group is not complete yet): a prefix of the
        forming messages, within the limits (a single larger message makes a group alone)."""
        if not self._forming:
            return None
        if self._pending is not None:
            if self._forming[-1].offset < self._pending.last_offset:
                return None
            return self._reform(self._pending)
        items: list[Consumed] = []
        included: list[Consumed] = []
        duplicates: list[Consumed] = []
        undecodable: list[Consumed] = []
        origins: set[str] = set()
        emissions: dict[str, str] = {}  # raw origin -> emission, in this group
        rows = nbytes = 0
        for item in self._forming:
            if item.error is not None:
                undecodable.append(item)
            elif self._duplicate(item.origin, origins, emissions):
                duplicates.append(item)
            else:
                if included and (rows + item.num_rows > self._limits.max_rows
                                 or nbytes + item.nbytes > self._limits.max_bytes):
                    break
                included.append(item)
                origins.add(item.origin)
                base, emission = split_origin(item.origin)
                emissions.setdefault(base, emission)
                rows += item.num_rows
                nbytes += item.nbytes
            items.append(item)
        first, last = items[0].offset, items[-1].offset
        intent = Intent(self.topic, self.partition, first, last,
                        self._token(self.topic, self.partition, first, last),
                        tuple(c.origin for c in included))
        self._consume(len(items))
        return Group(intent, False, included, duplicates, undecodable)

    def _duplicate(self, origin: str, origins: set[str], emissions: dict[str, str]) -> bool:
        """Whether ``origin`` was inserted before (committed, or earlier in the forming group:
        ``origins``), or belongs to another emission of a raw origin than its first."""
        if origin in self._seen or origin in origins:
            return True
        base, emission = split_origin(origin)
        first = emissions.get(base)
        if first is None and base in self._emissions:
            first = self._emissions[base][0]
        return first is not None and first != emission

    def _reform(self, intent: Intent) -> Group:
        """Exactly the recorded group: its offsets, the first message of each recorded origin."""
        wanted = set(intent.origins)
        group = Group(intent, True)
        count = 0
        for item in self._forming:
            if item.offset > intent.last_offset:
                break
            count += 1
            if item.error is not None:
                group.undecodable.append(item)
            elif item.origin in wanted:
                wanted.discard(item.origin)
                group.included.append(item)
            else:
                group.duplicates.append(item)
        self._consume(count)
        self._pending = None
        return group

    def _consume(self, count: int) -> None:
        taken, self._forming = self._forming[:count], self._forming[count:]
        self._rows -= sum(c.num_rows for c in taken)
        self._bytes -= sum(c.nbytes for c in taken)
        # The rest waited since the first of them arrived: approximate it by now (taken groups
        # are flushed right away, so the rest are at most one poll younger).
        self._since = None if not self._forming else self._since

    def landed(self, group: Group) -> None:
        """The group is inserted and committed: its origins are now duplicates if seen again."""
        self._remember(group.intent)
        self._prune(group.intent.last_offset + 1)

    def _remember(self, intent: Intent) -> None:
        for origin in intent.origins:
            self._seen[origin] = intent.last_offset
            self._seen.move_to_end(origin)
            base, emission = split_origin(origin)
            first = self._emissions.get(base, (emission, 0))[0]
            self._emissions[base] = (first, intent.last_offset)
            self._emissions.move_to_end(base)

    def _prune(self, next_offset: int) -> None:
        """Forget origins of groups that ended more than ``window_messages`` offsets ago."""
        while self._seen:
            origin, last = next(iter(self._seen.items()))
            if last >= next_offset - self._window:
                break
            del self._seen[origin]
        while self._emissions:
            base, (_, last) = next(iter(self._emissions.items()))
            if last >= next_offset - self._window:
                break
            del self._emissions[base]
