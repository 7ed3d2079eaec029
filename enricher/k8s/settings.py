"""Settings of `flowtally watch-k8s`."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from flowtally.kafka import TopicSettings
from flowtally.settings import CommaList, KafkaSettings, StageSettings


class WatcherSettings(StageSettings):
    """Where the API server is, how the watches behave, where the identity topic is."""

    kafka: KafkaSettings = KafkaSettings()
    topics: TopicSettings = TopicSettings()
    metrics_listen: str = "0.0.0.0:9465"
    kubeconfig: Path | None = Field(
        None, description="kubeconfig file; unset: the pod's service account when running in a "
                          "cluster (KUBERNETES_SERVICE_HOST), else $KUBECONFIG or ~/.kube/config")
    service_account_dir: Path = Field(
        Path("/var/run/secrets/kubernetes.io/serviceaccount"),
        description="In a cluster: the directory holding the service account's token and ca.crt")
    kube_context: str | None = Field(None, description="Context of the kubeconfig (unset: its current one)")
    identity_history_s: float = Field(
        3600.0, ge=60, le=7 * 86400,
        description="Ended versions are kept this long (same name and meaning as the enricher's)")
    flush_interval_s: float = Field(
        0.5, gt=0, le=60, description="Changes are computed and written at most this often")
    prune_interval_s: float = Field(60.0, gt=0, le=3600, description="How often history is pruned")
    watch_timeout_s: int = Field(
        300, ge=1, le=3600, description="A watch request asks the server to end it after this long")
    request_timeout_s: float = Field(
        30.0, gt=0, le=600, description="Connect and list read timeout; a watch stream may be "
                                        "silent for watch_timeout_s plus this before it counts as dead")
    backoff_initial_s: float = Field(0.5, gt=0, le=60, description="First wait after a failed request")
    backoff_max_s: float = Field(30.0, gt=0, le=600, description="Cap of the doubling wait")
    list_page_size: int = Field(500, ge=1, le=100_000, description="Objects per list page (limit)")
    pod_labels: CommaList = Field(
        ["app.kubernetes.io/name", "app.kubernetes.io/component", "app", "team"],
        description="Label keys a pod's identity carries into every flow (``src_labels``/``dst_labels``; "
                    "comma-separated in the environment); keep them few and stable: each distinct set of "
                    "values is stored per flow")
    continue_history: bool = Field(
        True, description="Read the identity topic back at start and continue its version lists")

    @model_validator(mode="after")
    def _check_backoff(self) -> WatcherSettings:
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError("backoff_max_s must be at least backoff_initial_s")
        return self
