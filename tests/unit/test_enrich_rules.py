"""The enricher's rules beyond the plain lookup: service attribution through DNAT (nat_addr),
hostNetwork pods by port, one observation per connection, and the counts (stats and
completeness rows of stage "enricher"), with exact expected identities and counts."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from enricher.enrich import EnrichStats, ObservedNodes, enrich_batch
from enricher.identity import IdentityIndex, OwnerInfo, Version
from sensors.completeness import CompletenessAccumulator
from sensors.schema import address16, build_raw_table

T = 1_700_000_000_000
MIN = 60_000
TCP, UDP = 6, 17

CLIENT = OwnerInfo(kind="pod", namespace="shop", name="web-1", pod_uid="u-web", workload="web",
                   workload_kind="Deployment", node="node-a", labels='{"app":"web","team":"shop"}')
BACKEND = OwnerInfo(kind="pod", namespace="shop", name="api-1", pod_uid="u-api", workload="api",
                    workload_kind="Deployment", service="api,api-v2", node="node-b")
FAR = OwnerInfo(kind="pod", namespace="batch", name="job-1", workload="job", node="node-c")
API = OwnerInfo(kind="service", namespace="shop", name="api", service="api")
EXPORTER = OwnerInfo(kind="host-network", namespace="monitoring", name="node-exporter-b",
                     workload="node-exporter", workload_kind="DaemonSet", node="node-b",
                     host_ports=((TCP, 9100),))
DNS = OwnerInfo(kind="host-network", namespace="kube-system", name="dns-b", node="node-b",
                host_ports=((UDP, 53), (TCP, 53)))

IPS = {"client": "10.244.1.5", "backend": "10.244.2.7", "far": "10.244.3.3", "api": "10.96.0.10",
       "node-a": "10.0.0.1", "node-b": "10.0.0.2", "unknown": "10.244.9.9", "google": "8.8.8.8",
       "router": "192.0.2.1", "old-api": "10.96.0.99", "ignored": "10.244.4.4", "none": "::"}


def _index() -> IdentityIndex:
    index = IdentityIndex()
    node = {n: OwnerInfo(kind="node", name=n, node=n) for n in ("node-a", "node-b")}
    index.apply({
        address16(IPS["client"]): [Version(CLIENT, T - 60 * MIN)],
        address16(IPS["backend"]): [Version(BACKEND, T - 60 * MIN)],
        address16(IPS["far"]): [Version(FAR, T - 60 * MIN)],
        address16(IPS["api"]): [Version(API, T - 600 * MIN)],
        address16(IPS["node-a"]): [Version(node["node-a"], 0)],
        # the node, a hostNetwork exporter since T-10min, and a DNS pod that ran until T-5min
        address16(IPS["node-b"]): [Version(node["node-b"], 0), Version(EXPORTER, T - 10 * MIN),
                                   Version(DNS, T - 60 * MIN, T - 5 * MIN)],
    })
    return index


def _a(names: list[str]) -> np.ndarray:
    return np.frombuffer(b"".join(address16(IPS[n]) for n in names), np.uint8).reshape(-1, 16)


def _raw(rows: list[dict[str, object]]) -> pa.Table:
    """A raw.v1 table from rows of named ends (unset: "none"/0/T/"")."""
    def col(key: str, default: object) -> list[object]:
        return [r.get(key, default) for r in rows]
    return build_raw_table({
        "src_addr": _a(col("src", "none")), "dst_addr": _a(col("dst", "none")),  # type: ignore[arg-type]
        "nat_addr": _a(col("nat", "none")), "exporter": _a(col("exporter", "router")),  # type: ignore[arg-type]
        "observation_domain": np.array(col("domain", 0)),
        "src_port": np.array(col("sport", 40000)), "dst_port": np.array(col("dport", 80)),
        "proto": np.array(col("proto", TCP)), "initiator": np.array(col("init", 0)),
        "observer": col("observer", ""), "end": np.array(col("end", T)), "bytes": np.array(col("bytes", 100)),
    })


def test_dnat_service_goes_to_the_service_side_and_the_pod_stays_the_backend() -> None:
    raw = _raw([
        # conntrack, initiator's direction: client -> backend, addressed the ClusterIP
        {"src": "client", "dst": "backend", "nat": "api", "init": 1},
        # its reply record: backend -> client
        {"src": "backend", "dst": "client", "sport": 80, "dport": 40000, "nat": "api", "init": 2},
        # the backend addressed directly (no translation): keeps its EndpointSlice services
        {"src": "client", "dst": "backend", "init": 1},
        # translated to a node address (a NodePort): not a service, nothing attributed
        {"src": "client", "dst": "backend", "nat": "node-a", "init": 1},
        # a ClusterIP flow seen before DNAT (NetFlow): the service is the dst itself
        {"src": "client", "dst": "api"},
    ])
    stats = EnrichStats()
    out = enrich_batch(raw, _index(), stats=stats).to_pydict()
    assert out["dst_name"] == ["api-1", "web-1", "api-1", "api-1", "api"]
    assert out["dst_pod_uid"] == ["u-api", "u-web", "u-api", "u-api", ""]
    web = '{"app":"web","team":"shop"}'
    assert out["src_labels"] == [web, "", web, web, web]
    assert out["dst_labels"] == ["", web, "", "", ""]
    assert out["dst_service"] == ["api", "", "api,api-v2", "api,api-v2", "api"]
    assert out["src_name"] == ["web-1", "api-1", "web-1", "web-1", "web-1"]
    assert out["src_service"] == ["", "api", "", "", ""]
    assert out["nat_service"] == ["api", "api", "", "", ""]
    assert out["nat_namespace"] == ["shop", "shop", "", "", ""]
    assert out["direction"] == ["pod-to-pod", "pod-to-pod", "pod-to-pod", "pod-to-pod", "pod-to-service"]
    assert stats.nat_service == 2


def test_dnat_lookup_is_time_aware() -> None:
    index = _index()
    # the ClusterIP 10.96.0.99 belonged to "old-api" until T-1min, then to nobody
    index.apply({address16("10.96.0.99"): [Version(OwnerInfo(kind="service", namespace="shop", name="old-api",
                                                                service="old-api"), T - 60 * MIN, T - MIN)]})
    raw = _raw([{"src": "client", "dst": "backend", "nat": "old-api", "init": 1, "end": T - 2 * MIN},
                {"src": "client", "dst": "backend", "nat": "old-api", "init": 1, "end": T}])
    out = enrich_batch(raw, index).to_pydict()
    assert out["nat_service"] == ["old-api", ""]
    assert out["dst_service"] == ["old-api", "api,api-v2"]


def test_host_network_pod_by_port_and_protocol_otherwise_the_node() -> None:
    raw = _raw([
        {"src": "client", "dst": "node-b", "dport": 9100},                    # the exporter
        {"src": "client", "dst": "node-b", "dport": 9101},                    # another port: node
        {"src": "client", "dst": "node-b", "dport": 9100, "proto": UDP},      # other protocol: node
        {"src": "node-b", "dst": "client", "sport": 9100, "dport": 40000},    # the reply: src side
        {"src": "client", "dst": "node-b", "dport": 9100, "end": T - 20 * MIN},  # before it started
        {"src": "client", "dst": "node-b", "dport": 53, "proto": UDP, "end": T - 6 * MIN},  # DNS ran
        {"src": "client", "dst": "node-b", "dport": 53, "proto": TCP, "end": T - 6 * MIN},
        {"src": "client", "dst": "node-b", "dport": 53, "proto": UDP},        # DNS pod gone: node
        {"src": "client", "dst": "node-a", "dport": 9100},                    # other node
    ])
    out = enrich_batch(raw, _index()).to_pydict()
    assert out["dst_name"] == ["node-exporter-b", "node-b", "node-b", "web-1", "node-b", "dns-b", "dns-b",
                               "node-b", "node-a"]
    assert out["dst_kind"] == ["host-network", "node", "node", "pod", "node", "host-network",
                               "host-network", "node", "node"]
    assert out["src_name"][3] == "node-exporter-b" and out["src_kind"][3] == "host-network"
    assert out["dst_workload"][0] == "node-exporter" and out["dst_node"][0] == "node-b"
    assert out["direction"][:2] == ["pod-to-pod", "other"]


def test_one_observation_per_connection_at_the_initiators_node() -> None:
    node_a, node_b = "node-a", "node-b"
    both: list[dict[str, object]] = [
        # client (node-a) -> backend (node-b): reported by both nodes, both directions
        {"src": "client", "dst": "backend", "nat": "api", "init": 1, "observer": node_a, "exporter": node_a},
        {"src": "backend", "dst": "client", "nat": "api", "init": 2, "observer": node_a, "exporter": node_a},
        {"src": "client", "dst": "backend", "init": 1, "observer": node_b, "exporter": node_b, "bytes": 7},
        {"src": "backend", "dst": "client", "init": 2, "observer": node_b, "exporter": node_b, "bytes": 7},
        # far (node-c, no sensor) -> backend: only node-b reports it, kept
        {"src": "far", "dst": "backend", "init": 1, "observer": node_b, "exporter": node_b},
        # a router's NetFlow record of the same connection: no observer, kept
        {"src": "client", "dst": "backend", "domain": 7},
        # initiator unknown: kept
        {"src": "client", "dst": "backend", "observer": node_b, "exporter": node_b},
    ]
    observers = ObservedNodes(window_ms=5 * MIN)
    stats = EnrichStats()
    acc = CompletenessAccumulator(observer="", stage="enricher")
    out = enrich_batch(_raw(both), _index(), stats=stats, observers=observers, completeness=acc, now_ms=T)
    assert out.column("observer").to_pylist() == [node_a, node_a, node_b, "", node_b]
    assert out.column("bytes").to_pylist() == [100] * 5
    assert stats.flows_in == 7 and stats.flows_out == 5 and stats.duplicates_dropped == 2
    rows = acc.take().to_pylist()
    assert [(r["exporter"], r["duplicates_dropped"]) for r in rows] == [(address16(IPS[node_b]), 2)]
    assert rows[0]["stage"] == "enricher" and rows[0]["minute"].timestamp() * 1000 == T - T % MIN

    # node-b's records alone, with node-a not observed (yet, or any more): nothing is dropped
    only_b = [r for r in both if r.get("observer") == node_b]
    fresh = ObservedNodes(window_ms=5 * MIN)
    assert enrich_batch(_raw(only_b), _index(), observers=fresh, now_ms=T).num_rows == 4
    assert enrich_batch(_raw(only_b), _index(), observers=observers, now_ms=T + 4 * MIN).num_rows == 2
    assert enrich_batch(_raw(only_b), _index(), observers=observers, now_ms=T + 6 * MIN).num_rows == 4
    # the rule switched off (no tracker): every record kept
    assert enrich_batch(_raw(both), _index()).num_rows == 7


def test_completeness_counts_per_exporter_and_domain() -> None:
    index = _index()
    index.apply({address16("10.244.4.4"): [Version(OwnerInfo(kind="ignored"), 0)]})
    index.prune(T)  # horizon: T - 1 h
    raw = _raw([
        {"src": "unknown", "dst": "google", "domain": 1},                   # unknown private src
        {"src": "unknown", "dst": "unknown", "domain": 1},                  # both: one flow
        {"src": "client", "dst": "google", "domain": 2},                    # nothing to count
        {"src": "ignored", "dst": "client", "domain": 2},                   # ignored
        {"src": "client", "dst": "backend", "domain": 2, "end": T - 90 * MIN},  # both ends late
        {"src": "google", "dst": "backend", "exporter": "node-a", "end": T - 61 * MIN},  # late + unknown
    ])
    stats = EnrichStats()
    acc = CompletenessAccumulator(observer="", stage="enricher")
    enrich_batch(raw, index, stats=stats, completeness=acc, now_ms=T + 30_000)
    got = {(r["exporter"], r["observation_domain"]): (r["unknown_addresses"], r["ignored"], r["late"],
                                                      r["duplicates_dropped"]) for r in acc.take().to_pylist()}
    router, node_a = address16(IPS["router"]), address16(IPS["node-a"])
    assert got == {(router, 1): (2, 0, 0, 0), (router, 2): (1, 1, 1, 0), (node_a, 0): (1, 0, 1, 0)}
    assert (stats.unknown_addresses, stats.ignored, stats.late) == (4, 1, 2)
    assert stats.sides["src"].late == 1 and stats.sides["dst"].late == 2
    assert stats.sides["src"].unknown_private == 3 and stats.sides["dst"].unknown_private == 3
