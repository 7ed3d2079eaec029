"""Settings of `flowtally sink` (also used by `flowtally migrate` and `flowtally query`)."""

from __future__ import annotations

from pydantic import Field

from flowtally.kafka import TopicSettings, group_instance_id
from flowtally.settings import ClickHouseSettings, KafkaSettings, StageSettings
from sink.groups import GroupLimits


class SinkSettings(StageSettings):
    """Where enriched batches come from and which ClickHouse they go to."""

    kafka: KafkaSettings = KafkaSettings()
    topics: TopicSettings = TopicSettings()
    clickhouse: ClickHouseSettings = ClickHouseSettings()
    group_id: str = Field("flowtally-sink", min_length=1)
    metrics_listen: str = "0.0.0.0:9463"
    table: str = Field("flows", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    migrate_on_start: bool = Field(True, description="Apply pending migrations before consuming")
    max_messages_per_poll: int = Field(64, ge=1, le=10_000)
    insert_concurrency: int = Field(
        1, ge=1, le=16,
        description="Partitions of a poll inserted at once, each over its own ClickHouse connection",
    )
    # Insert groups (sink/groups.py): consecutive messages of a partition inserted as one insert.
    group_max_rows: int = Field(
        500_000, ge=1, le=10_000_000,
        description="Rows of one insert (a group of consecutive messages of one partition) at most",
    )
    group_max_bytes: int = Field(
        256 * 1024 * 1024, ge=1024 * 1024, le=4 * 1024**3,
        description="Decoded (Arrow) bytes of one insert at most (memory: about two groups per partition)",
    )
    group_max_wait_s: float = Field(
        2.0, gt=0, le=300,
        description="Longest a message waits for its group to fill before it is inserted",
    )
    duplicate_window_messages: int = Field(
        10_000, ge=0, le=10_000_000,
        description="Offsets back (per partition) within which a re-emitted raw batch is dropped",
    )
    # Splitting (sink/split.py): no insert spans too many partitions, a rejected one is isolated.
    max_partitions_per_insert: int = Field(
        100, ge=1, le=10_000,
        description="Days (flows partitions) one insert may span; a group spanning more is inserted in "
        "day chunks. Sent as ClickHouse's max_partitions_per_insert_block, so the two always match")
    split_min_rows: int = Field(
        16, ge=1, le=1_000_000,
        description="A rejected message is halved until a rejected range has at most this many rows; "
        "those rows go to the DLQ")
    split_max_depth: int = Field(
        8, ge=0, le=30,
        description="Halvings of a rejected message at most (each costs an insert per half)")
    split_max_inserts: int = Field(
        512, ge=0, le=100_000,
        description="Inserts one rejected group may spend on isolating the refused rows (messages alone "
        "and halves); past it the ranges still refused are parked as they are")
    retry_initial_s: float = Field(0.5, gt=0)
    retry_max_s: float = Field(30.0, gt=0)
    unhealthy_after_s: float = Field(60.0, gt=0, description="Failing inserts this long = unhealthy")
    session_timeout_s: float = Field(
        10.0, ge=6, le=300,
        description="Kafka consumer-group session timeout: how long a dead sink holds its partitions",
    )
    group_instance_id: str = Field(
        "", pattern=r"^[A-Za-z0-9._{}-]*$",
        description="Static consumer-group membership (Kafka group.instance.id; {hostname} = this host's "
        "name): a sink restarted with the same id gets its partitions back at once instead of after "
        "session_timeout_s. Unique per running sink; \"\" = dynamic membership")
    # Retention, rendered into the migrations that set TTLs ({flows_ttl_days}, …). They take
    # effect when that migration is applied; later changes need an ALTER TABLE … MODIFY TTL.
    # At most 10 years: a TTL reaching past 2106 overflows DateTime and expires every row.
    flows_ttl_days: int = Field(15, ge=1, le=3650, description="TTL of raw flows (days)")
    rollup_1m_ttl_days: int = Field(30, ge=1, le=3650, description="TTL of the per-minute rollup (days)")
    rollup_1h_ttl_days: int = Field(
        730, ge=1, le=3650, description="TTL of the per-hour rollup and the per-pod hourly table (days)")
    rollup_1d_ttl_days: int = Field(3650, ge=1, le=3650, description="TTL of the per-day rollup (days)")

    def group_limits(self) -> GroupLimits:
        """When a forming insert group is flushed."""
        return GroupLimits(self.group_max_rows, self.group_max_bytes, self.group_max_wait_s)

    def group_kwargs(self) -> dict[str, int | str | None]:
        """Consumer-group membership and timing for every feed the sink consumes (aiokafka
        keyword arguments; each feed is its own group, so one instance id serves both)."""
        return {
            "group_instance_id": group_instance_id(self.group_instance_id),
            "session_timeout_ms": int(self.session_timeout_s * 1000),
            # Kafka wants heartbeats at most a third of the session timeout apart.
            "heartbeat_interval_ms": int(min(3.0, self.session_timeout_s / 3) * 1000),
        }

    def migration_variables(self) -> dict[str, int]:
        """The ``{name}`` placeholders the migrations may use, with this deployment's values."""
        return {
            "flows_ttl_days": self.flows_ttl_days,
            "rollup_1m_ttl_days": self.rollup_1m_ttl_days,
            "rollup_1h_ttl_days": self.rollup_1h_ttl_days,
            "rollup_1d_ttl_days": self.rollup_1d_ttl_days,
        }
