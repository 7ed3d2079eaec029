"""Named queries: ``sql/queries/<name>.sql`` with ClickHouse ``{param:Type}`` placeholders.

The header comment of each file documents it; a line ``-- params: name Type = default, …``
declares its parameters and their defaults, so ``flowtally query NAME`` needs no arguments for
the common case and Grafana panels can use the same files.
"""

from __future__ import annotations

import argparse
import csv
import io
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from clickhouse_connect.driver.client import Client

QUERIES_DIR = Path(__file__).with_name("queries")

_PARAM = re.compile(r"(\w+)\s+(\w+)\s*=\s*([^,()]+?)\s*(?:\([^)]*\))?\s*(?:,|$)")


@dataclass(frozen=True)
class NamedQuery:
    """A query file with its declared parameters."""

    name: str
    sql: str
    defaults: dict[str, str]
    description: str


class QueryError(ValueError):
    """An unknown query or a bad parameter."""


def load(name: str) -> NamedQuery:
    """Read query ``name``."""
    path = QUERIES_DIR / f"{name}.sql"
    if not path.is_file():
        raise QueryError(f"no query named {name!r}; known: {', '.join(names())}")
    sql = path.read_text()
    defaults: dict[str, str] = {}
    description = []
    for line in sql.splitlines():
        if line.startswith("-- params:"):
            for pname, _ptype, default in _PARAM.findall(line.removeprefix("-- params:")):
                defaults[pname] = default.strip()
        elif line.startswith("--"):
            description.append(line.removeprefix("--").strip())
    return NamedQuery(name, sql, defaults, " ".join(description))


def names() -> list[str]:
    """Every named query."""
    return sorted(p.stem for p in QUERIES_DIR.glob("*.sql"))


def on_cluster(sql: str) -> str:
    """``sql`` reading the ``Distributed`` tables of a cluster (``flows_dist`` … see
    :mod:`sql.migrate`) instead of the local tables: every ``FROM``/``JOIN`` of a data table."""
    from sql.migrate import DIST_SUFFIX, data_tables

    names = "|".join(sorted(data_tables(), key=len, reverse=True))
    return re.sub(rf"\b(FROM|JOIN)(\s+)({names})\b(?!\.)", rf"\1\2\3{DIST_SUFFIX}", sql, flags=re.I)


def execute(
    client: Client, name: str, params: dict[str, str] | None = None, *, distributed: bool = False
) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Run query ``name`` with ``params`` over its defaults (on a cluster's ``Distributed``
    tables with ``distributed``); returns column names and rows."""
    query = load(name)
    unknown = set(params or {}) - set(query.defaults)
    if unknown:
        raise QueryError(f"query {name} has no parameter {', '.join(sorted(unknown))}")
    sql = on_cluster(query.sql) if distributed else query.sql
    result = client.query(sql, parameters=query.defaults | (params or {}))
    return list(result.column_names), [tuple(r) for r in result.result_rows]


def format_table(columns: list[str], rows: list[tuple[Any, ...]]) -> str:
    """A plain aligned text table (numbers right-aligned, with thousands separators)."""
    def cell(v: Any) -> str:
        return f"{v:,}" if isinstance(v, int) else str(v)

    cells = [[cell(v) for v in row] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    numeric = [bool(rows) and all(isinstance(r[i], int | float) for r in rows) for i in range(len(columns))]

    def line(values: list[str]) -> str:
        cells = zip(values, widths, numeric, strict=True)
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in cells)

    out = [line(columns), line(["-" * w for w in widths])]
    out += [line(r) for r in cells]
    return "\n".join(out)


def format_csv(columns: list[str], rows: list[tuple[Any, ...]]) -> str:
    """RFC 4180 CSV with a header row."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(rows)
    return out.getvalue()


def run(args: argparse.Namespace) -> int:
    """`flowtally query [NAME] [--param k=v] [--format table|csv|json]`."""
    from flowtally.clickhouse import connect
    from flowtally.settings import load_settings
    from sink.settings import SinkSettings

    if not args.name:
        for n in names():
            print(f"{n}\t{load(n).description}")
        return 0
    params = {}
    for item in args.param:
        key, sep, value = item.partition("=")
        if not sep:
            print(f"flowtally query: --param {item!r} is not KEY=VALUE", file=sys.stderr)
            return 2
        params[key] = value
    settings = load_settings(SinkSettings, args.config)
    client = connect(settings.clickhouse)
    try:
        columns, rows = execute(client, args.name, params,
                                distributed=settings.clickhouse.cluster is not None)
    except QueryError as exc:
        print(f"flowtally query: {exc}", file=sys.stderr)
        return 2
    finally:
        client.close()
    if args.format == "json":
        for row in rows:
            sys.stdout.buffer.write(orjson.dumps(dict(zip(columns, row, strict=True)), default=str) + b"\n")
    elif args.format == "csv":
        sys.stdout.write(format_csv(columns, rows))
    else:
        print(format_table(columns, rows))
    return 0
