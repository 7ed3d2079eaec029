"""Pod UIDs held as 16 bytes per identity row instead of 36-character strings (pure).

Kubernetes UIDs are random RFC 4122 UUIDs written in canonical lowercase form; with a million
historical versions, their text, its offsets and the hashes that kept equal strings under one
code cost ~56 bytes a row, the 16 bytes of the UUID 16. A batch's output column is formatted
from the UIDs it uses (:meth:`UidStore.arrow`), vectorised.

A row's 16-byte *key*:

- all zero: no UID ("");
- an RFC 4122 UUID (variant bits ``10`` in byte 8) whose canonical lowercase text is the UID:
  its bytes;
- anything else (a non-UUID UID, upper case, another variant, the nil UUID): byte 8 is ``0x01``
  (a variant no stored UUID has, so the two never collide) and bytes 12-15 the big-endian code
  of the string in a :class:`enricher.identity._PerRowStrings`-like fallback store.

Equal UIDs have equal keys, so distinct keys are distinct strings (ClickHouse refuses an Arrow
dictionary holding a value twice).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import pyarrow as pa

KEY = np.dtype("S16")
_FALLBACK_MARK = 0x01
#: Byte value -> its two hex digits (as one uint16 in memory order).
_HEX_PAIRS = np.frombuffer(b"".join(f"{b:02x}".encode() for b in range(256)), dtype=np.uint16)
#: The five groups of hex digits of a UUID, in the 32 digits and in the 36-character text: a
#: whole column of them is moved with one record assignment (not five strided 2-D copies).
_GROUP_NAMES = ["g0", "g1", "g2", "g3", "g4"]
_GROUP_FORMATS = ["S8", "S4", "S4", "S4", "S12"]
_DIGITS = np.dtype({"names": _GROUP_NAMES, "formats": _GROUP_FORMATS, "offsets": [0, 8, 12, 16, 20],
                    "itemsize": 32})
_TEXT = np.dtype({"names": _GROUP_NAMES, "formats": _GROUP_FORMATS, "offsets": [0, 9, 14, 19, 24],
                  "itemsize": 36})


class FallbackStore(Protocol):
    """Strings by code (code 0 is ""), equal strings sharing one code."""

    def code(self, value: str) -> int: ...

    def arrow(self) -> pa.Array: ...

    def value(self, code: int) -> str: ...


def uuid_bytes(uid: str) -> bytes | None:
    """The 16 bytes of ``uid`` when it is a canonical lowercase RFC 4122 UUID, else None."""
    if len(uid) != 36 or uid[8] != "-" or uid[13] != "-" or uid[18] != "-" or uid[23] != "-":
        return None
    try:
        raw = bytes.fromhex(uid[:8] + uid[9:13] + uid[14:18] + uid[19:23] + uid[24:])
    except ValueError:
        return None
    if len(raw) != 16 or raw[8] & 0xC0 != 0x80:
        return None
    h = raw.hex()
    # fromhex accepts upper case and whitespace: only the canonical text round-trips
    if f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}" != uid:
        return None
    return raw


def fallback_key(code: int) -> bytes:
    """The key of fallback string ``code``."""
    return bytes(8) + bytes([_FALLBACK_MARK]) + bytes(3) + code.to_bytes(4, "big")


def key_of(uid: str, fallback: FallbackStore) -> bytes:
    """The 16-byte key of one UID (a non-UUID UID goes into ``fallback``)."""
    if not uid:
        return bytes(16)
    raw = uuid_bytes(uid)
    return raw if raw is not None else fallback_key(fallback.code(uid))


def _matrix(keys: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(keys).view(np.uint8).reshape(-1, 16)


def fallback_codes(keys: np.ndarray) -> np.ndarray:
    """Per key: its fallback code, 0 when the key is a UUID or empty."""
    m = _matrix(keys)
    codes = m[:, 12:16].copy().view(">u4").ravel().astype(np.int64)
    return np.where(m[:, 8] == _FALLBACK_MARK, codes, 0)


def remap_fallback(keys: np.ndarray, remap: np.ndarray) -> np.ndarray:
    """``keys`` with their fallback codes replaced by ``remap[code]`` (a compaction's map)."""
    out = np.array(keys, dtype=KEY)
    m = out.view(np.uint8).reshape(-1, 16)
    rows = np.flatnonzero(m[:, 8] == _FALLBACK_MARK)
    if len(rows):
        new = remap[fallback_codes(out[rows])].astype(">u4")
        m[rows, 12:16] = new.view(np.uint8).reshape(-1, 4)
    return out


def uid_key_string(key: bytes, fallback: FallbackStore) -> str:
    """The UID of one key (for inspection)."""
    key = key.ljust(16, b"\x00")  # numpy strips trailing NULs from S16 items
    if key[8] == _FALLBACK_MARK:
        return fallback.value(int.from_bytes(key[12:16], "big"))
    if not any(key):
        return ""
    h = key.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def uuid_text(keys: np.ndarray) -> pa.Array:
    """Canonical UUID strings of UUID keys, vectorised (one 36-byte text per key)."""
    m = _matrix(keys)
    n = len(m)
    text = np.full((n, 36), ord("-"), dtype=np.uint8)  # the dashes stay where no group goes
    text.view(_TEXT).ravel()[...] = _HEX_PAIRS[m].view(_DIGITS).ravel()  # (n, 32) hex digits
    offsets = np.arange(0, 36 * (n + 1), 36, dtype=np.int32)
    return pa.Array.from_buffers(pa.string(), n, [None, pa.py_buffer(offsets), pa.py_buffer(text)])


def strings(keys: np.ndarray, fallback: FallbackStore) -> pa.Array:
    """The UID strings of *distinct* keys, in order."""
    m = _matrix(keys)
    words = m.view(np.uint64).reshape(-1, 2)
    is_uuid = (m[:, 8] & 0xC0) == 0x80
    if is_uuid.all():
        return uuid_text(m)
    empty = (words[:, 0] | words[:, 1]) == 0
    if (is_uuid | empty).all():  # the usual case: UUIDs and "" (services, nodes, outside)
        text = uuid_text(m[is_uuid])
        offsets = np.zeros(len(m) + 1, dtype=np.int32)
        np.cumsum(np.where(is_uuid, 36, 0), out=offsets[1:])
        return pa.Array.from_buffers(pa.string(), len(m), [None, pa.py_buffer(offsets), text.buffers()[2]])
    return pa.array([uid_key_string(k.tobytes(), fallback) for k in m], pa.string())  # rare: fallback UIDs


#: Multiplier mixing a key's two 64-bit words into one hash (odd: a bijection of the low word).
_MIX = np.uint64(0x9E3779B97F4A7C15)


def dictionary(keys: np.ndarray, fallback: FallbackStore) -> tuple[np.ndarray, pa.Array]:
    """(index per key into the dictionary, dictionary of the distinct UIDs) of a column of keys.

    Keys are told apart by a 64-bit hash of their two words (Arrow's hash table on integers,
    several times faster than on 16-byte binaries), checked against the keys themselves: a
    collision falls back to encoding the 16-byte values."""
    m = _matrix(keys)
    words = m.view(np.uint64).reshape(-1, 2)
    encoded = pa.array(words[:, 0] ^ (words[:, 1] * _MIX)).dictionary_encode()
    index = encoded.indices.to_numpy()
    first = np.empty(len(encoded.dictionary), dtype=np.int64)
    first[index[::-1]] = np.arange(len(index) - 1, -1, -1)  # each value's first key
    same = first[index]
    if not ((words[same, 0] == words[:, 0]) & (words[same, 1] == words[:, 1])).all():
        binary = pa.Array.from_buffers(pa.binary(16), len(m), [None, pa.py_buffer(m)]).dictionary_encode()
        index = binary.indices.to_numpy()
        first = np.empty(len(binary.dictionary), dtype=np.int64)
        first[index[::-1]] = np.arange(len(index) - 1, -1, -1)
    return index, strings(np.ascontiguousarray(keys, dtype=KEY)[first], fallback)
