"""Memory settings of the enricher's process (not of tests importing the enricher's modules).

The enricher's resident set is its identity index (arrays of about 80 bytes a version) plus
what the replay and the per-batch work leave behind in the allocators; these settings keep the
latter small (measured on bench_enrich, 1M versions):

- glibc serves every allocation of 128 KiB and more with mmap (:func:`_fixed_mmap_threshold`),
  so the index's arrays and Arrow buffers go back to the OS when freed;
- :func:`release_free_memory` (``malloc_trim``) is what the identity index calls after a rebuild
  has freed its temporaries;
- Arrow allocates from the system allocator, not mimalloc (which keeps freed pages);
- pandas is kept out (pyarrow imports it on the first ``pa.array()`` of a Python list).

The index itself keeps its long-lived data out of glibc's heap (the replay's staged chunks are
merged into mmapped blocks, :meth:`enricher.identity.IdentityIndex._stage`), so these settings
are about the allocators' policies, not about working around the index.
"""

from __future__ import annotations

import importlib.abc
import sys
from typing import Any

import pyarrow as pa


def release_free_memory() -> None:
    """Give the free pages inside glibc's heaps back to the OS (``malloc_trim``); the identity
    index calls it when a rebuild has freed its temporaries. No-op without glibc or before
    :func:`lean_process`."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc() -> Any:
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim  # noqa: B018 (absent outside glibc)
        libc.mallopt  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


_LIBC: Any = None


def _fixed_mmap_threshold(libc: Any) -> None:
    """Ask glibc to serve allocations of 128 KiB and more (the index's arrays, Arrow buffers)
    with mmap, always: by default it raises that threshold after the first large free, and the
    identity rebuild's big temporaries then stay in a fragmented heap that is never given back
    (measured: 550 -> 473 MB resident after a 1M-version replay)."""
    libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD


class _NoPandas(importlib.abc.MetaPathFinder):
    """Refuses to import pandas. pyarrow imports it on the first ``pa.array()`` of a Python
    list (only to ask whether the list is a pandas object), which costs the enricher ~40 MB
    resident and a CPU-second for a library it never uses; pyarrow treats the ImportError as
    "pandas not installed"."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name == "pandas" or name.startswith("pandas."):
            raise ModuleNotFoundError("pandas is kept out of the enricher's process", name=name)


def lean_process() -> None:
    """Apply the memory settings (module docstring) to this process:
    glibc's mmap threshold fixed (:func:`_fixed_mmap_threshold`), Arrow buffers from the system
    allocator (mimalloc, Arrow's default, keeps freed pages: the identity rebuild's temporary
    string arrays stayed resident, ~90 MB after a 1M-version replay), no pandas."""
    global _LIBC
    _LIBC = _load_libc()
    if _LIBC is not None:
        _fixed_mmap_threshold(_LIBC)
    pa.set_memory_pool(pa.system_memory_pool())
    if "pandas" not in sys.modules:
        sys.meta_path.insert(0, _NoPandas())
