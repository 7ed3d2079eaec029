"""Kubernetes objects -> who owns each address, and since when (pure: no I/O, no clock).

:class:`ClusterState` holds the objects the watcher lists and watches (as compact records parsed
from the API's JSON dicts) and the version history of every address. The shell feeds it events
(:meth:`ClusterState.apply`) and full lists (:meth:`ClusterState.replace`, which also reconciles:
an object missing from a relist is gone), then calls :meth:`ClusterState.flush` with the current
time; ``flush`` returns the addresses whose version lists changed, each with its whole new list
(the identity topic's record, :mod:`enricher.identity_topic`), or None for an address to forget.

Who owns an address (recomputed at each flush for every address the changes since the last one
touched, through indexes by address, so the order of events between two flushes does not matter
and a flush costs what changed, not the cluster's size):

- A pod that is not on the host network owns each IP of ``status.podIPs`` while it is not
  terminated (phase Succeeded/Failed) and not deleted. Kind ``pod``; workload from the
  controller owner reference: a ReplicaSet's Deployment, a Job's CronJob, else the owner itself
  (StatefulSet, DaemonSet, ReplicaSet without Deployment, Job without CronJob…); a pod without
  owner is its own workload (kind ``Pod``). ``service``: the services whose EndpointSlices list
  the pod's IP, sorted and joined with ``,`` (the enricher keeps one string).
- A Service's ClusterIPs (not headless): kind ``service``.
- A Node's InternalIP/ExternalIP addresses: kind ``node``.
- A hostNetwork pod: kind ``host-network`` on its (node's) addresses, *next to* the node's own
  version (both open at once), with ``host_ports`` = its containers' ports; the enricher gives a
  flow to one of those ports to the pod and the rest to the node.
- ``flowtally.io/ignore: "true"`` on a pod or on its namespace: kind ``ignored`` with no names
  (the enricher marks and counts such flows and does not name them). An ignored *hostNetwork*
  pod gets no version at all: the enricher treats only ``host-network`` versions as overlays of
  the node's (an ``ignored`` one would end the node's version), so flows to its ports stay the
  node's, unnamed as the pod.
- Several owners at once (a race between a pod's termination and its IP's reuse, a ClusterIP
  inside the pod range): a pod wins over a service, a service over a node; among pods the newest
  (creationTimestamp).

Versions: ``[valid_from, valid_to)`` in ms; an owner that appears opens a version, one that goes
(or changes any field) closes it. Times are the flush's ``now``, except that a version opening on
an address with no open version of its class (or whose open version belongs to a pod that no
longer exists) starts when the object says it got the address — the pod's
``PodReadyToStartContainers`` condition (sandbox and network ready), else ``status.startTime``;
a service's or node's ``creationTimestamp`` — clamped to after the address's previous versions
and to ``now``. So a watcher that starts (or restarts from the topic) after a pod started still
dates the pod's version from its start, and a reused IP changes hands when the new pod got it.
History: ended versions older than ``history_ms`` are dropped by :meth:`ClusterState.prune`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from enricher.identity import IGNORED, OPEN, OwnerInfo, Version, labels_text

#: The resources the watcher lists and watches (also the order of the initial lists: owners
#: and namespaces before the pods that refer to them).
RESOURCES = ("namespaces", "nodes", "replicasets", "jobs", "services", "endpointslices", "pods")

IGNORE_ANNOTATION = "flowtally.io/ignore"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
#: Kubernetes protocol names -> IP protocol numbers (as in the flows).
PROTOCOLS = {"TCP": 6, "UDP": 17, "SCTP": 132}

#: One change: an address (text) and its whole version list, or None to forget the address.
IdentityChanges = dict[str, list[Version] | None]


def parse_time(value: str | None) -> int | None:
    """Milliseconds since the epoch of a Kubernetes timestamp (RFC 3339), None if absent/invalid."""
    if not value:
        return None
    try:
        return int(datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() * 1000)
    except ValueError:
        return None


def normalise_ip(value: str) -> str | None:
    """The canonical text of an address (the identity topic's key), None if not an address."""
    try:
        return str(ipaddress.ip_address(value.split("%")[0]))
    except ValueError:
        return None


def _ips(values: Iterable[str | None]) -> tuple[str, ...]:
    out: list[str] = []
    for v in values:
        ip = normalise_ip(v) if v else None
        if ip is not None and ip not in out:
            out.append(ip)
    return tuple(out)


def _meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, Mapping) else {}


def _ignored(meta: Mapping[str, Any]) -> bool:
    return str((meta.get("annotations") or {}).get(IGNORE_ANNOTATION, "")).lower() == "true"


