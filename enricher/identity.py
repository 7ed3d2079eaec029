"""Time-aware address -> owner lookup for whole columns at once (pure, no I/O).

An address has a list of *versions*: an owner (pod, service ClusterIP, node, hostNetwork pod, or
an ignored object) valid over ``[valid_from_ms, valid_to_ms)``; ``valid_to_ms`` is
:data:`OPEN` (int64 max) while the owner still holds the address. A flow is attributed to the
owner of its address *at the flow's time* (its end time): a pod deleted at 10:00 whose IP another
pod gets at 10:02 keeps the flows of 09:59 even when they are processed at 10:05.

Layout (rebuilt in one go after a batch of changes, never per change or per flow):

- *master rows* sorted by (address, valid_from): the address (``S16``), ``valid_from``,
  ``valid_to`` and per identity field an integer code; two extra slots at the end of every code
  column stand for "no owner, private" and "no owner, external";
- a :class:`_Timeline` over the rows that own an address outright (every kind but
  ``host-network``): the distinct addresses (sorted) and where each address's run of rows
  starts. A lookup is a ``searchsorted`` of the addresses (as 64-bit words) -> address ids, then
  a vectorised binary search within each address's run (as many steps as the longest run needs)
  -> the last version starting at or before the flow, accepted when it ends after the flow. No
  Python runs per flow;
- a second timeline over hostNetwork pods' ports: one row per (address, protocol, port) a
  ``host-network`` version serves (``host_ports``), keyed by the 19 bytes address + protocol +
  port.

String fields are stored as codes. Low-cardinality fields (kind, namespace, workload, service,
node…) have one append-only dictionary each; the per-pod fields (``name``, ``pod_uid``: with 1 M
historical versions there are 1 M of them) are kept as Arrow string chunks, one entry per row,
compacted when more than half of them belong to forgotten rows, so the index holds no Python
object per version. The Arrow dictionaries of an output column are built per batch from the
codes that batch uses (:meth:`IdentityIndex.arrow_columns`), so a message never carries the
whole table.

Rules:

- Overlapping versions of one address: a newer version ends the older one (the older version's
  ``valid_to`` is cut to the newer one's ``valid_from``); the watcher never produces overlaps, but
  a replay of two sources (e.g. the static inventory and the topic) might. ``host-network``
  versions are the exception (below): they overlap the node's version by design.
- History: versions that ended before ``now - history`` are dropped by :meth:`prune`; a flow with
  no owner at its time that is older than that horizon is counted as *late* (it may have had an
  owner we forgot) when its address is private or known to the index.
- hostNetwork pods share their node's address: the address's version list holds the node's
  version (kind ``node``) and, alongside it, a version of kind ``host-network`` per hostNetwork
  pod with the (protocol, port) pairs it serves in ``host_ports``. A flow end whose port (the
  flow's ``dst_port`` for the dst side, ``src_port`` for the src side) and protocol match a
  ``host_ports`` pair of a ``host-network`` version valid at the flow's time goes to that pod;
  every other flow end on the address goes to the node (or no one, if no node version).
  Overlapping ``host-network`` versions for the same (address, protocol, port): newer wins.
- Services: a ClusterIP version has kind ``service`` and its name in ``service``; a pod version
  whose IP an EndpointSlice lists as a backend carries the service name(s) in ``service``
  (comma-separated), so a flow to the backend pod gets ``dst_service`` too.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import orjson
import pyarrow as pa

from enricher import uids
from enricher.inventory import Owner
from enricher.schema import ALL_IDENTITY_FIELDS

PRIVATE = "private"
EXTERNAL = "external"
IGNORED = "ignored"
SERVICE = "service"
HOST_NETWORK = "host-network"

#: ``valid_to_ms`` of a version that has not ended.
OPEN = int(np.iinfo(np.int64).max)
#: Default history kept for late flows (1 h).
DEFAULT_HISTORY_MS = 3_600_000

#: Fields with about one distinct value per version: stored per row, not deduplicated.
_PER_ROW_FIELDS = frozenset({"name", "pod_uid"})
#: The field whose per-row column holds 16-byte keys (:mod:`enricher.uids`), not int32 codes.
_UID = "pod_uid"
_NF = len(ALL_IDENTITY_FIELDS)

# (network, prefix length) of IPv4 space that is never on the public internet.
_PRIVATE_V4 = [
    ("10.0.0.0", 8), ("172.16.0.0", 12), ("192.168.0.0", 16), ("100.64.0.0", 10),
    ("127.0.0.0", 8), ("169.254.0.0", 16), ("0.0.0.0", 8),
]


def _v4(addr: str) -> int:
    a, b, c, d = (int(x) for x in addr.split("."))
    return (a << 24) | (b << 16) | (c << 8) | d


def _words(addresses: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The (high, low) 64-bit halves of (n, 16) uint8 addresses, as native uint64 (sortable like
    the bytes)."""
    words = np.ascontiguousarray(addresses, dtype=np.uint8).view(">u8").reshape(-1, 2).astype(np.uint64)
    return words[:, 0], words[:, 1]


_PRIVATE_V4_MASKS = [(np.uint64((0xFFFFFFFF << (32 - length)) & 0xFFFFFFFF), np.uint64(_v4(network)))
                     for network, length in _PRIVATE_V4]


