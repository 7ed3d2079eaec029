"""`flowtally sink`: consume enriched batches, insert them into ClickHouse, then commit.

The exact-totals rule: consecutive messages of one partition are inserted as one **group**
(:mod:`sink.groups`: bounded by ``group_max_rows``, ``group_max_bytes`` and ``group_max_wait_s``).
Per group, in this order: record its intent in ``sink_groups`` (offsets, token, the raw origins
it holds), insert it with its deduplication token, commit ``last + 1``. A crash anywhere resumes
at the committed offset; a recorded intent starting there is re-formed exactly (same messages,
same token), so ClickHouse turns an insert that had landed into a no-op, in ``flows`` and in
every view. The enricher re-emitting a batch after its own crash gives a message whose raw origin
is already in a recorded group of the partition: it is skipped and counted
(``flowtally_sink_messages_total{outcome="duplicate"}``).

Throughput (``python -m tests.benchmarks.bench_sink``): each insert pays a roughly fixed cost per
table and materialized view (planning, one part each, the token bookkeeping), so inserts are
groups of hundreds of thousands of rows instead of one message each; messages are decoded in a
thread while the previous group of their partition is inserted, and with ``insert_concurrency``
> 1 several partitions insert at once, each over its own connection (each partition still in
offset order, one group at a time, committed only after its insert).

Failures (see :mod:`sink.writer` for the rule): a message that is not a valid batch goes to the
DLQ with the reason. A group whose rows fall on more days than ``max_partitions_per_insert`` is
inserted as day chunks; an insert ClickHouse *rejects* (constraint, unconvertible value, too many
partitions…) is inserted again message by message, a message rejected alone is halved down to
``split_min_rows``/``split_max_depth`` (tokens derived from the group's, :mod:`sink.split`), and
only the rows still rejected go to the DLQ (``flowtally-dlq-rows`` says how many) — retrying
cannot help them; the rest of the group is inserted. ClickHouse *unavailable* (any other error)
is retried with backoff; nothing after it is committed, and a partition whose next group is full while its
insert is failing is paused, so memory stays bounded by about two groups per partition.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import math
import time
from dataclasses import dataclass

import pyarrow as pa
from aiokafka import ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from clickhouse_connect.driver.client import Client
from prometheus_client import Counter, Gauge, Histogram

from enricher.schema import ENRICHED_SCHEMA, with_additive_defaults
from enricher.schema import SCHEMA_NAME as ENRICHED
from flowtally import kafka
from flowtally.clickhouse import connect_when_reachable
from flowtally.lifecycle import run_components
from flowtally.metrics import MetricsServer
from flowtally.settings import load_settings
from flowtally.wire import (
    EMISSION_HEADER,
    ORIGIN_HEADER,
    PART_HEADER,
    WireError,
    decode_batch,
    encode_batch,
    header,
    part_of,
)
from sink import split
from sink.delivery import Delivery, FeedMetrics, FeedWorker, Retry, Stopped
from sink.groups import Consumed, Group, Intent, PartitionGroups
from sink.rows import flow_rows
from sink.settings import SinkSettings
from sink.writer import InsertFailure, Writer
from sql.migrate import migrate

log = logging.getLogger(__name__)

MESSAGES = Counter("flowtally_sink_messages_total", "Enriched messages consumed", ["outcome"])
ROWS = Counter("flowtally_sink_rows_inserted_total", "Flow rows inserted into ClickHouse")
RECEIVED = Counter("flowtally_sink_rows_received_total",
                   "Flow rows consumed and decoded (minus inserted: in hand, duplicates, DLQ)")
INSERT_ERRORS = Counter("flowtally_sink_insert_errors_total", "Failed insert attempts", ["reason"])
INSERT_SECONDS = Histogram("flowtally_sink_insert_seconds", "Duration of one insert (a group of messages)")
COMMITTED = Gauge("flowtally_sink_committed_offset", "Last committed offset", ["partition"])
GROUPS = Counter("flowtally_sink_groups_total", "Insert groups committed", ["kind"])
SPLITS = Counter("flowtally_sink_split_inserts_total",
                 "Inserts of a split group: day chunks (rows on too many days), and after a rejection its "
                 "messages alone and halves of those rejected alone", ["kind"])
DLQ_ROWS = Counter("flowtally_sink_dlq_rows_total", "Flow rows ClickHouse rejected, sent to the DLQ",
                   ["reason"])
GROUP_MESSAGES = Histogram("flowtally_sink_group_messages", "Messages per insert group",
                           buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512))

#: The recorded insert groups (migration 0010).
GROUPS_TABLE = "sink_groups"


def origin_of(msg: ConsumerRecord) -> str:
    """The raw message a batch came from (set by the enricher), else this message itself; for
    piece ``i`` of ``n`` of a split batch (``flowtally-part``) ``<origin>#<emission>:i/n``. The
    pieces of one raw message are different rows, so each is its own origin; the emission (one
    id per time the enricher handled the raw message) lets the sink keep only the first emission
    of a raw message, however a re-emission was split (:mod:`sink.groups`)."""
    origin = header(msg.headers, ORIGIN_HEADER)
    base = origin.decode() if origin else f"{msg.topic}/{msg.partition}/{msg.offset}"
    part = header(msg.headers, PART_HEADER)
    if part is None:
        return base
    emission = header(msg.headers, EMISSION_HEADER) or b""
    return f"{base}#{emission.decode(errors='replace')}:{part.decode(errors='replace')}"


def decode(msg: ConsumerRecord) -> Consumed:
    """One enriched message as flow rows (or why it is not a batch), with its origin."""
    try:
        part_of(msg.headers)  # a malformed part header: not a batch of ours (to the DLQ)
        enriched = decode_batch(msg.value, msg.headers, ENRICHED_SCHEMA, ENRICHED, with_additive_defaults)
        rows = flow_rows(enriched)
    except WireError as exc:
        return Consumed(msg.offset, origin_of(msg), None, exc, msg)
    return Consumed(msg.offset, origin_of(msg), rows, None, msg)


def decode_all(messages: list[ConsumerRecord]) -> list[Consumed]:
    """:func:`decode` over one poll's messages of a partition (run in a thread)."""
    return [decode(msg) for msg in messages]


