"""One way to reach ClickHouse: a server over HTTP when a URL is set, else chDB in process.

Both go through clickhouse-connect, so the sink, migrations and queries have one code path.
chDB holds an exclusive lock on its data directory: only one process (normally the sink) can
open it at a time; run ``flowtally query`` after the sink stops, or use a ClickHouse server.
"""

from __future__ import annotations

import logging

import clickhouse_connect
from clickhouse_connect.driver.client import Client

from flowtally.settings import ClickHouseSettings

log = logging.getLogger(__name__)


class ClickHouseUnavailable(RuntimeError):
    """The database could not be opened or reached."""


def connect(settings: ClickHouseSettings) -> Client:
    """A client whose default database is ``settings.database`` (created if missing)."""
    try:
        if settings.url:
            client = clickhouse_connect.get_client(dsn=settings.url)
            where = settings.url.split("@")[-1]
        else:
            settings.path.mkdir(parents=True, exist_ok=True)
            client = clickhouse_connect.get_client(interface="chdb", path=str(settings.path))
            where = f"chDB at {settings.path}"
        client.command(f"CREATE DATABASE IF NOT EXISTS {settings.database}")
        client.database = settings.database
    except Exception as exc:
        if "Cannot lock file" in str(exc) or "EmbeddedServer" in str(exc):
            raise ClickHouseUnavailable(
                f"cannot open chDB at {settings.path}: another process (a running sink?) holds it"
            ) from exc
        raise ClickHouseUnavailable(f"cannot reach ClickHouse: {exc}") from exc
    log.debug("connected to %s, database %s", where, settings.database)
    return client
