"""Time-aware identity: versions per address, IP reuse, history window, late flows, direction."""

from __future__ import annotations

import itertools

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from enricher.enrich import EnrichStats, enrich_batch
from enricher.identity import OPEN, IdentityIndex, LookupStats, OwnerInfo, Version
from enricher.inventory import Owner
from sensors.schema import address16, build_raw_table

T10 = 1_700_000_000_000  # "10:00"
MIN = 60_000


def _a(*texts: str) -> np.ndarray:
    return np.frombuffer(b"".join(address16(t) for t in texts), dtype=np.uint8).reshape(-1, 16)


OLD = OwnerInfo(kind="pod", namespace="shop", name="cart-old", pod_uid="uid-old", workload="cart",
                workload_kind="Deployment", node="n1")
NEW = OwnerInfo(kind="pod", namespace="shop", name="db-new", pod_uid="uid-new", workload="db",
                workload_kind="StatefulSet", node="n2")


def _reused() -> IdentityIndex:
    index = IdentityIndex()
    index.apply({address16("10.244.1.7"): [Version(OLD, T10 - 60 * MIN, T10), Version(NEW, T10 + 2 * MIN)]})
    return index


def test_ip_reuse_flows_go_to_the_owner_at_flow_time() -> None:
    index = _reused()
    times = np.array([T10 - MIN, T10 + MIN, T10 + 3 * MIN, T10 - 61 * MIN])
    cols = index.columns(_a(*["10.244.1.7"] * 4), times)
    assert cols["name"].to_pylist() == ["cart-old", "", "db-new", ""]
    assert cols["pod_uid"].to_pylist() == ["uid-old", "", "uid-new", ""]
    assert cols["kind"].to_pylist() == ["pod", "private", "pod", "private"]
    # "now" (no times): only the open version
    assert index.columns(_a("10.244.1.7"))["name"].to_pylist() == ["db-new"]


def test_processing_time_does_not_matter_and_prune_keeps_the_window() -> None:
    index = _reused()
    flows = _a("10.244.1.7")
    assert index.prune(T10 + 5 * MIN) == 0  # processed at 10:05: the old pod is still known
    assert index.columns(flows, np.array([T10 - MIN]))["name"].to_pylist() == ["cart-old"]
    assert index.prune(T10 + 61 * MIN) == 1  # an hour after its end it is forgotten
    stats = LookupStats()
    cols = index.columns(flows, np.array([T10 - MIN]), stats)
    assert cols["name"].to_pylist() == [""] and stats.late == 1
    # a flow late by 30 min is still attributed with the default 1 h window
    index = _reused()
    index.prune(T10 + 29 * MIN)
    assert index.columns(flows, np.array([T10 - MIN]))["name"].to_pylist() == ["cart-old"]


def test_apply_replaces_an_address_and_none_forgets_it() -> None:
    index = _reused()
    other = address16("10.244.9.9")
    index.apply({other: [Version(NEW, 0)]})
    assert index.size == 2 and index.versions == 3
    index.apply({address16("10.244.1.7"): None})
    assert index.size == 1
    assert index.versions_of(other) == [Version(NEW, 0, OPEN)]


def test_overlapping_versions_newer_wins() -> None:
    index = IdentityIndex()
    index.apply({address16("10.1.1.1"): [Version(OLD, 0), Version(NEW, T10)]})
    assert [v.valid_to_ms for v in index.versions_of(address16("10.1.1.1"))] == [T10, OPEN]


def test_static_inventory_owners_are_valid_forever() -> None:
    index = IdentityIndex([Owner(ip="10.0.0.1", kind="node", name="n1", node="n1")])
    cols = index.columns(_a("10.0.0.1", "10.0.0.1"), np.array([0, 2**50]))
    assert cols["kind"].to_pylist() == ["node", "node"]


def test_ignored_and_direction_and_stats() -> None:
    index = IdentityIndex()
    svc = OwnerInfo(kind="service", namespace="shop", name="cart", service="cart")
    index.apply({
        address16("10.244.1.7"): [Version(OLD, 0)],
        address16("10.244.2.2"): [Version(OwnerInfo(kind="pod", name="db-0", service="db"), 0)],
        address16("10.96.0.5"): [Version(svc, 0)],
        address16("10.0.0.1"): [Version(OwnerInfo(kind="node", name="n1", node="n1"), 0)],
        address16("10.244.3.3"): [Version(OwnerInfo(kind="ignored"), 0)],
    })
    src = ["10.244.1.7", "10.244.1.7", "81.2.69.160", "10.244.1.7", "10.0.0.1", "10.244.3.3", "10.0.0.1"]
    dst = ["10.244.2.2", "10.96.0.5", "10.244.1.7", "8.8.8.8", "10.244.1.7", "10.244.1.7", "10.96.0.5"]
    raw = build_raw_table({"src_addr": _a(*src), "dst_addr": _a(*dst), "end": np.full(7, T10)})
    stats = EnrichStats()
    out = enrich_batch(raw, index, stats=stats)
    assert out.column("direction").to_pylist() == [
        "pod-to-pod", "pod-to-service", "ingress", "egress", "other", "other", "pod-to-service"]
    assert out.column("dst_service").to_pylist()[0] == "db"  # backend pod listed by an EndpointSlice
    assert stats.sides["src"].ignored == 1 and stats.sides["src"].external == 1
    assert stats.sides["dst"].external == 1 and stats.sides["dst"].owned == 6


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 1000), st.integers(1, 300)), max_size=40),
       st.lists(st.tuples(st.integers(0, 6), st.integers(-10, 1500)), min_size=1, max_size=50))
