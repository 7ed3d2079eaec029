"""Synthetic load: a made-up Kubernetes cluster, its traffic, and a NetFlow v9 exporter for it.

Three layers, each usable on its own:

* :func:`synthetic_cluster` makes a small deterministic cluster (nodes, namespaces, workloads,
  pods, services) and a list of public addresses that the MaxMind *test* databases resolve, and
  :func:`inventory_yaml` writes its static identity inventory (the format of
  ``enricher/inventory.py``, built here from plain dicts because sensors never import the enricher).
* :func:`synthetic_flows` draws flow records for that cluster as numpy columns named like the
  ``raw.v1`` schema, fully vectorised (a million flows in well under a second).
* :func:`encode_v9` is a pure NetFlow v9 encoder (columns -> UDP payloads), and
  :func:`encode_ipfix_packets` a pure IPFIX one (fixed-length fields, reduced-size encoding and
  one variable-length field); :func:`run_netflow` is the thin shell that paces and sends them
  (``flowtally generate netflow``, or ``python -m flowtally.dev.generator netflow --format ipfix``).

The encoders are deliberately written from RFC 3954 / RFC 7011 alone, not from the collector's decoder, so the
two can check each other; the unit tests check it against tshark.
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import json
import logging
import socket
import struct
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import yaml

from flowtally.settings import SettingsError, parse_hostport
from sensors.schema import NUMPY_DTYPES

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# The synthetic cluster
# ---------------------------------------------------------------------------------------------

#: Characters Kubernetes uses for generated name suffixes (no vowels, no look-alikes).
_K8S_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"

#: Networks present in the MaxMind test databases (see shared/testdata/SOURCES.md), with how many
#: addresses to take from each. 175.16.199.0/24 is only in the City databases; 1.128.0.0/11 and
#: 12.81.92.0/22 only in the ASN/ISP ones: a realistic mix of partial GeoIP answers.
_EXTERNAL_NETWORKS: tuple[tuple[str, int], ...] = (
    ("81.2.69.160/27", 4),  # GB, London
    ("89.160.20.112/28", 3),  # SE, Linköping (ASN 29518 via 89.160.0.0/17)
    ("216.160.83.56/29", 2),  # US, Milton (ASN 209)
    ("2.125.160.216/29", 2),  # GB, Boxford
    ("67.43.156.0/24", 3),  # BT (ASN 35908)
    ("1.128.0.0/11", 4),  # ASN 1221 Telstra, no country
    ("12.81.92.0/22", 3),  # ASN 7018 AT&T, no country
    ("175.16.199.0/24", 3),  # CN, Changchun (City databases only)
    ("2001:218::/32", 3),  # JP, IPv6
)


@dataclass(frozen=True, slots=True)
class Node:
    """A cluster node (its InternalIP)."""

    name: str
    ip: str
    index: int  # 1-based; the node's pod CIDR is 10.244.<index>.0/24


@dataclass(frozen=True, slots=True)
class Workload:
    """A Deployment, StatefulSet or DaemonSet and the port its pods serve on."""

    namespace: str
    name: str
    kind: str
    replicas: int
    port: int
    proto: int  # 6 TCP, 17 UDP


@dataclass(frozen=True, slots=True)
class Pod:
    """One pod: dual-stack, so it has an IPv4 and an IPv6 address."""

    name: str
    namespace: str
    workload: str
    workload_kind: str
    node: str
    ip: str
    ip6: str
    port: int
    service: str  # the service selecting the pod, "" if none


@dataclass(frozen=True, slots=True)
class Service:
    """A ClusterIP service (``cluster_ip`` "" = headless) selecting one workload (or none)."""

    name: str
    namespace: str
    cluster_ip: str
    port: int
    target_port: int
    proto: int
    workload: str  # "" for the apiserver's `kubernetes` service, whose endpoints are the nodes
    workload_kind: str


@dataclass(frozen=True, slots=True)
class ExternalHost:
    """A public address outside the cluster and the MaxMind test network it was taken from."""

    ip: str
    network: str


@dataclass(frozen=True, slots=True)
class SyntheticCluster:
    """A made-up cluster: everything the flow generator and the inventory need."""

    seed: int
    nodes: tuple[Node, ...]
    workloads: tuple[Workload, ...]
    pods: tuple[Pod, ...]
    services: tuple[Service, ...]
    externals: tuple[ExternalHost, ...]
    #: The cluster flattened into arrays for :func:`synthetic_flows`, derived once here because
    #: building it costs milliseconds and a paced sender draws a small batch every few of them.
    traffic: _TrafficModel = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "traffic", _traffic_model(self))

    @property
    def namespaces(self) -> tuple[str, ...]:
        """Namespaces that hold something, sorted."""
        return tuple(sorted({w.namespace for w in self.workloads} | {s.namespace for s in self.services}))

    def pods_of(self, workload: str) -> tuple[Pod, ...]:
        """The pods of a workload (by name; workload names are unique in this cluster)."""
        return tuple(p for p in self.pods if p.workload == workload)

    def service_of(self, workload: str) -> Service | None:
        """The service selecting a workload, if any."""
        return next((s for s in self.services if s.workload == workload), None)


_TCP, _UDP = 6, 17

# (namespace, name, kind, replicas, port, proto); a DaemonSet's replicas are set to the node count.
_WORKLOADS: tuple[tuple[str, str, str, int, int, int], ...] = (
    ("shop", "frontend", "Deployment", 4, 8080, _TCP),
    ("shop", "cart", "Deployment", 4, 8080, _TCP),
    ("shop", "catalog", "Deployment", 3, 8080, _TCP),
    ("shop", "checkout", "Deployment", 3, 8080, _TCP),
    ("shop", "cart-redis", "Deployment", 2, 6379, _TCP),
    ("payments", "payments-api", "Deployment", 3, 8443, _TCP),
    ("payments", "payments-db", "StatefulSet", 3, 5432, _TCP),
    ("search", "search-api", "Deployment", 3, 8080, _TCP),
    ("search", "search-index", "Deployment", 3, 9200, _TCP),
    ("monitoring", "prometheus", "Deployment", 2, 9090, _TCP),
    ("monitoring", "grafana", "Deployment", 2, 3000, _TCP),
    ("monitoring", "node-exporter", "DaemonSet", 0, 9100, _TCP),
    ("kube-system", "coredns", "Deployment", 2, 53, _UDP),
    ("kube-system", "metrics-server", "Deployment", 2, 4443, _TCP),
)

# (namespace, service, selected workload, port, fixed ClusterIP or None = allocate, headless?)
_SERVICES: tuple[tuple[str, str, str, int, str | None, bool], ...] = (
    ("default", "kubernetes", "", 443, "10.96.0.1", False),
    ("kube-system", "kube-dns", "coredns", 53, "10.96.0.10", False),
    ("kube-system", "metrics-server", "metrics-server", 443, None, False),
    ("shop", "frontend", "frontend", 80, None, False),
    ("shop", "cart", "cart", 80, None, False),
    ("shop", "catalog", "catalog", 80, None, False),
    ("shop", "checkout", "checkout", 80, None, False),
    ("shop", "cart-redis", "cart-redis", 6379, None, False),
    ("payments", "payments-api", "payments-api", 443, None, False),
    ("payments", "payments-db", "payments-db", 5432, None, True),  # a StatefulSet's headless service
    ("search", "search-api", "search-api", 80, None, False),
    ("search", "search-index", "search-index", 9200, None, False),
    ("monitoring", "prometheus", "prometheus", 9090, None, False),
    ("monitoring", "grafana", "grafana", 80, None, False),
)

_APISERVER_PORT = 6443
_KUBELET_PORT = 10250
_NODE_COUNT = 3


def _k8s_suffix(rng: np.random.Generator, length: int) -> str:
    return "".join(_K8S_ALPHABET[i] for i in rng.integers(0, len(_K8S_ALPHABET), length))


def synthetic_cluster(seed: int) -> SyntheticCluster:
    """A deterministic made-up cluster: 3 nodes, 6 namespaces, 14 workloads (39 pods), 14 services.

    Pods get ``10.244.<node>.x`` and ``fd00:10:244:<node>::x`` (dual-stack), nodes ``10.0.0.1x``,
    ClusterIPs ``10.96.x.y``. Names follow Kubernetes' conventions (``<deployment>-<rs hash>-<5>``,
    ``<statefulset>-<ordinal>``, ``<daemonset>-<5>``). The same seed always gives the same cluster.
    ``seed`` must be >= 0.
    """
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    rng = np.random.default_rng([seed, 0x6B3])
    nodes = tuple(Node(f"node-{i}", f"10.0.0.{10 + i}", i) for i in range(1, _NODE_COUNT + 1))
    # Each node hands out host numbers from its own /24 in a shuffled order, like an IPAM would
    # after some churn, so pod addresses are not simply sequential.
    free_hosts = {n.name: list(rng.permutation(np.arange(2, 255))) for n in nodes}

    service_of = {wl: name for _, name, wl, _, _, _ in _SERVICES if wl}
    workloads: list[Workload] = []
    pods: list[Pod] = []
    for namespace, name, kind, replicas, port, proto in _WORKLOADS:
        if kind == "DaemonSet":
            replicas = len(nodes)
        workloads.append(Workload(namespace, name, kind, replicas, port, proto))
        rs_hash = _k8s_suffix(rng, 10) if kind == "Deployment" else ""
        for r in range(replicas):
            if kind == "Deployment":
                pod_name = f"{name}-{rs_hash}-{_k8s_suffix(rng, 5)}"
                node = nodes[int(rng.integers(0, len(nodes)))]
            elif kind == "StatefulSet":
                pod_name = f"{name}-{r}"
                node = nodes[r % len(nodes)]  # anti-affinity: one replica per node
            else:  # DaemonSet
                pod_name = f"{name}-{_k8s_suffix(rng, 5)}"
                node = nodes[r]
            host = int(free_hosts[node.name].pop())
            pods.append(
                Pod(
                    name=pod_name,
                    namespace=namespace,
                    workload=name,
                    workload_kind=kind,
                    node=node.name,
                    ip=f"10.244.{node.index}.{host}",
                    ip6=f"fd00:10:244:{node.index}::{host:x}",
                    port=port,
                    service=service_of.get(name, ""),
                )
            )

    kinds = {w.name: w for w in workloads}
    used_ips = {ip for *_, ip, _ in _SERVICES if ip}
    services: list[Service] = []
    for namespace, name, wl, port, fixed_ip, headless in _SERVICES:
        if headless:
            ip = ""
        elif fixed_ip:
            ip = fixed_ip
        else:
            while True:
                ip = f"10.96.{int(rng.integers(0, 256))}.{int(rng.integers(1, 255))}"
                if ip not in used_ips:
                    break
            used_ips.add(ip)
        target = kinds[wl].port if wl else _APISERVER_PORT
        proto = kinds[wl].proto if wl else _TCP
        kind = kinds[wl].kind if wl else ""
        services.append(Service(name, namespace, ip, port, target, proto, wl, kind))

    externals: list[ExternalHost] = []
    for cidr, count in _EXTERNAL_NETWORKS:
        net = ipaddress.ip_network(cidr)
        # Avoid the network and broadcast addresses; cap the offset so big IPv6 networks stay
        # within numpy's int64.
        span = min(net.num_addresses - 2, 1 << 62)
        offsets = rng.choice(span, size=count, replace=False) + 1
        externals.extend(ExternalHost(str(net.network_address + int(o)), cidr) for o in offsets)

    return SyntheticCluster(
        seed=seed,
        nodes=nodes,
        workloads=tuple(workloads),
        pods=tuple(pods),
        services=tuple(services),
        externals=tuple(externals),
    )


def inventory_owners(cluster: SyntheticCluster) -> list[dict[str, str]]:
    """The cluster's address owners as plain dicts in the inventory format (empty fields left out)."""
    rows: list[dict[str, str]] = []
    for node in cluster.nodes:
        rows.append({"ip": node.ip, "kind": "node", "name": node.name, "node": node.name})
    for pod in cluster.pods:
        for ip in (pod.ip, pod.ip6):
            rows.append(
                {
                    "ip": ip,
                    "kind": "pod",
                    "namespace": pod.namespace,
                    "name": pod.name,
                    "workload": pod.workload,
                    "workload_kind": pod.workload_kind,
                    "service": pod.service,
                    "node": pod.node,
                }
            )
    for svc in cluster.services:
        if not svc.cluster_ip:  # headless: no address of its own, its pods carry the name
            continue
        rows.append(
            {
                "ip": svc.cluster_ip,
                "kind": "service",
                "namespace": svc.namespace,
                "name": svc.name,
                # The workload a ClusterIP leads to, so traffic seen before DNAT still has one.
                "workload": svc.workload,
                "workload_kind": svc.workload_kind,
                "service": svc.name,
            }
        )
    return [{k: v for k, v in row.items() if v} for row in rows]


