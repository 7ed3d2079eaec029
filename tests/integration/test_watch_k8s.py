"""`flowtally watch-k8s` as a real subprocess against the fake API server (tests/fake_apiserver.py,
a real HTTP server reached through a kubeconfig) and the real local Kafka: the identity topic,
decoded with the enricher's own reader, holds exactly the expected versions after the initial
lists, watch events, a bookmark, dropped connections, 410 Gone (event and HTTP status) with a
pod gone meanwhile, an API server restart, and a restart of the watcher itself.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from enricher.identity import OPEN, OwnerInfo, Version
from enricher.identity_topic import decode_record
from enricher.schema import ENRICHED_SCHEMA
from enricher.schema import SCHEMA_NAME as ENRICHED
from flowtally import kafka
from flowtally.dev.localstack import Stage, free_port
from flowtally.settings import KafkaSettings
from flowtally.wire import decode_batch, encode_batch
from sensors.schema import SCHEMA_NAME as RAW
from sensors.schema import address16, address_text, build_raw_table
from tests.fake_apiserver import RESOURCES, FakeApiServer, self_signed_cert

Topic = dict[str, list[Version] | None]


def iso(ms: int) -> str:
    """A Kubernetes timestamp (whole seconds, as the API serves them)."""
    return datetime.fromtimestamp(ms // 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def secs(ms: int) -> int:
    """``ms`` truncated to whole seconds (what a timestamp round trip keeps)."""
    return ms // 1000 * 1000


def pod(name: str, ip: str, started_ms: int, *, ns: str = "shop", owner: tuple[str, str] | None = None,
        host_network: bool = False, ports: list[dict[str, Any]] | None = None,
        annotations: dict[str, str] | None = None, labels: dict[str, str] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": ns, "uid": f"uid-{name}",
                            "creationTimestamp": iso(started_ms), "labels": labels or {}}
    if owner:
        meta["ownerReferences"] = [{"apiVersion": "apps/v1", "kind": owner[0], "name": owner[1],
                                    "uid": f"uid-{owner[1]}", "controller": True, "blockOwnerDeletion": True}]
    if annotations:
        meta["annotations"] = annotations
    return {"metadata": meta,
            "spec": {"nodeName": "node-1", "hostNetwork": host_network,
                     "containers": [{"name": "main", "image": "registry.example/app:1", "ports": ports or []}]},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "startTime": iso(started_ms),
                       "conditions": [{"type": "Ready", "status": "True"}]}}


def read_topic(bootstrap: str, topic: str) -> Topic:
    """The last record of every key of the identity topic, decoded by the enricher's reader."""

    async def read() -> Topic:
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
        await consumer.start()
        out: Topic = {}
        try:
            tp = TopicPartition(topic, 0)
            consumer.assign([tp])
            await consumer.seek_to_beginning(tp)
            end = (await consumer.end_offsets([tp]))[tp]
            deadline = time.monotonic() + 30
            while await consumer.position(tp) < end and time.monotonic() < deadline:
                for m in (await consumer.getmany(tp, timeout_ms=500)).get(tp, ()):
                    address, versions = decode_record(m.key, m.value)
                    out[address_text(address)] = versions
        finally:
            await consumer.stop()
        return out

    return asyncio.run(read())


