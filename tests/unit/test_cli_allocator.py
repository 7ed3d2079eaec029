"""The `flowtally` command picks Arrow's allocator before pyarrow loads (flowtally/cli.py)."""

from __future__ import annotations

import os
import subprocess
import sys

PROBE = ("from flowtally import cli; cli.build_parser(); import pyarrow as pa; "
         "print(pa.default_memory_pool().backend_name)")


def _backend(env: dict[str, str]) -> str:
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, check=True, capture_output=True, text=True)
    return out.stdout.strip()


def test_every_stage_gets_the_system_allocator() -> None:
    # The parser itself loads pyarrow (the generator's options), so a stage module setting the
    # variable would be too late: the CLI module sets it first.
    env = {k: v for k, v in os.environ.items() if k != "ARROW_DEFAULT_MEMORY_POOL"}
    assert _backend(env) == "system"


def test_an_operators_choice_wins() -> None:
    env = {k: v for k, v in os.environ.items() if k != "ARROW_DEFAULT_MEMORY_POOL"}
    assert _backend(env | {"ARROW_DEFAULT_MEMORY_POOL": "mimalloc"}) == "mimalloc"
