"""Process-wide settings a long-running stage applies to itself (:class:`MemoryPolicy`): the C
library's malloc policy, Arrow's allocator, the garbage collector, and pandas kept out.

Each stage chooses its own policy (the sensor keeps freed memory for the next batch, the
enricher gives it back after an identity rebuild); this module is only how they reach glibc
and the import system, once, in one place. Nothing here runs on import: tests importing the
stages' modules keep their process as it is.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import importlib.abc
import sys
from dataclasses import dataclass
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


@dataclass(frozen=True)
class MemoryPolicy:
    """How a long-running stage's process uses memory, applied once at start by :func:`apply`.

    Every stage takes Arrow's system allocator (mimalloc, Arrow's default, hands freed pages back
    and faults them in again for the next batch) and keeps pandas out (pyarrow would import it
    on the first timestamp conversion: ~40 MB resident and a CPU-second for nothing). The rest is
    each stage's own choice, measured where the stage defines its policy.
    """

    #: glibc's M_MMAP_THRESHOLD, fixed (by default glibc raises it after the first large free).
    mmap_threshold: int | None = None
    #: glibc's M_TRIM_THRESHOLD: freed heap kept for reuse rather than given back.
    trim_threshold: int | None = None
    #: Move what start-up created out of the cyclic garbage collector's sight (gc.freeze).
    freeze_gc: bool = False
    #: gc.set_threshold, when young collections should run less often.
    gc_thresholds: tuple[int, int, int] | None = None


_applied: MemoryPolicy | None = None


def apply(policy: MemoryPolicy) -> None:
    """Apply ``policy`` to this process (the stage's ``run`` calls it, never an import)."""
    global _applied
    import pyarrow as pa  # the stages load it anyway; this module stays light for the CLI

    keep_pandas_out()
    pa.set_memory_pool(pa.system_memory_pool())
    if policy.mmap_threshold is not None:
        mallopt(M_MMAP_THRESHOLD, policy.mmap_threshold)
    if policy.trim_threshold is not None:
        mallopt(M_TRIM_THRESHOLD, policy.trim_threshold)
    if policy.gc_thresholds is not None:
        gc.set_threshold(*policy.gc_thresholds)
    if policy.freeze_gc:
        gc.freeze()
    _applied = policy


def release_free_memory() -> None:
    """Give the free pages inside glibc's heaps back to the OS (``malloc_trim``), in a process
    that applied a policy (tests importing a stage keep their process as it is)."""
    if _applied is not None:
        malloc_trim()
