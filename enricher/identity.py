"""Address -> owner lookup for whole columns at once (pure, no I/O).

The index keeps owners sorted by their 16-byte address; a batch of addresses is resolved with one
``np.searchsorted``, and each identity column is produced as a dictionary array whose indices are
a numpy ``take`` of per-owner codes, so no Python runs per flow.

The walking skeleton's owners are static (the inventory file). Time-aware ownership (an IP
reused by another pod) replaces the single owner per address with versions in a later issue;
``lookup`` already takes the flow times for that reason.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from enricher.inventory import Owner
from enricher.schema import IDENTITY_FIELDS

PRIVATE = "private"
EXTERNAL = "external"

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


class IdentityIndex:
    """Owners indexed by address."""

    def __init__(self, owners: Sequence[Owner]) -> None:
        keys = np.array([o.address16() for o in owners], dtype="S16")
        order = np.argsort(keys, kind="stable")
        self._keys = keys[order]
        sorted_owners = [owners[i] for i in order]
        self.size = len(sorted_owners)
        # Per field: the distinct values (a dictionary) and each owner's code in it. Two extra
        # codes at the end stand for "no owner: private" and "no owner: external".
        self._dictionaries: dict[str, pa.Array] = {}
        self._codes: dict[str, np.ndarray] = {}
        for field in IDENTITY_FIELDS:
            values = [str(getattr(o, field)) for o in sorted_owners]
            unowned = [PRIVATE, EXTERNAL] if field == "kind" else ["", ""]
            distinct = sorted(set(values) | set(unowned))
            position = {v: i for i, v in enumerate(distinct)}
            self._dictionaries[field] = pa.array(distinct, pa.string())
            self._codes[field] = np.array(
                [position[v] for v in values] + [position[u] for u in unowned], dtype=np.int32
            )

    def lookup(self, addresses: np.ndarray, times_ms: np.ndarray | None = None) -> np.ndarray:
        """Owner position of each address, or -1 where no owner holds it.

        ``times_ms`` (flow times) is accepted for the time-aware index that replaces this one;
        a static inventory has one owner per address at all times.
        """
        if self.size == 0 or len(addresses) == 0:
            return np.full(len(addresses), -1, dtype=np.int64)
        queries = np.ascontiguousarray(addresses, dtype=np.uint8).view("S16").ravel()
        pos = np.searchsorted(self._keys, queries)
        clipped = np.minimum(pos, self.size - 1)
        return np.where(self._keys[clipped] == queries, clipped, -1)

    def columns(self, addresses: np.ndarray, times_ms: np.ndarray | None = None) -> dict[str, pa.Array]:
        """The identity columns (keyed by field name) for a column of addresses."""
        owner = self.lookup(addresses, times_ms)
        unowned = np.where(is_private(addresses), self.size, self.size + 1)
        slot = np.where(owner >= 0, owner, unowned)
        return {
            field: pa.DictionaryArray.from_arrays(
                pa.array(self._codes[field][slot], pa.int32()), self._dictionaries[field]
            )
            for field in IDENTITY_FIELDS
        }
