"""Plumbing every flowtally stage shares: settings base, Kafka clients, the Arrow wire format,
the metrics/health server, process lifecycle, the local Kafka broker and the `flowtally` CLI.

Kept small on purpose: anything specific to one stage lives in that stage's package.
"""

__version__ = "0.1.0"