def _is_private_words(hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
    is_v4 = (hi == 0) & ((lo >> np.uint64(32)) == np.uint64(0xFFFF))
    v4 = lo & np.uint64(0xFFFFFFFF)
    private_v4 = np.zeros(len(lo), dtype=bool)
    for mask, network in _PRIVATE_V4_MASKS:
        private_v4 |= (v4 & mask) == network
    top = hi >> np.uint64(54)  # first 10 bits
    ula = (hi >> np.uint64(57)) == np.uint64(0x7E)  # fc00::/7
    link_local = top == np.uint64(0x3FA)  # fe80::/10
    # ::1 and :: (unspecified: what a record that reports no address carries).
    loopback = (hi == 0) & (lo <= 1)
    return np.where(is_v4, private_v4, ula | link_local | loopback)


def network_bounds(networks: Iterable[str]) -> np.ndarray:
    """(n, 4) uint64: the first and last address of each CIDR as (hi, lo) words of the 16-byte
    form (IPv4 networks in IPv4-mapped form), for :func:`in_networks`. Raises ValueError."""
    out = []
    for text in networks:
        net = ipaddress.ip_network(text, strict=False)
        if isinstance(net, ipaddress.IPv4Network):
            first = int(ipaddress.IPv6Address(f"::ffff:{net.network_address}"))
            last = int(ipaddress.IPv6Address(f"::ffff:{net.broadcast_address}"))
        else:
            first, last = int(net.network_address), int(net.broadcast_address)
        out.append((first >> 64, first & (2**64 - 1), last >> 64, last & (2**64 - 1)))
    return np.array(out, dtype=np.uint64).reshape(-1, 4)


def in_networks(hi: np.ndarray, lo: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """Mask of the addresses (as :func:`_words`) inside any of ``bounds`` (:func:`network_bounds`)."""
    inside = np.zeros(len(hi), dtype=bool)
    for s_hi, s_lo, e_hi, e_lo in bounds:
        after_start = (hi > s_hi) | ((hi == s_hi) & (lo >= s_lo))
        before_end = (hi < e_hi) | ((hi == e_hi) & (lo <= e_lo))
        inside |= after_start & before_end
    return inside


def is_private(addresses: np.ndarray) -> np.ndarray:
    """Boolean mask of addresses in RFC 1918/6598, loopback, link-local, ULA or unspecified space.

    ``addresses`` is an (n, 16) uint8 array (IPv4 in IPv4-mapped form).
    """
    return _is_private_words(*_words(addresses))


def labels_text(labels: Mapping[str, str]) -> str:
    """The one text form of a label set: a JSON object with sorted keys, "" for no labels (equal
    sets give equal strings, so the column stays dictionary-encoded and comparable)."""
    if not labels:
        return ""
    return orjson.dumps({str(k): str(v) for k, v in labels.items()}, option=orjson.OPT_SORT_KEYS).decode()


@dataclass(frozen=True, slots=True)
class OwnerInfo:
    """Who holds an address (the time-independent part of a version)."""

    kind: str = "pod"
    namespace: str = ""
    name: str = ""
    workload: str = ""
    workload_kind: str = ""
    service: str = ""
    node: str = ""
    pod_uid: str = ""
    #: The pod's chosen labels as :func:`labels_text` writes them ("" without labels).
    labels: str = ""
    #: For a host-network pod (kind ``host-network``, sharing its node's address): the
    #: (protocol, port) pairs it listens on, so a flow to one of them is attributed to the pod
    #: and other flows on that address to the node.
    host_ports: tuple[tuple[int, int], ...] = ()

    def values(self) -> tuple[str, ...]:
        """Field values in :data:`ALL_IDENTITY_FIELDS` order."""
        return tuple(getattr(self, f) for f in ALL_IDENTITY_FIELDS)

    @classmethod
    def from_owner(cls, owner: Owner) -> OwnerInfo:
        """The static inventory's owner."""
        return cls(kind=str(owner.kind), namespace=owner.namespace, name=owner.name,
                   workload=owner.workload, workload_kind=owner.workload_kind,
                   service=owner.service, node=owner.node)


@dataclass(frozen=True, slots=True)
class Version:
    """An owner of an address over ``[valid_from_ms, valid_to_ms)``."""

    owner: OwnerInfo
    valid_from_ms: int = 0
    valid_to_ms: int = OPEN

    @property
    def open(self) -> bool:
        """Whether the owner still holds the address."""
        return self.valid_to_ms == OPEN


#: One change: the full version list of an address (16 bytes), or None to forget the address.
Changes = Mapping[bytes, Sequence[Version] | None]


@dataclass
class LookupStats:
    """Counts of one lookup (per side), for metrics and completeness records."""

    flows: int = 0
    owned: int = 0
    ignored: int = 0
    unknown_private: int = 0
    external: int = 0
    late: int = 0

    def add(self, other: LookupStats) -> None:
        """Accumulate ``other`` into this."""
        for name in ("flows", "owned", "ignored", "unknown_private", "external", "late"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass
class SideLookup:
    """The outcome of looking up one column of addresses: per flow the master row (or one of the
    two "no owner" slots), and masks the counters and the late rule need."""

    slot: np.ndarray  # int64 into the code columns
    owned: np.ndarray  # bool
    private: np.ndarray  # bool: no owner matters only for private/known addresses
    known: np.ndarray  # bool: the address has (had) versions in the index

    def take(self, rows: np.ndarray) -> SideLookup:
        """The lookups of the selected flows (a boolean mask or indices)."""
        return SideLookup(self.slot[rows], self.owned[rows], self.private[rows], self.known[rows])


class _Dictionary:
    """Append-only low-cardinality strings: value -> code, with a cached Arrow array."""

    def __init__(self) -> None:
        self.values: list[str] = [""]
        self.codes: dict[str, int] = {"": 0}
        self._arrow: pa.Array | None = None

    def code(self, value: str) -> int:
        code = self.codes.get(value)
        if code is None:
            code = self.codes[value] = len(self.values)
            self.values.append(value)
            self._arrow = None
        return code

    def arrow(self) -> pa.Array:
        if self._arrow is None:
            self._arrow = pa.array(self.values, pa.string())
        return self._arrow

    def value(self, code: int) -> str:
        return self.values[code]

    def __len__(self) -> int:
        return len(self.values)


class _PerRowStrings:
    """Strings with about one distinct value per row (pod names, UIDs), in Arrow chunks: no
    Python object per row. Code 0 is "". Equal strings always share one code (ClickHouse refuses
    an Arrow dictionary holding a value twice), found without a pass over the whole store: a
    sorted array of the strings' hashes is searched for each apply's new strings
    (:meth:`resolve`); codes no row uses any more are dropped by :meth:`compact`."""

    #: Pending Python strings are turned into an Arrow chunk at this count (a replay's apply
    #: adds ~10,000: held as Python strings until a flush, 65,536 of them cost ~14 MB).
    _FLUSH = 8_192

    def __init__(self) -> None:
        self._chunks: list[pa.Array] = [pa.array([""], pa.string())]
        self._size = 1
        self._pending: list[str] = []
        self._combined: pa.Array | None = None
        self._hashes = np.array([hash("")], dtype=np.int64)  # sorted
        self._hash_codes = np.array([0], dtype=np.int32)  # the code of each hash
        self._new: dict[str, int] = {}  # strings added since the last resolve
        self._new_hashes: list[int] = []
        self._first_new = 1

    def code(self, value: str) -> int:
        if not value:
            return 0
        code = self._new.get(value)
        if code is not None:
            return code
        self._pending.append(value)
        code = self._new[value] = self._size + len(self._pending) - 1
        self._new_hashes.append(hash(value))
        if len(self._pending) >= self._FLUSH:
            self.flush()
        return code

    def flush(self) -> None:
        if self._pending:
            self._chunks.append(pa.array(self._pending, pa.string()))
            self._size += len(self._pending)
            self._pending = []
            self._combined = None

    def __len__(self) -> int:
        return self._size + len(self._pending)

    def arrow(self) -> pa.Array:
        self.flush()
        if self._combined is None:
            self._combined = pa.concat_arrays(self._chunks)
            self._chunks = [self._combined]
        return self._combined

    def value(self, code: int) -> str:
        return str(self.arrow()[code].as_py())

    def resolve(self) -> np.ndarray | None:
        """Give the strings added since the last call that were already stored their old code;
        returns a code -> code lookup for the rows just added (None: nothing to change)."""
        if not self._new_hashes:
            return None
        new_hashes = np.array(self._new_hashes, dtype=np.int64)
        new_codes = np.arange(self._first_new, self._first_new + len(new_hashes), dtype=np.int64)
        self._new.clear()
        self._new_hashes = []
        self._first_new = len(self)
        pos = np.searchsorted(self._hashes, new_hashes)
        np.minimum(pos, len(self._hashes) - 1, out=pos)
        same_hash = np.flatnonzero(self._hashes[pos] == new_hashes)
        remap = None
        fresh = np.ones(len(new_hashes), dtype=bool)
        if len(same_hash):  # rare: a name seen before (a StatefulSet pod, a dual-stack pod)
            strings = self.arrow()
            remap = np.arange(len(self), dtype=np.int32)
            for i in same_hash.tolist():
                old, new = int(self._hash_codes[pos[i]]), int(new_codes[i])
                if strings[old].as_py() == strings[new].as_py():
                    remap[new] = old
                    fresh[i] = False
        order = np.argsort(new_hashes[fresh], kind="stable")
        add_hashes, add_codes = new_hashes[fresh][order], new_codes[fresh][order]
        at = np.searchsorted(self._hashes, add_hashes)
        self._hashes = np.insert(self._hashes, at, add_hashes)
        self._hash_codes = np.insert(self._hash_codes, at, add_codes)
        return remap

    def compact(self, codes: np.ndarray) -> np.ndarray | None:
        """When more than half of the stored strings are no row's (``codes``: every row's), drop
        them; returns old code -> new code, or None when nothing was dropped."""
        used = np.zeros(len(self), dtype=bool)
        used[codes] = True
        used[0] = True  # code 0 ("") stays 0
        live = np.flatnonzero(used)
        if len(self) <= 2 * len(live) + 1024:
            return None
        kept = self.arrow().take(pa.array(live))
        remap = np.full(len(self), -1, dtype=np.int32)
        remap[live] = np.arange(len(live), dtype=np.int32)
        self._chunks, self._combined, self._size = [kept], kept, len(live)
        self._first_new = len(live)
        alive = remap[self._hash_codes] >= 0
        self._hashes = self._hashes[alive]
        self._hash_codes = remap[self._hash_codes[alive]]
        return remap


class _Timeline:
    """Rows of (key, valid_from, valid_to, master row), looked up by (key, time).

    Each distinct key (:attr:`unique`, sorted) has a run of rows ``[first, stop)`` sorted by
    ``valid_from``; overlapping rows of one key must already be cut. A lookup finds the key
    (``searchsorted`` over the distinct keys), then the last row of its run starting at or before
    the time with a vectorised binary search bounded by the longest run (a few steps: an address
    has a handful of versions), which touches far less memory than searching all rows.

    ``rows`` maps the timeline's rows to master rows; None means they *are* the master rows
    (:meth:`of_master`: ``valid_from``/``valid_to`` are the index's own arrays, not copies)."""

    def __init__(self, unique: np.ndarray, first: np.ndarray, stop: np.ndarray, valid_from: np.ndarray,
                 valid_to: np.ndarray, rows: np.ndarray | None) -> None:
        self.unique, self.first, self.stop = unique, first.astype(np.int64), stop.astype(np.int64)
        self.valid_from, self.valid_to, self.rows = valid_from, valid_to, rows
        longest = int((self.stop - self.first).max()) if len(unique) else 0
        self.steps = longest.bit_length()
        self.search = _AddressSearch(unique) if unique.dtype == np.dtype("S16") else None
        self.size = int((self.stop - self.first).sum())

    @classmethod
    def of_sorted(cls, keys: np.ndarray, valid_from: np.ndarray, valid_to: np.ndarray,
                  rows: np.ndarray) -> _Timeline:
        """Over ``keys`` (``S<k>``) sorted together with ``valid_from``, each a master row."""
        n = len(keys)
        starts = np.ones(n, dtype=bool)
        if n > 1:
            starts[1:] = keys[1:] != keys[:-1]
        first = np.flatnonzero(starts)
        return cls(keys[first], first, np.append(first[1:], n), valid_from, valid_to,
                   rows.astype(np.int32 if n < 2**31 else np.int64))

    @classmethod
    def of_master(cls, addr: np.ndarray, valid_from: np.ndarray, valid_to: np.ndarray,
                  main: np.ndarray) -> _Timeline:
        """Over the master rows selected by ``main`` (sorted by address, then by ``main`` (False
        first), then by ``valid_from``: an address's selected rows are its last, one run)."""
        n = len(addr)
        start, end = main.copy(), main.copy()
        if n > 1:
            same = addr[1:] == addr[:-1]
            start[1:] &= ~(same & main[:-1])
            end[:-1] &= ~(same & main[1:])
        first = np.flatnonzero(start)
        return cls(addr[first], first, np.flatnonzero(end) + 1, valid_from, valid_to, None)

    def __len__(self) -> int:
        return self.size

    def find(self, queries: np.ndarray, times: np.ndarray, open_only: bool) -> tuple[np.ndarray, np.ndarray]:
        """(master row or -1, key known) per query (``S<k>`` keys)."""
        if len(self.unique) == 0 or len(queries) == 0:
            return np.full(len(queries), -1, dtype=np.int64), np.zeros(len(queries), dtype=bool)
        pos = np.searchsorted(self.unique, queries)
        np.minimum(pos, len(self.unique) - 1, out=pos)
        known = self.unique[pos] == queries
        return self.find_ids(pos, known, times, open_only), known

    def find_ids(self, pos: np.ndarray, known: np.ndarray, times: np.ndarray, open_only: bool) -> np.ndarray:
        """Master row or -1 per query, given the queries' positions in :attr:`unique`."""
        if len(self.unique) == 0 or len(pos) == 0:
            return np.full(len(pos), -1, dtype=np.int64)
        first = self.first[pos]
        lo, hi = first.copy(), self.stop[pos]
        last = len(self.valid_from) - 1
        for _ in range(self.steps):  # lo: first row of the run starting after the time
            mid = (lo + hi) >> 1
            right = (lo < hi) & (self.valid_from[np.minimum(mid, last)] <= times)
            lo = np.where(right, mid + 1, lo)
            hi = np.where(right | (lo >= hi), hi, mid)
        row = np.maximum(lo - 1, 0)
        hit = known & (lo > first) & (times < self.valid_to[row])
        if open_only:
            hit &= self.valid_to[row] == OPEN
        return np.where(hit, row if self.rows is None else self.rows[row], -1)


class _AddressSearch:
    """Sorted distinct addresses searched as two 64-bit words: integer ``searchsorted`` on the
    low words within each run of equal high words (one run for all of IPv4), several times faster
    than comparing ``S16`` strings."""

    def __init__(self, unique: np.ndarray) -> None:
        hi, self.lo = _words(unique.view(np.uint8).reshape(-1, 16))
        self.size = len(unique)
        self.his, starts = np.unique(hi, return_index=True)
        self.starts = starts.astype(np.int64)
        self.ends = np.append(self.starts[1:], self.size)

    def find(self, hi: np.ndarray, lo: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(position, found) of each (hi, lo) address."""
        n = len(hi)
        pos = np.zeros(n, dtype=np.int64)
        known = np.zeros(n, dtype=bool)
        if self.size == 0 or n == 0:
            return pos, known
        if len(self.his) == 1:
            segments = [(np.arange(n), 0)]
            in_run = hi == self.his[0]
        else:
            g = np.searchsorted(self.his, hi)
            np.minimum(g, len(self.his) - 1, out=g)
            in_run = self.his[g] == hi
            rows = np.flatnonzero(in_run)
            order = rows[np.argsort(g[rows], kind="stable")]
            groups, first = np.unique(g[order], return_index=True)
            bounds = np.append(first, len(order))
            segments = [(order[bounds[i]:bounds[i + 1]], int(gi)) for i, gi in enumerate(groups.tolist())]
        for rows, gi in segments:
            start, end = int(self.starts[gi]), int(self.ends[gi])
            lo_run = self.lo[start:end]
            p = np.searchsorted(lo_run, lo[rows])
            np.minimum(p, end - start - 1, out=p)
            pos[rows] = p + start
            known[rows] = lo_run[p] == lo[rows]
        known &= in_run
        return pos, known


def _cut_overlaps(keys: np.ndarray, valid_from: np.ndarray, valid_to: np.ndarray) -> np.ndarray:
    """``valid_to`` with each row ended by the next row of the same key (rows sorted by key, from)."""
    out = valid_to.copy()
    if len(keys) > 1:
        same = keys[1:] == keys[:-1]
        out[:-1] = np.where(same, np.minimum(out[:-1], valid_from[1:]), out[:-1])
    return out


def _cut_overlaps_rows(keys: np.ndarray, valid_from: np.ndarray, valid_to: np.ndarray, rows: np.ndarray,
                       chunk: int = 1 << 16) -> None:
    """:func:`_cut_overlaps` among the master rows selected by the mask ``rows`` (an address's
    selected rows adjacent), in place and a chunk at a time: the same result without full-size
    copies of the rows (the replay's peak memory)."""
    n = len(keys)
    for start in range(0, n - 1, chunk):
        end = min(start + chunk, n - 1)
        a, b = slice(start, end), slice(start + 1, end + 1)
        cut = np.flatnonzero((keys[a] == keys[b]) & rows[a] & rows[b] & (valid_from[b] < valid_to[a])) + start
        valid_to[cut] = valid_from[cut + 1]


def _sort_order(addr: np.ndarray, valid_from: np.ndarray, main: np.ndarray) -> np.ndarray:
    """Order of rows by (address, main, valid_from): integer sort keys, much faster than sorting
    S16. ``main`` is False for host-network rows: they go first, so an address's other rows
    are its last (one run of :meth:`_Timeline.of_master`)."""
    words = addr.view(">u8").reshape(-1, 2).astype(np.uint64)
    return np.lexsort((valid_from, main, words[:, 1], words[:, 0]))


def _distinct_codes(codes: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(index of each code in the distinct codes, distinct codes ascending) of codes < ``size``.
    A dictionary small next to the batch (kinds, namespaces, workloads…) is marked in a mask,
    a few linear passes; a large one (per-row names: a million codes) is sorted instead."""
    if size > 8 * len(codes) + 4096:
        distinct, index = np.unique(codes, return_inverse=True)
        return index, distinct
    used = np.zeros(size, dtype=bool)
    used[codes] = True
    distinct = np.flatnonzero(used)
    position = np.empty(size, dtype=np.int32)
    position[distinct] = np.arange(len(distinct), dtype=np.int32)
    return position[codes], distinct


#: Staged rows merged into one block (:meth:`IdentityIndex._stage`): its int32 columns are
#: 128 KiB, glibc's mmap threshold.
_STAGE_BLOCK_ROWS = 32_768


def _fold(staged: list[dict[str, np.ndarray]], changed: list[np.ndarray],
          start: int = 0) -> tuple[dict[str, list[np.ndarray]], np.ndarray]:
    """The rows of the staged chunks ``start:`` that count, per column a list of parts (of an
    address changed by several chunks, the last chunk's rows), and the distinct addresses those
    chunks changed (sorted). The chunks are removed from ``staged`` as their parts are taken
    (``changed`` is left as it is)."""
    gens = [np.full(len(c), i, dtype=np.int32) for i, c in enumerate(changed[start:])]
    addresses = np.concatenate(changed[start:])
    gen = np.concatenate(gens)
    order = np.lexsort((gen, *reversed(_words(addresses.view(np.uint8).reshape(-1, 16)))))
    addresses, gen = addresses[order], gen[order]
    last = np.ones(len(addresses), dtype=bool)
    last[:-1] = addresses[1:] != addresses[:-1]
    last_addr, last_gen = addresses[last], gen[last]
    parts: dict[str, list[np.ndarray]] = {}
    chunks = staged[start:]
    del staged[start:]
    for i in range(len(chunks)):
        chunk = chunks[i]
        chunks[i] = {}  # a chunk's arrays go as soon as its parts are taken (peak memory)
        if not len(chunk["addr"]):
            continue
        pos = np.searchsorted(last_addr, chunk["addr"])
        rows = last_gen[pos] == i
        whole = bool(rows.all())  # the usual case (a replay): no copy
        for k, v in chunk.items():
            parts.setdefault(k, []).append(v if whole else v[rows])
    return parts, last_addr


class IdentityIndex:
    """Versioned owners indexed by (address, time)."""

    def __init__(self, owners: Iterable[Owner] = (), *, history_ms: int = DEFAULT_HISTORY_MS,
                 release_memory: Callable[[], None] | None = None,
                 private_networks: Iterable[str] = ()) -> None:
        """``private_networks``: CIDRs labelled ``private`` (not looked up in GeoIP) besides the
        RFC 1918/6598/ULA/link-local ranges, e.g. a VPC or node range in public address space."""
        if history_ms <= 0:
            raise ValueError("history_ms must be positive")
        self.history_ms = history_ms
        self._private_bounds = network_bounds(private_networks)
        #: Called when a rebuild has freed a large part of its temporaries: the process shell
        #: gives the allocator's free pages back to the OS there (the staged chunks of a replay
        #: are small allocations in the heap, whose holes are otherwise kept resident while the
        #: rebuild allocates the full-size arrays: the replay's peak).
        self._release_memory = release_memory
        #: Flows older than this (ms) with no owner are late; moves with :meth:`prune`.
        self.horizon_ms = -(2**62)
        self._dicts: dict[str, _Dictionary | _PerRowStrings] = {
            f: _PerRowStrings() if f in _PER_ROW_FIELDS else _Dictionary() for f in ALL_IDENTITY_FIELDS}
        kinds = self._dicts["kind"]
        assert isinstance(kinds, _Dictionary)
        self._kinds = kinds
        self._extra = {f: np.zeros(2, dtype=uids.KEY if f == _UID else np.int32) for f in ALL_IDENTITY_FIELDS}
        self._extra["kind"] = np.array([kinds.code(PRIVATE), kinds.code(EXTERNAL)], dtype=np.int32)
        self.ignored_code = kinds.code(IGNORED)
        self.service_code = kinds.code(SERVICE)
        self.host_network_code = kinds.code(HOST_NETWORK)
        self._port_sets: list[tuple[tuple[int, int], ...]] = [()]
        self._port_codes: dict[tuple[tuple[int, int], ...], int] = {(): 0}
        self._addr = np.zeros(0, dtype="S16")
        self._from = np.zeros(0, dtype=np.int64)
        self._to = np.zeros(0, dtype=np.int64)
        self._ports = np.zeros(0, dtype=np.int32)
        #: Per field: int32 codes of the master rows, then the two "no owner" slots.
        self._codes = {f: self._extra[f].copy() for f in ALL_IDENTITY_FIELDS}
        self._staged: list[dict[str, np.ndarray]] = []
        self._staged_merged = 0  # chunks before this index are merged blocks
        self._staged_changed: list[np.ndarray] = []
        self._master_keep: np.ndarray | None = None
        self._rebuild()
        static = {o.address16(): [Version(OwnerInfo.from_owner(o))] for o in owners}
        if static:
            self.apply(static)

    # -- changes -------------------------------------------------------------------------------

    def apply(self, changes: Changes, *, rebuild: bool = True) -> None:
        """Replace the version lists of the addresses in ``changes`` (None: forget the address).

        Cost: one concatenation and one sort of all rows, so call it with a batch of changes.
        ``rebuild=False`` defers the sort (and leaves lookups stale) until :meth:`rebuild`: a
        replay applies its records in chunks, so it never holds them all as Python objects.
        """
        if not changes:
            return
        changed = np.array(list(changes), dtype="S16")
        n_rows = len(self._addr)
        # Rows are sorted by address (staged changes never touch them): each changed address
        # is one range of them.
        left = np.searchsorted(self._addr, changed, side="left")
        right = np.searchsorted(self._addr, changed, side="right")
        bounds = np.bincount(left, minlength=n_rows + 1) - np.bincount(right, minlength=n_rows + 1)
        keep = np.cumsum(bounds)[:n_rows] == 0
        addrs: list[bytes] = []
        starts: list[int] = []
        ends: list[int] = []
        ports: list[int] = []
        codes: list[list[int] | list[bytes]] = [[] for _ in ALL_IDENTITY_FIELDS]
        uid_store = self._dicts[_UID]
        coders: list[Callable[[str], int] | Callable[[str], bytes]] = [
            (lambda value: uids.key_of(value, uid_store)) if f == _UID else self._dicts[f].code
            for f in ALL_IDENTITY_FIELDS]
        for address, versions in changes.items():
            if len(address) != 16:
                raise ValueError(f"address must be 16 bytes, got {len(address)}")
            for v in versions or ():
                if v.valid_to_ms <= v.valid_from_ms:
                    continue
                addrs.append(address)
                starts.append(v.valid_from_ms)
                ends.append(v.valid_to_ms)
                owner = v.owner
                for column, coder, value in zip(codes, coders, owner.values(), strict=True):
                    column.append(coder(value))  # type: ignore[arg-type]
                hp = owner.host_ports
                if hp:
                    code = self._port_codes.get(hp)
                    if code is None:
                        code = self._port_codes[hp] = len(self._port_sets)
                        self._port_sets.append(hp)
                    ports.append(code)
                else:
                    ports.append(0)
        new = {"addr": np.array(addrs, dtype="S16"), "from": np.array(starts, dtype=np.int64),
               "to": np.array(ends, dtype=np.int64), "ports": np.array(ports, dtype=np.int32)}
        for f, column in zip(ALL_IDENTITY_FIELDS, codes, strict=True):
            new[f] = np.array(column, dtype=uids.KEY if f == _UID else np.int32)
            store = self._dicts[f]
            if isinstance(store, _PerRowStrings):
                remap = store.resolve()
                if remap is not None:
                    new[f] = uids.remap_fallback(new[f], remap) if f == _UID else remap[new[f]]
        if self._staged or not rebuild:
            self._stage(changed, keep, new)
            if rebuild:
                self._rebuild_staged()
            return
        old = {"addr": self._addr[keep], "from": self._from[keep], "to": self._to[keep],
               "ports": self._ports[keep]}
        for f in ALL_IDENTITY_FIELDS:
            old[f] = self._codes[f][:n_rows][keep]
        # Merge instead of sorting everything: the kept rows are sorted and the changed
        # addresses have no rows left among them, so each address's new rows go in as a block.
        order = _sort_order(new["addr"], new["from"], new["kind"] != self.host_network_code)
        at = np.searchsorted(old["addr"], new["addr"][order])
        self._addr = np.insert(old.pop("addr"), at, new["addr"][order])
        self._from = np.insert(old.pop("from"), at, new["from"][order])
        self._to = np.insert(old.pop("to"), at, new["to"][order])
        # np.insert casts the new codes to the old column's dtype: widen a narrowed column first
        self._ports = np.insert(old.pop("ports").astype(np.int32, copy=False), at, new["ports"][order])
        for f in ALL_IDENTITY_FIELDS:
            column = old.pop(f)
            column = column.astype(new[f].dtype, copy=False)
            self._codes[f] = np.concatenate([np.insert(column, at, new[f][order]), self._extra[f]])
        self._rebuild(sort=False)

    def _stage(self, changed: np.ndarray, keep: np.ndarray, new: dict[str, np.ndarray]) -> None:
        """Hold a change for :meth:`rebuild`: the sorted rows only get a "removed" mark, the new
        rows wait in a list (one concatenation and one sort at the end, whatever the chunks).

        Small chunks are merged into blocks of :data:`_STAGE_BLOCK_ROWS` rows as they come: a
        replay chunk's arrays are below glibc's mmap threshold, so thousands of them held until
        the rebuild fragmented the heap (measured on 1M versions: ~80 MB freed by the rebuild
        in holes that the enricher's batches then touched back into the resident set); a
        block's arrays are mmapped and given back whole, and the small chunks' heap space is
        reused by the next ones."""
        self._master_keep = keep if self._master_keep is None else self._master_keep & keep
        self._staged.append(new)
        self._staged_changed.append(changed)
        tail = self._staged[self._staged_merged:]
        if len(tail) > 1 and sum(len(c["addr"]) for c in tail) >= _STAGE_BLOCK_ROWS:
            parts, addresses = _fold(self._staged, self._staged_changed, self._staged_merged)
            block = {k: np.concatenate(v) for k, v in parts.items()} if parts else \
                {k: v[:0] for k, v in new.items()}
            self._staged[self._staged_merged:] = [block]
            self._staged_changed[self._staged_merged:] = [addresses]
            self._staged_merged = len(self._staged)

    def _rebuild_staged(self) -> None:
        """Fold the staged changes in: of an address changed by several, only the last counts."""
        parts, _ = _fold(self._staged, self._staged_changed)
        self._staged, self._staged_merged = [], 0
        n = len(self._addr)
        keep = self._master_keep if self._master_keep is not None else np.ones(n, dtype=bool)
        self._staged_changed, self._master_keep = [], None
        if parts:
            self._addr = np.concatenate([self._addr[keep], *parts.pop("addr")])
            self._released()
            self._from = np.concatenate([self._from[keep], *parts.pop("from")])
            self._released()
            self._to = np.concatenate([self._to[keep], *parts.pop("to")])
            self._released()
            self._ports = np.concatenate([self._ports[keep], *parts.pop("ports")])
            for f in ALL_IDENTITY_FIELDS:
                self._codes[f] = np.concatenate([self._codes[f][:n][keep], *parts.pop(f), self._extra[f]])
                self._released()
        else:
            self._select(keep)
        self._rebuild()
        self._released()

    def _released(self) -> None:
        if self._release_memory is not None:
            self._release_memory()

    def rebuild(self) -> None:
        """Make changes applied with ``rebuild=False`` visible to lookups."""
        if self._staged:
            self._rebuild_staged()
        else:
            self._rebuild()

    def prune(self, now_ms: int) -> int:
        """Forget versions that ended before ``now_ms - history_ms``; returns how many."""
        if self._staged:
            self.rebuild()
        self.horizon_ms = max(self.horizon_ms, now_ms - self.history_ms)
        old = self._to < self.horizon_ms
        dropped = int(old.sum())
        if dropped:
            self._select(~old)
            self._rebuild(sort=False)  # a selection of sorted rows is sorted
        return dropped

    def _select(self, rows: np.ndarray) -> None:
        """Keep the master rows ``rows`` (mask or indices, in the new order)."""
        n = len(self._addr)
        self._addr, self._from, self._to = self._addr[rows], self._from[rows], self._to[rows]
        self._ports = self._ports[rows]
        for f in ALL_IDENTITY_FIELDS:
            column = self._codes[f]
            extra = self._extra[f].astype(column.dtype, copy=False)
            self._codes[f] = np.concatenate([column[:n][rows], extra])

    def _rebuild(self, sort: bool = True) -> None:
        if sort:
            self._select(_sort_order(self._addr, self._from,
                                     self._codes["kind"][: len(self._addr)] != self.host_network_code))
            self._released()
        main = self._codes["kind"][: len(self._addr)] != self.host_network_code
        # A newer version of an address ends the older one (host-network versions overlap the
        # node's by design and are cut only among themselves, per port, below).
        _cut_overlaps_rows(self._addr, self._from, self._to, main)
        nonempty = self._to > self._from
        if not nonempty.all():
            self._select(nonempty)
            main = main[nonempty]
        host = ~main
        self._compact_strings()
        self._narrow_codes()
        for store in self._dicts.values():
            store.arrow()  # per-row strings: one Arrow array now rather than in the first batch
            self._released()
        self._main = _Timeline.of_master(self._addr, self._from, self._to, main)
        self._hosts = self._host_timeline(np.flatnonzero(host & (self._ports > 0)))
        host_addresses = np.unique(self._addr[np.flatnonzero(host)])
        self._host_addresses = _AddressSearch(host_addresses)
        assert self._main.search is not None
        self._host_only = int(np.count_nonzero(~self._main.search.find(*_words(
            host_addresses.view(np.uint8).reshape(-1, 16)))[1])) if len(host_addresses) else 0

    def _host_timeline(self, rows: np.ndarray) -> _Timeline:
        """One row per (host-network version, served port), keyed by address + proto + port."""
        sets = [self._port_sets[c] for c in self._ports[rows].tolist()]
        repeat = np.array([len(s) for s in sets], dtype=np.int64)
        expanded = np.repeat(rows, repeat)
        pairs = np.array([p for s in sets for p in s], dtype=np.int64).reshape(-1, 2)
        keys = np.zeros((len(expanded), 19), dtype=np.uint8)
        keys[:, :16] = self._addr[expanded].view(np.uint8).reshape(-1, 16)
        keys[:, 16] = pairs[:, 0]
        keys[:, 17] = pairs[:, 1] >> 8
        keys[:, 18] = pairs[:, 1] & 0xFF
        skeys = keys.view("S19").ravel()
        order = np.lexsort((self._from[expanded], skeys))
        skeys, expanded = skeys[order], expanded[order]
        valid_from = self._from[expanded]
        valid_to = _cut_overlaps(skeys, valid_from, self._to[expanded])
        return _Timeline.of_sorted(skeys, valid_from, valid_to, expanded)

    def _narrow_codes(self) -> None:
        """Code columns as uint16 while their dictionary has at most 65,536 values (all the
        low-cardinality fields in practice): 2 bytes a row instead of 4, ~12 MB on 1M versions.
        A change adding values beyond that widens the column again (:meth:`apply`)."""
        for f in ALL_IDENTITY_FIELDS:
            if f == _UID:
                continue
            column = self._codes[f]
            dtype = np.dtype(np.uint16) if len(self._dicts[f]) <= 1 << 16 else np.dtype(np.int32)
            if column.dtype != dtype:
                self._codes[f] = column.astype(dtype)
        if self._ports.dtype != np.uint16 and len(self._port_sets) <= 1 << 16:
            self._ports = self._ports.astype(np.uint16)

    def _compact_strings(self) -> None:
        n = len(self._addr)
        for f in _PER_ROW_FIELDS:
            store = self._dicts[f]
            assert isinstance(store, _PerRowStrings)
            if f == _UID:
                remap = store.compact(uids.fallback_codes(self._codes[f][:n]))
                if remap is not None:
                    self._codes[f] = uids.remap_fallback(self._codes[f], remap)
                continue
            remap = store.compact(self._codes[f][:n])
            if remap is not None:
                self._codes[f] = remap[self._codes[f]]

    # -- inspection ----------------------------------------------------------------------------

    @property
    def size(self) -> int:
        """Distinct addresses in the index."""
        return len(self._main.unique) + self._host_only

    @property
    def versions(self) -> int:
        """Versions (rows) in the index."""
        return len(self._addr)

    def versions_of(self, address: bytes) -> list[Version]:
        """The versions of one address, oldest first (for tests and debugging)."""
        rows = np.flatnonzero(self._addr == np.bytes_(address))
        rows = rows[np.argsort(self._from[rows], kind="stable")]
        out = []
        for r in rows:
            values = {f: uids.uid_key_string(bytes(self._codes[f][r]), self._dicts[f]) if f == _UID
                      else self._dicts[f].value(int(self._codes[f][r])) for f in ALL_IDENTITY_FIELDS}
            owner = OwnerInfo(**values, host_ports=self._port_sets[int(self._ports[r])])
            out.append(Version(owner, int(self._from[r]), int(self._to[r])))
        return out

    def kind_values(self) -> list[str]:
        """The kind dictionary (code -> kind), for callers classifying :meth:`codes` of "kind"."""
        return list(self._kinds.values)

    def code_of(self, field_name: str, value: str) -> int:
        """The code of ``value`` in a low-cardinality field's dictionary, -1 if it never occurred."""
        d = self._dicts[field_name]
        if not isinstance(d, _Dictionary):
            raise ValueError(f"{field_name} has no dictionary")
        return d.codes.get(value, -1)

    def codes(self, field_name: str, slot: np.ndarray) -> np.ndarray:
        """The int32 codes of one field for lookup slots."""
        return self._codes[field_name][slot]

    # -- lookup --------------------------------------------------------------------------------

    def lookup(self, addresses: np.ndarray, times_ms: np.ndarray | None = None) -> np.ndarray:
        """Row of the version holding each address at each time, or -1 where none does.

        ``addresses`` is (n, 16) uint8; ``times_ms`` int64 flow times (None: "now", i.e. the
        open versions).
        """
        return self._lookup(addresses, times_ms, None, None)[0]

    def _lookup(self, addresses: np.ndarray, times_ms: np.ndarray | None, ports: np.ndarray | None,
                protos: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        return self._lookup_words(addresses, *_words(addresses), times_ms, ports, protos)

    def _lookup_words(self, addresses: np.ndarray, hi: np.ndarray, lo: np.ndarray,
                      times_ms: np.ndarray | None, ports: np.ndarray | None,
                      protos: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        n = len(addresses)
        if times_ms is None:
            times = np.full(n, OPEN - 1, dtype=np.int64)
        else:
            times = np.asarray(times_ms, dtype=np.int64)
        assert self._main.search is not None
        pos, known = self._main.search.find(hi, lo)
        row = self._main.find_ids(pos, known, times, times_ms is None)
        if len(self._hosts) and ports is not None and protos is not None and n:
            # Only flow ends on an address a hostNetwork pod shares go to the port timeline.
            on_host = np.flatnonzero(self._host_addresses.find(hi, lo)[1])
            if len(on_host):
                keys = np.empty((len(on_host), 19), dtype=np.uint8)
                keys[:, :16] = addresses[on_host]
                keys[:, 16] = np.asarray(protos)[on_host]
                port = np.asarray(ports, dtype=np.uint16)[on_host]
                keys[:, 17] = port >> 8
                keys[:, 18] = port & 0xFF
                host_row, _ = self._hosts.find(keys.view("S19").ravel(), times[on_host], times_ms is None)
                row[on_host] = np.where(host_row >= 0, host_row, row[on_host])
                known[on_host] = True
        return row, known

    def side(self, addresses: np.ndarray, times_ms: np.ndarray | None = None,
             ports: np.ndarray | None = None, protos: np.ndarray | None = None) -> SideLookup:
        """Look up one side of a batch: the owner of each address at each time, refined by the
        flow's port and protocol on addresses hostNetwork pods share (``ports``/``protos``)."""
        hi, lo = _words(addresses)
        row, known = self._lookup_words(addresses, hi, lo, times_ms, ports, protos)
        private = _is_private_words(hi, lo)
        if len(self._private_bounds):
            private |= in_networks(hi, lo, self._private_bounds)
        owned = row >= 0
        slot = np.where(owned, row, np.where(private, self.versions, self.versions + 1))
        return SideLookup(slot, owned, private, known)

    def count(self, side: SideLookup, times_ms: np.ndarray | None, stats: LookupStats) -> np.ndarray:
        """Add one side's outcomes to ``stats``; returns the per-flow "late" mask."""
        n = len(side.slot)
        ignored = int(np.count_nonzero(self._codes["kind"][side.slot] == self.ignored_code))
        stats.flows += n
        stats.owned += int(np.count_nonzero(side.owned)) - ignored
        stats.ignored += ignored
        stats.unknown_private += int(np.count_nonzero(~side.owned & side.private))
        stats.external += int(np.count_nonzero(~side.owned & ~side.private))
        if times_ms is not None and n:
            late = ~side.owned & (side.private | side.known) & (np.asarray(times_ms) < self.horizon_ms)
            stats.late += int(np.count_nonzero(late))
            return late
        return np.zeros(n, dtype=bool)

    def arrow_columns(self, slot: np.ndarray, overrides: Mapping[str, np.ndarray] | None = None,
                      fields: Sequence[str] = ALL_IDENTITY_FIELDS) -> dict[str, pa.DictionaryArray]:
        """The identity columns (keyed by field name) for lookup slots, each with a dictionary
        holding only the values the batch uses. ``overrides`` replaces some fields' codes."""
        # Distinct slots once (a sort of the batch), then per field the distinct codes of those.
        uniq, inverse = np.unique(slot, return_inverse=True)
        out = {}
        for f in fields:
            override = overrides.get(f) if overrides is not None else None
            codes = self._codes[f][uniq] if override is None else override
            store = self._dicts[f]
            if f == _UID:
                index, values = uids.dictionary(codes, store)
            else:
                # Equal strings share one code, so distinct codes are distinct strings:
                # ClickHouse refuses a dictionary with duplicates.
                index, distinct = _distinct_codes(codes, len(store))
                values = store.arrow().take(pa.array(distinct))
            indices = index if override is not None else index[inverse]
            out[f] = pa.DictionaryArray.from_arrays(pa.array(indices.astype(np.int32, copy=False)), values,
                                                    safe=False)  # indices < len(values) by construction
        return out

    def columns(self, addresses: np.ndarray, times_ms: np.ndarray | None = None,
                stats: LookupStats | None = None) -> dict[str, pa.DictionaryArray]:
        """The identity columns (keyed by field name, :data:`ALL_IDENTITY_FIELDS`) for a column of
        addresses at the flows' times; counts go to ``stats`` when given."""
        side = self.side(addresses, times_ms)
        if stats is not None:
            self.count(side, times_ms, stats)
        return self.arrow_columns(side.slot)
