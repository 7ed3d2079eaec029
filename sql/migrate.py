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

Cluster rendering: the files target a single ClickHouse server (and chDB). With a cluster name
(``clickhouse.cluster``, ``FLOWTALLY_CLICKHOUSE_CLUSTER``) the same files are rendered for a
ClickHouse cluster by :func:`render_for_cluster`, after the placeholders and without touching the
checksums (those are of the files):

* every ``CREATE``/``ALTER``/``DROP``/``RENAME`` gets ``ON CLUSTER '<name>'``;
* every ``MergeTree`` family engine becomes its ``Replicated…`` variant, with the replication path
  :data:`REPLICA_PATH` (the servers' ``{shard}`` and ``{replica}`` macros must be defined);
  ``non_replicated_deduplication_window`` becomes ``replicated_deduplication_window``, so the
  sink's insert tokens keep deduplicating (per shard, in Keeper);
* every data table ``t`` gets a ``t_dist`` ``Distributed`` table over the cluster for reads,
  re-created after each migration that creates or alters ``t`` (it holds no data, and re-creating
  it picks up new columns); ``flowtally query`` reads those when a cluster is set;
* the ledger ``schema_migrations`` is replicated over the whole cluster (a path without
  ``{shard}``), so one ``flowtally migrate`` records for every node.

Writes go to the local tables: the sink inserts into ``flows`` on the node it is connected to, the
views fire there, and the tokens stay effective. Backfill ``INSERT … SELECT`` statements run on
the node ``flowtally migrate`` is connected to, so they fill that shard only: on a multi-shard
cluster that already holds flows, run those statements on one replica of each other shard.
``flowtally migrate --render`` prints the DDL (rendered for the configured cluster, if any)
without connecting.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import re
import sys
from collections.abc import Collection, Mapping
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
    "rollup_1d_ttl_days": 3650,
}

_LEDGER = """
CREATE TABLE IF NOT EXISTS schema_migrations{on_cluster}
(
    version    UInt32,
    name       String,
    checksum   String,
    applied_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = {engine} ORDER BY version
"""

#: Replication path of a cluster's data tables (``{shard}``/``{replica}``: the servers' macros;
#: ``{database}``/``{table}``: expanded by ClickHouse).
REPLICA_PATH = "/clickhouse/tables/{shard}/{database}/{table}"
#: The ledger is one replicated table across every shard.
LEDGER_PATH = "/clickhouse/flowtally/{database}/schema_migrations"
DIST_SUFFIX = "_dist"

_MERGE_TREES = "Summing|Aggregating|Replacing|Collapsing|VersionedCollapsing|Graphite"
_ENGINE = re.compile(rf"\bENGINE\s*=\s*({_MERGE_TREES})?MergeTree\b(\s*\()?")
# Statement heads, matched at the start of a statement with its comment lines removed.
_CREATE_TABLE = re.compile(r"(CREATE\s+TABLE\s+(?:IF\s+NOT\s+EXISTS\s+)?)(\w+)", re.I)
_CREATE_VIEW = re.compile(r"(CREATE\s+(?:MATERIALIZED\s+)?VIEW\s+(?:IF\s+NOT\s+EXISTS\s+)?)(\w+)", re.I)
_ALTER_DROP = re.compile(r"(ALTER\s+TABLE\s+|DROP\s+(?:TABLE|VIEW|DICTIONARY)\s+(?:IF\s+EXISTS\s+)?)(\w+)",
                         re.I)
_RENAME = re.compile(r"(?:RENAME|EXCHANGE)\s+TABLES?\b", re.I)

def _ledger(cluster: str | None) -> str:
    if cluster is None:
        return _LEDGER.format(on_cluster="", engine="MergeTree")
    return _LEDGER.format(on_cluster=f" ON CLUSTER '{cluster}'",
                          engine=f"ReplicatedMergeTree('{LEDGER_PATH}', '{{replica}}')")


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

    def rendered(self, variables: Mapping[str, int | str] | None = None, cluster: str | None = None,
                 data_tables: Collection[str] = ()) -> list[str]:
        """The statements to run: :meth:`statements` as they are for a single server, or rendered
        for ``cluster`` (:func:`render_for_cluster`; ``data_tables``: every MergeTree table of
        the migrations, see :func:`data_tables`), followed by the re-creation of the
        ``Distributed`` tables of the data tables this migration creates or alters."""
        statements = self.statements(variables)
        if cluster is None:
            return statements
        out = [render_for_cluster(s, cluster) for s in statements]
        touched: list[str] = []
        for statement in statements:
            name = _data_table_of(statement, data_tables)
            if name and name not in touched:
                touched.append(name)
        for name in touched:
            out += distributed_table(name, cluster)
        return out


class MigrationError(RuntimeError):
    """The database's recorded migrations disagree with the files."""


def _has_code(part: str) -> bool:
    return any(line.strip() and not line.strip().startswith("--") for line in part.splitlines())


def _without_comments(statement: str) -> str:
    return "\n".join(line for line in statement.splitlines() if not line.strip().startswith("--")).strip()


