"""Pod UIDs held as 16-byte keys in the identity index: the output column is the UID text,
whatever its form, and a batch's dictionary never holds a value twice."""

from __future__ import annotations

import uuid

import numpy as np
import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from enricher import uids
from enricher.identity import IdentityIndex, OwnerInfo, Version, _PerRowStrings
from sensors.schema import address16

T = 1_700_000_000_000

# Canonical RFC 4122 UUIDs (what Kubernetes writes) and UIDs that must take the fallback path.
UUIDS = [str(uuid.UUID(int=(i * 0x9E3779B97F4A7C15) << 40 | i, version=4)) for i in range(1, 6)]
OTHERS = ["uid-web-1", UUIDS[0].upper(), "00000000-0000-0000-0000-000000000000",  # nil: not RFC 4122
          "00000000-0000-4000-c000-000000000001",  # variant 110
          f" {UUIDS[1][1:]}", UUIDS[2].replace("-", ""), "é"]
ALL = [*UUIDS, *OTHERS, ""]


def _addresses(*texts: str) -> np.ndarray:
    return np.frombuffer(b"".join(address16(t) for t in texts), dtype=np.uint8).reshape(-1, 16)


def test_uuid_bytes_only_for_canonical_rfc4122_text() -> None:
    for text in UUIDS:
        assert uids.uuid_bytes(text) == uuid.UUID(text).bytes
    for text in OTHERS:
        assert uids.uuid_bytes(text) is None, text


def test_every_form_of_uid_comes_back_as_written() -> None:
    index = IdentityIndex()
    changes = {address16(f"10.1.0.{i}"): [Version(OwnerInfo(name=f"p{i}", pod_uid=uid), T)]
               for i, uid in enumerate(ALL)}
    # a dual-stack pod: the same UID on a second address (one dictionary value)
    changes[address16("fd00::1")] = [Version(OwnerInfo(name="p0", pod_uid=ALL[0]), T)]
    index.apply(changes)
    queries = [f"10.1.0.{i}" for i in range(len(ALL))] + ["fd00::1", "10.1.0.0", "10.9.9.9"]
    column = index.columns(_addresses(*queries), np.full(len(queries), T + 1))["pod_uid"]
    assert column.to_pylist() == [*ALL, ALL[0], ALL[0], ""]
    values = column.dictionary.to_pylist()
    assert sorted(values) == sorted(set(ALL))  # each value once
    for i, uid in enumerate(ALL):
        assert index.versions_of(address16(f"10.1.0.{i}"))[0].owner.pod_uid == uid


def test_uuid_text_is_the_canonical_form() -> None:
    keys = np.array([uuid.UUID(u).bytes for u in UUIDS], dtype=uids.KEY)
    assert uids.uuid_text(keys).to_pylist() == UUIDS
    assert uids.uuid_text(keys[:0]).to_pylist() == []
    # UUIDs and "" (the usual column: pods beside services and outside addresses)
    mixed = np.array([keys[0], b"", keys[1], keys[0]], dtype=uids.KEY)
    index, values = uids.dictionary(mixed, _PerRowStrings())
    assert [values[i].as_py() for i in index] == [UUIDS[0], "", UUIDS[1], UUIDS[0]]
    assert len(values) == 3


@settings(max_examples=30, deadline=None)
@given(st.lists(st.lists(st.tuples(st.integers(0, 5), st.sampled_from(ALL), st.booleans()), max_size=5),
                min_size=1, max_size=5))
def test_changes_keep_uids_and_the_fallback_store_consistent(
        steps: list[list[tuple[int, str, bool]]]) -> None:
    # addresses replaced or forgotten step by step (forgotten fallback strings get compacted
    # away once most are unused); the final columns equal a fresh index's and the truth
    index = IdentityIndex()
    final: dict[bytes, list[Version] | None] = {}
    for step in steps:
        changes: dict[bytes, list[Version] | None] = {}
        for a, uid, forget in step:
            changes[address16(f"10.0.0.{a}")] = None if forget else [Version(OwnerInfo(pod_uid=uid), T)]
        index.apply(changes)
        final.update(changes)
    fresh = IdentityIndex()
    fresh.apply(final)
    addresses = _addresses(*(f"10.0.0.{a}" for a in range(6)))
    times = np.full(6, T + 1)
    want = [(final.get(address16(f"10.0.0.{a}")) or [Version(OwnerInfo())])[0].owner.pod_uid for a in range(6)]
    for other in (index, fresh):
        got = other.columns(addresses, times)["pod_uid"]
        assert got.to_pylist() == want
        assert isinstance(got, pa.DictionaryArray)
        values = got.dictionary.to_pylist()
        assert len(values) == len(set(values))


def test_fallback_store_is_compacted_when_most_strings_are_forgotten() -> None:
    index = IdentityIndex()
    many = {address16(f"10.2.{i // 250}.{i % 250}"): [Version(OwnerInfo(pod_uid=f"uid-{i}"), T)]
            for i in range(3000)}
    index.apply(many)
    keep = address16("10.2.11.249")  # uid-2999
    index.apply({a: None for a in many if a != keep})
    index.apply({address16("10.3.0.1"): [Version(OwnerInfo(pod_uid="uid-new"), T)]})
    store = index._dicts["pod_uid"]
    assert isinstance(store, _PerRowStrings) and len(store) < 100  # compacted (it held 3,000 strings)
    got = index.columns(_addresses("10.2.11.249", "10.3.0.1"), np.full(2, T + 1))["pod_uid"]
    assert got.to_pylist() == ["uid-2999", "uid-new"]


def test_keys_whose_hashes_collide_stay_apart() -> None:
    # two UUIDs built so that the 64-bit mix of their words is equal
    mix = int(uids._MIX)
    w1a, w1b = 0x80, 0x81  # byte 8 (the low byte of the second word): RFC 4122 variant
    w0a = 0x0123456789ABCDEF
    w0b = w0a ^ ((w1a * mix) % 2**64) ^ ((w1b * mix) % 2**64)
    keys = np.array([w0a, w1a, w0b, w1b, w0a, w1a, 0, 0], dtype=np.uint64).view(uids.KEY)
    words = keys.view(np.uint64).reshape(-1, 2)
    assert len(set((words[:, 0] ^ (words[:, 1] * uids._MIX)).tolist()[:2])) == 1  # they do collide
    index, values = uids.dictionary(keys, _PerRowStrings())
    texts = [str(uuid.UUID(bytes=k.ljust(16, b"\0"))) for k in keys.tolist()[:2]]
    assert [values[i].as_py() for i in index] == [*texts, texts[0], ""]
    assert len(set(values.to_pylist())) == len(values) == 3