def inventory_yaml(cluster: SyntheticCluster) -> str:
    """The static identity inventory of ``cluster`` as YAML (``owners:`` list, see enricher/inventory.py)."""
    return yaml.safe_dump({"owners": inventory_owners(cluster)}, sort_keys=False)


# ---------------------------------------------------------------------------------------------
# Synthetic traffic
# ---------------------------------------------------------------------------------------------

# A traffic edge: who calls whom and what the bytes look like.
# Endpoints: "wl:<workload>" (its pods), "pods" (every pod), "nodes", "ext" (public addresses).
# Port -1 = the destination's own serving port. Byte counts are log-normal (heavy tailed) with
# the given median and sigma; avg_pkt is the mean packet size. p_via = share of flows addressed
# to the destination's ClusterIP (seen before kube-proxy's DNAT) instead of a pod.
# (src, dst, port, proto, weight, median bytes, sigma, avg packet, p_via)
_EDGES: tuple[tuple[str, str, int, int, float, float, float, float, float], ...] = (
    ("ext", "wl:frontend", -1, _TCP, 6.0, 20_000, 1.6, 900, 0.0),  # ingress
    ("wl:frontend", "wl:cart", -1, _TCP, 12.0, 4_000, 1.2, 500, 0.1),
    ("wl:frontend", "wl:catalog", -1, _TCP, 14.0, 12_000, 1.5, 800, 0.1),
    ("wl:frontend", "wl:search-api", -1, _TCP, 8.0, 8_000, 1.4, 700, 0.1),
    ("wl:frontend", "wl:checkout", -1, _TCP, 4.0, 3_000, 1.0, 500, 0.1),
    ("wl:cart", "wl:cart-redis", -1, _TCP, 10.0, 600, 1.0, 150, 0.1),
    ("wl:checkout", "wl:cart", -1, _TCP, 3.0, 2_000, 1.0, 400, 0.1),
    ("wl:checkout", "wl:payments-api", -1, _TCP, 3.0, 2_500, 1.0, 450, 0.1),
    ("wl:payments-api", "wl:payments-db", -1, _TCP, 5.0, 3_000, 1.5, 400, 0.0),
    ("wl:catalog", "wl:search-index", -1, _TCP, 4.0, 15_000, 1.8, 1_000, 0.1),
    ("wl:search-api", "wl:search-index", -1, _TCP, 8.0, 30_000, 2.0, 1_200, 0.1),
    ("wl:payments-api", "ext", 443, _TCP, 3.0, 6_000, 1.2, 700, 0.0),  # payment provider
    ("wl:catalog", "ext", 443, _TCP, 2.0, 150_000, 2.0, 1_300, 0.0),  # images from a CDN
    ("wl:frontend", "ext", 443, _TCP, 2.0, 5_000, 1.5, 600, 0.0),  # analytics, APIs
    ("pods", "wl:coredns", 53, _UDP, 8.0, 90, 0.3, 90, 0.8),  # DNS, mostly to kube-dns' ClusterIP
    ("wl:coredns", "ext", 53, _UDP, 1.0, 110, 0.3, 110, 0.0),  # upstream resolvers
    ("wl:prometheus", "pods", 9090, _TCP, 3.0, 25_000, 0.8, 1_100, 0.0),  # scrapes
    ("wl:prometheus", "wl:node-exporter", -1, _TCP, 1.0, 60_000, 0.5, 1_300, 0.0),
    ("wl:prometheus", "nodes", _KUBELET_PORT, _TCP, 1.0, 80_000, 0.6, 1_300, 0.0),
    ("wl:prometheus", "apiserver", -1, _TCP, 0.5, 20_000, 1.0, 900, 0.7),
    ("wl:metrics-server", "nodes", _KUBELET_PORT, _TCP, 1.0, 10_000, 0.5, 900, 0.0),
    ("wl:grafana", "wl:prometheus", -1, _TCP, 1.0, 40_000, 1.5, 1_200, 0.1),
    ("nodes", "pods", -1, _TCP, 3.0, 400, 0.4, 100, 0.0),  # kubelet probes
)