def _controller(meta: Mapping[str, Any]) -> tuple[str, str] | None:
    """(kind, name) of the controlling owner reference (else the first one), None if none."""
    refs = [r for r in meta.get("ownerReferences") or () if isinstance(r, Mapping)]
    for ref in refs:
        if ref.get("controller"):
            return str(ref.get("kind", "")), str(ref.get("name", ""))
    return (str(refs[0].get("kind", "")), str(refs[0].get("name", ""))) if refs else None


def object_key(obj: Mapping[str, Any]) -> str:
    """``namespace/name`` (``name`` for cluster-scoped objects): an object's key in its resource."""
    meta = _meta(obj)
    ns = meta.get("namespace") or ""
    return f"{ns}/{meta.get('name', '')}" if ns else str(meta.get("name", ""))


# -- compact records (a 100 k pod cluster must not keep 100 k full pod dicts) ---------------------


@dataclass(frozen=True, slots=True)
class Pod:
    """The fields of a Pod that decide who owns its addresses."""

    uid: str
    namespace: str
    name: str
    node: str
    ips: tuple[str, ...]
    active: bool  # not Succeeded/Failed
    host_network: bool
    ignored: bool
    controller: tuple[str, str] | None
    ports: tuple[tuple[int, int], ...]
    since_ms: int | None
    created_ms: int
    labels: str = ""  # the chosen labels (labels_text); "" when none is chosen or set


@dataclass(frozen=True, slots=True)
class Namespace:
    name: str
    ignored: bool


@dataclass(frozen=True, slots=True)
class Node:
    name: str
    addresses: tuple[str, ...]
    created_ms: int | None


@dataclass(frozen=True, slots=True)
class Controlled:
    """A ReplicaSet or a Job: only its own controller matters (Deployment, CronJob)."""

    controller: tuple[str, str] | None


@dataclass(frozen=True, slots=True)
class Service:
    namespace: str
    name: str
    cluster_ips: tuple[str, ...]
    created_ms: int | None


@dataclass(frozen=True, slots=True)
class EndpointSlice:
    namespace: str
    service: str
    addresses: tuple[str, ...]


Record = Pod | Namespace | Node | Controlled | Service | EndpointSlice


def _container_ports(spec: Mapping[str, Any]) -> tuple[tuple[int, int], ...]:
    ports: set[tuple[int, int]] = set()
    init_sidecars = [c for c in spec.get("initContainers") or () if c.get("restartPolicy") == "Always"]
    for container in [*(spec.get("containers") or ()), *init_sidecars]:
        for p in container.get("ports") or ():
            number = p.get("hostPort") or p.get("containerPort")
            proto = PROTOCOLS.get(str(p.get("protocol") or "TCP").upper())
            if number and proto:
                ports.add((proto, int(number)))
    return tuple(sorted(ports))


def parse_pod(obj: Mapping[str, Any], label_keys: Sequence[str] = ()) -> Pod:
    """The :class:`Pod` record of a Pod object, keeping the labels named in ``label_keys``."""
    meta, spec, status = _meta(obj), obj.get("spec") or {}, obj.get("status") or {}
    ips = _ips([p.get("ip") for p in status.get("podIPs") or ()] or [status.get("podIP")])
    since = None
    for cond in status.get("conditions") or ():
        if cond.get("type") == "PodReadyToStartContainers" and cond.get("status") == "True":
            since = parse_time(cond.get("lastTransitionTime"))
    if since is None:
        since = parse_time(status.get("startTime"))
    host_network = bool(spec.get("hostNetwork"))
    return Pod(
        uid=str(meta.get("uid", "")), namespace=str(meta.get("namespace", "")),
        name=str(meta.get("name", "")), node=str(spec.get("nodeName") or ""), ips=ips,
        active=status.get("phase") not in ("Succeeded", "Failed"), host_network=host_network,
        ignored=_ignored(meta), controller=_controller(meta),
        ports=_container_ports(spec) if host_network else (), since_ms=since,
        created_ms=parse_time(meta.get("creationTimestamp")) or 0,
        labels=_chosen_labels(meta, label_keys),
    )


def _chosen_labels(meta: Mapping[str, Any], keys: Sequence[str]) -> str:
    # Only chosen keys: labels like pod-template-hash or a version would multiply the distinct
    # label sets (and the stored strings) without answering a traffic question.
    labels = meta.get("labels") or {}
    return labels_text({k: str(labels[k]) for k in keys if k in labels})


