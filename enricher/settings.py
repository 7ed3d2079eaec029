"""Settings of `flowtally enrich`."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from enricher.identity import network_bounds
from enricher.times import MAX_AGE_LIMIT_S, Policy, TimeWindow
from flowtally.kafka import TopicSettings
from flowtally.settings import CommaList, KafkaSettings, StageSettings


class EnricherSettings(StageSettings):
    """The Faust app's identity and inputs."""

    kafka: KafkaSettings = KafkaSettings()
    topics: TopicSettings = TopicSettings()
    app_id: str = Field("flowtally-enricher", pattern=r"^[A-Za-z0-9._-]+$",
                        description="Faust app id = consumer group; unique per deployment")
    inventory: Path | None = Field(None, description="Static identity inventory (YAML)")
    metrics_listen: str = Field("0.0.0.0:9462", description="host:port of /metrics and /healthz")
    data_dir: Path = Field(Path("var/faust"), description="Faust's local directory (its table state is "
                           "in memory; Faust still creates this), relative to the working directory")
    session_timeout_s: float = Field(10.0, ge=6, le=300,
                                     description="How long a worker that died holds its partitions (one "
                                     "restarted with its group_instance_id takes them back at once)")
    group_instance_id: str = Field(
        "", pattern=r"^[A-Za-z0-9._{}-]*$",
        description="Static consumer-group membership (Kafka group.instance.id; {hostname} = this host's "
        "name): a worker restarted with the same id gets its partitions back at once instead of after "
        "session_timeout_s. Unique per running worker; \"\" = dynamic membership")
    commit_interval_s: float = Field(1.0, gt=0, le=60,
                                     description="How often Faust commits the input offsets it may commit")
    identity_topic: bool = Field(True, description="Replay and follow the identity topic")
    identity_history_s: float = Field(3600.0, ge=60, le=7 * 86400,
                                      description="How long ended identity versions are kept for late flows")
    identity_apply_interval_s: float = Field(0.5, gt=0, le=60,
                                             description="Identity changes are applied in batches this often")
    private_cidrs: CommaList = Field(
        default_factory=list, description="Ranges labelled private when no cluster object owns the address, "
        "besides RFC 1918/6598, ULA and link-local (e.g. node or VPC ranges in public space; comma-separated "
        "in the environment)")
    geoip_asn_path: Path | None = Field(None, description="GeoLite2-ASN (or GeoIP2-ISP) mmdb file")
    geoip_city_path: Path | None = Field(None, description="GeoLite2-City or -Country mmdb file")
    geoip_check_interval_s: float = Field(30.0, ge=0, le=86400,
                                          description="How often the mmdb files are checked for changes")
    geoip_cache_size: int = Field(200_000, ge=0, le=10_000_000,
                                  description="Public addresses whose GeoIP/ASN answer is cached")
    dedup_connections: bool = Field(True, description="Keep one observation per connection: drop a "
                                    "record not made at the initiator's node when that node is observed")
    observer_window_s: float = Field(900.0, ge=10, le=86400,
                                     description="A node counts as observed this long after its last record")
    completeness: bool = Field(True, description="Publish per-minute completeness rows (stage enricher)")
    # Implausible flow times (enricher/times.py): a window around each flow's receive time.
    max_flow_age_s: float = Field(
        86400.0, ge=60, le=MAX_AGE_LIMIT_S,
        description="A flow ending longer than this before it was received has an implausible time (at most "
        "90 days, so the rows of one insert stay below ClickHouse's 100 partitions)")
    max_flow_future_s: float = Field(
        300.0, ge=0, le=86400,
        description="A flow ending more than this after it was received has an implausible time")
    implausible_time: Policy = Field(
        "clamp", description="What happens to a flow with an implausible time: clamp (kept, its end set "
        "to its receive time, start keeps the duration) or dlq (sent to the DLQ as received); counted")
    compression: Literal["lz4", "zstd"] = Field(
        "lz4", description="Arrow buffer compression of enriched batches: lz4 costs about half of zstd's "
        "CPU for twice the bytes (one message per batch either way)")

    def time_window(self) -> TimeWindow:
        """The window of plausible flow times and its policy."""
        return TimeWindow(int(self.max_flow_age_s * 1000), int(self.max_flow_future_s * 1000),
                          self.implausible_time)

    @field_validator("private_cidrs")
    @classmethod
    def _check_cidrs(cls, value: list[str]) -> list[str]:
        network_bounds(value)  # raises ValueError naming the bad one
        return value