#: Share of records that describe the answering direction (server -> client) of a conversation.
_REPLY_SHARE = 0.4


@dataclass(frozen=True, slots=True)
class _TrafficModel:
    """The cluster flattened into arrays so that flows can be drawn with a few fancy indexes.

    Entities are pods, nodes, service ClusterIPs and external hosts. ``addr_items`` holds each
    entity's primary address in rows [0, m) and its IPv6 address (or the primary one) in [m, 2m).
    """

    addr_items: np.ndarray  # (2m,) V16: the rows of the (2m, 16) uint8 address table
    v6_only: np.ndarray  # (m,) bool: the entity has only an IPv6 address (IPv6 external hosts)
    port: np.ndarray  # (m,) int64 serving port (0 where it has none)
    ifindex: np.ndarray  # (m,) int64 SNMP index on the observing node: veth for pods, 2 (eth0) else
    pool: np.ndarray  # concatenated entity indices of every edge endpoint pool
    src_off: np.ndarray
    src_len: np.ndarray
    dst_off: np.ndarray
    dst_len: np.ndarray
    e_port: np.ndarray  # -1 = the destination's own port
    e_proto: np.ndarray
    e_cum: np.ndarray  # cumulative edge weights, normalised to end at 1
    e_mu: np.ndarray
    e_sigma: np.ndarray
    e_pkt: np.ndarray
    e_via: np.ndarray  # entity index of the destination's ClusterIP, -1 = none
    e_via_port: np.ndarray
    e_p_via: np.ndarray


def _addr16(ip: str) -> bytes:
    a = ipaddress.ip_address(ip)
    return (b"\x00" * 10 + b"\xff\xff" + a.packed) if a.version == 4 else a.packed