def parse_namespace(obj: Mapping[str, Any]) -> Namespace:
    """The :class:`Namespace` record of a Namespace object."""
    meta = _meta(obj)
    return Namespace(str(meta.get("name", "")), _ignored(meta))


def parse_node(obj: Mapping[str, Any]) -> Node:
    """The :class:`Node` record: its InternalIP and ExternalIP addresses."""
    meta = _meta(obj)
    addrs = (obj.get("status") or {}).get("addresses") or ()
    ips = _ips([a.get("address") for a in addrs if a.get("type") in ("InternalIP", "ExternalIP")])
    return Node(str(meta.get("name", "")), ips, parse_time(meta.get("creationTimestamp")))


def parse_controlled(obj: Mapping[str, Any]) -> Controlled:
    """A ReplicaSet's or Job's controller."""
    return Controlled(_controller(_meta(obj)))


def parse_service(obj: Mapping[str, Any]) -> Service:
    """The :class:`Service` record: its ClusterIPs (none for headless and ExternalName)."""
    meta, spec = _meta(obj), obj.get("spec") or {}
    values = spec.get("clusterIPs") or [spec.get("clusterIP")]
    return Service(str(meta.get("namespace", "")), str(meta.get("name", "")),
                   _ips(v for v in values if v and v != "None"),
                   parse_time(meta.get("creationTimestamp")))


def parse_endpoint_slice(obj: Mapping[str, Any]) -> EndpointSlice:
    """The :class:`EndpointSlice` record: its service and every endpoint address (ready or not:
    the service selects the pod either way)."""
    meta = _meta(obj)
    service = str((meta.get("labels") or {}).get(SERVICE_NAME_LABEL, ""))
    addrs = [a for ep in obj.get("endpoints") or () for a in ep.get("addresses") or ()]
    return EndpointSlice(str(meta.get("namespace", "")), service, _ips(addrs))


PARSERS: dict[str, Callable[[Mapping[str, Any]], Record]] = {
    "pods": parse_pod, "namespaces": parse_namespace, "nodes": parse_node,
    "replicasets": parse_controlled, "jobs": parse_controlled, "services": parse_service,
    "endpointslices": parse_endpoint_slice,
}


# -- owners ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Want:
    """An owner an address should have now."""

    owner: OwnerInfo
    since_ms: int | None
    overlay: bool  # a hostNetwork pod, next to the node's version
    rank: tuple[int, int, str]  # exclusive owners: highest wins


def _is_overlay(owner: OwnerInfo) -> bool:
    return owner.kind == "host-network"


