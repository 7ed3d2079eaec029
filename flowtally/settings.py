"""Typed settings shared by every stage.

Each stage has one frozen settings model (a subclass of :class:`StageSettings`) read from, in
order of precedence: command-line overrides, environment variables ``FLOWTALLY_…``, an optional
YAML file (``--config`` or ``FLOWTALLY_CONFIG``), then the defaults written next to each field.
Unknown keys are rejected; a bad value stops the process with a message naming the setting and
the environment variable that sets it.

Nested groups use one underscore after the group name: ``FLOWTALLY_KAFKA_BOOTSTRAP`` sets
``kafka.bootstrap``, ``FLOWTALLY_CLICKHOUSE_URL`` sets ``clickhouse.url``.
"""

from __future__ import annotations

import contextvars
import difflib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, TypeVar

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
)
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

ENV_PREFIX = "FLOWTALLY_"
#: ``FLOWTALLY_…`` variables that are not settings of a stage model but are read elsewhere: the
#: settings file, the local broker's jar cache, the compose file's image, and the tests' and
#: benchmarks' own switches (they reach the stages the tests start through the environment).
OTHER_ENV_NAMES = frozenset({
    "FLOWTALLY_CONFIG",
    "FLOWTALLY_LOCALKAFKA_CACHE",
    "FLOWTALLY_IMAGE",
    "FLOWTALLY_TEST_KAFKA_BOOTSTRAP",
    "FLOWTALLY_SHARED_TESTDATA",
    "FLOWTALLY_BENCH_PROFILE",
})


def _comma_separated(value: object) -> object:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, int):
        return [value]
    return value


#: A list setting written comma-separated in the environment (``a,b``; not JSON, which Helm and
#: shell users get wrong) and as a list in YAML.
CommaList = Annotated[list[str], NoDecode, BeforeValidator(_comma_separated)]
#: The same for whole numbers.
CommaIntList = Annotated[list[int], NoDecode, BeforeValidator(_comma_separated)]
_yaml_file: contextvars.ContextVar[Path | None] = contextvars.ContextVar("flowtally_yaml", default=None)


class SettingsError(Exception):
    """Settings that cannot be used; the message names each bad setting."""


class Group(BaseModel):
    """A nested settings group: frozen, unknown keys rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def parse_hostport(value: str, *, what: str) -> tuple[str, int]:
    """Split ``host:port`` (``[v6]:port`` for IPv6) and check the port."""
    host, sep, port = value.strip().rpartition(":")
    if not sep or not host:
        raise ValueError(f"{what} {value!r} is not host:port")
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{what} {value!r} has no valid port (0-65535)")
    return host.strip("[]"), int(port)


#: Kafka's own default limit of a message (``max.message.bytes``), 1 MiB.
DEFAULT_MAX_MESSAGE_BYTES = 1_048_576


class KafkaSettings(Group):
    """Where Kafka is and what the topics are called."""

    bootstrap: str = Field(
        "127.0.0.1:9092", description="Comma-separated broker list host:port[,host:port…]"
    )
    topic_prefix: str = Field("flowtally", pattern=r"^[A-Za-z0-9._-]+$",
                              description="Topics are <prefix>.flows.raw, <prefix>.flows.enriched, …")
    client_id: str = Field("flowtally", description="Kafka client id (broker logs and quotas)")
    security_protocol: str = Field("PLAINTEXT", pattern=r"^(PLAINTEXT|SSL|SASL_PLAINTEXT|SASL_SSL)$",
                                   description="How clients talk to the brokers")
    sasl_mechanism: str | None = Field(None, description="SASL mechanism, e.g. PLAIN or SCRAM-SHA-512")
    sasl_username: str | None = Field(None, description="SASL user")
    sasl_password: SecretStr | None = Field(None, description="SASL password (never logged)")
    request_timeout_ms: int = Field(30_000, ge=1_000, le=600_000, description="Timeout of one Kafka request")
    max_message_bytes: int = Field(
        DEFAULT_MAX_MESSAGE_BYTES, ge=32_768, le=64 * 1_048_576,
        description="Largest Kafka message flowtally produces (value, key, headers and framing): "
        "batches are split to fit it; also the producers' max_request_size, the max.message.bytes "
        "of the topics flowtally creates and the consumers' fetch sizes. The broker's "
        "message.max.bytes and replica.fetch.max.bytes must be at least this")

    @field_validator("bootstrap")
    @classmethod
    def _check_bootstrap(cls, value: str) -> str:
        servers = [s.strip() for s in value.split(",") if s.strip()]
        if not servers:
            raise ValueError("bootstrap is empty")
        for server in servers:
            parse_hostport(server, what="broker")
        return ",".join(servers)

    def topic(self, name: str) -> str:
        """The full name of topic ``name`` (``raw``, ``enriched``, ``identity``, ``dlq``…)."""
        return f"{self.topic_prefix}.{TOPIC_SUFFIXES[name]}"

    def client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments shared by every aiokafka client."""
        kwargs: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap,
            "client_id": self.client_id,
            "security_protocol": self.security_protocol,
            "request_timeout_ms": self.request_timeout_ms,
        }
        if self.sasl_mechanism:
            kwargs["sasl_mechanism"] = self.sasl_mechanism
            kwargs["sasl_plain_username"] = self.sasl_username
            kwargs["sasl_plain_password"] = (
                self.sasl_password.get_secret_value() if self.sasl_password else None
            )
        return kwargs


