"""Process-wide settings of the stages (flowtally/process.py), each probed in a fresh interpreter
so the test process keeps its own pandas and malloc policy."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def _probe(code: str) -> dict[str, object]:
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def test_pandas_is_kept_out_and_arrow_still_converts_timestamps() -> None:
    # pyarrow looks for pandas on a list conversion and on the first timestamp: both must work
    # without it, and pandas must not load.
    result = _probe(
        "import json, sys, datetime as dt\n"
        "from flowtally.process import keep_pandas_out\n"
        "keep_pandas_out(); keep_pandas_out()\n"
        "import numpy as np, pyarrow as pa\n"
        "a = pa.array(np.array([1700000000000]), pa.timestamp('ms', tz='UTC'))\n"
        "b = pa.array([dt.datetime(2026, 1, 1, tzinfo=dt.UTC)])\n"
        "try:\n    import pandas  # noqa\n    blocked = False\nexcept ModuleNotFoundError:\n    blocked = True\n"
        "print(json.dumps({'pandas': 'pandas' in sys.modules, 'blocked': blocked, 'ms': a[0].value,"
        " 'year': b[0].as_py().year, 'finders': sum(type(f).__name__ == '_NoPandas' for f in sys.meta_path)}))"
    )
    assert result == {"pandas": False, "blocked": True, "ms": 1700000000000, "year": 2026, "finders": 1}


def test_a_pandas_imported_before_stays_usable() -> None:
    # pandas is installed (a dependency of dependencies, pinned in deploy/local/constraints.txt):
    # once imported, its own later imports must not meet the blocker.
    result = _probe(
        "import json, sys\nimport pandas\nfrom flowtally.process import keep_pandas_out\nkeep_pandas_out()\n"
        "print(json.dumps({'finders': sum(type(f).__name__ == '_NoPandas' for f in sys.meta_path)}))"
    )
    assert result == {"finders": 0}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_mallopt_and_malloc_trim_reach_glibc() -> None:
    result = _probe(
        "import json\nfrom flowtally.process import M_MMAP_THRESHOLD, libc, mallopt, malloc_trim\n"
        "malloc_trim()\nprint(json.dumps({'ok': mallopt(M_MMAP_THRESHOLD, 1 << 20), 'libc': libc() is not None}))"
    )
    assert result == {"ok": True, "libc": True}


@pytest.mark.parametrize("stage", ["sensors.netflow.collector", "sensors.conntrack.service", "enricher.memory"])
def test_each_stage_policy_applies_once_in_one_place(stage: str) -> None:
    """The stages' memory policies go through flowtally.process.apply: the garbage collector as
    each asks, Arrow on the system allocator, pandas out, release_free_memory live only after."""
    result = _probe(
        "import gc, importlib, json, sys\n"
        "import flowtally.process as p\n"
        f"policy = importlib.import_module({stage!r}).MEMORY\n"
        "before = p._applied\n"
        "p.apply(policy)\n"
        "import pyarrow as pa\n"
        "print(json.dumps({'before': before is None, 'after': p._applied is policy,"
        " 'frozen': gc.get_freeze_count() > 0, 'thresholds': list(gc.get_threshold()),"
        " 'pool': pa.default_memory_pool().backend_name,"
        " 'finders': sum(type(f).__name__ == '_NoPandas' for f in sys.meta_path),"
        " 'freeze_gc': policy.freeze_gc, 'gc_thresholds': list(policy.gc_thresholds or ())}))"
    )
    assert result["before"] and result["after"] and result["finders"] == 1 and result["pool"] == "system"
    assert result["frozen"] == result["freeze_gc"]
    if result["gc_thresholds"]:
        assert result["thresholds"] == result["gc_thresholds"]
