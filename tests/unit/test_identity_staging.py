"""A replay's staged chunks (merged into blocks as they come) give the index a single apply of
the final state gives."""

from __future__ import annotations

import random

import numpy as np

from enricher import identity
from enricher.identity import IdentityIndex, OwnerInfo, Version
from sensors.schema import address16

T = 1_700_000_000_000


def _versions(rng: random.Random, a: int, generation: int) -> list[Version]:
    return [Version(OwnerInfo(name=f"p{a}-{generation}-{k}", pod_uid=f"u{a}-{generation}-{k}",
                              workload=f"w{a % 7}", node=f"n{a % 3}"), T + k * 1000, T + k * 1000 + 900)
            for k in range(rng.randint(1, 5))]


def test_staged_replay_across_merged_blocks_equals_the_final_state() -> None:
    rng = random.Random(7)
    addresses = 20_000
    # ~3 versions an address, in chunks of 1,000 addresses: several merged blocks; addresses come
    # back in later chunks (a later record replaces an earlier one) or are forgotten
    chunks: list[dict[bytes, list[Version] | None]] = []
    final: dict[bytes, list[Version] | None] = {}
    order = list(range(addresses)) + rng.sample(range(addresses), 10_000)
    for start in range(0, len(order), 1_000):
        chunk: dict[bytes, list[Version] | None] = {}
        for a in order[start:start + 1_000]:
            key = address16(f"10.{a >> 16}.{(a >> 8) & 255}.{a & 255}")
            chunk[key] = None if rng.random() < 0.05 else _versions(rng, a, start)
        chunks.append(chunk)
        final.update(chunk)
    rows = sum(len(v or ()) for c in chunks for v in c.values())
    assert rows > 2 * identity._STAGE_BLOCK_ROWS  # the merge happens more than once
    staged = IdentityIndex()
    for chunk in chunks:
        staged.apply(chunk, rebuild=False)
    assert len(staged._staged) < len(chunks)  # merged as they came
    staged.rebuild()
    fresh = IdentityIndex()
    fresh.apply(final)
    assert staged.versions == fresh.versions and staged.size == fresh.size
    probes = [(a, T + k * 1000 + 450) for a in range(0, addresses, 23) for k in range(5)]
    queries = np.frombuffer(b"".join(address16(f"10.{a >> 16}.{(a >> 8) & 255}.{a & 255}") for a, _ in probes),
                            dtype=np.uint8).reshape(-1, 16)
    times = np.array([t for _, t in probes])
    want, got = fresh.columns(queries, times), staged.columns(queries, times)
    for field in ("name", "pod_uid", "workload", "node", "kind"):
        assert got[field].to_pylist() == want[field].to_pylist()
    # and against the records themselves
    names = want["name"].to_pylist()
    for (a, t), name in zip(probes, names, strict=True):
        versions = final[address16(f"10.{a >> 16}.{(a >> 8) & 255}.{a & 255}")] or []
        expect = [v.owner.name for v in versions if v.valid_from_ms <= t < v.valid_to_ms]
        assert [name] == (expect or [""])


def test_code_columns_narrowed_then_widened_past_65536_values() -> None:
    # 60,000 workloads (uint16 codes), then 10,000 more through each path: a merge of a
    # small change and a staged chunk; every code still names its own workload
    def versions(lo: int, hi: int) -> dict[bytes, list[Version] | None]:
        return {address16(f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}"): [Version(OwnerInfo(workload=f"w{i}"), T)]
                for i in range(lo, hi)}

    merged, staged = IdentityIndex(), IdentityIndex()
    for index in (merged, staged):
        index.apply(versions(0, 60_000))
        assert index._codes["workload"].dtype == np.uint16
    merged.apply(versions(60_000, 70_000))
    staged.apply(versions(60_000, 70_000), rebuild=False)
    staged.rebuild()
    probes = [*range(0, 70_000, 97), 65_535, 65_536, 65_537, 69_999]
    queries = np.frombuffer(b"".join(address16(f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}") for i in probes),
                            dtype=np.uint8).reshape(-1, 16)
    for index in (merged, staged):
        assert index._codes["workload"].dtype == np.int32
        got = index.columns(queries, np.full(len(probes), T + 1))["workload"].to_pylist()
        assert got == [f"w{i}" for i in probes]
