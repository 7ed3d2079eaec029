"""Settings: precedence, strictness, and errors that name the setting."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from flowtally.settings import SettingsError, load_settings
from sink.settings import SinkSettings


def test_defaults_are_the_embedded_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("FLOWTALLY_KAFKA_BOOTSTRAP", "FLOWTALLY_CLICKHOUSE_URL", "FLOWTALLY_CONFIG"):
        monkeypatch.delenv(var, raising=False)
    s = load_settings(SinkSettings)
    assert s.kafka.bootstrap == "127.0.0.1:9092"
    assert s.clickhouse.url is None and s.clickhouse.path == Path("var/chdb")
    assert s.kafka.topic("raw") == "flowtally.flows.raw"
    assert s.kafka.topic("identity") == "flowtally.k8s.identity"


def test_env_overrides_yaml_and_overrides_win(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "sink.yaml"
    config.write_text("kafka:\n  bootstrap: yaml:1\n  topic_prefix: fromyaml\ngroup_id: g-yaml\n")
    monkeypatch.setenv("FLOWTALLY_KAFKA_BOOTSTRAP", "env1:9092, env2:9093")
    s = load_settings(SinkSettings, config, metrics_listen="127.0.0.1:1")
    assert s.kafka.bootstrap == "env1:9092,env2:9093"  # env beats YAML, list normalised
    assert s.kafka.topic_prefix == "fromyaml"  # YAML beats the default
    assert s.group_id == "g-yaml"
    assert s.metrics_listen == "127.0.0.1:1"
    monkeypatch.setenv("FLOWTALLY_CLICKHOUSE_URL", "http://default:pw@ch:8123")
    assert load_settings(SinkSettings, config).clickhouse.url == "http://default:pw@ch:8123"


def test_unknown_yaml_key_is_rejected(tmp_path: Path) -> None:
    config = tmp_path / "sink.yaml"
    config.write_text("kafka:\n  bootstrapp: x:1\n")
    with pytest.raises(SettingsError, match=r"kafka\.bootstrapp .*unknown setting"):
        load_settings(SinkSettings, config)


@pytest.mark.parametrize(
    ("var", "value", "named"),
    [
        ("FLOWTALLY_KAFKA_BOOTSTRAP", "no-port", "kafka.bootstrap"),
        ("FLOWTALLY_KAFKA_BOOTSTRAP", "h:99999", "kafka.bootstrap"),
        ("FLOWTALLY_MAX_MESSAGES_PER_POLL", "0", "max_messages_per_poll"),
        ("FLOWTALLY_CLICKHOUSE_URL", "ftp://x", "clickhouse.url"),
        ("FLOWTALLY_TOPICS_RAW_PARTITIONS", "lots", "topics.raw_partitions"),
    ],
)
def test_bad_value_names_the_setting(monkeypatch: pytest.MonkeyPatch, var: str, value: str, named: str) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(SettingsError) as info:
        load_settings(SinkSettings)
    assert named in str(info.value)
    assert var in str(info.value)


def test_missing_or_broken_config_file(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(SinkSettings, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n- not a mapping\n")
    with pytest.raises(SettingsError, match="mapping"):
        load_settings(SinkSettings, bad)


def test_cli_stops_with_exit_2_naming_the_setting(tmp_path: Path) -> None:
    env = {"FLOWTALLY_KAFKA_BOOTSTRAP": "broker-without-port", "PATH": "/usr/bin:/bin"}
    for argv in (["sink"], ["enrich"], ["sensor", "netflow"]):
        proc = subprocess.run(
            [sys.executable, "-m", "flowtally.cli", *argv], env=env, capture_output=True, text=True,
            timeout=60, cwd=tmp_path,
        )
        assert proc.returncode == 2, proc.stderr
        assert "kafka.bootstrap" in proc.stderr and "FLOWTALLY_KAFKA_BOOTSTRAP" in proc.stderr


def test_a_misspelt_environment_variable_stops_the_stage(monkeypatch: pytest.MonkeyPatch) -> None:
    """As an unknown YAML key does: a typo would otherwise leave its setting at the default."""
    monkeypatch.setenv("FLOWTALLY_BATCH_MAX_FLOW", "5")
    monkeypatch.setenv("flowtally_kafka_bootstrapp", "x:1")  # read case-insensitively, so checked so
    with pytest.raises(SettingsError) as info:
        load_settings(SinkSettings)
    lines = str(info.value).splitlines()
    assert lines == [
        "unknown environment variable FLOWTALLY_BATCH_MAX_FLOW: no flowtally stage reads it; "
        "did you mean FLOWTALLY_BATCH_MAX_FLOWS?",
        "unknown environment variable flowtally_kafka_bootstrapp: no flowtally stage reads it; "
        "did you mean FLOWTALLY_KAFKA_BOOTSTRAP?",
    ]


def test_another_stages_variable_is_not_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Shells and compose files share one environment between stages: the sensor's listen address
    and the enricher's inventory do not stop the sink, and the sink does not read them."""
    from flowtally.env_names import STAGE_ENV_NAMES
    from flowtally.settings import env_names

    monkeypatch.setenv("FLOWTALLY_LISTEN", "0.0.0.0:2055")
    monkeypatch.setenv("FLOWTALLY_INVENTORY", "/etc/flowtally/inventory.yaml")
    monkeypatch.setenv("FLOWTALLY_CONFIG", "")
    assert "FLOWTALLY_LISTEN" not in env_names(SinkSettings)
    assert {"FLOWTALLY_LISTEN", "FLOWTALLY_INVENTORY"} <= STAGE_ENV_NAMES
    load_settings(SinkSettings)


