"""Named queries: ``sql/queries/<name>.sql`` with ClickHouse ``{param:Type}`` placeholders.

The header comment of each file documents it; a line ``-- params: name Type = default, …``
declares its parameters and their defaults, so ``flowtally query NAME`` needs no arguments for
the common case.

Besides ClickHouse's ``{param:Type}`` parameters, a file may use placeholders without a type,
rendered here before the query is sent (:func:`render`), so the choice of table by window is
written once instead of in every file:

* ``{rollup}``: the rollup rows of the window ``minutes`` (a subquery with the columns of
  ``flows_1m``; see :func:`rollup_rows`): a window is read from the coarsest rollups that cover it
  exactly, the per-minute one only for the partial hour at its start, the per-hour one for the
  partial day, the per-day one for the rest; all time reads the per-day rollup alone.
* ``{window_start}``: the start of that window as the rollup rows cover it (a DateTime expression).
* ``{window_seconds}``: its length in seconds; for all time the span of the data in the rollups
  (see :func:`window_seconds`).
* ``{pod_traffic}``: the per-pod rows of the window (see :func:`pod_rows`).
* ``{NAME}`` for a file ``sql/queries/fragments/NAME.sql``: that file's text (shared parts).
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
FRAGMENTS_DIR = QUERIES_DIR / "fragments"

#: A placeholder rendered by :func:`render`: a name without a type (``{param:Type}`` has a colon).
_PLACEHOLDER = re.compile(r"\{([a-z_]+)\}")
#: Windows up to this many minutes start at a minute boundary, longer ones at an hour boundary
#: (the per-minute rollup's TTL is at least a day).
MINUTE_PRECISION_MAX = 1440
#: Pod windows up to this many minutes read only the raw flows: ``flows`` is ordered by time, so
#: an hour is a small read, while the per-pod rollup, ordered by pod, costs its skip index's
#: (fixed) read whatever the window.
POD_RAW_ONLY_MAX = 60

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
    return parse(name, path.read_text())


def parse(name: str, sql: str) -> NamedQuery:
    """Query ``name`` from the text of its file."""
    defaults: dict[str, str] = {}
    description = []
    for line in sql.splitlines():
        if line.startswith("-- params:"):
            for pname, _ptype, default in _PARAM.findall(line.removeprefix("-- params:")):
                defaults[pname] = default.strip()
        elif line.startswith("--"):
            description.append(line.removeprefix("--").strip())
    return NamedQuery(name, sql, defaults, " ".join(description))


def _minutes(values: dict[str, str]) -> int:
    try:
        minutes = int(values.get("minutes", "0"))
    except ValueError as exc:
        raise QueryError(f"minutes must be a whole number, not {values['minutes']!r}") from exc
    if minutes < 0:
        raise QueryError("minutes must be >= 0")
    return minutes


def window_start(minutes: int) -> str:
    """The start of the last ``minutes`` minutes as the rollups cover it: the minute for windows
    up to :data:`MINUTE_PRECISION_MAX` minutes, the hour beyond, the epoch for 0 (all time)."""
    if minutes == 0:
        return "toDateTime(0, 'UTC')"
    bucket = "toStartOfMinute" if minutes <= MINUTE_PRECISION_MAX else "toStartOfHour"
    return f"{bucket}(now() - toIntervalMinute({minutes}))"


def window_seconds(minutes: int) -> str:
    """The length of the last ``minutes`` minutes in seconds; for 0 (all time) the span of the data:
    from the first to the last hour of ``flows_1h`` plus a minute, starting at the first day of
    ``flows_1d`` when that holds older days (the hourly rollup's TTL is shorter), so a rate over
    all time does not depend on the daily rollup's coarse buckets."""
    if minutes:
        return str(minutes * 60)
    return """(SELECT greatest(dateDiff('second', if(d.first < toStartOfDay(h.first), d.first, h.first),
                                    h.last) + 60, 60)
     FROM (SELECT min(time) AS first, max(time) AS last FROM flows_1h) AS h,
          (SELECT min(time) AS first FROM flows_1d) AS d)"""


def rollup_rows(minutes: int) -> str:
    """A subquery with the rollup rows (columns of ``flows_1m``) of the last ``minutes`` minutes
    (0 = all time), from the coarsest rollups that cover the window exactly: ``flows_1m`` from
    :func:`window_start` to the next full hour, ``flows_1h`` from there to the next full day,
    ``flows_1d`` for the rest (the chained views keep the three equal to the raw totals, so the
    union is exact). A 7-day window reads ~7 daily rows per key instead of 168 hourly ones."""
    if minutes == 0:
        return "(SELECT * FROM flows_1d)"
    start = window_start(minutes)
    parts = []
    if minutes <= MINUTE_PRECISION_MAX:
        # The next full hour at or after the window's (minute-aligned) start.
        hour = f"toStartOfHour({start} + toIntervalMinute(59))"
        parts.append(f"SELECT * FROM flows_1m WHERE time >= {start} AND time < {hour}")
    else:
        hour = start
    day = f"toStartOfDay({hour} + toIntervalHour(23))"  # the next full day at or after that hour
    parts.append(f"SELECT * FROM flows_1h WHERE time >= {hour} AND time < {day}")
    parts.append(f"SELECT * FROM flows_1d WHERE time >= {day}")
    return "(\n    " + "\n    UNION ALL\n    ".join(parts) + "\n)"


#: One row per named end of a raw flow, in the columns of ``pod_traffic_1h`` (migration 0009
#: builds that table with the same expressions).
_RAW_POD_ROWS = """SELECT side.1 AS namespace, side.2 AS name, side.3 AS pod_uid,
        toStartOfHour(flow_end) AS time, side.4 AS direction, side.5 AS peer, side.6 AS peer_workload,
        proto, dst_port,
        bytes, packets, toUInt64(1) AS flows, bytes * sampling_rate AS scaled_bytes,
        packets * sampling_rate AS scaled_packets, flow_start AS first_seen, flow_end AS last_seen
    FROM flows
    ARRAY JOIN [
        (CAST(src_namespace, 'String'), src_name, src_pod_uid, 'outbound',
         if(dst_name != '', concat(dst_namespace, '/', dst_name), toString(dst_addr)),
         CAST(if(dst_workload != '', dst_workload, dst_kind), 'String')),
        (CAST(dst_namespace, 'String'), dst_name, dst_pod_uid, 'inbound',
         if(src_name != '', concat(src_namespace, '/', src_name), toString(src_addr)),
         CAST(if(src_workload != '', src_workload, src_kind), 'String'))
    ] AS side
    WHERE {window}
      AND (side.2 != '' OR side.3 != '')
      AND NOT (side.4 = 'inbound' AND src_namespace = dst_namespace AND src_name = dst_name
               AND src_pod_uid = dst_pod_uid)"""


def pod_rows(minutes: int) -> str:
    """A subquery with the per-pod rows (columns of ``pod_traffic_1h``) of flows that ended in the
    last ``minutes`` minutes (0 = all time), to the millisecond: the raw flows of the partial hour
    at the window's start (a window of an hour reads at most an hour of flows, which ``flows``'
    time-first order finds quickly), ``pod_traffic_1h`` from the next full hour on; windows up to
    :data:`POD_RAW_ONLY_MAX` minutes read the raw flows alone."""
    if minutes == 0:
        return "(SELECT * FROM pod_traffic_1h)"
    start = f"(now64(3) - toIntervalMinute({minutes}))"
    if minutes <= POD_RAW_ONLY_MAX:
        return f"(\n    {_RAW_POD_ROWS.format(window=f'flow_end >= {start}')}\n)"
    hour = f"(toStartOfHour({start}) + toIntervalHour(toStartOfHour({start}) < {start}))"
    raw = _RAW_POD_ROWS.format(window=f"flow_end >= {start} AND flow_end < {hour}")
    return f"(\n    {raw}\n    UNION ALL\n    SELECT * FROM pod_traffic_1h WHERE time >= {hour}\n)"


def render(query: NamedQuery, values: dict[str, str]) -> str:
    """``query``'s SQL with its untyped placeholders rendered for the parameter ``values`` (the
    ClickHouse ``{param:Type}`` ones are left for the server)."""
    minutes = _minutes(values) if "minutes" in query.defaults else 0

    def fill(match: re.Match[str], depth: int = 0) -> str:
        name = match[1]
        if name == "rollup":
            return rollup_rows(minutes)
        if name == "window_start":
            return window_start(minutes)
        if name == "window_seconds":
            return window_seconds(minutes)
        if name == "pod_traffic":
            return pod_rows(minutes)
        fragment = FRAGMENTS_DIR / f"{name}.sql"
        if not fragment.is_file() or depth > 3:
            raise QueryError(f"query {query.name} uses unknown placeholder {{{name}}}")
        lines = fragment.read_text().splitlines()
        text = "\n".join(line for line in lines if not line.lstrip().startswith("--"))
        return _PLACEHOLDER.sub(lambda m: fill(m, depth + 1), text.strip())

    # Comment lines are left out: a placeholder named in a comment is not rendered into it.
    code = "\n".join(line for line in query.sql.splitlines() if not line.lstrip().startswith("--"))
    return _PLACEHOLDER.sub(fill, code)


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
    values = query.defaults | (params or {})
    sql = render(query, values)
    if distributed:
        sql = on_cluster(sql)
    result = client.query(sql, parameters=values)
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
    from flowtally.clickhouse import ClickHouseUnavailable, connect
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
    try:
        client = connect(settings.clickhouse)
    except ClickHouseUnavailable as exc:
        print(f"flowtally {args.command}: {exc}", file=sys.stderr)
        return 1
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
