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

import pyarrow as pa

from flowtally.process import M_MMAP_THRESHOLD, keep_pandas_out, malloc_trim, mallopt

_applied = False


def release_free_memory() -> None:
    """Give the free pages inside glibc's heaps back to the OS (``malloc_trim``); the identity
    index calls it when a rebuild has freed its temporaries. No-op without glibc or before
    :func:`lean_process`."""
    if _applied:
        malloc_trim()


def _fixed_mmap_threshold() -> None:
    """Ask glibc to serve allocations of 128 KiB and more (the index's arrays, Arrow buffers)
    with mmap, always: by default it raises that threshold after the first large free, and the
    identity rebuild's big temporaries then stay in a fragmented heap that is never given back
    (measured: 550 -> 473 MB resident after a 1M-version replay)."""
    mallopt(M_MMAP_THRESHOLD, 128 * 1024)


def lean_process() -> None:
    """Apply the memory settings (module docstring) to this process:
    glibc's mmap threshold fixed (:func:`_fixed_mmap_threshold`), Arrow buffers from the system
    allocator (mimalloc, Arrow's default, keeps freed pages: the identity rebuild's temporary
    string arrays stayed resident, ~90 MB after a 1M-version replay), no pandas
    (:func:`flowtally.process.keep_pandas_out`: ~40 MB resident for a library the enricher never
    uses)."""
    global _applied
    _applied = True
    _fixed_mmap_threshold()
    pa.set_memory_pool(pa.system_memory_pool())
    keep_pandas_out()