TOPIC_SUFFIXES = {
    "raw": "flows.raw",
    "enriched": "flows.enriched",
    "identity": "k8s.identity",
    "dlq": "flows.dlq",
    "completeness": "sensor.completeness",  # per-minute completeness records of the sensors
}


class ClickHouseSettings(Group):
    """A ClickHouse server (``url``) or, when no URL is set, the embedded chDB engine at ``path``."""

    url: str | None = Field(
        None, description="http(s)://user:password@host:8123 of a ClickHouse server; unset = chDB"
    )
    path: Path = Field(Path("var/chdb"), description="Data directory of the embedded chDB engine")
    database: str = Field("flowtally", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
                          description="Database of the tables (created by the migrations)")
    cluster: str | None = Field(
        None, pattern=r"^[A-Za-z_][A-Za-z0-9_.-]*$",
        description="ClickHouse cluster name: migrations render ON CLUSTER, Replicated engines and "
                    "<table>_dist Distributed tables, queries read those (unset = single server)",
    )

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        if not value.startswith(("http://", "https://")):
            raise ValueError("url must start with http:// or https://")
        return value


class StageSettings(BaseSettings):
    """Base of every stage's settings model."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="_",
        env_nested_max_split=1,
        extra="forbid",
        frozen=True,
        validate_default=True,
    )
    #: Which environment variables a stage reads, for error messages.
    env_note: ClassVar[str] = ENV_PREFIX

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = _yaml_file.get()
        if path is not None:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=path))
        return tuple(sources)


S = TypeVar("S", bound=StageSettings)


def load_settings(cls: type[S], config_file: str | Path | None = None, **overrides: Any) -> S:
    """Build ``cls`` from overrides, environment and YAML; raise :class:`SettingsError` with one
    line per bad setting."""
    path = config_file or os.environ.get(ENV_PREFIX + "CONFIG")
    if path:
        path = Path(path)
        if not path.is_file():
            raise SettingsError(f"config file {path} does not exist")
        try:
            content = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise SettingsError(f"config file {path} is not valid YAML: {exc}") from exc
        if content is not None and not isinstance(content, dict):
            raise SettingsError(f"config file {path} must hold a mapping of settings")
    unknown = unknown_env_lines(cls, os.environ)
    if unknown:
        raise SettingsError("\n".join(unknown))
    token = _yaml_file.set(Path(path) if path else None)
    try:
        return cls(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        raise SettingsError(describe_errors(exc)) from None
    finally:
        _yaml_file.reset(token)


def env_names(model: type[BaseModel]) -> frozenset[str]:
    """Every environment variable that sets a field of stage model ``model``: ``FLOWTALLY_<FIELD>``,
    and for a group both ``FLOWTALLY_<GROUP>`` (the whole group as JSON) and
    ``FLOWTALLY_<GROUP>_<FIELD>``."""
    names = set()
    for name, info in model.model_fields.items():
        env = ENV_PREFIX + name.upper()
        names.add(env)
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, Group):
            names.update(f"{env}_{sub.upper()}" for sub in annotation.model_fields)
    return frozenset(names)


def unknown_env_lines(model: type[BaseModel], environ: Mapping[str, str]) -> list[str]:
    """One error line per ``FLOWTALLY_…`` variable in ``environ`` that no flowtally stage reads.

    A variable another stage reads is not an error here: compose files and shells share one
    environment between stages. A misspelt one is, as an unknown YAML key is: it would otherwise
    leave its setting at the default without a word. The names of every stage come from
    :mod:`flowtally.env_names`, generated from the stage models (with the configuration reference).
    """
    from flowtally.env_names import STAGE_ENV_NAMES

    known = STAGE_ENV_NAMES | OTHER_ENV_NAMES | env_names(model)
    lines = []
    for raw in sorted(environ):
        name = raw.upper()  # pydantic-settings reads the environment case-insensitively
        if not name.startswith(ENV_PREFIX) or name in known:
            continue
        close = difflib.get_close_matches(name, sorted(env_names(model) | STAGE_ENV_NAMES), n=1, cutoff=0.75)
        hint = f"; did you mean {close[0]}?" if close else ""
        lines.append(f"unknown environment variable {raw}: no flowtally stage reads it{hint}")
    return lines


#: Settings whose values are never echoed, whatever their type.
_SECRET_NAME = re.compile(r"password|secret|token|key$", re.IGNORECASE)
#: The password of a URL's user information (``scheme://user:password@host``).
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^/:@\s]*:)[^\s/]*(?=@)")


def redact(text: str) -> str:
    """``text`` with the password of every URL in it replaced by ``***`` (for error messages and
    logs: a ClickHouse URL carries its password)."""
    return _URL_PASSWORD.sub(r"\g<head>***", text)


def describe_errors(exc: ValidationError) -> str:
    """One line per error: the dotted setting, its environment variable and what is wrong."""
    lines = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        dotted = ".".join(loc)
        env = ENV_PREFIX + "_".join(loc).upper()
        got = err.get("input")
        if isinstance(got, dict):
            shown = ""
        elif _SECRET_NAME.search(dotted):
            shown = " (value not shown: it is a secret)"
        else:
            shown = f" (got {redact(repr(got))})"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown setting"
        lines.append(f"invalid setting {dotted} [{env}]: {msg}{shown}")
    return "\n".join(lines)
