"""The watcher's pure core: Kubernetes objects + times -> per-address version lists."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest

from enricher.identity import OPEN, OwnerInfo, Version
from enricher.k8s.objects import ClusterState, parse_time
from enricher.k8s.settings import WatcherSettings
from flowtally.settings import SettingsError, load_settings

H = 3_600_000


def ms(hhmm: str, seconds: int = 0) -> int:
    """Milliseconds of HH:MM on 2026-01-01 (UTC)."""
    h, m = (int(x) for x in hhmm.split(":"))
    return int(datetime(2026, 1, 1, h, m, seconds, tzinfo=UTC).timestamp() * 1000)


def ts(hhmm: str, seconds: int = 0) -> str:
    """The Kubernetes timestamp of HH:MM."""
    h, m = (int(x) for x in hhmm.split(":"))
    return f"2026-01-01T{h:02d}:{m:02d}:{seconds:02d}Z"


def pod(name: str, ip: str | None, *, ns: str = "shop", uid: str | None = None, node: str = "node-1",
        owner: tuple[str, str] | None = None, started: str = "09:00", phase: str = "Running",
        host_network: bool = False, ports: list[dict[str, Any]] | None = None,
        annotations: dict[str, str] | None = None) -> dict[str, Any]:
    """A Pod as the API serves it (the fields the watcher reads, and a few it does not)."""
    meta: dict[str, Any] = {"name": name, "namespace": ns, "uid": uid or f"uid-{name}",
                            "creationTimestamp": ts(started), "labels": {"app": name}}
    if owner:
        meta["ownerReferences"] = [{"apiVersion": "apps/v1", "kind": owner[0], "name": owner[1],
                                    "uid": f"uid-{owner[1]}", "controller": True}]
    if annotations:
        meta["annotations"] = annotations
    status: dict[str, Any] = {"phase": phase, "startTime": ts(started)}
    if ip:
        status |= {"podIP": ip, "podIPs": [{"ip": ip}]}
    return {"metadata": meta, "status": status,
            "spec": {"nodeName": node, "hostNetwork": host_network,
                     "containers": [{"name": "main", "image": "x", "ports": ports or []}]}}


def owned(kind: str, name: str, owner: tuple[str, str] | None, ns: str = "shop") -> dict[str, Any]:
    """A ReplicaSet or Job, optionally controlled by ``owner``."""
    meta: dict[str, Any] = {"name": name, "namespace": ns}
    if owner:
        meta["ownerReferences"] = [{"kind": owner[0], "name": owner[1], "controller": True}]
    return {"kind": kind, "metadata": meta}


def service(name: str, cluster_ip: str, ns: str = "shop") -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": ns, "creationTimestamp": ts("08:00")},
            "spec": {"clusterIP": cluster_ip, "clusterIPs": [cluster_ip] if cluster_ip != "None" else ["None"]}}


def slice_(name: str, svc: str, ips: list[str], ns: str = "shop") -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": ns, "labels": {"kubernetes.io/service-name": svc}},
            "endpoints": [{"addresses": [ip], "conditions": {"ready": True}} for ip in ips]}


def node(name: str, internal: str, external: str | None = None) -> dict[str, Any]:
    addrs = [{"type": "InternalIP", "address": internal}, {"type": "Hostname", "address": name}]
    if external:
        addrs.append({"type": "ExternalIP", "address": external})
    return {"metadata": {"name": name, "creationTimestamp": ts("07:00")}, "status": {"addresses": addrs}}


def namespace(name: str, ignore: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if ignore:
        meta["annotations"] = {"flowtally.io/ignore": "true"}
    return {"metadata": meta}


def pod_owner(name: str, *, ns: str = "shop", workload: str = "", kind: str = "", service: str = "",
              node: str = "node-1") -> OwnerInfo:
    return OwnerInfo(kind="pod", namespace=ns, name=name, workload=workload or name,
                     workload_kind=kind or "Pod", service=service, node=node, pod_uid=f"uid-{name}")


def test_parse_time() -> None:
    assert parse_time("2026-01-01T10:00:00Z") == ms("10:00")
    assert parse_time(None) is None and parse_time("yesterday") is None


def test_ip_reuse_dates_each_pod_by_its_own_times() -> None:
    state = ClusterState(history_ms=H)
    state.replace("pods", [pod("cart-a", "10.244.1.7", started="09:00")])
    first = state.flush(ms("09:30"))
    # a fresh watcher dates the pod from its start, not from when it first saw it
    assert first == {"10.244.1.7": [Version(pod_owner("cart-a"), ms("09:00"))]}
    state.apply("pods", "DELETED", pod("cart-a", "10.244.1.7"))
    assert state.flush(ms("10:00")) == {
        "10.244.1.7": [Version(pod_owner("cart-a"), ms("09:00"), ms("10:00"))]}
    state.apply("pods", "ADDED", pod("db-b", "10.244.1.7", started="10:02"))
    changes = state.flush(ms("10:02", 1))
    assert changes == {"10.244.1.7": [Version(pod_owner("cart-a"), ms("09:00"), ms("10:00")),
                                      Version(pod_owner("db-b"), ms("10:02"))]}
    assert state.flush(ms("10:03")) == {}  # nothing changed: nothing written


def test_reuse_in_one_flush_hands_over_at_the_new_pods_start() -> None:
    state = ClusterState(history_ms=H)
    state.replace("pods", [pod("a", "10.0.0.5", started="09:00")])
    state.flush(ms("09:10"))
    state.apply("pods", "DELETED", pod("a", "10.0.0.5"))
    state.apply("pods", "ADDED", pod("b", "10.0.0.5", started="10:02"))
    assert state.flush(ms("10:05"))["10.0.0.5"] == [
        Version(pod_owner("a"), ms("09:00"), ms("10:02")), Version(pod_owner("b"), ms("10:02"))]


def test_terminated_pod_releases_its_ip_and_a_new_ip_is_assigned_later() -> None:
    state = ClusterState(history_ms=H)
    state.replace("pods", [pod("job-x", None, started="09:00")])  # pending, no IP yet
    assert state.flush(ms("09:00", 5)) == {}
    state.apply("pods", "MODIFIED", pod("job-x", "10.0.0.9", started="09:00"))
    assert state.flush(ms("09:01")) == {"10.0.0.9": [Version(pod_owner("job-x"), ms("09:00"))]}
    state.apply("pods", "MODIFIED", pod("job-x", "10.0.0.9", started="09:00", phase="Succeeded"))
    assert state.flush(ms("09:05")) == {"10.0.0.9": [Version(pod_owner("job-x"), ms("09:00"), ms("09:05"))]}
    state.apply("pods", "DELETED", pod("job-x", "10.0.0.9", phase="Succeeded"))
    assert state.flush(ms("09:06")) == {}  # already closed


def test_owners_deployment_cronjob_statefulset_daemonset_bare() -> None:
    state = ClusterState(history_ms=H)
    state.replace("replicasets", [owned("ReplicaSet", "cart-7d9c6", ("Deployment", "cart")),
                                  owned("ReplicaSet", "solo-rs", None)])
    state.replace("jobs", [owned("Job", "report-2901", ("CronJob", "report")), owned("Job", "once", None)])
    state.replace("pods", [
        pod("cart-7d9c6-x2x1q", "10.0.0.1", owner=("ReplicaSet", "cart-7d9c6")),
        pod("solo-rs-abcde", "10.0.0.2", owner=("ReplicaSet", "solo-rs")),
        pod("report-2901-zz", "10.0.0.3", owner=("Job", "report-2901")),
        pod("once-q", "10.0.0.4", owner=("Job", "once")),
        pod("web-0", "10.0.0.5", owner=("StatefulSet", "web")),
        pod("agent-k2", "10.0.0.6", owner=("DaemonSet", "agent")),
        pod("debug", "10.0.0.7"),
    ])
    changes = state.flush(ms("09:30"))
    got = {ip: (v[0].owner.workload, v[0].owner.workload_kind) for ip, v in changes.items() if v}
    assert got == {
        "10.0.0.1": ("cart", "Deployment"), "10.0.0.2": ("solo-rs", "ReplicaSet"),
        "10.0.0.3": ("report", "CronJob"), "10.0.0.4": ("once", "Job"),
        "10.0.0.5": ("web", "StatefulSet"), "10.0.0.6": ("agent", "DaemonSet"), "10.0.0.7": ("debug", "Pod"),
    }


def test_service_cluster_ip_and_backends_via_endpoint_slices() -> None:
    state = ClusterState(history_ms=H)
    state.replace("services", [service("cart", "10.96.0.20"), service("cart-headless", "None"),
                               service("all-shop", "10.96.0.21")])
    state.replace("endpointslices", [slice_("cart-abc", "cart", ["10.0.0.1"]),
                                     slice_("all-shop-1", "all-shop", ["10.0.0.1", "10.0.0.2"]),
                                     slice_("other-ns", "cart", ["10.0.0.2"], ns="elsewhere")])
    state.replace("pods", [pod("cart-1", "10.0.0.1"), pod("db-1", "10.0.0.2")])
    changes = state.flush(ms("09:30"))
    assert changes == {
        "10.96.0.20": [Version(OwnerInfo(kind="service", namespace="shop", name="cart", service="cart"), ms("08:00"))],
        "10.96.0.21": [Version(OwnerInfo(kind="service", namespace="shop", name="all-shop", service="all-shop"),
                               ms("08:00"))],
        "10.0.0.1": [Version(pod_owner("cart-1", service="all-shop,cart"), ms("09:00"))],
        # a slice of another namespace does not name this pod
        "10.0.0.2": [Version(pod_owner("db-1", service="all-shop"), ms("09:00"))],
    }
    # the pod leaves the cart service at 10:00: a new version from then
    state.apply("endpointslices", "MODIFIED", slice_("cart-abc", "cart", []))
    assert state.flush(ms("10:00"))["10.0.0.1"] == [
        Version(pod_owner("cart-1", service="all-shop,cart"), ms("09:00"), ms("10:00")),
        Version(pod_owner("cart-1", service="all-shop"), ms("10:00"))]


def test_host_network_pod_next_to_the_node_and_node_addresses() -> None:
    state = ClusterState(history_ms=H)
    state.replace("nodes", [node("node-1", "192.168.1.10", external="203.0.113.5")])
    exporter = pod("node-exporter-x", "192.168.1.10", ns="monitoring", host_network=True,
                   owner=("DaemonSet", "node-exporter"), started="09:10",
                   ports=[{"containerPort": 9100, "hostPort": 9100, "protocol": "TCP"},
                          {"containerPort": 53, "protocol": "UDP"}, {"containerPort": 9999, "protocol": "SCTP"}])
    state.replace("pods", [exporter])
    changes = state.flush(ms("09:30"))
    node_owner = OwnerInfo(kind="node", name="node-1", node="node-1")
    host = OwnerInfo(kind="host-network", namespace="monitoring", name="node-exporter-x",
                     workload="node-exporter", workload_kind="DaemonSet", node="node-1",
                     pod_uid="uid-node-exporter-x", host_ports=((6, 9100), (17, 53), (132, 9999)))
    assert changes == {"192.168.1.10": [Version(node_owner, ms("07:00")), Version(host, ms("09:10"))],
                       "203.0.113.5": [Version(node_owner, ms("07:00"))]}
    # the hostNetwork pod goes: the node's version stays open
    state.apply("pods", "DELETED", exporter)
    assert state.flush(ms("10:00")) == {
        "192.168.1.10": [Version(node_owner, ms("07:00")), Version(host, ms("09:10"), ms("10:00"))]}


@pytest.mark.parametrize("on", ["pod", "namespace"])
def test_ignore_annotation(on: str) -> None:
    state = ClusterState(history_ms=H)
    state.replace("namespaces", [namespace("shop", ignore=on == "namespace"), namespace("other")])
    ann = {"flowtally.io/ignore": "true"} if on == "pod" else None
    state.replace("pods", [pod("secret", "10.0.0.1", annotations=ann), pod("seen", "10.0.0.2", ns="other"),
                           pod("hostnet", "192.168.1.10", annotations=ann, host_network=True,
                               ports=[{"containerPort": 8080}])])
    changes = state.flush(ms("09:30"))
    assert changes["10.0.0.1"] == [Version(OwnerInfo(kind="ignored"), ms("09:00"))]
    assert "192.168.1.10" not in changes  # an ignored hostNetwork pod: no version (the node's stays)
    assert changes["10.0.0.2"] == [Version(pod_owner("seen", ns="other"), ms("09:00"))]
    # the annotation removed at 10:00: the pod is named from then on
    if on == "namespace":
        state.apply("namespaces", "MODIFIED", namespace("shop"))
    else:
        state.apply("pods", "MODIFIED", pod("secret", "10.0.0.1"))
    assert state.flush(ms("10:00"))["10.0.0.1"] == [
        Version(OwnerInfo(kind="ignored"), ms("09:00"), ms("10:00")), Version(pod_owner("secret"), ms("10:00"))]


def test_pod_wins_over_a_terminated_holder_and_newest_pod_wins() -> None:
    state = ClusterState(history_ms=H)
    state.replace("pods", [pod("old", "10.0.0.5", started="08:00", phase="Failed"),
                           pod("older", "10.0.0.6", started="08:00"), pod("newer", "10.0.0.6", started="09:00")])
    changes = state.flush(ms("09:30"))
    assert changes == {"10.0.0.6": [Version(pod_owner("newer"), ms("09:00"))]}


def test_relist_reconciles_and_restart_continues_history() -> None:
    state = ClusterState(history_ms=H)
    state.replace("pods", [pod("a", "10.0.0.1"), pod("b", "10.0.0.2")])
    state.flush(ms("09:30"))
    state.replace("pods", [pod("b", "10.0.0.2")])  # a is gone from the relist
    assert state.flush(ms("10:00")) == {"10.0.0.1": [Version(pod_owner("a"), ms("09:00"), ms("10:00"))]}
    # a restarted watcher continues from the topic's lists: b stays one open version; c is new
    # and took a's old address at 10:10 while the watcher was down
    restarted = ClusterState(history_ms=H, history=state.history())
    restarted.replace("pods", [pod("b", "10.0.0.2"), pod("c", "10.0.0.1", started="10:10")])
    assert restarted.flush(ms("10:20")) == {"10.0.0.1": [
        Version(pod_owner("a"), ms("09:00"), ms("10:00")), Version(pod_owner("c"), ms("10:10"))]}
    # a pod deleted while the watcher was down: closed at the restart's first flush
    again = ClusterState(history_ms=H, history=restarted.history())
    again.replace("pods", [pod("c", "10.0.0.1", started="10:10")])
    assert again.flush(ms("10:30")) == {"10.0.0.2": [Version(pod_owner("b"), ms("09:00"), ms("10:30"))]}


def test_restart_with_a_replaced_pod_hands_over_at_the_new_pods_start() -> None:
    state = ClusterState(history_ms=H)
    state.replace("pods", [pod("a", "10.0.0.1", started="09:00")])
    state.flush(ms("09:30"))
    restarted = ClusterState(history_ms=H, history=state.history())
    restarted.replace("pods", [pod("b", "10.0.0.1", started="10:02")])  # a went while we were down
    assert restarted.flush(ms("10:05")) == {"10.0.0.1": [
        Version(pod_owner("a"), ms("09:00"), ms("10:02")), Version(pod_owner("b"), ms("10:02"))]}


def test_prune_bounds_history() -> None:
    state = ClusterState(history_ms=H)
    state.replace("pods", [pod("a", "10.0.0.1", started="08:00"), pod("b", "10.0.0.2", started="08:00")])
    state.flush(ms("08:30"))
    state.replace("pods", [pod("b", "10.0.0.2", started="08:00")])
    state.flush(ms("09:00"))
    state.replace("pods", [pod("c", "10.0.0.2", uid="uid-c", started="09:30"),
                           pod("b", "10.0.0.3", started="08:00")])  # b moved?! (a new IP)
    state.flush(ms("09:30"))
    assert state.prune(ms("09:59")) == {}  # ended 09:00 and 09:30: within the hour
    # at 10:01, a's version (ended 09:00) is older than the history: the address is forgotten
    assert state.prune(ms("10:01")) == {"10.0.0.1": None}
    assert state.versions("10.0.0.1") == []
    assert [v.owner.name for v in state.versions("10.0.0.2")] == ["b", "c"]
    assert state.versions("10.0.0.2")[-1].valid_to_ms == OPEN


def test_owner_learned_after_its_pods_renames_them_from_then_on() -> None:
    state = ClusterState(history_ms=H)
    state.replace("pods", [pod("api-5f-x", "10.0.0.1", owner=("ReplicaSet", "api-5f")),
                           pod("other", "10.0.0.2", owner=("ReplicaSet", "other-rs"))])
    assert state.flush(ms("09:30"))["10.0.0.1"][0].owner.workload_kind == "ReplicaSet"  # type: ignore[index]
    state.apply("replicasets", "ADDED", owned("ReplicaSet", "api-5f", ("Deployment", "api")))
    changes = state.flush(ms("09:31"))
    assert list(changes) == ["10.0.0.1"]  # only the ReplicaSet's pods were looked at again
    assert [(v.owner.workload, v.owner.workload_kind, v.valid_from_ms, v.valid_to_ms)
            for v in changes["10.0.0.1"] or ()] == [
        ("api-5f", "ReplicaSet", ms("09:00"), ms("09:31")), ("api", "Deployment", ms("09:31"), OPEN)]


def test_settings(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLOWTALLY_KUBECONFIG", "/etc/kube/config")
    monkeypatch.setenv("FLOWTALLY_IDENTITY_HISTORY_S", "7200")
    monkeypatch.setenv("FLOWTALLY_KAFKA_BOOTSTRAP", "kafka-0:9092")
    monkeypatch.setenv("FLOWTALLY_CLICKHOUSE_DATABASE", "flowtally")  # the Helm ConfigMap's, for other stages
    s = load_settings(WatcherSettings, kube_context="prod")
    assert (str(s.kubeconfig), s.kube_context, s.identity_history_s, s.kafka.topic("identity")) == (
        "/etc/kube/config", "prod", 7200.0, "flowtally.k8s.identity")
    bad = tmp_path / "w.yaml"
    bad.write_text("flush_interval_s: 0\nkubeconfg: /x\n")
    with pytest.raises(SettingsError) as err:
        load_settings(WatcherSettings, bad)
    assert "FLOWTALLY_FLUSH_INTERVAL_S" in str(err.value) and "kubeconfg" in str(err.value)


def test_chosen_labels_and_a_label_change() -> None:
    """Only the chosen label keys are kept (one sorted JSON text); a pod whose chosen labels
    change gets a new version from then on, so earlier flows keep the earlier labels."""
    state = ClusterState(history_ms=H, pod_labels=["app", "team"])
    p = pod("cart-a", "10.244.1.7", started="09:00")
    p["metadata"]["labels"] = {"team": "shop", "app": "cart", "pod-template-hash": "7d9c6"}
    state.replace("pods", [p])
    labelled = replace(pod_owner("cart-a"), labels='{"app":"cart","team":"shop"}')
    assert state.flush(ms("09:30")) == {"10.244.1.7": [Version(labelled, ms("09:00"))]}
    p["metadata"]["labels"] = {"app": "cart", "team": "payments", "pod-template-hash": "other"}
    state.apply("pods", "MODIFIED", p)
    moved = replace(labelled, labels='{"app":"cart","team":"payments"}')
    assert state.flush(ms("10:00")) == {
        "10.244.1.7": [Version(labelled, ms("09:00"), ms("10:00")), Version(moved, ms("10:00"))]}
    # an unchosen label changing is no change at all
    p["metadata"]["labels"] = {"app": "cart", "team": "payments", "pod-template-hash": "third"}
    state.apply("pods", "MODIFIED", p)
    assert state.flush(ms("10:05")) == {}