class ClusterState:
    """Cluster objects and every address's version history.

    Incremental: each stored object change marks the addresses it can affect (a pod's IPs, a
    service's ClusterIPs, a slice's endpoints, a node's addresses, the pods of a changed
    namespace or ReplicaSet/Job), and :meth:`flush` recomputes the owners of those addresses only,
    through indexes by address, so a flush costs what changed, not the size of the cluster.
    """

    def __init__(self, *, history_ms: int, history: Mapping[str, Sequence[Version]] | None = None,
                 pod_labels: Sequence[str] = ()) -> None:
        """``history``: version lists to continue (read back from the identity topic);
        ``pod_labels``: the label keys a pod's versions carry."""
        if history_ms <= 0:
            raise ValueError("history_ms must be positive")
        self.history_ms = history_ms
        keys = tuple(pod_labels)
        self._parsers = PARSERS | {"pods": lambda obj: parse_pod(obj, keys)}
        self._objects: dict[str, dict[str, Record]] = {r: {} for r in RESOURCES}
        self._history: dict[str, list[Version]] = {
            a: sorted(v, key=lambda x: x.valid_from_ms) for a, v in (history or {}).items() if v}
        # Every continued address is checked at the first flush (its owner may be gone).
        self._dirty: set[str] = set(self._history)
        self._pods_at: dict[str, set[str]] = {}  # address -> pod keys
        self._services_at: dict[str, set[str]] = {}  # address -> service keys
        self._nodes_at: dict[str, set[str]] = {}  # address -> node names
        self._backends: dict[tuple[str, str], dict[str, str]] = {}  # (ns, address) -> slice key -> service
        self._pods_of: dict[tuple[str, str, str], set[str]] = {}  # (ns, kind, name) of controller -> pods
        self._pods_in: dict[str, set[str]] = {}  # namespace -> pod keys
        self._ignored_ns: set[str] = set()
        self._live_uids: set[str] = set()

    # -- objects -------------------------------------------------------------------------------

    def apply(self, resource: str, event_type: str, obj: Mapping[str, Any]) -> None:
        """One watch event: ``ADDED``/``MODIFIED`` store the object, ``DELETED`` removes it."""
        if event_type == "DELETED":
            self._store(resource, object_key(obj), None)
        elif event_type in ("ADDED", "MODIFIED"):
            self._store(resource, object_key(obj), self._parsers[resource](obj))
        else:
            raise ValueError(f"not an object event: {event_type}")

    def replace(self, resource: str, objects: Iterable[Mapping[str, Any]]) -> None:
        """A full list of ``resource``: objects missing from it are gone (reconcile after a relist)."""
        parse = self._parsers[resource]
        fresh = {object_key(o): parse(o) for o in objects}
        for key in [k for k in self._objects[resource] if k not in fresh]:
            self._store(resource, key, None)
        for key, record in fresh.items():
            self._store(resource, key, record)

    def count(self, resource: str) -> int:
        """Objects of ``resource`` held."""
        return len(self._objects[resource])

    def _store(self, resource: str, key: str, record: Record | None) -> None:
        """The one place objects change: indexes follow, affected addresses become dirty."""
        store = self._objects[resource]
        old = store.get(key)
        if old == record:
            return
        if old is not None:
            self._index(resource, key, old, add=False)
        if record is None:
            del store[key]
        else:
            store[key] = record
            self._index(resource, key, record, add=True)

    def _index(self, resource: str, key: str, r: Record, *, add: bool) -> None:
        def link(index: dict[Any, set[str]], at: Any) -> None:
            if add:
                index.setdefault(at, set()).add(key)
            else:
                members = index.get(at)
                if members is not None:
                    members.discard(key)
                    if not members:
                        del index[at]

        dirty = self._dirty
        if isinstance(r, Pod):
            for ip in r.ips:
                link(self._pods_at, ip)
            link(self._pods_in, r.namespace)
            if r.controller:
                link(self._pods_of, (r.namespace, *r.controller))
            if r.active:
                (self._live_uids.add if add else self._live_uids.discard)(r.uid)
            dirty.update(r.ips)
        elif isinstance(r, Service):
            for ip in r.cluster_ips:
                link(self._services_at, ip)
            dirty.update(r.cluster_ips)
        elif isinstance(r, Node):
            for ip in r.addresses:
                link(self._nodes_at, ip)
            dirty.update(r.addresses)
        elif isinstance(r, EndpointSlice):
            for ip in r.addresses:
                backends = self._backends.setdefault((r.namespace, ip), {})
                if add:
                    backends[key] = r.service
                else:
                    backends.pop(key, None)
                    if not backends:
                        del self._backends[(r.namespace, ip)]
            dirty.update(r.addresses)
        elif isinstance(r, Namespace):
            if r.ignored:
                (self._ignored_ns.add if add else self._ignored_ns.discard)(r.name)
            self._dirty_pods(self._pods_in.get(r.name, ()))
        elif isinstance(r, Controlled):
            ns, _, name = key.partition("/")
            kind = "ReplicaSet" if resource == "replicasets" else "Job"
            self._dirty_pods(self._pods_of.get((ns, kind, name), ()))

    def _dirty_pods(self, keys: Iterable[str]) -> None:
        pods = self._objects["pods"]
        for k in keys:
            p = pods.get(k)
            if isinstance(p, Pod):
                self._dirty.update(p.ips)

    # -- history -------------------------------------------------------------------------------

    @property
    def addresses(self) -> int:
        """Addresses with a version history."""
        return len(self._history)

    @property
    def versions_total(self) -> int:
        """Versions held, over all addresses."""
        return sum(len(v) for v in self._history.values())

    def versions(self, address: str) -> list[Version]:
        """The version list of one address, oldest first."""
        ip = normalise_ip(address)
        return list(self._history.get(ip or address, ()))

    def history(self) -> dict[str, list[Version]]:
        """Every address's version list (a copy)."""
        return {a: list(v) for a, v in self._history.items()}

    def owners_of(self, ip: str) -> list[_Want]:
        """Who should own ``ip`` now: the exclusive owner first (if any), then the overlays."""
        objs = self._objects
        wants: list[_Want] = []
        for key in self._pods_at.get(ip, ()):
            p = objs["pods"][key]
            assert isinstance(p, Pod)
            if not p.active:
                continue
            ignored = p.ignored or p.namespace in self._ignored_ns
            if ignored and p.host_network:
                continue
            if ignored:
                owner = OwnerInfo(kind=IGNORED)
            else:
                workload, workload_kind = self._workload(p)
                services = sorted(set(self._backends.get((p.namespace, ip), {}).values()) - {""})
                owner = OwnerInfo(
                    kind="host-network" if p.host_network else "pod", namespace=p.namespace,
                    name=p.name, workload=workload, workload_kind=workload_kind,
                    service=",".join(services), node=p.node, pod_uid=p.uid, labels=p.labels,
                    host_ports=p.ports)
            wants.append(_Want(owner, p.since_ms, p.host_network, (3, p.created_ms, p.name)))
        for key in self._services_at.get(ip, ()):
            s = objs["services"][key]
            assert isinstance(s, Service)
            owner = OwnerInfo(kind="service", namespace=s.namespace, name=s.name, service=s.name)
            wants.append(_Want(owner, s.created_ms, False, (2, 0, s.name)))
        for key in self._nodes_at.get(ip, ()):
            n = objs["nodes"][key]
            assert isinstance(n, Node)
            wants.append(_Want(OwnerInfo(kind="node", name=n.name, node=n.name), n.created_ms, False,
                               (1, 0, n.name)))
        exclusive = [w for w in wants if not w.overlay]
        overlays = sorted((w for w in wants if w.overlay), key=lambda w: w.rank)
        return ([max(exclusive, key=lambda w: w.rank)] if exclusive else []) + overlays

    def _workload(self, pod: Pod) -> tuple[str, str]:
        if pod.controller is None:
            return pod.name, "Pod"
        kind, name = pod.controller
        parents = {"ReplicaSet": ("replicasets", "Deployment"), "Job": ("jobs", "CronJob")}
        if kind in parents:
            resource, parent_kind = parents[kind]
            parent = self._objects[resource].get(f"{pod.namespace}/{name}")
            if isinstance(parent, Controlled) and parent.controller and parent.controller[0] == parent_kind:
                return parent.controller[1], parent_kind
        return name, kind

    def flush(self, now_ms: int) -> IdentityChanges:
        """Bring the versions of every address touched since the last flush in line with the
        objects; the addresses whose lists changed."""
        dirty, self._dirty = self._dirty, set()
        changes: IdentityChanges = {}
        for address in dirty:
            if self._update(address, self.owners_of(address), self._live_uids, now_ms):
                changes[address] = list(self._history[address])
        return changes

    def _update(self, address: str, wants: list[_Want], live_pods: set[str], now_ms: int) -> bool:
        versions = self._history.get(address, [])
        wanted = {w.owner: w for w in wants}
        open_idx = {v.owner: i for i, v in enumerate(versions) if v.open}
        to_close = [i for owner, i in open_idx.items() if owner not in wanted]
        to_open = [w for owner, w in wanted.items() if owner not in open_idx]
        if not to_close and not to_open:
            return False
        # Nothing may start before (or inside) what the address had before.
        floor = max((v.valid_from_ms + 1 if v.open else v.valid_to_ms for v in versions), default=None)
        opened: list[Version] = []
        exclusive_start: int | None = None
        for w in to_open:
            # Still held by an object of the same class that exists: a change, dated now.
            holders = [versions[i].owner for i in open_idx.values()
                       if _is_overlay(versions[i].owner) == w.overlay]
            replaced_gone = all(h.kind in ("pod", "host-network") and h.pod_uid and h.pod_uid not in live_pods
                                for h in holders)
            start = now_ms
            if w.since_ms is not None and (not holders or replaced_gone):
                start = min(w.since_ms, now_ms)
            if floor is not None:
                start = max(start, floor)
            opened.append(Version(w.owner, start))
            if not w.overlay:
                exclusive_start = start
        for i in to_close:
            v = versions[i]
            end = now_ms
            if exclusive_start is not None and not _is_overlay(v.owner):
                end = exclusive_start  # handed over to the new owner
            versions[i] = Version(v.owner, v.valid_from_ms, max(end, v.valid_from_ms + 1))
        versions.extend(opened)
        versions.sort(key=lambda v: (v.valid_from_ms, v.valid_to_ms))
        self._history[address] = versions
        return True

    def prune(self, now_ms: int) -> IdentityChanges:
        """Forget versions that ended before ``now_ms - history_ms``: the addresses that changed
        (None for an address left with no version: a tombstone)."""
        horizon = now_ms - self.history_ms
        changes: IdentityChanges = {}
        for address, versions in list(self._history.items()):
            keep = [v for v in versions if v.open or v.valid_to_ms >= horizon]
            if len(keep) != len(versions):
                if keep:
                    self._history[address] = keep
                    changes[address] = list(keep)
                else:
                    del self._history[address]
                    changes[address] = None
        return changes


__all__ = ["OPEN", "RESOURCES", "ClusterState", "IdentityChanges", "parse_time"]