def _traffic_model(cluster: SyntheticCluster) -> _TrafficModel:
    primary: list[bytes] = []
    secondary: list[bytes] = []
    v6_only: list[bool] = []
    port: list[int] = []
    ifindex: list[int] = []

    def add(ip: str, ip6: str | None, serving_port: int, ifidx: int) -> int:
        primary.append(_addr16(ip))
        secondary.append(_addr16(ip6 or ip))
        v6_only.append(ipaddress.ip_address(ip).version == 6)
        port.append(serving_port)
        ifindex.append(ifidx)
        return len(primary) - 1

    pods_by_node: dict[str, int] = {}
    pods_of: dict[str, list[int]] = {}
    all_pods: list[int] = []
    for pod in cluster.pods:
        # veth interfaces on a node are numbered after lo (1), eth0 (2) and the bridge/tunnel (3).
        local = pods_by_node[pod.node] = pods_by_node.get(pod.node, 3) + 1
        idx = add(pod.ip, pod.ip6, pod.port, local)
        pods_of.setdefault(pod.workload, []).append(idx)
        all_pods.append(idx)
    nodes = [add(n.ip, None, _APISERVER_PORT, 2) for n in cluster.nodes]
    cluster_ip: dict[str, tuple[int, int]] = {}
    for svc in cluster.services:
        if svc.cluster_ip:
            key = svc.workload or "apiserver"
            cluster_ip[key] = (add(svc.cluster_ip, None, svc.port, 2), svc.port)
    externals = [add(e.ip, None, 0, 2) for e in cluster.externals]

    pools = {"pods": all_pods, "nodes": nodes, "apiserver": nodes, "ext": externals}
    pools.update({f"wl:{name}": idxs for name, idxs in pods_of.items()})

    flat: list[int] = []
    offsets: dict[str, tuple[int, int]] = {}
    for name, idxs in pools.items():
        offsets[name] = (len(flat), len(idxs))
        flat.extend(idxs)

    src_off, src_len, dst_off, dst_len = [], [], [], []
    e_port, e_proto, weight, mu, sigma, pkt, via, via_port, p_via = [], [], [], [], [], [], [], [], []
    for src, dst, dport, proto, w, median, sig, avg_pkt, pv in _EDGES:
        if src not in offsets or dst not in offsets:
            continue  # a cluster without that workload: the edge simply carries no traffic
        src_off.append(offsets[src][0])
        src_len.append(offsets[src][1])
        dst_off.append(offsets[dst][0])
        dst_len.append(offsets[dst][1])
        e_port.append(dport)
        e_proto.append(proto)
        weight.append(w)
        mu.append(np.log(median))
        sigma.append(sig)
        pkt.append(avg_pkt)
        target = cluster_ip.get(dst.removeprefix("wl:"), (-1, 0))
        via.append(target[0])
        via_port.append(target[1])
        p_via.append(pv if target[0] >= 0 else 0.0)

    cum = np.cumsum(np.asarray(weight, dtype=np.float64))
    i64 = np.int64
    return _TrafficModel(
        addr_items=np.frombuffer(b"".join(primary + secondary), dtype="V16"),
        v6_only=np.asarray(v6_only, dtype=bool),
        port=np.asarray(port, dtype=i64),
        ifindex=np.asarray(ifindex, dtype=i64),
        pool=np.asarray(flat, dtype=i64),
        src_off=np.asarray(src_off, dtype=i64),
        src_len=np.asarray(src_len, dtype=i64),
        dst_off=np.asarray(dst_off, dtype=i64),
        dst_len=np.asarray(dst_len, dtype=i64),
        e_port=np.asarray(e_port, dtype=i64),
        e_proto=np.asarray(e_proto, dtype=i64),
        e_cum=cum / cum[-1],
        e_mu=np.asarray(mu),
        e_sigma=np.asarray(sigma),
        e_pkt=np.asarray(pkt),
        e_via=np.asarray(via, dtype=i64),
        e_via_port=np.asarray(via_port, dtype=i64),
        e_p_via=np.asarray(p_via),
    )


#: Column names of :func:`synthetic_flows`' output (a subset of the raw.v1 schema).
FLOW_COLUMNS = (
    "src_addr", "dst_addr", "src_port", "dst_port", "proto", "bytes", "packets",
    "start", "end", "tcp_flags", "in_if", "out_if",
)

_MAX_BYTES = 4_000_000_000  # one flow record never claims more than ~4 GB


