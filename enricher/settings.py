"""Settings of `flowtally enrich`."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from flowtally.kafka import TopicSettings
from flowtally.settings import KafkaSettings, StageSettings


class EnricherSettings(StageSettings):
    """The Faust app's identity and inputs."""

    kafka: KafkaSettings = KafkaSettings()
    topics: TopicSettings = TopicSettings()
    app_id: str = Field("flowtally-enricher", pattern=r"^[A-Za-z0-9._-]+$",
                        description="Faust app id = consumer group; unique per deployment")
    inventory: Path | None = Field(None, description="Static identity inventory (YAML)")
    metrics_listen: str = "0.0.0.0:9462"
    session_timeout_s: float = Field(30.0, ge=6, le=300,
                                     description="How long a dead worker holds its partitions")
    commit_interval_s: float = Field(1.0, gt=0, le=60)
