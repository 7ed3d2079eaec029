"""Settings of the conntrack sensor (one typed model, like every stage's)."""

from __future__ import annotations

import ipaddress
import os
import socket
from typing import Literal

from pydantic import Field, field_validator

from flowtally.kafka import TopicSettings
from flowtally.settings import CommaIntList, CommaList, KafkaSettings, StageSettings


def _default_observer() -> str:
    return os.environ.get("NODE_NAME") or socket.gethostname()


class ConntrackSettings(StageSettings):
    """Settings of `flowtally sensor conntrack`."""

    kafka: KafkaSettings = KafkaSettings()
    topics: TopicSettings = TopicSettings()
    metrics_listen: str = "0.0.0.0:9464"
    observer: str = Field(default_factory=_default_observer, description="Observation point on every "
                          "record: the node name (default $NODE_NAME, else the host name)")
    exporter: str = Field("", description="The node's address, recorded as the exporter (optional)")
    stdout: bool = Field(False, description="Print records as JSON lines instead of publishing them")
    dump_interval_s: float = Field(30.0, ge=0.05, le=3600, description="Seconds between full table dumps: "
                                   "each reports what every live connection did since the last one")
    receive_buffer_bytes: int = Field(16 * 1024 * 1024, ge=1024, le=2**31 - 1,
                                      description="Receive buffer of the event socket (SO_RCVBUFFORCE)")
    enable_sysctls: bool = Field(True, description="Turn nf_conntrack_acct/_timestamp/_events on when "
                                 "they are off (needs root and NET_ADMIN in the node's namespace)")
    baseline_first_dump: bool = Field(True, description="The first dump only records where each "
                                      "live connection's counters stand (what it did before the sensor "
                                      "started is not reported, so a restart cannot double count)")
    tombstone_s: float = Field(60.0, ge=0, le=86_400, description="How long an ended connection is "
                               "remembered, so a late dump row or a DESTROY delivered again (the kernel "
                               "rebroadcasts DESTROYs a reliable listener missed) cannot count it twice")
    lost_after_s: float = Field(60.0, ge=0, le=86_400, description="A connection absent from the dumps "
                                "for this long whose DESTROY never came is given up (counted as lost)")
    batch_max_flows: int = Field(8192, ge=1, le=1_000_000)
    batch_max_age_ms: int = Field(1000, ge=10, le=60_000)
    max_queued_batches: int = Field(256, ge=1, le=100_000)
    max_in_flight: int = Field(8, ge=1, le=1024)
    drain_timeout_s: float = Field(10.0, ge=0.1, le=300)
    compression: Literal["none", "lz4", "zstd"] = "lz4"
    completeness: bool = Field(True, description="Publish per-minute completeness records")
    ignore_loopback: bool = Field(True, description="Skip connections from or to 127.0.0.0/8 and ::1")
    ignore_kafka: bool = Field(True, description="Skip the sensor's own connections to the Kafka "
                               "bootstrap addresses")
    ignore_cidrs: CommaList = Field(
        default_factory=list, description="Skip connections with either end in these CIDRs "
        "(comma-separated in the environment)")
    ignore_ports: CommaIntList = Field(
        default_factory=list, description="Skip TCP/UDP/SCTP connections with either end on these ports")

    @field_validator("ignore_cidrs")
    @classmethod
    def _check_cidrs(cls, value: list[str]) -> list[str]:
        for cidr in value:
            ipaddress.ip_network(cidr, strict=False)
        return value

    @field_validator("ignore_ports")
    @classmethod
    def _check_ports(cls, value: list[int]) -> list[int]:
        for port in value:
            if not 0 < port < 65536:
                raise ValueError(f"port {port} is not 1-65535")
        return value

    @field_validator("exporter")
    @classmethod
    def _check_exporter(cls, value: str) -> str:
        if value:
            ipaddress.ip_address(value)
        return value
