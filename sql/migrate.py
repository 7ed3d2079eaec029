"""Versioned schema migrations: ``sql/migrations/NNNN_name.sql``, applied in order and recorded.

Each file is one migration; statements are separated by a ``;`` at the end of a line. Applied
migrations are recorded in ``schema_migrations`` with a checksum, so a second run applies nothing
and an edited, already-applied file is refused instead of silently diverging. Statements must be
safe to re-run (``IF NOT EXISTS``), because a crash between a statement and its record re-applies it.

Variables: a migration may contain ``{name}`` placeholders (lower-case names, e.g.
``{flows_ttl_days}``) rendered from the sink's settings (:data:`DEFAULT_VARIABLES` lists them and
their defaults). The checksum is taken over the file, not the rendered text, so changing a TTL
setting later does not make an applied migration look edited — and does not change the table
either: use ``ALTER TABLE … MODIFY TTL`` (or a new migration) for that. ClickHouse's own
``{name:Type}`` query parameters are never used in migrations, so the two cannot clash.

Cluster note: the files target a single ClickHouse server (and chDB). On a cluster every
``MergeTree`` family engine becomes its ``Replicated…`` variant (``ReplicatedMergeTree``,
``ReplicatedSummingMergeTree``, with ``ON CLUSTER`` on each DDL), deduplication then uses
``replicated_deduplication_window`` instead of ``non_replicated_deduplication_window``, and reads
go through ``Distributed`` tables over the local ones (the sink inserting into the local table of
one shard per partition keeps the tokens effective). That rendering is not implemented yet.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from clickhouse_connect.driver.client import Client

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).with_name("migrations")

_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_VARIABLE = re.compile(r"\{([a-z_][a-z0-9_]*)\}")

#: Placeholders migrations may use, and their values when no settings are given.
DEFAULT_VARIABLES: dict[str, int | str] = {
    "flows_ttl_days": 15,
    "rollup_1m_ttl_days": 30,
    "rollup_1h_ttl_days": 730,
}

_LEDGER = """
CREATE TABLE IF NOT EXISTS schema_migrations
(
    version    UInt32,
    name       String,
    checksum   String,
    applied_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = MergeTree ORDER BY version
"""


@dataclass(frozen=True)
class Migration:
    """One migration file."""

    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()

    def statements(self, variables: Mapping[str, int | str] | None = None) -> list[str]:
        """The statements of the file with ``{name}`` placeholders rendered, comments kept,
        empty ones dropped."""
        values = DEFAULT_VARIABLES | dict(variables or {})

        def render(match: re.Match[str]) -> str:
            if match[1] not in values:
                raise MigrationError(f"migration {self.version:04d}_{self.name} uses unknown "
                                     f"variable {{{match[1]}}}; known: {', '.join(sorted(values))}")
            return str(values[match[1]])

        parts = re.split(r";[ \t]*(?:\n|$)", self.sql)
        return [_VARIABLE.sub(render, p.strip()) for p in parts if _has_code(p)]


class MigrationError(RuntimeError):
    """The database's recorded migrations disagree with the files."""


def _has_code(part: str) -> bool:
    return any(line.strip() and not line.strip().startswith("--") for line in part.splitlines())


def available() -> list[Migration]:
    """The migrations shipped in ``sql/migrations``, by version."""
    found = []
    for entry in sorted(MIGRATIONS_DIR.iterdir()):
        match = _NAME.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text()))
        elif entry.name.endswith(".sql"):
            raise MigrationError(f"migration file {entry.name} is not named NNNN_name.sql")
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"two migration files share a version: {versions}")
    return found


def applied(client: Client) -> dict[int, str]:
    """Version -> checksum of the migrations recorded in the database."""
    client.command(_LEDGER)
    rows = client.query("SELECT version, checksum FROM schema_migrations ORDER BY version").result_rows
    return {int(v): str(c) for v, c in rows}


def pending(client: Client) -> list[Migration]:
    """Migrations not applied yet; raises if an applied one was edited afterwards."""
    done = applied(client)
    todo = []
    for migration in available():
        if migration.version in done:
            if done[migration.version] != migration.checksum:
                raise MigrationError(
                    f"migration {migration.version:04d}_{migration.name} was changed after it was "
                    "applied; add a new migration instead of editing an applied one"
                )
        else:
            todo.append(migration)
    return todo


def migrate(client: Client, variables: Mapping[str, int | str] | None = None) -> list[Migration]:
    """Apply every pending migration in order (placeholders rendered from ``variables`` over
    :data:`DEFAULT_VARIABLES`); returns what was applied."""
    todo = pending(client)
    for migration in todo:
        for statement in migration.statements(variables):
            client.command(statement)
        client.insert(
            "schema_migrations",
            [[migration.version, migration.name, migration.checksum]],
            column_names=["version", "name", "checksum"],
        )
        log.info("applied migration %04d_%s", migration.version, migration.name)
    return todo


def run(args: argparse.Namespace) -> int:
    """`flowtally migrate`: apply (or with --status, list) migrations."""
    from flowtally.clickhouse import connect
    from flowtally.settings import load_settings
    from sink.settings import SinkSettings

    settings = load_settings(SinkSettings, args.config)
    client = connect(settings.clickhouse)
    try:
        if args.status:
            done = applied(client)
            for m in available():
                state = "applied" if m.version in done else "pending"
                print(f"{m.version:04d}_{m.name}\t{state}")
            return 0
        applied_now = migrate(client, settings.migration_variables())
        print(f"{len(applied_now)} migration(s) applied" + "".join(
            f"\n  {m.version:04d}_{m.name}" for m in applied_now))
        return 0
    except MigrationError as exc:
        log.error("%s", exc)
        return 1
    finally:
        client.close()
