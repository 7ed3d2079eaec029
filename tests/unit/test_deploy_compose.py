"""deploy/compose and deploy/docker, checked without a Docker engine.

The docker CLI here has no compose plugin, so `docker compose config` cannot run; the same
loading is done by compose-go (the library `docker compose` is built on: interpolation, the
Compose Specification JSON schema, profiles, depends_on/volume references), built by
deploy/local/setup.sh from deploy/compose/validate into ~/.cache/flowtally/bin. Missing = failure.
hadolint is not installable here (a Haskell binary from GitHub releases), so the Dockerfile's
rules that matter to us are asserted below instead.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from flowtally.settings import StageSettings, load_settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "deploy" / "compose" / "compose.yaml"
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"
BIN = Path.home() / ".cache" / "flowtally" / "bin"


def _validator() -> str:
    found = shutil.which("flowtally-compose-validate", path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if not found:
        pytest.fail("flowtally-compose-validate is missing: run bash deploy/local/setup.sh")
    return found


def _config(*profiles: str, file: Path = COMPOSE) -> dict[str, Any]:
    args = [_validator(), "-f", str(file)]
    for p in profiles:
        args += ["--profile", p]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLOWTALLY_", "CLICKHOUSE_", "GRAFANA_"))}
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    return yaml.safe_load(proc.stdout)


def test_compose_config_default_and_profiles() -> None:
    default = _config()
    assert set(default["services"]) == {"kafka", "clickhouse", "migrate", "sink", "enricher", "sensor", "grafana"}
    full = _config("demo", "conntrack")
    assert set(full["services"]) == set(default["services"]) | {"demo-traffic", "conntrack-sensor"}
    s = full["services"]
    assert s["sink"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert s["migrate"]["depends_on"]["clickhouse"]["condition"] == "service_healthy"
    for name in ("kafka", "clickhouse", "sink", "enricher", "sensor", "grafana"):
        assert s[name]["healthcheck"]["test"], name
    for name in ("sink", "enricher", "sensor", "conntrack-sensor"):
        # readiness: what depends_on waits for (compose restarts nothing on a failing check)
        assert "/healthz" in " ".join(s[name]["healthcheck"]["test"])
    for name in ("sink", "enricher"):  # static group members: a restarted container resumes at once
        assert s[name]["environment"]["FLOWTALLY_GROUP_INSTANCE_ID"] == "{hostname}"
    assert {"published": "2055", "target": 2055, "protocol": "udp"}.items() <= s["sensor"]["ports"][0].items()
    ct = s["conntrack-sensor"]
    assert ct["network_mode"] == "host" and ct["cap_add"] == ["NET_ADMIN"] and ct["cap_drop"] == ["ALL"]
    assert ct["user"] == "0:0"  # added capabilities are effective for uid 0 only
    assert ct["environment"]["FLOWTALLY_KAFKA_BOOTSTRAP"] == "127.0.0.1:9094"  # Kafka's HOST listener
    assert {"mode": "ingress", "host_ip": "127.0.0.1", "target": 9094, "published": "9094", "protocol": "tcp"}.items() \
        <= s["kafka"]["ports"][0].items()
    assert not ct.get("privileged")
    assert set(full["volumes"]) >= {"kafka-data", "clickhouse-data", "grafana-data", "geoip"}
    for name, svc in s.items():  # every pulled image pinned to a version (ours is built here)
        image = svc["image"]
        if "build" in svc:
            continue
        assert ":" in image and not image.endswith(":latest"), (name, image)
        assert re.search(r":\S*\d", image), (name, image)


def test_compose_rejects_a_broken_file(tmp_path: Path) -> None:
    """The validator is not a rubber stamp: an unknown key and a dangling depends_on fail."""
    data = yaml.safe_load(COMPOSE.read_text())
    data["services"]["sink"]["depends_on"]["nope"] = {"condition": "service_healthy"}
    bad = tmp_path / "compose.yaml"
    bad.write_text(yaml.safe_dump(data))
    proc = subprocess.run([_validator(), "-f", str(bad)], capture_output=True, text=True, check=False)
    assert proc.returncode != 0 and "nope" in proc.stderr
    data = yaml.safe_load(COMPOSE.read_text())
    data["services"]["sink"]["healthcheck"]["intervall"] = "5s"
    bad.write_text(yaml.safe_dump(data))
    proc = subprocess.run([_validator(), "-f", str(bad)], capture_output=True, text=True, check=False)
    assert proc.returncode != 0 and "intervall" in proc.stderr


def _model(command: list[str]) -> type[StageSettings] | None:
    """The settings model of the flowtally subcommand a service runs."""
    from enricher.k8s.settings import WatcherSettings
    from enricher.settings import EnricherSettings
    from sensors.conntrack.settings import ConntrackSettings
    from sensors.netflow.collector import NetflowSettings
    from sink.settings import SinkSettings

    key = tuple(command[:2]) if command and command[0] == "sensor" else tuple(command[:1])
    models: dict[tuple[str, ...], type[StageSettings]] = {
        ("sensor", "netflow"): NetflowSettings, ("sensor", "conntrack"): ConntrackSettings,
        ("enrich",): EnricherSettings, ("sink",): SinkSettings, ("migrate",): SinkSettings,
        ("watch-k8s",): WatcherSettings}
    return models.get(key)


def test_every_flowtally_variable_is_accepted_by_its_stage(monkeypatch: pytest.MonkeyPatch) -> None:
    services = _config("demo", "conntrack")["services"]
    checked = set()
    for name, svc in services.items():
        env = {k: str(v) for k, v in (svc.get("environment") or {}).items() if k.startswith("FLOWTALLY_")}
        if name == "grafana":  # read by Grafana's datasource provisioning, not by flowtally
            ds = (ROOT / "deploy/grafana/provisioning/datasources/clickhouse.yaml").read_text()
            assert set(env) == set(re.findall(r"\$\{(FLOWTALLY_\w+)\}", ds))
            continue
        if not env:
            assert name in {"kafka", "clickhouse", "demo-traffic"}, name
            continue
        for k in list(os.environ):
            if k.startswith("FLOWTALLY_"):
                monkeypatch.delenv(k)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        model = _model(svc["command"])
        assert model is not None, (name, svc["command"])
        settings = load_settings(model)
        fields = type(settings).model_fields
        for k, v in env.items():  # each variable names a field and sets it (unknown ones stop the stage)
            name_ = k.removeprefix("FLOWTALLY_").lower()
            group, _, field = name_.partition("_")
            if name_ in fields:
                value = getattr(settings, name_)
            else:
                assert group in fields and field in type(getattr(settings, group)).model_fields, k
                value = getattr(getattr(settings, group), field)
            shown = ",".join(value) if isinstance(value, list) else str(value)
            assert shown.lower() == v.lower(), (name, k, value, v)
        checked.add(name)
    assert checked == {"migrate", "sink", "enricher", "sensor", "conntrack-sensor"}


def test_dockerfile_rules() -> None:
    """What hadolint would check that matters here: pinned bases, no latest, non-root, multi-stage."""
    text = DOCKERFILE.read_text()
    froms = re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\w+))?", text, re.MULTILINE)
    assert len(froms) >= 2
    for image, _ in froms:
        assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", image), image
    users = re.findall(r"^USER\s+(\S+)", text, re.MULTILINE)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert "pip install -c deploy/local/constraints.txt" in text
    assert not re.search(r"^ADD\s", text, re.MULTILINE)
    assert re.search(r'^ENTRYPOINT \["flowtally"\]', text, re.MULTILINE)
    for line in re.findall(r"^COPY\s+(?!--from)(\S+)", text, re.MULTILINE):
        assert (ROOT / line).exists(), line