def record_intent(client: Client, intent: Intent) -> None:
    """Write a group's intent (before its insert)."""
    row = [intent.topic, intent.partition, intent.first_offset, intent.last_offset, intent.token,
           list(intent.origins)]
    client.insert(GROUPS_TABLE, [row], column_names=[
        "topic", "kafka_partition", "first_offset", "last_offset", "token", "origins"])


def recorded_intents(client: Client, topic: str, partition: int, start: int, window: int) -> list[Intent]:
    """The partition's intents that matter when it resumes at ``start``: those ending within
    ``window`` offsets before it and those starting there, oldest recorded first."""
    result = client.query(
        f"SELECT first_offset, last_offset, token, origins FROM {GROUPS_TABLE} "
        "WHERE topic = %(topic)s AND kafka_partition = %(partition)s "
        "AND last_offset >= %(low)s AND first_offset <= %(start)s ORDER BY recorded_at, first_offset",
        parameters={"topic": topic, "partition": partition, "low": max(0, start - window), "start": start},
    )
    return [Intent(topic, partition, int(first), int(last), str(token), tuple(origins))
            for first, last, token, origins in result.result_rows]


@dataclass
class Lane:
    """One assigned partition: its forming groups and the insert in flight."""

    tp: TopicPartition
    groups: PartitionGroups
    flushing: asyncio.Task[bool] | None = None