def test_vectorised_lookup_matches_a_naive_scan(spans: list[tuple[int, int, int]],
                                                probes: list[tuple[int, int]]) -> None:
    by_addr: dict[int, list[Version]] = {}
    for i, (a, start, length) in enumerate(spans):
        by_addr.setdefault(a, []).append(Version(OwnerInfo(name=f"o{i}"), start, start + length))
    # the naive model of the same rule: sorted by start, a newer version cuts the older one
    naive: dict[int, list[Version]] = {}
    for a, vs in by_addr.items():
        vs = sorted(vs, key=lambda v: v.valid_from_ms)
        cut = [Version(v.owner, v.valid_from_ms, min(v.valid_to_ms, nxt.valid_from_ms)) for v, nxt in itertools.pairwise(vs)]
        naive[a] = [*cut, vs[-1]] if vs else []
    index = IdentityIndex()
    index.apply({address16(f"10.0.0.{a}"): vs for a, vs in by_addr.items()})
    names = index.columns(_a(*(f"10.0.0.{a}" for a, _ in probes)), np.array([t for _, t in probes]))["name"].to_pylist()
    expected = []
    for a, t in probes:
        hits = [v.owner.name for v in naive.get(a, []) if v.valid_from_ms <= t < v.valid_to_ms]
        expected.append(hits[-1] if hits else "")
    assert names == expected


def test_equal_names_share_one_dictionary_entry() -> None:
    # a StatefulSet pod recreated under the same name on another address, and re-applied records:
    # the output dictionary never holds a value twice (ClickHouse refuses such a dictionary)
    index = IdentityIndex()
    db = OwnerInfo(kind="pod", namespace="shop", name="db-0", pod_uid="u1")
    index.apply({address16("10.244.1.7"): [Version(db, 0, T10)]})
    index.apply({address16("10.244.2.8"): [Version(OwnerInfo(kind="pod", namespace="shop", name="db-0",
                                                             pod_uid="u2"), T10)]})
    index.apply({address16("10.244.1.7"): [Version(db, 0, T10)]})
    cols = index.columns(_a("10.244.1.7", "10.244.2.8", "10.244.1.7"), np.array([T10 - 1, T10 + 1, T10 - 2]))
    assert cols["name"].to_pylist() == ["db-0", "db-0", "db-0"]
    assert cols["name"].dictionary.to_pylist() == ["db-0"]
    assert cols["pod_uid"].to_pylist() == ["u1", "u2", "u1"]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.tuples(st.integers(0, 6), st.integers(0, 3), st.integers(0, 500),
                                   st.booleans()), max_size=6), min_size=1, max_size=6))
def test_changes_applied_one_by_one_equal_the_final_state_applied_at_once(
        steps: list[list[tuple[int, int, int, bool]]]) -> None:
    # each step replaces some addresses' version lists (or forgets them); names repeat across
    # addresses and steps, so the per-row string store must keep one code per name
    index = IdentityIndex()
    staged = IdentityIndex()  # the replay's way: every step staged, one rebuild at the end
    final: dict[bytes, list[Version] | None] = {}
    for step in steps:
        changes: dict[bytes, list[Version] | None] = {}
        for a, name, start, forget in step:
            key = address16(f"10.0.0.{a}")
            versions = changes.get(key) or []
            changes[key] = None if forget else [*versions, Version(OwnerInfo(name=f"p{name}", pod_uid=f"u{name}"),
                                                                   start, start + 100)]
        index.apply(changes)
        staged.apply(changes, rebuild=False)
        final.update(changes)
    staged.rebuild()
    fresh = IdentityIndex()
    fresh.apply(final)
    probes = [(a, t) for a in range(7) for t in range(0, 700, 25)]
    addresses = _a(*(f"10.0.0.{a}" for a, _ in probes))
    times = np.array([t for _, t in probes])
    want = fresh.columns(addresses, times)
    for other in (index, staged):
        got = other.columns(addresses, times)
        for field in ("name", "pod_uid", "kind"):
            assert got[field].to_pylist() == want[field].to_pylist()
            values = got[field].dictionary.to_pylist()
            assert len(values) == len(set(values))
        assert other.size == fresh.size and other.versions == fresh.versions
