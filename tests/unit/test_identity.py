"""Identity lookup and enrichment on whole columns."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import numpy as np
import pytest

from enricher.enrich import enrich_batch
from enricher.identity import IdentityIndex, is_private
from enricher.inventory import InventoryError, Owner, load_inventory
from enricher.schema import ENRICHED_SCHEMA
from enricher.settings import EnricherSettings
from flowtally.settings import SettingsError, load_settings
from sensors.schema import address16, build_raw_table

OWNERS = [
    Owner(ip="10.244.1.7", namespace="shop", name="cart-7d9c6-x2x1q", workload="cart",
          workload_kind="Deployment", service="cart", node="node-1"),
    Owner(ip="10.244.2.9", namespace="shop", name="db-0", workload="db", workload_kind="StatefulSet",
          node="node-2"),
    Owner(ip="10.96.0.10", kind="service", namespace="kube-system", name="kube-dns", service="kube-dns"),
    Owner(ip="10.0.0.1", kind="node", name="node-1", node="node-1"),
    Owner(ip="fd00:10:244::5", namespace="v6", name="web-1", workload="web", workload_kind="Deployment"),
]


def _addresses(*texts: str) -> np.ndarray:
    return np.frombuffer(b"".join(address16(t) for t in texts), dtype=np.uint8).reshape(-1, 16)


def test_lookup_finds_each_owner_and_nothing_else() -> None:
    index = IdentityIndex(OWNERS)
    probes = [o.ip for o in OWNERS] + ["10.244.1.8", "0.0.0.0", "255.255.255.255", "::", "8.8.8.8"]
    found = index.lookup(_addresses(*probes))
    assert (found[: len(OWNERS)] >= 0).all()
    assert (found[len(OWNERS):] == -1).all()


def test_private_and_external_classification() -> None:
    cases = {
        "10.1.2.3": True, "172.16.0.1": True, "172.32.0.1": False, "192.168.9.9": True,
        "100.64.0.1": True, "100.128.0.1": False, "127.0.0.1": True, "169.254.1.1": True,
        "8.8.8.8": False, "81.2.69.160": False, "fd12::1": True, "fe80::1": True, "::1": True,
        "2001:218::1": False, "::": True, "0.0.0.0": True,
    }
    mask = is_private(_addresses(*cases))
    assert dict(zip(cases, mask.tolist(), strict=True)) == cases


def test_configured_private_ranges() -> None:
    """Node or VPC ranges in public space are labelled private when unowned (and so never looked
    up in GeoIP); an owned address in them is still its owner; the edges of each range count."""
    index = IdentityIndex(OWNERS, private_networks=["203.0.113.0/24", "2001:db8::/32", "10.0.0.1/32"])
    probes = {"203.0.113.0": "private", "203.0.113.255": "private", "203.0.114.0": "external",
              "203.0.112.255": "external", "2001:db8::": "private", "2001:db8:ffff:ffff:ffff:ffff:ffff:ffff": "private",
              "2001:db9::": "external", "10.0.0.1": "node", "8.8.8.8": "external", "10.9.9.9": "private"}
    raw = build_raw_table({"src_addr": _addresses(*probes), "dst_addr": _addresses(*probes),
                           "end": np.full(len(probes), 1_700_000_000_000)})
    out = enrich_batch(raw, index)
    assert dict(zip(probes, out.column("src_kind").to_pylist(), strict=True)) == probes
    with pytest.raises(ValueError, match="does not appear to be"):
        IdentityIndex(private_networks=["not-a-cidr"])


def test_private_cidrs_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLOWTALLY_PRIVATE_CIDRS", "203.0.113.0/24, 2001:db8::/32")
    assert load_settings(EnricherSettings).private_cidrs == ["203.0.113.0/24", "2001:db8::/32"]
    monkeypatch.setenv("FLOWTALLY_PRIVATE_CIDRS", "203.0.113.0/24,nope")
    with pytest.raises(SettingsError, match="FLOWTALLY_PRIVATE_CIDRS"):
        load_settings(EnricherSettings)


def test_enrich_batch_labels_both_sides() -> None:
    src = ["10.244.1.7", "10.244.2.9", "81.2.69.160", "fd00:10:244::5", "10.9.9.9"]
    dst = ["10.96.0.10", "10.244.1.7", "10.244.1.7", "2001:218::1", "10.0.0.1"]
    raw = build_raw_table({"src_addr": _addresses(*src), "dst_addr": _addresses(*dst),
                           "bytes": np.arange(5), "end": np.full(5, 1_700_000_000_000)})
    out = enrich_batch(raw, IdentityIndex(OWNERS))
    assert out.schema.equals(ENRICHED_SCHEMA, check_metadata=False)
    rows = out.to_pylist()
    assert [(r["src_kind"], r["src_workload"], r["dst_kind"], r["dst_namespace"], r["dst_name"]) for r in rows] == [
        ("pod", "cart", "service", "kube-system", "kube-dns"),
        ("pod", "db", "pod", "shop", "cart-7d9c6-x2x1q"),
        ("external", "", "pod", "shop", "cart-7d9c6-x2x1q"),
        ("pod", "web", "external", "", ""),
        ("private", "", "node", "", "node-1"),
    ]
    assert [r["bytes"] for r in rows] == [0, 1, 2, 3, 4]
    assert [str(ipaddress.IPv6Address(r["src_addr"]).ipv4_mapped or ipaddress.IPv6Address(r["src_addr"]))
            for r in rows] == src


def test_empty_index_and_empty_batch() -> None:
    out = enrich_batch(build_raw_table({"src_addr": _addresses("8.8.8.8")}), IdentityIndex([]))
    assert out.column("src_kind").to_pylist() == ["external"]
    assert out.column("dst_kind").to_pylist() == ["private"]  # "::", no address reported
    assert enrich_batch(build_raw_table({}), IdentityIndex(OWNERS)).num_rows == 0


def test_inventory_errors_name_the_entry(tmp_path: Path) -> None:
    path = tmp_path / "inv.yaml"
    path.write_text("owners:\n  - ip: 10.0.0.1\n  - ip: 10.0.0.1\n")
    with pytest.raises(InventoryError, match="appears twice"):
        load_inventory(path)
    path.write_text("owners:\n  - ip: 10.0.0.300\n")
    with pytest.raises(InventoryError, match=r"owners\.0\.ip"):
        load_inventory(path)
    path.write_text("owners:\n  - ip: 10.0.0.1\n    colour: blue\n")
    with pytest.raises(InventoryError, match="colour"):
        load_inventory(path)
    with pytest.raises(InventoryError, match="does not exist"):
        load_inventory(tmp_path / "missing.yaml")
