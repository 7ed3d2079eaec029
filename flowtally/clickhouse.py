"""One way to reach ClickHouse: a server over HTTP when a URL is set, else chDB in process.

Both go through clickhouse-connect, so the sink, migrations and queries have one code path.
chDB holds an exclusive lock on its data directory: only one process (normally the sink) can
open it at a time; run ``flowtally query`` after the sink stops, or use a ClickHouse server.
"""

from __future__ import annotations

import asyncio
import logging

import clickhouse_connect
from clickhouse_connect.driver.client import Client

from flowtally.settings import ClickHouseSettings, redact

log = logging.getLogger(__name__)


class ClickHouseUnavailable(RuntimeError):
    """The database could not be opened or reached."""


def connect(settings: ClickHouseSettings) -> Client:
    """A client whose default database is ``settings.database`` (created if missing)."""
    # The URL's user information carries the password: never part of a message.
    where = settings.url.split("@")[-1] if settings.url else f"chDB at {settings.path}"
    try:
        if settings.url:
            client = clickhouse_connect.get_client(dsn=settings.url)
        else:
            settings.path.mkdir(parents=True, exist_ok=True)
            client = clickhouse_connect.get_client(interface="chdb", path=str(settings.path))
        client.command(f"CREATE DATABASE IF NOT EXISTS {settings.database}")
        client.database = settings.database
    except Exception as exc:
        if "Cannot lock file" in str(exc) or "EmbeddedServer" in str(exc):
            raise ClickHouseUnavailable(
                f"cannot open chDB at {settings.path}: another process (a running sink?) holds it"
            ) from exc
        raise ClickHouseUnavailable(f"cannot reach ClickHouse at {where}: {redact(str(exc))}") from exc
    log.debug("connected to %s, database %s", where, settings.database)
    return client


async def connect_when_reachable(settings: ClickHouseSettings) -> Client:
    """:func:`connect`, retried with a doubling delay up to 30 s (one warning per attempt) while
    the database is unreachable or, for chDB, held by another process: a long-running stage waits
    for its database at start as it does for Kafka, instead of exiting into a restart loop."""
    delay, attempt = 1.0, 0
    while True:
        try:
            return await asyncio.to_thread(connect, settings)
        except ClickHouseUnavailable as exc:
            attempt += 1
            log.warning("%s (attempt %d), retrying in %.0f s", exc, attempt, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)
