"""The observers a completeness batch names (pure part of enricher/observer_feed.py)."""

from __future__ import annotations

import pyarrow as pa

from enricher.observer_feed import reporting_observers
from sensors.completeness import COMPLETENESS_SCHEMA

M = 1_700_000_040_000  # a minute start


def test_sensor_rows_name_observers_at_the_end_of_their_latest_minute() -> None:
    rows = [
        {"minute": M, "observer": "node-a", "stage": "sensor-conntrack"},
        {"minute": M + 60_000, "observer": "node-a", "stage": "sensor-conntrack"},
        {"minute": M, "observer": "node-b", "stage": "sensor-netflow"},
        {"minute": M, "observer": "", "stage": "sensor-netflow"},  # a router's exporter: no node
        {"minute": M + 120_000, "observer": "node-c", "stage": "enricher"},  # keys, not a sensor
    ]
    table = pa.Table.from_pylist([{"exporter": bytes(16), "observation_domain": 0, **r} for r in rows],
                                 schema=COMPLETENESS_SCHEMA)
    assert reporting_observers(table) == {"node-a": M + 120_000, "node-b": M + 60_000}
    assert reporting_observers(COMPLETENESS_SCHEMA.empty_table()) == {}
