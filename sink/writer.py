"""Inserts into ClickHouse with a deduplication token, so a replayed batch is a no-op."""

from __future__ import annotations

import logging

import pyarrow as pa
from clickhouse_connect.driver.client import Client

log = logging.getLogger(__name__)


class Writer:
    """Writes whole batches to one table; one insert per batch, keyed by ``token``."""

    def __init__(self, client: Client, table: str) -> None:
        self._client = client
        self._table = table

    def insert(self, rows: pa.Table, token: str) -> int:
        """Insert ``rows`` atomically; a repeat of the same ``token`` inserts nothing.

        ClickHouse keeps the last ``non_replicated_deduplication_window`` tokens of the table
        (see the migration), which covers any replay the sink can cause. Returns the row count.
        """
        if rows.num_rows == 0:
            return 0
        self._client.insert_arrow(
            self._table,
            rows,
            settings={
                "insert_deduplication_token": token,
                # One Kafka batch must land as one part, or dedup would work per block.
                "max_insert_block_size": max(rows.num_rows, 1_048_576),
                "min_insert_block_size_rows": 0,
                "min_insert_block_size_bytes": 0,
            },
        )
        return rows.num_rows
