"""Process-wide settings a long-running stage applies to itself: the C library's malloc policy,
and pandas kept out.

Each stage chooses its own policy (the sensor keeps freed memory for the next batch, the
enricher gives it back after an identity rebuild); this module is only how they reach glibc
and the import system, once, in one place. Nothing here runs on import: tests importing the
stages' modules keep their process as it is.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import importlib.abc
import sys
from typing import Any

#: mallopt(3) parameters (glibc's malloc.h).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


@functools.cache
def libc() -> Any:
    """The C library (errno kept for ctypes.get_errno), or None where it cannot be loaded."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


def mallopt(param: int, value: int) -> bool:
    """glibc's mallopt(3); False where the C library has none (not glibc) or refuses."""
    func = getattr(libc(), "mallopt", None)
    if func is None:
        return False
    func.argtypes, func.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(func(param, value))


def malloc_trim() -> None:
    """Give the free pages inside glibc's heaps back to the OS; nothing without glibc."""
    func = getattr(libc(), "malloc_trim", None)
    if func is not None:
        func(0)


class _NoPandas(importlib.abc.MetaPathFinder):
    """Refuses to import pandas. pyarrow imports it on the first ``pa.array()`` of a Python list
    or the first timestamp conversion (only to ask whether a value is a pandas object), which
    costs ~40 MB resident and about a CPU-second for a library no stage uses; pyarrow treats
    the ImportError as "pandas not installed"."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name == "pandas" or name.startswith("pandas."):
            raise ModuleNotFoundError("pandas is kept out of this process", name=name)


def keep_pandas_out() -> None:
    """Install the pandas blocker (once), unless pandas is imported already (its own lazy
    imports of submodules must then keep working)."""
    if "pandas" not in sys.modules and not any(isinstance(f, _NoPandas) for f in sys.meta_path):
        sys.meta_path.insert(0, _NoPandas())
