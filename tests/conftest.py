"""Shared fixtures. Each fixture family lives in tests/fixtures/<name>.py and is loaded here."""

pytest_plugins = [
    "tests.fixtures.kafka",
    "tests.fixtures.clickhouse",
    "tests.fixtures.grafana",
]