def test_env_names_cover_fields_and_groups() -> None:
    from flowtally.settings import env_names

    names = env_names(SinkSettings)
    assert {"FLOWTALLY_GROUP_ID", "FLOWTALLY_KAFKA", "FLOWTALLY_KAFKA_BOOTSTRAP",
            "FLOWTALLY_CLICKHOUSE_URL"} <= names
    assert "FLOWTALLY_KAFKA_BOOTSTRAPP" not in names


@pytest.mark.parametrize(
    ("var", "value", "secret"),
    [
        ("FLOWTALLY_CLICKHOUSE_URL", "ftp://flowtally:s3cr3t-pw@clickhouse:8123", "s3cr3t-pw"),
        ("FLOWTALLY_CLICKHOUSE_URL", "ftp://flowtally:p@ss@word@clickhouse:8123", "ss@word"),
    ],
)
def test_a_bad_value_never_echoes_a_secret(monkeypatch: pytest.MonkeyPatch, var: str, value: str,
                                           secret: str) -> None:
    monkeypatch.setenv(var, value)
    monkeypatch.setenv("FLOWTALLY_KAFKA_SECURITY_PROTOCOL", "NOT-A-PROTOCOL")  # makes the load fail
    with pytest.raises(SettingsError) as info:
        load_settings(SinkSettings)
    assert "kafka.security_protocol" in str(info.value)
    assert secret not in str(info.value)


def test_redact_hides_url_passwords_only() -> None:
    from flowtally.settings import redact

    assert redact("cannot use http://u:pw@h:8123/db and https://v:p@w@g:1") == \
        "cannot use http://u:***@h:8123/db and https://v:***@g:1"
    assert redact("http://h:8123/?user=x") == "http://h:8123/?user=x"


def test_a_bad_secret_is_named_not_shown(tmp_path: Path) -> None:
    config = tmp_path / "sink.yaml"
    config.write_text("kafka:\n  sasl_password: [topsecret, 1]\n")
    with pytest.raises(SettingsError) as info:
        load_settings(SinkSettings, config)
    assert "kafka.sasl_password" in str(info.value) and "value not shown" in str(info.value)
    assert "topsecret" not in str(info.value)
