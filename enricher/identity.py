"""Time-aware address -> owner lookup for whole columns at once (pure, no I/O).

An address has a list of *versions*: an owner (pod, service ClusterIP, node, hostNetwork pod, or
an ignored object) valid over ``[valid_from_ms, valid_to_ms)``; ``valid_to_ms`` is
:data:`OPEN` (int64 max) while the owner still holds the address. A flow is attributed to the
owner of its address *at the flow's time* (its end time): a pod deleted at 10:00 whose IP another
pod gets at 10:02 keeps the flows of 09:59 even when they are processed at 10:05.

Layout (rebuilt in one go after a batch of changes, never per change or per flow):

- rows sorted by (address, valid_from); per row the owner's fields as integer codes into
  append-only per-field dictionaries, and ``valid_to``;
- the distinct addresses (``S16``, sorted) and each row's address id;
- one ``uint64`` key per row: ``address_id << T | valid_from`` where ``T = 64 - bits(ids)``
  (at least 42 bits: milliseconds up to the year 2109).

A batch lookup is two ``np.searchsorted`` calls: addresses -> address ids, then
``(id << T | flow_time)`` -> the last version starting at or before the flow, accepted when it
belongs to the same address and ends after the flow. No Python runs per flow.

Rules:

- Overlapping versions of one address: a newer version ends the older one (the older version's
  ``valid_to`` is cut to the newer one's ``valid_from``); the watcher never produces overlaps, but
  a replay of two sources (e.g. the static inventory and the topic) might.
- History: versions that ended before ``now - history`` are dropped by :meth:`prune`; a flow with
  no owner at its time that is older than that horizon is counted as *late* (it may have had an
  owner we forgot) when its address is private or known to the index.
- hostNetwork pods share their node's address: the node owns the address (kind ``node``); the
  watcher does not create versions for hostNetwork pods' addresses. Ports could later refine this
  (a listening port -> the hostNetwork pod), which is why the kind ``host-network`` exists.
- Services: a ClusterIP version has kind ``service``; a pod version whose IP an EndpointSlice
  lists as a backend carries the service name(s) in ``service`` (comma-separated), so a flow to
  the backend pod gets ``dst_service`` too.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from enricher.inventory import Owner
from enricher.schema import ALL_IDENTITY_FIELDS

PRIVATE = "private"
EXTERNAL = "external"
IGNORED = "ignored"

#: ``valid_to_ms`` of a version that has not ended.
OPEN = int(np.iinfo(np.int64).max)
#: Default history kept for late flows (1 h).
DEFAULT_HISTORY_MS = 3_600_000

_MIN_TIME_BITS = 42

_V4_MAPPED_PREFIX = np.array([0] * 10 + [0xFF, 0xFF], dtype=np.uint8)
# (network, prefix length) of IPv4 space that is never on the public internet.
_PRIVATE_V4 = [
    ("10.0.0.0", 8), ("172.16.0.0", 12), ("192.168.0.0", 16), ("100.64.0.0", 10),
    ("127.0.0.0", 8), ("169.254.0.0", 16), ("0.0.0.0", 8),
]


def _v4(addr: str) -> int:
    a, b, c, d = (int(x) for x in addr.split("."))
    return (a << 24) | (b << 16) | (c << 8) | d


def is_private(addresses: np.ndarray) -> np.ndarray:
    """Boolean mask of addresses in RFC 1918/6598, loopback, link-local, ULA or unspecified space.

    ``addresses`` is an (n, 16) uint8 array (IPv4 in IPv4-mapped form).
    """
    is_v4 = np.all(addresses[:, :12] == _V4_MAPPED_PREFIX, axis=1)
    v4 = addresses[:, 12:16].copy().view(">u4").ravel().astype(np.uint32)
    private_v4 = np.zeros(len(addresses), dtype=bool)
    for network, length in _PRIVATE_V4:
        mask = np.uint32((0xFFFFFFFF << (32 - length)) & 0xFFFFFFFF)
        private_v4 |= (v4 & mask) == np.uint32(_v4(network))
    first = addresses[:, 0]
    ula = (first & 0xFE) == 0xFC
    link_local = (first == 0xFE) & ((addresses[:, 1] & 0xC0) == 0x80)
    # ::1 and :: (unspecified: what a record that reports no address carries).
    loopback = np.all(addresses[:, :15] == 0, axis=1) & (addresses[:, 15] <= 1)
    return np.where(is_v4, private_v4, ula | link_local | loopback)


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
class _Dictionary:
    values: list[str] = field(default_factory=list)
    codes: dict[str, int] = field(default_factory=dict)

    def code(self, value: str) -> int:
        code = self.codes.get(value)
        if code is None:
            code = self.codes[value] = len(self.values)
            self.values.append(value)
        return code


class IdentityIndex:
    """Versioned owners indexed by (address, time)."""

    def __init__(self, owners: Iterable[Owner] = (), *, history_ms: int = DEFAULT_HISTORY_MS) -> None:
        if history_ms <= 0:
            raise ValueError("history_ms must be positive")
        self.history_ms = history_ms
        #: Flows older than this (ms) with no owner are late; moves with :meth:`prune`.
        self.horizon_ms = -(2**62)
        self._dicts = {f: _Dictionary() for f in ALL_IDENTITY_FIELDS}
        for d in self._dicts.values():
            d.code("")
        self._dicts["kind"].code(PRIVATE)
        self._dicts["kind"].code(EXTERNAL)
        self._ignored_code = self._dicts["kind"].code(IGNORED)
        self._addr = np.zeros(0, dtype="S16")
        self._from = np.zeros(0, dtype=np.int64)
        self._to = np.zeros(0, dtype=np.int64)
        self._codes = np.zeros((0, len(ALL_IDENTITY_FIELDS)), dtype=np.int32)
        self._rebuild()
        static = {o.address16(): [Version(OwnerInfo.from_owner(o))] for o in owners}
        if static:
            self.apply(static)

    # -- changes -------------------------------------------------------------------------------

    def apply(self, changes: Changes) -> None:
        """Replace the version lists of the addresses in ``changes`` (None: forget the address).

        Cost: one concatenation and one sort of all rows, so call it with a batch of changes.
        """
        if not changes:
            return
        changed = np.array(list(changes), dtype="S16")
        keep = ~np.isin(self._addr, changed)
        rows: list[tuple[bytes, int, int, tuple[int, ...]]] = []
        dicts = [self._dicts[f] for f in ALL_IDENTITY_FIELDS]
        for address, versions in changes.items():
            if len(address) != 16:
                raise ValueError(f"address must be 16 bytes, got {len(address)}")
            for v in versions or ():
                if v.valid_to_ms <= v.valid_from_ms:
                    continue
                codes = tuple(d.code(x) for d, x in zip(dicts, v.owner.values(), strict=True))
                rows.append((address, v.valid_from_ms, v.valid_to_ms, codes))
        new_addr = np.array([r[0] for r in rows], dtype="S16")
        new_from = np.array([r[1] for r in rows], dtype=np.int64)
        new_to = np.array([r[2] for r in rows], dtype=np.int64)
        new_codes = np.array([r[3] for r in rows], dtype=np.int32).reshape(-1, len(ALL_IDENTITY_FIELDS))
        self._addr = np.concatenate([self._addr[keep], new_addr])
        self._from = np.concatenate([self._from[keep], new_from])
        self._to = np.concatenate([self._to[keep], new_to])
        self._codes = np.concatenate([self._codes[keep], new_codes])
        self._rebuild()

    def prune(self, now_ms: int) -> int:
        """Forget versions that ended before ``now_ms - history_ms``; returns how many."""
        self.horizon_ms = max(self.horizon_ms, now_ms - self.history_ms)
        old = self._to < self.horizon_ms
        dropped = int(old.sum())
        if dropped:
            keep = ~old
            self._addr, self._from, self._to = self._addr[keep], self._from[keep], self._to[keep]
            self._codes = self._codes[keep]
            self._rebuild()
        return dropped

    def _rebuild(self) -> None:
        order = np.lexsort((self._from, self._addr))
        self._addr, self._from = self._addr[order], self._from[order]
        self._to, self._codes = self._to[order], self._codes[order]
        n = len(self._addr)
        if n > 1:
            # A newer version of an address ends the older one.
            same = self._addr[1:] == self._addr[:-1]
            self._to[:-1] = np.where(same, np.minimum(self._to[:-1], self._from[1:]), self._to[:-1])
            nonempty = self._to > self._from
            if not nonempty.all():
                self._addr, self._from = self._addr[nonempty], self._from[nonempty]
                self._to, self._codes = self._to[nonempty], self._codes[nonempty]
                n = len(self._addr)
        starts = np.ones(n, dtype=bool)
        if n > 1:
            starts[1:] = self._addr[1:] != self._addr[:-1]
        self._ids = (np.cumsum(starts) - 1).astype(np.uint64)
        self._unique = self._addr[starts]
        id_bits = max(1, len(self._unique).bit_length())
        self._time_bits = 64 - id_bits
        if self._time_bits < _MIN_TIME_BITS:
            raise ValueError(f"too many addresses for the index: {len(self._unique)}")
        self._time_max = np.int64((1 << self._time_bits) - 1)
        self._keys = (self._ids << np.uint64(self._time_bits)) | np.clip(
            self._from, 0, self._time_max).astype(np.uint64)
        # Per field: contiguous codes with two extra slots, "no owner: private" and "external".
        self._field_codes: dict[str, np.ndarray] = {}
        for i, f in enumerate(ALL_IDENTITY_FIELDS):
            extra = [self._dicts[f].codes[PRIVATE], self._dicts[f].codes[EXTERNAL]] if f == "kind" else [0, 0]
            self._field_codes[f] = np.concatenate([self._codes[:, i], np.array(extra, dtype=np.int32)])
        self._arrow_dicts = {f: pa.array(self._dicts[f].values, pa.string()) for f in ALL_IDENTITY_FIELDS}

    # -- inspection ----------------------------------------------------------------------------

    @property
    def size(self) -> int:
        """Distinct addresses in the index."""
        return len(self._unique)

    @property
    def versions(self) -> int:
        """Versions (rows) in the index."""
        return len(self._addr)

    def versions_of(self, address: bytes) -> list[Version]:
        """The versions of one address, oldest first (for tests and debugging)."""
        rows = np.flatnonzero(self._addr == np.bytes_(address))
        out = []
        for r in rows:
            codes = zip(ALL_IDENTITY_FIELDS, self._codes[r], strict=True)
            values = [self._dicts[f].values[c] for f, c in codes]
            out.append(Version(OwnerInfo(**dict(zip(ALL_IDENTITY_FIELDS, values, strict=True))),
                               int(self._from[r]), int(self._to[r])))
        return out

    # -- lookup --------------------------------------------------------------------------------

    def lookup(self, addresses: np.ndarray, times_ms: np.ndarray | None = None) -> np.ndarray:
        """Row of the version holding each address at each time, or -1 where none does.

        ``addresses`` is (n, 16) uint8; ``times_ms`` int64 flow times (None: "now", i.e. the
        open versions).
        """
        return self._lookup(addresses, times_ms)[0]

    def _lookup(self, addresses: np.ndarray, times_ms: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        n = len(addresses)
        if len(self._unique) == 0 or n == 0:
            return np.full(n, -1, dtype=np.int64), np.zeros(n, dtype=bool)
        queries = np.ascontiguousarray(addresses, dtype=np.uint8).view("S16").ravel()
        pos = np.searchsorted(self._unique, queries)
        np.minimum(pos, len(self._unique) - 1, out=pos)
        known = self._unique[pos] == queries
        if times_ms is None:
            times = np.full(n, min(int(self._time_max), OPEN - 1), dtype=np.int64)
        else:
            times = np.asarray(times_ms, dtype=np.int64)
        ids = pos.astype(np.uint64)
        keys = (ids << np.uint64(self._time_bits)) | np.clip(times, 0, self._time_max).astype(np.uint64)
        row = np.searchsorted(self._keys, keys, side="right") - 1
        np.maximum(row, 0, out=row)
        hit = known & (self._ids[row] == ids) & (times < self._to[row]) & (times >= self._from[row])
        if times_ms is None:
            hit &= self._to[row] == OPEN
        return np.where(hit, row, -1), known

    def columns(self, addresses: np.ndarray, times_ms: np.ndarray | None = None,
                stats: LookupStats | None = None) -> dict[str, pa.Array]:
        """The identity columns (keyed by field name, :data:`ALL_IDENTITY_FIELDS`) for a column of
        addresses at the flows' times; counts go to ``stats`` when given."""
        row, known = self._lookup(addresses, times_ms)
        private = is_private(addresses)
        owned = row >= 0
        slot = np.where(owned, row, np.where(private, self.versions, self.versions + 1))
        if stats is not None:
            n = len(addresses)
            kinds = self._field_codes["kind"][slot]
            ignored = int(np.count_nonzero(kinds == self._ignored_code))
            stats.flows += n
            stats.owned += int(np.count_nonzero(owned)) - ignored
            stats.ignored += ignored
            stats.unknown_private += int(np.count_nonzero(~owned & private))
            stats.external += int(np.count_nonzero(~owned & ~private))
            if times_ms is not None and len(times_ms):
                late = ~owned & (private | known) & (np.asarray(times_ms) < self.horizon_ms)
                stats.late += int(np.count_nonzero(late))
        return {
            f: pa.DictionaryArray.from_arrays(pa.array(self._field_codes[f][slot], pa.int32()),
                                              self._arrow_dicts[f])
            for f in ALL_IDENTITY_FIELDS
        }