def wait_for(what: str, check: Callable[[], bool], stage: Stage, timeout: float = 30.0) -> None:
    """Poll ``check`` until true (bounded); fail with the watcher's log otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stage.check_alive()
        if check():
            return
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}:\n{stage.log_tail()}")


def cart(name: str, ip: str, started_ms: int, service: str = "cart") -> Version:
    """The expected version of a pod of the cart Deployment."""
    return Version(OwnerInfo(kind="pod", namespace="shop", name=name, workload="cart",
                             workload_kind="Deployment", service=service, node="node-1",
                             pod_uid=f"uid-{name}"), secs(started_ms))


@pytest.fixture
def fake() -> Iterator[FakeApiServer]:
    with FakeApiServer() as server:
        yield server


class Watcher:
    """`flowtally watch-k8s` subprocesses sharing one topic prefix and kubeconfig."""

    def __init__(self, bootstrap: str, fake: FakeApiServer, tmp: Path,
                 access: dict[str, str] | None = None) -> None:
        """``access``: the environment that tells the watcher where the API server is (default:
        a kubeconfig written for ``fake``)."""
        self.bootstrap = bootstrap
        self.prefix = f"t{uuid.uuid4().hex[:10]}"
        self.topic = f"{self.prefix}.k8s.identity"
        self.access = access or {"FLOWTALLY_KUBECONFIG": str(fake.write_kubeconfig(tmp / "kubeconfig"))}
        self.tmp = tmp
        self.runs = 0

    def start(self) -> Stage:
        self.runs += 1
        port = free_port()
        env = {
            "FLOWTALLY_KAFKA_BOOTSTRAP": self.bootstrap, "FLOWTALLY_KAFKA_TOPIC_PREFIX": self.prefix,
            **self.access, "FLOWTALLY_FLUSH_INTERVAL_S": "0.1",
            "FLOWTALLY_BACKOFF_INITIAL_S": "0.2", "FLOWTALLY_BACKOFF_MAX_S": "1",
            "FLOWTALLY_LIST_PAGE_SIZE": "2",  # several pages per list
        }
        stage = Stage("watch-k8s", ["watch-k8s", "--metrics-listen", f"127.0.0.1:{port}"], env,
                      self.tmp / f"watch-k8s-{self.runs}.log", port)
        stage.start()
        return stage

    def topic_now(self) -> Topic:
        return read_topic(self.bootstrap, self.topic)


RS = ("ReplicaSet", "cart-7d9c6")


def seed(fake: FakeApiServer, t0: int) -> Topic:
    """A small cluster whose objects started at ``t0``; the identity records it should give."""
    fake.put("namespaces", {"metadata": {"name": "shop"}})
    fake.put("namespaces", {"metadata": {"name": "vault", "annotations": {"flowtally.io/ignore": "true"}}})
    fake.put("nodes", {"metadata": {"name": "node-1", "creationTimestamp": iso(t0 - 3_600_000)},
                       "status": {"addresses": [{"type": "InternalIP", "address": "192.168.1.10"},
                                                {"type": "Hostname", "address": "node-1"}]}})
    fake.put("replicasets", {"metadata": {"name": "cart-7d9c6", "namespace": "shop", "ownerReferences": [
        {"kind": "Deployment", "name": "cart", "controller": True}]}})
    fake.put("services", {"metadata": {"name": "cart", "namespace": "shop", "creationTimestamp": iso(t0)},
                          "spec": {"clusterIP": "10.96.0.20", "clusterIPs": ["10.96.0.20"]}})
    fake.put("endpointslices", {"metadata": {"name": "cart-x1", "namespace": "shop",
                                             "labels": {"kubernetes.io/service-name": "cart"}},
                                "endpoints": [{"addresses": ["10.244.1.5"]}, {"addresses": ["10.244.1.6"]}]})
    fake.put("pods", pod("cart-7d9c6-a", "10.244.1.5", t0, owner=RS))
    fake.put("pods", pod("cart-7d9c6-b", "10.244.1.6", t0, owner=RS))
    fake.put("pods", pod("secrets-0", "10.244.1.9", t0, ns="vault", owner=("StatefulSet", "secrets")))
    fake.put("pods", pod("node-exporter-q", "192.168.1.10", t0 + 1000, ns="monitoring",
                         owner=("DaemonSet", "node-exporter"), host_network=True,
                         ports=[{"containerPort": 9100, "hostPort": 9100, "protocol": "TCP"}]))
    node_owner = OwnerInfo(kind="node", name="node-1", node="node-1")
    exporter = Version(OwnerInfo(kind="host-network", namespace="monitoring", name="node-exporter-q",
                                 workload="node-exporter", workload_kind="DaemonSet", node="node-1",
                                 pod_uid="uid-node-exporter-q", host_ports=((6, 9100),)), secs(t0 + 1000))
    expected: Topic = {
        "10.244.1.5": [cart("cart-7d9c6-a", "10.244.1.5", t0)],
        "10.244.1.6": [cart("cart-7d9c6-b", "10.244.1.6", t0)],
        "10.244.1.9": [Version(OwnerInfo(kind="ignored"), secs(t0))],
        "10.96.0.20": [Version(OwnerInfo(kind="service", namespace="shop", name="cart", service="cart"), secs(t0))],
        "192.168.1.10": [Version(node_owner, secs(t0 - 3_600_000)), exporter],
    }
    return expected


def test_watch_k8s_against_the_fake_api_server(kafka_bootstrap: str, fake: FakeApiServer, tmp_path: Path) -> None:
    t0 = int(time.time() * 1000) - 600_000  # the cluster's objects started 10 minutes ago
    expected = seed(fake, t0)
    rs = RS
    w = Watcher(kafka_bootstrap, fake, tmp_path)
    stage = w.start()
    try:
        stage.wait_healthy(60)
        # 1. the initial lists: exactly these records, written once each
        assert w.topic_now() == expected
        assert stage.metric("flowtally_watcher_records_written_total") == len(expected)
        for r in RESOURCES:
            watches = fake.watch_requests(r)
            assert watches and watches[0].query["allowWatchBookmarks"] == "true"
            assert int(watches[0].query["resourceVersion"]) == 110  # the list's version (10 puts)
            assert fake.list_requests(r)[0].query["limit"] == "2"
        assert len(fake.list_requests("pods")) == 2  # 4 pods, 2 per page

        # 2. watch events: a pod is deleted, a StatefulSet pod gets its IP (IP reuse)
        fake.wait_watching()
        before = int(time.time() * 1000)
        fake.delete("pods", "cart-7d9c6-a", "shop")
        wait_for("the deleted pod's version to close", lambda: not w.topic_now()["10.244.1.5"][-1].open, stage)  # type: ignore[index]
        after = int(time.time() * 1000)
        closed = w.topic_now()["10.244.1.5"]
        assert closed is not None and len(closed) == 1
        end = closed[0].valid_to_ms
        assert before <= end <= after
        reuse_start = int(time.time() * 1000)
        fake.put("pods", pod("db-0", "10.244.1.5", reuse_start, owner=("StatefulSet", "db")))
        db = OwnerInfo(kind="pod", namespace="shop", name="db-0", workload="db", workload_kind="StatefulSet",
                       service="cart", node="node-1", pod_uid="uid-db-0")  # the slice still lists the IP
        wait_for("the reused IP's new version", lambda: len(w.topic_now()["10.244.1.5"] or ()) == 2, stage)
        assert w.topic_now()["10.244.1.5"] == [Version(closed[0].owner, closed[0].valid_from_ms, end),
                                               Version(db, max(secs(reuse_start), end))]

        # 3. a bookmark moves every watch's version on: the rewatch after a dropped connection
        # starts from it, not from the older list or event versions
        bookmark_rv = fake.resource_version
        fake.bookmark()
        wait_for("7 bookmarks", lambda: stage.metric("flowtally_watcher_events_total", {"type": "BOOKMARK"}) == 7,
                 stage)
        watches_before = {r: len(fake.watch_requests(r)) for r in RESOURCES}
        fake.drop_connections()
        wait_for("every resource to watch again",
                 lambda: all(len(fake.watch_requests(r)) > watches_before[r] for r in RESOURCES), stage)
        for r in RESOURCES:
            assert fake.watch_requests(r)[watches_before[r]].query["resourceVersion"] == str(bookmark_rv)
        assert stage.metric("flowtally_watcher_relists_total") == 0  # a drop is no reason to relist
        # events after the drop arrive on the new streams
        fake.wait_watching()
        t_new = int(time.time() * 1000)
        fake.put("pods", pod("cart-7d9c6-c", "10.244.1.7", t_new, owner=rs))
        wait_for("the pod added after the drop", lambda: "10.244.1.7" in w.topic_now(), stage)
        assert w.topic_now()["10.244.1.7"] == [cart("cart-7d9c6-c", "10.244.1.7", t_new, service="")]

        # 4. 410 Gone: a pod went while the history was compacted (no event for it), and the
        # nodes' next watch answers HTTP 410 as well; every resource relists, the pod's version closes
        fake.wait_watching()
        fake.remove_silently("pods", "cart-7d9c6-b", "shop")
        fake.fail_next_watch("nodes", 410)
        before = int(time.time() * 1000)
        fake.expire()
        wait_for("the vanished pod's version to close", lambda: not (w.topic_now()["10.244.1.6"] or [])[-1].open,
                 stage)
        after = int(time.time() * 1000)
        gone = w.topic_now()["10.244.1.6"]
        assert gone is not None and [(v.owner.name, v.valid_from_ms) for v in gone] == [("cart-7d9c6-b", secs(t0))]
        assert before <= gone[0].valid_to_ms <= after
        wait_for("relists", lambda: stage.metric("flowtally_watcher_relists_total") == 8, stage)
        assert len(fake.list_requests("nodes")) == 3  # initial, after the 410 event, after the HTTP 410
        assert len(fake.list_requests("pods")) == 4  # two pages, twice

        # 5. an API server restart: connections cut, port closed for a while, a pod deleted and
        # one added meanwhile (their events lost with the watch cache): reconnect with backoff,
        # 410 on the old versions, relist, reconcile
        relists = stage.metric("flowtally_watcher_relists_total")
        t_down = int(time.time() * 1000)

        def meanwhile() -> None:
            fake.delete("pods", "cart-7d9c6-c", "shop")
            fake.put("pods", pod("web-1", "10.244.1.8", t_down, owner=("ReplicaSet", "web-55f")))

        fake.restart(down_s=1.5, while_down=meanwhile)
        wait_for("the restart's changes", lambda: "10.244.1.8" in w.topic_now()
                 and not (w.topic_now()["10.244.1.7"] or [])[-1].open, stage)
        assert stage.metric("flowtally_watcher_reconnects_total") >= 1
        # Every resource's watch gets its 410 and relists once; the pods' changes can be in the
        # topic before the last resource has reconnected on a loaded machine, so wait for them all.
        wait_for("every resource relisted", lambda: stage.metric("flowtally_watcher_relists_total") >= relists + 7,
                 stage)
        assert stage.metric("flowtally_watcher_relists_total") == relists + 7
        topic = w.topic_now()
        # a ReplicaSet the watcher does not know (no Deployment above it) names the workload itself
        assert topic["10.244.1.8"] == [Version(OwnerInfo(
            kind="pod", namespace="shop", name="web-1", workload="web-55f", workload_kind="ReplicaSet",
            node="node-1", pod_uid="uid-web-1"), secs(t_down))]
        # nothing else changed
        for address in ("10.244.1.9", "10.96.0.20", "192.168.1.10"):
            assert topic[address] == expected[address]
        assert stage.stop() == 0
        final = w.topic_now()

        # 6. a restarted watcher continues the history: unchanged addresses keep their lists
        # (nothing written for them), a pod deleted while it was down is closed
        fake.remove_silently("pods", "db-0", "shop")
        stage = w.start()
        stage.wait_healthy(60)
        wait_for("the restart's write", lambda: not (w.topic_now()["10.244.1.5"] or [])[-1].open, stage)
        again = w.topic_now()
        assert stage.metric("flowtally_watcher_records_written_total") == 1
        assert {a: v for a, v in again.items() if a != "10.244.1.5"} == {
            a: v for a, v in final.items() if a != "10.244.1.5"}
        reused = again["10.244.1.5"]
        assert reused is not None and reused[:1] == (final["10.244.1.5"] or [])[:1]
        assert reused[1].owner.name == "db-0" and reused[1].valid_to_ms != OPEN
        assert stage.stop() == 0
    finally:
        stage.stop()


def test_watch_k8s_in_cluster_through_its_service_account(kafka_bootstrap: str, tmp_path: Path) -> None:
    """In a pod there is no kubeconfig: KUBERNETES_SERVICE_HOST/PORT and the mounted token and CA
    lead to an HTTPS API server. With the right CA the watcher lists and writes the cluster; with
    another CA it refuses the server (TLS verified) and stays unhealthy; without a token it says
    which directory it read and exits 1."""
    with FakeApiServer(tls=self_signed_cert(tmp_path)) as fake:
        t0 = int(time.time() * 1000) - 600_000
        expected = seed(fake, t0)
        in_cluster = {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(fake.port)}
        account = fake.write_service_account(tmp_path / "serviceaccount")
        w = Watcher(kafka_bootstrap, fake, tmp_path,
                    access=in_cluster | {"FLOWTALLY_SERVICE_ACCOUNT_DIR": str(account)})
        stage = w.start()
        try:
            stage.wait_healthy(60)
            assert w.topic_now() == expected
            lists = [r for r in fake.requests if not r.watch]
            assert lists and all(r.status == 200 for r in lists)  # the token was sent
        finally:
            assert stage.stop() == 0

        # a CA that did not sign the server's certificate: no request gets through
        other = tmp_path / "other"
        other.mkdir()
        stranger = FakeApiServer(tls=self_signed_cert(other)).write_service_account(other / "serviceaccount")
        served = len(fake.requests)
        w = Watcher(kafka_bootstrap, fake, tmp_path, access=in_cluster | {"FLOWTALLY_SERVICE_ACCOUNT_DIR": str(stranger)})
        stage = w.start()
        try:
            wait_for("failed attempts", lambda: stage.metric("flowtally_watcher_reconnects_total") >= 3, stage)
            assert not stage.healthy()
            assert len(fake.requests) == served
            assert "CERTIFICATE_VERIFY_FAILED" in stage.log_path.read_text()
        finally:
            assert stage.stop() == 0

        # no token mounted: a clear error and exit 2 (could not start)
        (account / "token").unlink()
        w.access["FLOWTALLY_SERVICE_ACCOUNT_DIR"] = str(account)
        stage = w.start()
        assert stage.process is not None and stage.process.wait(60) == 2
        assert f"cannot reach the Kubernetes API through service account in {account}" in stage.log_path.read_text()


def test_enricher_names_flows_from_the_watchers_topic(kafka_bootstrap: str, fake: FakeApiServer,
                                                      tmp_path: Path) -> None:
    """The watcher writes the topic (an IP reused by a second pod included), then the real
    `flowtally enrich` replays it and names a raw batch: each flow by the owner at its time."""
    t0 = int(time.time() * 1000) - 600_000
    seed(fake, t0)
    w = Watcher(kafka_bootstrap, fake, tmp_path)
    watcher = w.start()
    try:
        watcher.wait_healthy(60)
        fake.wait_watching()
        fake.delete("pods", "cart-7d9c6-a", "shop")
        wait_for("the deleted pod's version", lambda: not (w.topic_now()["10.244.1.5"] or [])[-1].open, watcher)
        time.sleep(1.1)  # the next pod's start (whole seconds) after the release
        fake.put("pods", pod("db-0", "10.244.1.5", int(time.time() * 1000), owner=("StatefulSet", "db"),
                             labels={"app": "db", "team": "data", "controller-revision-hash": "db-7f"}))
        wait_for("the reused IP", lambda: len(w.topic_now()["10.244.1.5"] or ()) == 2, watcher)
        assert watcher.stop() == 0
    finally:
        watcher.stop()
    old, new = w.topic_now()["10.244.1.5"] or []
    now = int(time.time() * 1000)
    # (src, dst, dst_port, flow end)
    flows = [("10.244.1.5", "10.96.0.20", 8080, old.valid_to_ms - 1),  # the old pod, to the service
             ("10.244.1.5", "10.96.0.20", 8080, now),  # the new pod
             ("10.244.1.6", "192.168.1.10", 9100, now),  # to the hostNetwork exporter's port
             ("10.244.1.6", "192.168.1.10", 22, now),  # the node itself
             ("10.244.1.9", "10.244.1.6", 8080, now)]  # from an ignored namespace

    def a(values: list[str]) -> np.ndarray:
        return np.frombuffer(b"".join(address16(v) for v in values), np.uint8).reshape(-1, 16)

    raw = build_raw_table({
        "src_addr": a([f[0] for f in flows]), "dst_addr": a([f[1] for f in flows]),
        "src_port": np.arange(40000, 40000 + len(flows)), "dst_port": np.array([f[2] for f in flows]),
        "proto": np.full(len(flows), 6), "end": np.array([f[3] for f in flows]),
        "bytes": np.arange(1, len(flows) + 1) * 100, "packets": np.ones(len(flows), np.int64),
    })
    settings = KafkaSettings(bootstrap=kafka_bootstrap, topic_prefix=w.prefix)

    async def produce() -> None:
        producer = kafka.producer(settings)
        await producer.start()
        try:
            value, headers = encode_batch(raw, RAW)
            await producer.send_and_wait(settings.topic("raw"), value, key=b"k", headers=list(headers))
        finally:
            await producer.stop()

    async def consume() -> dict[str, list[Any]]:
        consumer = kafka.consumer(settings, settings.topic("enriched"), group_id=f"{w.prefix}-check")
        await consumer.start()
        rows: list[dict[str, Any]] = []
        try:
            deadline = time.monotonic() + 60
            while len(rows) < len(flows) and time.monotonic() < deadline:
                for messages in (await consumer.getmany(timeout_ms=500)).values():
                    for m in messages:
                        rows += decode_batch(m.value, m.headers, ENRICHED_SCHEMA, ENRICHED).to_pylist()
        finally:
            await consumer.stop()
        return {k: [r[k] for r in rows] for k in ("src_name", "src_kind", "dst_name", "dst_kind",
                                                   "src_workload", "dst_service", "src_labels", "bytes")}

    port = free_port()
    enricher = Stage("enricher", ["enrich", "--metrics-listen", f"127.0.0.1:{port}"],
                     {"FLOWTALLY_KAFKA_BOOTSTRAP": kafka_bootstrap, "FLOWTALLY_KAFKA_TOPIC_PREFIX": w.prefix,
                      "FLOWTALLY_APP_ID": f"{w.prefix}-enricher", "FLOWTALLY_SESSION_TIMEOUT_S": "10"},
                     tmp_path / "enricher.log", port)
    enricher.start()
    try:
        enricher.wait_healthy(90)
        asyncio.run(produce())
        out = asyncio.run(consume())
        assert enricher.stop() == 0, enricher.log_tail()
    finally:
        enricher.stop()
    assert new.owner.name == "db-0"
    assert out["bytes"] == [100, 200, 300, 400, 500]
    assert out["src_name"] == ["cart-7d9c6-a", "db-0", "cart-7d9c6-b", "cart-7d9c6-b", ""]
    # the watcher's default pod_labels chose app and team, not the revision hash
    assert out["src_labels"] == ["", '{"app":"db","team":"data"}', "", "", ""]
    assert out["src_workload"] == ["cart", "db", "cart", "cart", ""]
    assert out["src_kind"] == ["pod", "pod", "pod", "pod", "ignored"]
    assert out["dst_name"] == ["cart", "cart", "node-exporter-q", "node-1", "cart-7d9c6-b"]
    assert out["dst_kind"] == ["service", "service", "host-network", "node", "pod"]
    assert out["dst_service"] == ["cart", "cart", "", "", "cart"]
