"""Memory policy of the enricher's process (applied by ``flowtally enrich``, not by tests
importing the enricher's modules).

The enricher's resident set is its identity index (arrays of about 80 bytes a version) plus
what the replay and the per-batch work leave behind in the allocators; the policy keeps the
latter small (measured on bench_enrich, 1M versions):

- glibc serves every allocation of 128 KiB and more with mmap, always: by default it raises that
  threshold after the first large free, and the identity rebuild's big temporaries then stay in
  a fragmented heap that is never given back (measured: 550 -> 473 MB resident after a
  1M-version replay), so the index's arrays and Arrow buffers go back to the OS when freed;
- the identity index calls :func:`flowtally.process.release_free_memory` (``malloc_trim``) when a
  rebuild has freed its temporaries;
- Arrow allocates from the system allocator (mimalloc, Arrow's default, keeps freed pages: the
  rebuild's temporary string arrays stayed resident, ~90 MB after a 1M-version replay), and
  pandas is kept out (~40 MB resident for a library the enricher never uses), as in every stage.

The index itself keeps its long-lived data out of glibc's heap (the replay's staged chunks are
merged into mmapped blocks, :meth:`enricher.identity.IdentityIndex._stage`), so the policy is
about the allocators, not about working around the index.
"""

from __future__ import annotations

from flowtally.process import MemoryPolicy

MEMORY = MemoryPolicy(mmap_threshold=128 * 1024)