def render_for_cluster(statement: str, cluster: str) -> str:
    """One (placeholder-rendered) statement for a ClickHouse cluster: ``ON CLUSTER`` on DDL,
    ``Replicated…`` engines with :data:`REPLICA_PATH`, the replicated deduplication window.
    Comment lines are dropped (they may name engines). Other statements (``INSERT``) unchanged."""
    on = f" ON CLUSTER '{cluster}'"
    sql = _without_comments(statement)
    for pattern in (_CREATE_TABLE, _CREATE_VIEW, _ALTER_DROP):
        match = pattern.match(sql)
        if match:
            sql = sql[: match.end()] + on + sql[match.end():]
            break
    else:
        if _RENAME.match(sql):
            sql += on

    def replicated(match: re.Match[str]) -> str:
        args = f"'{REPLICA_PATH}', '{{replica}}'"
        if match[2] is None:  # no engine arguments
            return f"ENGINE = Replicated{match[1] or ''}MergeTree({args})"
        rest = sql[match.end():].lstrip()
        return f"ENGINE = Replicated{match[1] or ''}MergeTree({args}" + ("" if rest.startswith(")") else ", ")

    sql = _ENGINE.sub(replicated, sql)
    return sql.replace("non_replicated_deduplication_window", "replicated_deduplication_window")


def distributed_table(table: str, cluster: str) -> list[str]:
    """Statements (re-)creating ``<table>_dist``, a ``Distributed`` table over ``table`` on every
    shard of ``cluster``, for reads. It holds no data, so dropping it loses nothing."""
    dist = table + DIST_SUFFIX
    return [
        f"DROP TABLE IF EXISTS {dist} ON CLUSTER '{cluster}' SYNC",
        f"CREATE TABLE {dist} ON CLUSTER '{cluster}' AS {table}\n"
        f"ENGINE = Distributed('{cluster}', currentDatabase(), '{table}')",
    ]


def _data_table_of(statement: str, data_tables: Collection[str]) -> str | None:
    """The data table a statement creates or alters (None for views, inserts, …)."""
    sql = _without_comments(statement)
    match = _CREATE_TABLE.match(sql) or _ALTER_DROP.match(sql)
    if match and match[2] in data_tables and not match[1].upper().startswith("DROP"):
        return match[2]
    return None


def data_tables(migrations: list[Migration] | None = None) -> list[str]:
    """The tables with a MergeTree family engine the migrations create (not views, not the
    ledger): those that get Replicated engines and ``_dist`` tables on a cluster."""
    found: list[str] = []
    for migration in available() if migrations is None else migrations:
        for statement in migration.statements():
            sql = _without_comments(statement)
            match = _CREATE_TABLE.match(sql)
            if match and _ENGINE.search(sql) and match[2] not in found:
                found.append(match[2])
    return found


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


def applied(client: Client, cluster: str | None = None) -> dict[int, str]:
    """Version -> checksum of the migrations recorded in the database (the ledger is created on
    first use, replicated over ``cluster`` when given)."""
    client.command(_ledger(cluster))
    rows = client.query("SELECT version, checksum FROM schema_migrations ORDER BY version").result_rows
    return {int(v): str(c) for v, c in rows}


def pending(client: Client, cluster: str | None = None) -> list[Migration]:
    """Migrations not applied yet; raises if an applied one was edited afterwards."""
    done = applied(client, cluster)
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


def migrate(client: Client, variables: Mapping[str, int | str] | None = None,
            cluster: str | None = None) -> list[Migration]:
    """Apply every pending migration in order (placeholders rendered from ``variables`` over
    :data:`DEFAULT_VARIABLES`; for ``cluster`` when given, see the module doc); returns what was
    applied. The ledger records the files' checksums, whatever the rendering."""
    todo = pending(client, cluster)
    tables = data_tables() if cluster else []
    for migration in todo:
        for statement in migration.rendered(variables, cluster, tables):
            client.command(statement)
        client.insert(
            "schema_migrations",
            [[migration.version, migration.name, migration.checksum]],
            column_names=["version", "name", "checksum"],
        )
        log.info("applied migration %04d_%s", migration.version, migration.name)
    return todo


def render_all(variables: Mapping[str, int | str] | None = None, cluster: str | None = None) -> str:
    """Every statement ``flowtally migrate`` would run on an empty database (the ledger, then
    each migration), ``;``-terminated, as ``flowtally migrate --render`` prints them."""
    tables = data_tables() if cluster else []
    out = [f"-- ledger\n{_ledger(cluster).strip()};\n"]
    for migration in available():
        out.append(f"-- {migration.version:04d}_{migration.name}\n")
        out += [f"{statement};\n" for statement in migration.rendered(variables, cluster, tables)]
    return "\n".join(out)


def run(args: argparse.Namespace) -> int:
    """`flowtally migrate`: apply (with --status, list; with --render, print) migrations."""
    from flowtally.clickhouse import ClickHouseUnavailable, connect
    from flowtally.settings import load_settings
    from sink.settings import SinkSettings

    settings = load_settings(SinkSettings, args.config)
    cluster = settings.clickhouse.cluster
    if getattr(args, "render", False):
        print(render_all(settings.migration_variables(), cluster), end="")
        return 0
    try:
        client = connect(settings.clickhouse)
    except ClickHouseUnavailable as exc:
        print(f"flowtally {args.command}: {exc}", file=sys.stderr)
        return 1
    try:
        if args.status:
            done = applied(client, cluster)
            for m in available():
                state = "applied" if m.version in done else "pending"
                print(f"{m.version:04d}_{m.name}\t{state}")
            return 0
        applied_now = migrate(client, settings.migration_variables(), cluster)
        print(f"{len(applied_now)} migration(s) applied" + "".join(
            f"\n  {m.version:04d}_{m.name}" for m in applied_now))
        return 0
    except MigrationError as exc:
        log.error("%s", exc)
        return 1
    finally:
        client.close()