def synthetic_flows(
    cluster: SyntheticCluster,
    n: int,
    seed: int | tuple[int, ...],
    start_ms: int,
    *,
    span_ms: int = 1_000,
    max_duration_ms: int = 5_000,
) -> dict[str, np.ndarray]:
    """Draw ``n`` flow records of ``cluster``'s traffic, as numpy columns.

    Flows *end* at times spread over ``[start_ms, start_ms + span_ms]`` (sorted, the order in
    which an exporter expires them); each starts up to ``max_duration_ms`` earlier. The mix:
    pod->pod calls along a fixed call graph (frontend -> cart -> cart-redis, checkout ->
    payments-api -> payments-db, ...), some addressed to a ClusterIP; pod->internet egress and
    internet->frontend ingress (about one in nine external hosts is IPv6, and those flows use the
    pods' IPv6 addresses); DNS to kube-dns over UDP 53; kubelet probes and Prometheus scrapes between
    nodes and pods. About 40 % of the records are the answering direction of a conversation.
    Clients use ephemeral ports 32768-60999. Bytes are heavy tailed; packets = bytes / packet size,
    and bytes >= 40 (IPv6: 60) per packet.

    Columns (raw.v1 names): ``src_addr``/``dst_addr`` (n, 16) uint8 (IPv4-mapped or IPv6),
    ``src_port``, ``dst_port``, ``proto``, ``bytes``, ``packets``, ``start``, ``end`` (UTC ms),
    ``tcp_flags``, ``in_if``, ``out_if``. Same arguments -> identical arrays.
    """
    if n < 0 or span_ms < 0 or max_duration_ms < 0:
        raise ValueError("n, span_ms and max_duration_ms must be >= 0")
    model = cluster.traffic
    seed_seq = [seed] if isinstance(seed, int) else list(seed)
    rng = np.random.default_rng([*seed_seq, 0xF10])
    m = len(model.v6_only)

    e = np.searchsorted(model.e_cum, rng.random(n), side="right")
    np.minimum(e, len(model.e_cum) - 1, out=e)  # guards the (theoretical) float round-up at 1.0
    client = model.pool[model.src_off[e] + (rng.random(n) * model.src_len[e]).astype(np.int64)]
    server = model.pool[model.dst_off[e] + (rng.random(n) * model.dst_len[e]).astype(np.int64)]
    dport = np.where(model.e_port[e] >= 0, model.e_port[e], model.port[server])
    via = rng.random(n) < model.e_p_via[e]
    server = np.where(via, model.e_via[e], server)
    dport = np.where(via, model.e_via_port[e], dport)
    sport = rng.integers(32768, 61000, n)
    proto = model.e_proto[e]
    is_tcp = proto == _TCP

    # A flow with an IPv6-only party is IPv6 end to end: the pod side uses its IPv6 address.
    v6 = model.v6_only[client] | model.v6_only[server]
    row_client = client + v6 * m
    row_server = server + v6 * m

    reply = rng.random(n) < _REPLY_SHARE
    src_row = np.where(reply, row_server, row_client)
    dst_row = np.where(reply, row_client, row_server)
    src_port = np.where(reply, dport, sport)
    dst_port = np.where(reply, sport, dport)
    in_if = np.where(reply, model.ifindex[server], model.ifindex[client])
    out_if = np.where(reply, model.ifindex[client], model.ifindex[server])

    size = np.exp(model.e_mu[e] + model.e_sigma[e] * rng.standard_normal(n))
    pkt_size = model.e_pkt[e] * rng.uniform(0.8, 1.2, n)
    packets = np.maximum(1, np.ceil(size / pkt_size)).astype(np.uint64)
    min_size = np.where(v6, 60, 40).astype(np.uint64)  # IP + TCP headers, at least
    nbytes = np.minimum(np.maximum(size.astype(np.uint64), min_size * packets), _MAX_BYTES)
    packets = np.minimum(packets, nbytes // min_size)  # keeps bytes >= min_size * packets after the cap

    # Durations: single-packet flows are instantaneous; others mostly short, a few long-lived.
    duration = np.exp(np.log(300.0) + 1.3 * rng.standard_normal(n))
    duration = np.where(packets > 1, np.minimum(duration, max_duration_ms), 0).astype(np.int64)
    end = start_ms + np.sort(rng.integers(0, span_ms + 1, n))
    start = end - duration

    # TCP flags: most conversations complete (SYN|ACK|PSH|FIN), some still open (ACK|PSH or with
    # SYN), a few reset; a lone packet is a SYN (request) or the RST|ACK that refused it (reply).
    flag_choices = np.array([0x1B, 0x18, 0x1A, 0x1C], dtype=np.uint8)
    flags = flag_choices[np.searchsorted([0.80, 0.92, 0.97], rng.random(n), side="right")]
    flags = np.where(packets == 1, np.where(reply, 0x14, 0x02), flags)
    flags = np.where(is_tcp, flags, 0)

    dt = NUMPY_DTYPES
    return {
        # Rows taken as 16-byte opaque items: several times faster than indexing (n, 16) uint8.
        "src_addr": np.take(model.addr_items, src_row).view(np.uint8).reshape(-1, 16),
        "dst_addr": np.take(model.addr_items, dst_row).view(np.uint8).reshape(-1, 16),
        "src_port": src_port.astype(dt["src_port"]),
        "dst_port": dst_port.astype(dt["dst_port"]),
        "proto": proto.astype(dt["proto"]),
        "bytes": nbytes.astype(dt["bytes"]),
        "packets": packets.astype(dt["packets"]),
        "start": start.astype(dt["start"]),
        "end": end.astype(dt["end"]),
        "tcp_flags": flags.astype(dt["tcp_flags"]),
        "in_if": in_if.astype(dt["in_if"]),
        "out_if": out_if.astype(dt["out_if"]),
    }


# ---------------------------------------------------------------------------------------------
# NetFlow v9 encoding (RFC 3954), pure
# ---------------------------------------------------------------------------------------------

TEMPLATE_V4 = 256
TEMPLATE_V6 = 257
MAX_DATAGRAM = 1400  # stays under a 1500-byte MTU with IPv6 + UDP headers

# (field type, length) in record order; the numpy dtypes below must follow the same order.
_FIELDS_V4: tuple[tuple[int, int], ...] = (
    (8, 4), (12, 4), (7, 2), (11, 2), (4, 1), (6, 1), (10, 2), (14, 2), (1, 8), (2, 8), (22, 4), (21, 4),
)
_FIELDS_V6: tuple[tuple[int, int], ...] = ((27, 16), (28, 16), *_FIELDS_V4[2:])


def _record_dtype(addr_len: int) -> np.dtype[Any]:
    # A packed (unaligned) big-endian struct: one row is one data record on the wire.
    return np.dtype(
        [
            ("src", np.uint8, (addr_len,)), ("dst", np.uint8, (addr_len,)),
            ("src_port", ">u2"), ("dst_port", ">u2"), ("proto", "u1"), ("tcp_flags", "u1"),
            ("in_if", ">u2"), ("out_if", ">u2"), ("bytes", ">u8"), ("packets", ">u8"),
            ("first", ">u4"), ("last", ">u4"),
        ]
    )


_DTYPE_V4 = _record_dtype(4)
_DTYPE_V6 = _record_dtype(16)
assert _DTYPE_V4.itemsize == sum(length for _, length in _FIELDS_V4)
assert _DTYPE_V6.itemsize == sum(length for _, length in _FIELDS_V6)


def _template_flowset() -> bytes:
    records = b""
    for template_id, fields in ((TEMPLATE_V4, _FIELDS_V4), (TEMPLATE_V6, _FIELDS_V6)):
        records += struct.pack("!HH", template_id, len(fields))
        records += b"".join(struct.pack("!HH", t, length) for t, length in fields)
    return struct.pack("!HH", 0, 4 + len(records)) + records


_TEMPLATE_FLOWSET = _template_flowset()
_TEMPLATE_RECORDS = 2
_HEADER = struct.Struct("!HHIIII")
_V4_MAPPED_PREFIX = np.array([0] * 10 + [0xFF, 0xFF], dtype=np.uint8)


def _records_per_packet(record_len: int, limit: int) -> int:
    # Sized as if every packet carried the templates, so the layout never depends on refreshes.
    room = MAX_DATAGRAM - _HEADER.size - len(_TEMPLATE_FLOWSET) - 4
    return max(1, min(limit, room // record_len))


@dataclass(frozen=True, slots=True)
class EncodedPackets:
    """What :func:`encode_packets` produced: the datagrams and, per datagram, what it carries."""

    packets: list[bytes]
    records: np.ndarray  # flow records per datagram
    bytes: np.ndarray  # sum of the records' byte counters per datagram
    pkts: np.ndarray  # sum of the records' packet counters per datagram
    next_sequence: int


_RECORD_COLUMNS = ("src_port", "dst_port", "proto", "tcp_flags", "in_if", "out_if", "bytes", "packets")


def _family_records(columns: Mapping[str, np.ndarray], src: np.ndarray, dst: np.ndarray, v4: np.ndarray,
                    dtypes: tuple[np.dtype[Any], np.dtype[Any]],
                    times: Mapping[str, np.ndarray]) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """The flows of each address family as records of its template (v9 and IPFIX alike):
    (template ID, the flows' indexes, the records in ``dtypes``' IPv4 or IPv6 layout); the
    time fields are named by ``times``, the others by the columns."""
    for template_id, mask, dtype, addr in ((TEMPLATE_V4, v4, dtypes[0], slice(12, 16)),
                                           (TEMPLATE_V6, ~v4, dtypes[1], slice(0, 16))):
        idx = np.flatnonzero(mask)
        if not len(idx):
            continue
        rec = np.empty(len(idx), dtype=dtype)
        rec["src"] = src[idx, addr]
        rec["dst"] = dst[idx, addr]
        for name in _RECORD_COLUMNS:
            rec[name] = np.asarray(columns[name])[idx]
        for name, values in times.items():
            rec[name] = values[idx]
        yield template_id, idx, rec


class _PacketTotals:
    """Records, bytes and packets per datagram, gathered family by family for EncodedPackets."""

    def __init__(self) -> None:
        self.counts: list[np.ndarray] = []
        self.byte_sums: list[np.ndarray] = []
        self.pkt_sums: list[np.ndarray] = []

    def add(self, rec: np.ndarray, per: int) -> np.ndarray:
        """Account for ``rec`` sent ``per`` records a datagram; returns each datagram's first record."""
        starts = np.arange(0, len(rec), per)
        self.counts.append(np.diff(np.append(starts, len(rec))))
        self.byte_sums.append(np.add.reduceat(rec["bytes"].astype(np.uint64), starts))
        self.pkt_sums.append(np.add.reduceat(rec["packets"].astype(np.uint64), starts))
        return starts

    def encoded(self, packets: list[bytes], seq: int) -> EncodedPackets:
        def cat(parts: list[np.ndarray]) -> np.ndarray:
            return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint64)

        return EncodedPackets(packets, cat(self.counts), cat(self.byte_sums), cat(self.pkt_sums),
                              seq & 0xFFFFFFFF)


def encode_packets(
    columns: Mapping[str, np.ndarray],
    *,
    source_id: int,
    sequence: int,
    unix_secs: int,
    uptime_ms: int,
    records_per_packet: int = 30,
    template_every: int = 20,
    template_first: bool = True,
) -> EncodedPackets:
    """:func:`encode_v9` plus per-datagram totals, so a sender can account for partial sends."""
    if template_every < 1:
        raise ValueError("template_every must be >= 1")
    for name, value in (("source_id", source_id), ("unix_secs", unix_secs), ("uptime_ms", uptime_ms)):
        if not 0 <= value <= 0xFFFFFFFF:
            raise ValueError(f"{name} {value} does not fit the header's 32 bits")
    src = np.asarray(columns["src_addr"], dtype=np.uint8)
    dst = np.asarray(columns["dst_addr"], dtype=np.uint8)
    n = len(src)
    v4_src = (src[:, :12] == _V4_MAPPED_PREFIX).all(axis=1)
    v4_dst = (dst[:, :12] == _V4_MAPPED_PREFIX).all(axis=1)
    if not np.array_equal(v4_src, v4_dst):
        raise ValueError("a record mixes an IPv4 and an IPv6 address")

    # sysUptime-relative times: the exporter booted at header time - sysUptime.
    boot_ms = unix_secs * 1000 - uptime_ms
    first = np.asarray(columns["start"], dtype=np.int64) - boot_ms
    last = np.asarray(columns["end"], dtype=np.int64) - boot_ms
    if n and (min(first.min(), last.min()) < 0 or max(first.max(), last.max()) > 0xFFFFFFFF):
        raise ValueError("flow times fall outside the exporter's sysUptime range")
    for name in ("in_if", "out_if"):
        if n and int(np.max(columns[name])) > 0xFFFF:
            raise ValueError(f"{name} does not fit the 2-byte SNMP index field")

    packets: list[bytes] = []
    totals = _PacketTotals()
    seq = sequence
    for template_id, idx, rec in _family_records(columns, src, dst, v4_src, (_DTYPE_V4, _DTYPE_V6),
                                                 {"first": first, "last": last}):
        data = rec.tobytes()
        size = rec.dtype.itemsize
        per = _records_per_packet(size, records_per_packet)
        starts = totals.add(rec, per)
        for a in starts.tolist():
            k = min(per, len(idx) - a)
            with_template = (template_first and not packets) or seq % template_every == 0
            body_len = 4 + k * size
            pad = -body_len % 4
            header = _HEADER.pack(
                9, k + (_TEMPLATE_RECORDS if with_template else 0), uptime_ms, unix_secs,
                seq & 0xFFFFFFFF, source_id,
            )
            packets.append(
                b"".join(
                    (
                        header,
                        _TEMPLATE_FLOWSET if with_template else b"",
                        struct.pack("!HH", template_id, body_len + pad),
                        data[a * size : (a + k) * size],
                        b"\x00" * pad,
                    )
                )
            )
            seq += 1
    return totals.encoded(packets, seq)


def encode_v9(
    columns: Mapping[str, np.ndarray],
    *,
    source_id: int,
    sequence: int,
    unix_secs: int,
    uptime_ms: int,
    records_per_packet: int = 30,
    template_every: int = 20,
    template_first: bool = True,
) -> tuple[list[bytes], int]:
    """Encode flow columns (as from :func:`synthetic_flows`) as NetFlow v9 export packets.

    Each packet: the v9 header (version 9, record count including template records, sysUptime,
    ``unix_secs``, the package sequence ``sequence``, ``source_id``), then, in the first packet
    (``template_first``) and in every packet whose sequence is a multiple of ``template_every``,
    a template flowset with templates 256 (IPv4) and 257 (IPv6), then one data flowset, padded to
    4 bytes. IPv4 records come first, then IPv6 ones; at most ``records_per_packet`` records per
    packet and never more than 1400 bytes. FIRST/LAST_SWITCHED are sysUptime-relative:
    ``uptime_ms - (unix_secs * 1000 - time_ms)``.

    Returns the packets and the sequence number of the next packet (v9 counts packets).
    """
    out = encode_packets(
        columns, source_id=source_id, sequence=sequence, unix_secs=unix_secs, uptime_ms=uptime_ms,
        records_per_packet=records_per_packet, template_every=template_every,
        template_first=template_first,
    )
    return out.packets, out.next_sequence


# ---------------------------------------------------------------------------------------------
# IPFIX encoding (RFC 7011/7012), pure
# ---------------------------------------------------------------------------------------------

IPFIX_VERSION = 10
INTERFACE_NAME = 82  # interfaceName: a string, sent with variable length
VARIABLE_LENGTH = 0xFFFF
# (information element, length) in record order, fixed-length fields first, then interfaceName
# (variable length). tcpControlBits (6) is 2 bytes in RFC 7125 and sent in 1 here: reduced-size
# encoding (RFC 7011 section 6.2), which collectors must accept. Times are absolute
# flowStart/EndMilliseconds (152/153), so IPFIX needs no uptime arithmetic.
_IPFIX_FIELDS_V4: tuple[tuple[int, int], ...] = (
    (8, 4), (12, 4), (7, 2), (11, 2), (4, 1), (6, 1), (10, 4), (14, 4), (1, 8), (2, 8), (152, 8), (153, 8),
    (INTERFACE_NAME, VARIABLE_LENGTH),
)
_IPFIX_FIELDS_V6: tuple[tuple[int, int], ...] = ((27, 16), (28, 16), *_IPFIX_FIELDS_V4[2:])


def _ipfix_dtype(addr_len: int) -> np.dtype[Any]:
    # The fixed-length part of one data record, packed and big-endian like the wire.
    return np.dtype(
        [
            ("src", np.uint8, (addr_len,)), ("dst", np.uint8, (addr_len,)),
            ("src_port", ">u2"), ("dst_port", ">u2"), ("proto", "u1"), ("tcp_flags", "u1"),
            ("in_if", ">u4"), ("out_if", ">u4"), ("bytes", ">u8"), ("packets", ">u8"),
            ("start", ">u8"), ("end", ">u8"),
        ]
    )


_IPFIX_DTYPE_V4 = _ipfix_dtype(4)
_IPFIX_DTYPE_V6 = _ipfix_dtype(16)
assert _IPFIX_DTYPE_V4.itemsize == sum(length for _, length in _IPFIX_FIELDS_V4[:-1])
assert _IPFIX_DTYPE_V6.itemsize == sum(length for _, length in _IPFIX_FIELDS_V6[:-1])


def _ipfix_template_set() -> bytes:
    records = b""
    for template_id, fields in ((TEMPLATE_V4, _IPFIX_FIELDS_V4), (TEMPLATE_V6, _IPFIX_FIELDS_V6)):
        records += struct.pack("!HH", template_id, len(fields))
        records += b"".join(struct.pack("!HH", t, length) for t, length in fields)
    return struct.pack("!HH", 2, 4 + len(records)) + records


_IPFIX_TEMPLATE_SET = _ipfix_template_set()
_IPFIX_HEADER = struct.Struct("!HHIII")  # version, length, export time, sequence, observation domain
_KNOWN_INTERFACES = {1: "lo", 2: "eth0", 3: "cni0"}


def interface_name(index: int) -> str:
    """The interfaceName the IPFIX encoder sends for an SNMP index (the synthetic node's
    interfaces: lo, eth0, the CNI bridge, then one veth per pod; 0 = unknown, sent empty)."""
    if index == 0:
        return ""
    return _KNOWN_INTERFACES.get(index, f"veth{index:x}")


def _variable_field(value: bytes) -> bytes:
    """RFC 7011 section 7: a 1-byte length, or 255 and a 2-byte length from 255 bytes on."""
    if len(value) < 255:
        return bytes([len(value)]) + value
    return b"\xff" + struct.pack("!H", len(value)) + value


def encode_ipfix_packets(
    columns: Mapping[str, np.ndarray],
    *,
    domain: int,
    sequence: int,
    export_secs: int,
    records_per_packet: int = 30,
    template_every: int = 20,
    template_first: bool = True,
    message_index: int = 0,
    names: Mapping[int, str] | None = None,
) -> EncodedPackets:
    """Encode flow columns (as from :func:`synthetic_flows`) as IPFIX messages.

    Each message: the IPFIX header (version 10, length, ``export_secs``, the sequence number =
    data records sent before it in this observation domain, ``domain``), then, in the first
    message (``template_first``) and in every message whose index in the stream (``message_index``
    for the first of this call) is a multiple of ``template_every``, a template set with
    templates 256 (IPv4) and 257 (IPv6), then one data set (no padding). IPv4 records first,
    then IPv6; at most ``records_per_packet`` records and 1400 bytes per message. Each record
    ends with interfaceName (variable length) naming its ingress interface (``names`` maps an
    index to its name, default :func:`interface_name`). ``next_sequence`` of the result is the
    sequence number of the next message.
    """
    if template_every < 1:
        raise ValueError("template_every must be >= 1")
    for name, value in (("domain", domain), ("export_secs", export_secs), ("sequence", sequence)):
        if not 0 <= value <= 0xFFFFFFFF:
            raise ValueError(f"{name} {value} does not fit the header's 32 bits")
    src = np.asarray(columns["src_addr"], dtype=np.uint8)
    dst = np.asarray(columns["dst_addr"], dtype=np.uint8)
    v4_src = (src[:, :12] == _V4_MAPPED_PREFIX).all(axis=1)
    if not np.array_equal(v4_src, (dst[:, :12] == _V4_MAPPED_PREFIX).all(axis=1)):
        raise ValueError("a record mixes an IPv4 and an IPv6 address")
    start = np.asarray(columns["start"], dtype=np.int64)
    end = np.asarray(columns["end"], dtype=np.int64)
    if len(start) and min(int(start.min()), int(end.min())) < 0:
        raise ValueError("flow times before 1970 cannot be sent as flowStart/EndMilliseconds")
    in_if = np.asarray(columns["in_if"]).astype(np.int64)
    # The variable-length tail of each record, built once per distinct interface.
    distinct, which = np.unique(in_if, return_inverse=True)
    label = names.get if names is not None else None
    tails = [_variable_field(((label(int(i), "") if label else interface_name(int(i)))).encode())
             for i in distinct.tolist()]
    tail_len = np.array([len(t) for t in tails], dtype=np.int64)

    packets: list[bytes] = []
    totals = _PacketTotals()
    seq = sequence
    layouts, times = (_IPFIX_DTYPE_V4, _IPFIX_DTYPE_V6), {"start": start, "end": end}
    for template_id, idx, rec in _family_records(columns, src, dst, v4_src, layouts, times):
        size = rec.dtype.itemsize
        # Lay the records out with their variable-length tails: fixed part, then the tail.
        kind = which[idx]
        lengths = size + tail_len[kind]
        offsets = np.concatenate(([0], np.cumsum(lengths)))
        wire = np.empty(int(offsets[-1]), dtype=np.uint8)
        wire[offsets[:-1, None] + np.arange(size)] = rec.view(np.uint8).reshape(-1, size)
        for k, tail in enumerate(tails):
            at = offsets[:-1][kind == k]
            if len(at):
                wire[at[:, None] + size + np.arange(len(tail))] = np.frombuffer(tail, dtype=np.uint8)
        data = wire.tobytes()
        room = MAX_DATAGRAM - _IPFIX_HEADER.size - len(_IPFIX_TEMPLATE_SET) - 4
        per = max(1, min(records_per_packet, room // (size + int(tail_len.max()))))
        starts = totals.add(rec, per)
        bounds = offsets.tolist()
        for a in starts.tolist():
            k = min(per, len(idx) - a)
            index = message_index + len(packets)
            with_template = (template_first and not packets) or index % template_every == 0
            body = data[bounds[a] : bounds[a + k]]
            tset = _IPFIX_TEMPLATE_SET if with_template else b""
            length = _IPFIX_HEADER.size + len(tset) + 4 + len(body)
            header = _IPFIX_HEADER.pack(IPFIX_VERSION, length, export_secs, seq & 0xFFFFFFFF, domain)
            packets.append(b"".join((header, tset, struct.pack("!HH", template_id, 4 + len(body)), body)))
            seq += k
    return totals.encoded(packets, seq)


# ---------------------------------------------------------------------------------------------
# The sender (`flowtally generate netflow`) and `flowtally generate inventory`
# ---------------------------------------------------------------------------------------------

_CHUNK = 20_000  # flows generated and encoded at a time: bounded memory, amortised numpy overhead
_BURST_S = 0.02  # pacing granularity when a rate is set
_SEND_RETRY_S = 5.0  # how long a full send buffer may keep refusing before the run gives up
_UPTIME_AT_START_MS = 3_600_000  # the simulated exporter has been up an hour


@dataclass
class _Totals:
    flows: int = 0
    bytes: int = 0
    packets: int = 0
    datagrams: int = 0
    payload_bytes: int = 0
    send_retries: int = 0


def _resolve(target: str) -> tuple[int, Any]:
    try:
        host, port = parse_hostport(target, what="--to")
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except (ValueError, OSError) as exc:
        raise SettingsError(f"cannot use --to {target!r}: {exc}") from None
    family, _, _, _, sockaddr = infos[0]
    return family, sockaddr


def _send(sock: socket.socket, data: bytes, sockaddr: Any, totals: _Totals) -> None:
    """Send one datagram; wait out a full send buffer (counted and logged) instead of dropping."""
    deadline = 0.0
    pause = 0.0005
    while True:
        try:
            sock.sendto(data, sockaddr)
            return
        except OSError as exc:
            if exc.errno not in (errno.ENOBUFS, errno.EAGAIN, errno.EWOULDBLOCK):
                raise
            now = time.monotonic()
            if not deadline:
                deadline = now + _SEND_RETRY_S
            elif now > deadline:
                raise
            if totals.send_retries % 1000 == 0:
                log.warning("send buffer full (%s), retrying (%d retries so far)",
                            errno.errorcode.get(exc.errno or 0, exc.errno), totals.send_retries + 1)
            totals.send_retries += 1
            time.sleep(pause)
            pause = min(pause * 2, 0.01)


FORMATS = ("v9", "ipfix")


def add_netflow_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``generate netflow`` (:func:`run_netflow`)."""
    parser.add_argument("--to", required=True, help="host:port of the collector")
    parser.add_argument("--flows", type=int, default=100_000, help="number of flow records to send")
    parser.add_argument("--rate", type=float, default=50_000,
                        help="flows per second (0 = as fast as possible)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the synthetic cluster and traffic")
    parser.add_argument("--source-id", type=int, default=1, help="v9 source ID / IPFIX observation domain")
    parser.add_argument("--format", choices=FORMATS, default="v9", help="NetFlow v9 or IPFIX")
    parser.add_argument("--json", action="store_true", help="print the totals as JSON")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def run_netflow(args: argparse.Namespace) -> int:
    """Send ``args.flows`` synthetic flows as NetFlow v9 (or IPFIX with ``args.format`` "ipfix")
    to ``args.to`` at ``args.rate`` flows/s.

    Flows end about when they are sent (so latency to "queryable" can be measured from a flow's
    end time). Prints the totals of what was actually sent (flows, bytes and packets summed over
    the records, datagrams, elapsed seconds, achieved rate), as JSON with ``args.json``.
    """
    family, sockaddr = _resolve(args.to)
    total = int(args.flows)
    rate = float(args.rate)
    if total < 0 or rate < 0 or args.seed < 0:
        raise SettingsError("--flows, --rate and --seed must be >= 0")
    if not 0 <= args.source_id <= 0xFFFFFFFF:
        raise SettingsError(f"--source-id {args.source_id} is not a 32-bit unsigned number")
    ipfix = args.format == "ipfix"
    cluster = synthetic_cluster(args.seed)
    sock = socket.socket(family, socket.SOCK_DGRAM)
    # A big send buffer absorbs bursts; an unconnected socket ignores ICMP errors from a collector
    # that is not up yet, as a real exporter does.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)

    totals = _Totals()
    sequence = 0
    boot_ms = time.time_ns() // 1_000_000 - _UPTIME_AT_START_MS
    prev_end_ms = boot_ms + _UPTIME_AT_START_MS
    min_burst = max(1, int(rate * _BURST_S)) if rate else _CHUNK
    chunk_no = 0
    status = 0
    t0 = time.monotonic()
    try:
        while totals.flows < total:
            if rate:
                due = int((time.monotonic() - t0) * rate) - totals.flows
                want = min(total - totals.flows, _CHUNK)
                if due < min(min_burst, want):
                    time.sleep((min(min_burst, want) - due) / rate)
                    continue
                k = min(due, want)
            else:
                k = min(total - totals.flows, _CHUNK)
            now_ms = time.time_ns() // 1_000_000
            # The header carries whole seconds: round up, so no flow ends after the export time.
            unix_secs = -(-now_ms // 1000)
            flows = synthetic_flows(
                cluster, k, (args.seed, chunk_no), prev_end_ms,
                span_ms=max(0, now_ms - prev_end_ms),
            )
            prev_end_ms = now_ms
            chunk_no += 1
            if ipfix:
                enc = encode_ipfix_packets(flows, domain=args.source_id, sequence=sequence,
                                           export_secs=unix_secs, template_first=totals.datagrams == 0,
                                           message_index=totals.datagrams)
            else:
                enc = encode_packets(
                    flows, source_id=args.source_id, sequence=sequence, unix_secs=unix_secs,
                    uptime_ms=unix_secs * 1000 - boot_ms, template_first=sequence == 0,
                )
            sent = 0
            try:
                for data in enc.packets:
                    _send(sock, data, sockaddr, totals)
                    totals.payload_bytes += len(data)
                    sent += 1
            finally:
                totals.datagrams += sent
                totals.flows += int(enc.records[:sent].sum())
                totals.bytes += int(enc.bytes[:sent].sum())
                totals.packets += int(enc.pkts[:sent].sum())
                # v9 numbers export packets, IPFIX the data records before the message.
                sequence = (sequence + (int(enc.records[:sent].sum()) if ipfix else sent)) & 0xFFFFFFFF
    except OSError as exc:
        log.error("sending to %s failed after %d datagrams: %s", args.to, totals.datagrams, exc)
        status = 1
    except KeyboardInterrupt:
        status = 130
    finally:
        elapsed = time.monotonic() - t0
        sock.close()

    report = {
        "to": args.to,
        "source_id": args.source_id,
        "format": "ipfix" if ipfix else "v9",
        "flows": totals.flows,
        "bytes": totals.bytes,
        "packets": totals.packets,
        "datagrams": totals.datagrams,
        "payload_bytes": totals.payload_bytes,
        "send_retries": totals.send_retries,
        "elapsed_s": round(elapsed, 6),
        "rate": round(totals.flows / elapsed, 1) if elapsed > 0 else 0.0,
        "complete": totals.flows == total,
    }
    if args.json:
        print(json.dumps(report))
    else:
        retries = f", {totals.send_retries} send retries" if totals.send_retries else ""
        print(
            f"sent {totals.flows} flows ({totals.bytes} bytes, {totals.packets} packets) in "
            f"{totals.datagrams} datagrams to {args.to} in {elapsed:.3f} s: "
            f"{report['rate']:.0f} flows/s{retries}"
        )
    sys.stdout.flush()
    return status


def run_inventory(args: argparse.Namespace) -> int:
    """Print the synthetic cluster's inventory (YAML) for ``args.seed`` to stdout."""
    if args.seed < 0:
        raise SettingsError("--seed must be >= 0")
    sys.stdout.write(inventory_yaml(synthetic_cluster(args.seed)))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m flowtally.dev.generator netflow ...``: the sender with every option
    (including ``--format``), for benchmarks and tools that do not go through the CLI."""
    parser = argparse.ArgumentParser(prog="python -m flowtally.dev.generator")
    sub = parser.add_subparsers(dest="what", required=True)
    add_netflow_arguments(sub.add_parser("netflow", help="send a synthetic NetFlow v9 or IPFIX stream"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return run_netflow(args)
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
