"""The sink's second consumer: per-minute completeness records (``completeness.v1``) from the
completeness topic into the ``completeness`` table (migration 0005).

The sensors publish one batch per minute (stage ``sensor-netflow``/``sensor-conntrack``), the
enricher its own (stage ``enricher``); rows are deltas that the table sums. Unlike the flows
consumer (:mod:`sink.service`, which groups messages) it inserts one message per insert — a few
small messages a minute, nothing to amortise — committed only after the insert
(:mod:`sink.delivery`); a message that is not a completeness batch, or that ClickHouse rejects,
goes to the DLQ with the reason, counted; ClickHouse unavailable is retried with backoff and
nothing after it is committed.

The deduplication token is the message's own ``topic/partition/offset``: a completeness record
is produced once by its writer, so the only replay to absorb is the sink's own (a crash between
insert and commit). It runs in its own consumer group (``<group_id>-completeness``) so that a
rebalance of one feed never pauses the other. It does not migrate: in ``flowtally sink`` it
starts after the flows consumer, which applies the migrations.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import pyarrow as pa
from aiokafka import ConsumerRecord, TopicPartition
from prometheus_client import Counter, Gauge, Histogram

from flowtally.clickhouse import connect_when_reachable
from flowtally.wire import decode_batch
from sensors.completeness import COMPLETENESS_SCHEMA, SCHEMA_NAME, with_additive_defaults
from sink.delivery import Delivery, FeedMetrics, FeedWorker, Retry
from sink.settings import SinkSettings
from sink.writer import Writer

log = logging.getLogger(__name__)

TABLE = "completeness"

METRICS = FeedMetrics(
    Counter("flowtally_sink_completeness_messages_total", "Completeness messages consumed", ["outcome"]),
    Counter("flowtally_sink_completeness_rows_inserted_total", "Completeness rows inserted into ClickHouse"),
    Counter("flowtally_sink_completeness_insert_errors_total", "Failed completeness inserts", ["reason"]),
    Histogram("flowtally_sink_completeness_insert_seconds", "Duration of one completeness insert"),
)
COMMITTED = Gauge("flowtally_sink_completeness_committed_offset", "Last committed offset", ["partition"])

Health = Callable[[], tuple[bool, str]]


def completeness_token(msg: ConsumerRecord) -> str:
    """The deduplication token of a completeness message: where it is in Kafka."""
    return f"{msg.topic}/{msg.partition}/{msg.offset}"


def completeness_rows(msg: ConsumerRecord) -> tuple[pa.Table, str]:
    """The rows of one completeness message (older writers' missing columns filled) and its
    token; raises :class:`flowtally.wire.WireError` if it is not a completeness batch."""
    table = decode_batch(msg.value, msg.headers, COMPLETENESS_SCHEMA, SCHEMA_NAME,
                         fill_additive=with_additive_defaults)
    return table, completeness_token(msg)


def all_healthy(*checks: Health) -> Health:
    """One health check that fails when any of ``checks`` fails (the first failure's reason)."""
    def check() -> tuple[bool, str]:
        for one in checks:
            ok, why = one()
            if not ok:
                return ok, why
        return True, "ok"
    return check


class CompletenessWorker(FeedWorker):
    """The consume -> insert -> commit loop of the completeness topic."""

    name = "sink-completeness"

    def __init__(self, settings: SinkSettings) -> None:
        super().__init__(settings)
        self._delivery: Delivery | None = None

    def health(self) -> tuple[bool, str]:
        """Unhealthy while completeness inserts have been failing for longer than allowed."""
        if self._task is None:
            return False, "completeness consumer starting"
        since = self._delivery.failing_since if self._delivery is not None else None
        if since is not None and time.monotonic() - since > self._settings.unhealthy_after_s:
            return False, f"completeness inserts failing for {time.monotonic() - since:.0f}s"
        return True, "ok"

    async def start(self) -> None:
        s = self._settings
        # The topics exist: the flows consumer (or the test) created them before this starts.
        client = await connect_when_reachable(s.clickhouse)
        self._clients.append(client)
        self._delivery = Delivery(
            schema_name=SCHEMA_NAME, decode=completeness_rows, writer=Writer(client, TABLE),
            dlq=await self._open_dlq(), dlq_topic=s.kafka.topic("dlq"), metrics=METRICS,
            retry=Retry(s.retry_initial_s, s.retry_max_s), stopping=self._stopping,
        )
        await self._consume(s.kafka.topic("completeness"), f"{s.group_id}-completeness")

    async def _run(self) -> None:
        assert self._consumer is not None and self._delivery is not None
        while not self._stopping.is_set():
            polled = await self._consumer.getmany(
                timeout_ms=500, max_records=self._settings.max_messages_per_poll
            )
            commits: dict[TopicPartition, int] = {}
            for tp, messages in polled.items():
                for msg in messages:
                    if not await self._delivery.deliver(msg):
                        break  # stopping during retries: commit what landed, replay the rest
                    commits[tp] = msg.offset + 1
            if commits:
                await self._consumer.commit(commits)
                for tp, offset in commits.items():
                    COMMITTED.labels(str(tp.partition)).set(offset - 1)