class SinkWorker(FeedWorker, ConsumerRebalanceListener):
    """The consume -> group -> record -> insert -> commit loop."""

    name = "sink"

    def __init__(self, settings: SinkSettings) -> None:
        super().__init__(settings)
        self._topic = settings.kafka.topic("enriched")
        #: one per concurrent partition insert, each over its own connection
        self._deliveries: list[Delivery] = []
        self._free: asyncio.Queue[Delivery] = asyncio.Queue()
        self._lanes: dict[TopicPartition, Lane] = {}
        #: bumped on every rebalance: a poll that straddles one is dropped (refetched)
        self._generation = 0
        #: no new group is started meanwhile (a rebalance is waiting for the inserts in flight)
        self._holding = False
        self._draining = False
        self._failure: BaseException | None = None

    def health(self) -> tuple[bool, str]:
        """Unhealthy while inserts have been failing for longer than allowed."""
        if self._task is None:
            return False, "starting"
        since = [d.failing_since for d in self._deliveries if d.failing_since is not None]
        if since:
            failing = time.monotonic() - min(since)
            if failing > self._settings.unhealthy_after_s:
                return False, f"inserts failing for {failing:.0f}s"
        return True, "ok"

    async def start(self) -> None:
        s = self._settings
        await kafka.ensure_topics(s.kafka, s.topics)
        client = await connect_when_reachable(s.clickhouse)
        self._clients.append(client)
        if s.migrate_on_start:
            await asyncio.to_thread(migrate, client, s.migration_variables(), s.clickhouse.cluster)
        for _ in range(s.insert_concurrency - 1):
            self._clients.append(await connect_when_reachable(s.clickhouse))
        dlq = await self._open_dlq()
        self._deliveries = [
            Delivery(
                schema_name=ENRICHED, writer=Writer(c, s.table, s.max_partitions_per_insert), dlq=dlq,
                dlq_topic=s.kafka.topic("dlq"),
                stopping=self._stopping,
                metrics=FeedMetrics(MESSAGES, ROWS, INSERT_ERRORS, INSERT_SECONDS),
                retry=Retry(s.retry_initial_s, s.retry_max_s),
            )
            for c in self._clients
        ]
        for delivery in self._deliveries:
            self._free.put_nowait(delivery)
        await self._consume(self._topic, s.group_id, listener=self)

    async def stop(self) -> None:
        await super().stop()
        self._deliveries = []

    # -- rebalances (aiokafka calls these while the loop runs) --------------------------------

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        """Let the inserts in flight land and commit while this member still owns their
        partitions; then forget every lane (the new assignment resumes from the commits)."""
        self._holding = True
        try:
            await self._settle()
        finally:
            self._lanes.clear()
            self._generation += 1
            self._holding = False

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        self._generation += 1

    # -- the loop ------------------------------------------------------------------------------

    async def _run(self) -> None:
        assert self._consumer is not None
        try:
            while not self._stopping.is_set():
                if self._failure is not None:
                    raise self._failure
                polled = await self._consumer.getmany(
                    timeout_ms=self._poll_timeout_ms(), max_records=self._settings.max_messages_per_poll
                )
                # aiokafka returns records of the current assignment only; a rebalance during the
                # awaits below resets the positions to the commits, so that poll is dropped.
                generation = self._generation
                for tp, messages in polled.items():
                    lane = self._lanes.get(tp)
                    if lane is None:
                        try:
                            lane = await self._open_lane(tp, messages[0].offset)
                        except Stopped:  # ClickHouse unavailable and the sink stopping: nothing to do
                            break
                        if generation == self._generation:
                            self._lanes[tp] = lane
                    consumed = await asyncio.to_thread(decode_all, messages)
                    if generation != self._generation or self._lanes.get(tp) is not lane:
                        break  # a rebalance happened meanwhile: whoever owns it refetches from the commit
                    now = time.monotonic()
                    for item in consumed:
                        lane.groups.add(item, now)
                        RECEIVED.inc(item.num_rows)
                self._dispatch_all()
            # SIGTERM: insert and commit what is in hand (each lane's forming groups).
            self._draining = True
            self._dispatch_all()
            await self._settle()
        except BaseException:
            self._stopping.set()  # an insert retrying in flight gives up (uncommitted: replayed)
            await self._settle()
            raise

    async def _settle(self) -> None:
        """Wait until no insert is in flight (a finished one may start its lane's next group)."""
        while True:
            flushing = [lane.flushing for lane in self._lanes.values() if lane.flushing is not None]
            if not flushing:
                return
            await asyncio.wait(flushing)
            await asyncio.sleep(0)  # let the done-callbacks run

    def _poll_timeout_ms(self) -> int:
        deadlines = [d for lane in self._lanes.values() if lane.flushing is None
                     and (d := lane.groups.deadline()) is not None]
        if not deadlines:
            return 500
        return max(1, min(500, math.ceil((min(deadlines) - time.monotonic()) * 1000)))

    async def _open_lane(self, tp: TopicPartition, start: int) -> Lane:
        """A lane for a partition resuming at ``start``, with its recorded intents (the caller
        keeps it unless a rebalance happened meanwhile)."""
        s = self._settings
        delivery = await self._free.get()
        try:
            intents = await delivery.retrying(
                lambda: asyncio.to_thread(recorded_intents, delivery.client, tp.topic, tp.partition, start,
                                          s.duplicate_window_messages),
                f"the recorded groups of {tp.topic}/{tp.partition}", rejectable=False,
            )
        finally:
            self._free.put_nowait(delivery)
        groups = PartitionGroups(tp.topic, tp.partition, s.group_limits(), s.duplicate_window_messages)
        groups.resume(start, intents)
        if groups.pending is not None:
            p = groups.pending
            log.info("partition %s/%d resumes inside recorded group %d-%d (token %s): re-forming it",
                     tp.topic, tp.partition, p.first_offset, p.last_offset, p.token)
        return Lane(tp, groups)

    def _dispatch_all(self) -> None:
        for lane in list(self._lanes.values()):
            self._dispatch(lane)
        self._pause_full()

    def _dispatch(self, lane: Lane) -> None:
        """Start the lane's next group if it is due and nothing of the lane is in flight."""
        if lane.flushing is not None or self._holding or self._lanes.get(lane.tp) is not lane:
            return
        if self._stopping.is_set() and not self._draining:
            return
        now = math.inf if self._draining else time.monotonic()
        if not lane.groups.ready(now):
            return
        group = lane.groups.take()
        if group is None:
            return
        lane.flushing = asyncio.create_task(self._flush(lane, group))
        lane.flushing.add_done_callback(lambda task: self._flushed(lane, task))

    def _flushed(self, lane: Lane, task: asyncio.Task[bool]) -> None:
        lane.flushing = None
        if task.cancelled():
            return
        if (exc := task.exception()) is not None:
            self._failure = self._failure or exc
            return
        if task.result():  # landed: the next group may go at once
            self._dispatch(lane)
            self._pause_full()

    def _pause_full(self) -> None:
        """Pause a partition whose next group is full while its insert is in flight (bounded
        memory while ClickHouse is slow or down); resume it otherwise."""
        if self._consumer is None:
            return
        assigned = self._consumer.assignment()
        paused = self._consumer.paused()
        for tp, lane in self._lanes.items():
            if tp not in assigned:
                continue
            full = lane.flushing is not None and lane.groups.full()
            if full and tp not in paused:
                self._consumer.pause(tp)
            elif not full and tp in paused:
                self._consumer.resume(tp)

    async def _flush(self, lane: Lane, group: Group) -> bool:
        """Record, insert and commit one group; False if the sink stopped before it landed."""
        assert self._consumer is not None
        intent = group.intent
        delivery = await self._free.get()
        try:
            for item in group.undecodable:
                assert item.error is not None
                await delivery.to_dlq(item.record, item.error)
            if group.duplicates:
                MESSAGES.labels("duplicate").inc(len(group.duplicates))
                log.info("dropped %d re-emitted message(s) of %s/%d (origins already inserted): %s",
                         len(group.duplicates), intent.topic, intent.partition,
                         ", ".join(c.origin for c in group.duplicates[:5]))
            table = await asyncio.to_thread(group.table)
            if table is not None:
                started = time.monotonic()
                if not group.recorded:
                    await delivery.retrying(lambda: asyncio.to_thread(record_intent, delivery.client, intent),
                                            f"the intent of {intent.token}", rejectable=False)
                recorded = time.monotonic()
                rejected = await self._insert_split(delivery, group, table)
                log.info("group %s: %d messages, %d rows; intent %.3fs, insert %.3fs", intent.token,
                         len(group.included), table.num_rows, recorded - started,
                         time.monotonic() - recorded)
                del table
                await self._park_rejected(delivery, group, rejected)
            await self._consumer.commit({lane.tp: intent.last_offset + 1})
        except Stopped:
            return False
        finally:
            self._free.put_nowait(delivery)
        COMMITTED.labels(str(intent.partition)).set(intent.last_offset)
        GROUPS.labels("reformed" if group.recorded else "new").inc()
        GROUP_MESSAGES.observe(len(group.included))
        lane.groups.landed(group)
        return True

    async def _insert_split(self, delivery: Delivery, group: Group,
                            table: pa.Table) -> dict[int, list[tuple[pa.Table, InsertFailure]]]:
        """Insert the group as day chunks (:mod:`sink.split`), isolating the rows ClickHouse
        rejects: returns them per message offset, with the reason (nothing else is lost)."""
        messages = [(item.offset, item.num_rows) for item in group.included]
        days = split.day_numbers(table.column("flow_end"))
        limit = self._settings.max_partitions_per_insert
        chunks = split.plan_chunks(group.intent.token, messages, days, limit)
        if len(chunks) > 1:
            log.warning("group %s spans more than %d days: inserting it as %d day chunks",
                        group.intent.token, limit, len(chunks))
            SPLITS.labels("day").inc(len(chunks))
        rejected: dict[int, list[tuple[pa.Table, InsertFailure]]] = {}
        budget = _Budget(self._settings.split_max_inserts)
        for chunk in chunks:
            rows = table if chunk.indices is None else table.take(pa.array(chunk.indices))
            failure = await delivery.insert(rows, chunk.token)
            if failure is None:
                continue
            if failure.in_view or len(chunk.parts) == 1:  # parked per message as it is, or halved
                for part in chunk.parts:
                    own = rows.slice(part.start, part.count)
                    await self._isolate_rows(delivery, chunk.token, part, own, failure, rejected, budget)
                continue
            log.warning("ClickHouse rejected insert %s (%s): inserting its %d messages alone", chunk.token,
                        failure.reason, len(chunk.parts))
            for part in chunk.parts:
                own = rows.slice(part.start, part.count)
                alone = None
                if budget.take():
                    SPLITS.labels("message").inc()
                    alone = await delivery.insert(own, split.message_token(chunk.token, part.offset))
                    if alone is None:
                        continue
                await self._isolate_rows(delivery, chunk.token, part, own, alone or failure, rejected, budget)
        if budget.spent:
            log.warning("group %s: split insert budget (%d) spent, the rest parked unsplit",
                        group.intent.token, self._settings.split_max_inserts)
        return rejected

    async def _isolate_rows(self, delivery: Delivery, base: str, part: split.Part, rows: pa.Table,
                            failure: InsertFailure, rejected: dict[int, list[tuple[pa.Table, InsertFailure]]],
                            budget: _Budget) -> None:
        """``rows`` (one message's, ``part``) were rejected with ``failure``: halve them while
        that can isolate fewer rows, insert the halves (tokens derived from ``base``, so a replay
        is a no-op); the ranges still refused are added to ``rejected``. Not split: a rejection
        inside a view (not atomic: the table has the rows already) and one that concerns every
        row alike (the batch's shape); nor once the group's budget of split inserts is spent."""
        s = self._settings
        pending = [(split.whole(part), failure)]
        refused_spans: list[tuple[split.Span, InsertFailure]] = []
        while pending:
            span, why = pending.pop(0)
            halves = None
            if why.in_view:
                log.error("a view refused %s rows of message %d (%s) after the table stored them: parked "
                          "whole, not split", span.count, part.offset, why.reason)
                why = dataclasses.replace(why, reason=f"{why.reason}_IN_VIEW")
            elif why.row_dependent:
                halves = split.halves(span, s.split_min_rows, s.split_max_depth)
            if halves is None or not budget.take(2):  # these rows are what ClickHouse refuses
                refused_spans.append((span, why))
                continue
            for half in halves:
                SPLITS.labels("range").inc()
                piece = rows.slice(half.first, half.count)
                refused = await delivery.insert(piece, split.span_token(base, half))
                if refused is not None:
                    pending.append((half, refused))
        for span, why in sorted(refused_spans, key=lambda refused: refused[0].first):  # message order
            rejected.setdefault(part.offset, []).append((rows.slice(span.first, span.count), why))

    async def _park_rejected(self, delivery: Delivery, group: Group,
                             rejected: dict[int, list[tuple[pa.Table, InsertFailure]]]) -> None:
        """Count the group's messages; send each message's rejected rows to the DLQ (the message
        itself when all of its rows were rejected, else a batch of just those rows)."""
        inserted = 0
        for item in group.included:
            pieces = rejected.get(item.offset)
            if not pieces:
                inserted += 1
                continue
            # One DLQ message per reason, so that each says exactly what happened to its rows (a
            # view's refusal means "stored in the table", the others "not stored").
            by_reason: dict[str, list[tuple[pa.Table, InsertFailure]]] = {}
            for rows, why in pieces:
                by_reason.setdefault(why.reason, []).append((rows, why))
                DLQ_ROWS.labels(why.reason).inc(rows.num_rows)
            for same in by_reason.values():
                count = sum(rows.num_rows for rows, _ in same)
                value = None
                if count < item.num_rows:
                    only = pa.concat_tables([rows for rows, _ in same]).unify_dictionaries().combine_chunks()
                    value = encode_batch(split.as_enriched(only), ENRICHED)[0]
                await delivery.to_dlq(item.record, same[0][1], value=value, rows=count)
        if inserted:
            MESSAGES.labels("inserted").inc(inserted)


class _Budget:
    """The split inserts a group may still spend (bounds the time one poisoned group takes)."""

    def __init__(self, inserts: int) -> None:
        self.left = inserts
        self.spent = False

    def take(self, n: int = 1) -> bool:
        """Spend ``n`` inserts if that many are left."""
        if self.left < n:
            self.spent = True
            return False
        self.left -= n
        return True


def run(args: argparse.Namespace) -> int:
    """`flowtally sink`."""
    settings = load_settings(SinkSettings, args.config, metrics_listen=args.metrics_listen)
    worker = SinkWorker(settings)
    # The completeness consumer (sink/completeness.py) starts after the flows worker has migrated.
    from sink.completeness import CompletenessWorker, all_healthy

    completeness = CompletenessWorker(settings)
    metrics = MetricsServer(settings.metrics_listen, all_healthy(worker.health, completeness.health),
                            kafka=settings.kafka)
    return asyncio.run(run_components([metrics, worker, completeness]))
