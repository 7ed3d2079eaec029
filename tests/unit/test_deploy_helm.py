"""The Helm chart: helm lint, helm template (default values and ci/values-all.yaml), the rendered
manifests validated for Kubernetes 1.31 with kubernetes-validate (schemas shipped in the PyPI
package, strict: unknown fields rejected), values.schema.json rejecting bad values, and the
security properties the sensor must have.

helm is built by deploy/local/setup.sh into ~/.cache/flowtally/bin; missing = failure, not skip.
(kubeconform is not used: it downloads its schemas at run time, which these machines cannot.)
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "flowtally"
BIN = Path.home() / ".cache" / "flowtally" / "bin"
KUBE_VERSION = "1.31.0"
DEFAULT_SET = ["--set", "clickhouse.url=http://flowtally:secret@clickhouse:8123"]
CRDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}


def _helm(*args: str) -> subprocess.CompletedProcess[str]:
    helm = shutil.which("helm", path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if not helm:
        pytest.fail("helm is missing: run bash deploy/local/setup.sh")
    return subprocess.run([helm, *args], capture_output=True, text=True, timeout=120, check=False)


def _render(*args: str) -> list[dict[str, Any]]:
    proc = _helm("template", "ft", str(CHART), "--namespace", "flowtally", "--kube-version", KUBE_VERSION, *args)
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def _by_kind(docs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


VALUES = {"default": DEFAULT_SET, "all": ["-f", str(CHART / "ci" / "values-all.yaml")]}


@pytest.mark.parametrize("values", list(VALUES))
def test_lint(values: str) -> None:
    proc = _helm("lint", str(CHART), "--strict", "--kube-version", KUBE_VERSION, *VALUES[values])
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("values", list(VALUES))
def test_rendered_manifests_are_valid_kubernetes(values: str) -> None:
    docs = _render(*VALUES[values])
    assert docs
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in CRDS:
            assert doc["spec"]["endpoints"] and doc["spec"]["selector"]["matchLabels"]
            continue
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def test_default_values() -> None:
    docs = _by_kind(_render(*DEFAULT_SET))
    kinds = {k for k, _ in docs}
    assert kinds == {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ConfigMap", "Secret", "DaemonSet",
                     "Deployment", "PodDisruptionBudget", "Job"}
    assert ("Secret", "ft-flowtally-migrate-credentials") in docs
    ds = docs["DaemonSet", "ft-flowtally-sensor"]["spec"]["template"]
    spec = ds["spec"]
    assert spec["hostNetwork"] is True and spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert {"operator": "Exists"} in spec["tolerations"]
    (netflow,) = spec["containers"]  # conntrack off by default
    sc = netflow["securityContext"]
    assert sc["capabilities"] == {"drop": ["ALL"]} and sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False and not sc.get("privileged")
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert {"checksum/config", "checksum/secret"} <= set(ds["metadata"]["annotations"])
    job = docs["Job", "ft-flowtally-migrate"]
    assert "pre-install" in job["metadata"]["annotations"]["helm.sh/hook"]
    # The sensor is on the host network: /metrics on the pod (node) address, not on every
    # interface; exporters from private address space only unless the values say otherwise.
    env = {e["name"]: e for e in netflow["env"]}
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert env["FLOWTALLY_METRICS_LISTEN"]["value"] == "[$(POD_IP)]:9461"
    names = [e["name"] for e in netflow["env"]]
    assert names.index("POD_IP") < names.index("FLOWTALLY_METRICS_LISTEN")  # $(…) needs it defined first
    assert env["FLOWTALLY_ALLOW_EXPORTERS"]["value"] == "10.0.0.0/8,172.16.0.0/12,192.168.0.0/16,100.64.0.0/10,fc00::/7"
    assert env["FLOWTALLY_LISTEN"]["value"] == "0.0.0.0:2055"


def _url_sources(docs: dict[tuple[str, str], dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Every container's FLOWTALLY_CLICKHOUSE_URL entries, by container name."""
    found: dict[str, list[dict[str, Any]]] = {}
    for (kind, _), doc in docs.items():
        if kind in ("Deployment", "DaemonSet", "Job"):
            for c in doc["spec"]["template"]["spec"]["containers"]:
                found[c["name"]] = [e for e in c.get("env", []) if e["name"] == "FLOWTALLY_CLICKHOUSE_URL"]
    return found


@pytest.mark.parametrize("values", sorted(VALUES))
def test_clickhouse_url_only_from_a_secret_and_never_optional(values: str) -> None:
    """The URL carries the password: never a plain value (the migrate hook included), only where
    ClickHouse is used, and a missing Secret key stops the pod instead of a sink on chDB."""
    docs = _by_kind(_render(*VALUES[values]))
    sources = _url_sources(docs)
    assert {name for name, entries in sources.items() if entries} == {"sink", "migrate"}
    for name, entries in sources.items():
        for entry in entries:
            assert "value" not in entry, name
            ref = entry["valueFrom"]["secretKeyRef"]
            assert "optional" not in ref or ref["optional"] is False, name
            secret = ("Secret", ref["name"])
            if values == "default":
                assert ref["key"] in docs[secret]["stringData"], name
    migrate_ref = sources["migrate"][0]["valueFrom"]["secretKeyRef"]["name"]
    if values == "default":
        hook = docs["Secret", migrate_ref]["metadata"]["annotations"]
        assert hook["helm.sh/hook"] == "pre-install,pre-upgrade" and int(hook["helm.sh/hook-weight"]) < 0
    else:
        assert migrate_ref == "flowtally-credentials"  # existingSecret: the user's own
    assert all("secret" not in str(e.get("value", "")) for c in sources.values() for e in c)
    role = docs["ClusterRole", "ft-flowtally-watcher"]
    granted = {(g, r) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]}
    assert granted == _watched()
    assert all(rule["verbs"] == ["get", "list", "watch"] for rule in role["rules"])
    watcher = docs["Deployment", "ft-flowtally-watcher"]["spec"]
    assert watcher["replicas"] == 1 and watcher["strategy"]["type"] == "Recreate"


def _watched() -> set[tuple[str, str]]:
    """(API group, resource) of every list/watch function flowtally watch-k8s calls."""
    from kubernetes import client

    from enricher.k8s.watcher import list_functions

    groups = {"CoreV1Api": "", "AppsV1Api": "apps", "BatchV1Api": "batch", "DiscoveryV1Api": "discovery.k8s.io"}
    funcs = list_functions(client.ApiClient(client.Configuration()))
    bound: dict[str, Any] = dict(funcs)  # bound methods of the client's API classes
    return {(groups[type(f.__self__).__name__], resource) for resource, f in bound.items()}


def test_everything_on() -> None:
    docs = _by_kind(_render(*VALUES["all"]))
    assert ("Secret", "ft-flowtally-credentials") not in docs  # existingSecret: none written
    kinds = {k for k, _ in docs}
    assert {"ServiceMonitor", "Service"} <= kinds
    containers = {c["name"]: c for c in docs["DaemonSet", "ft-flowtally-sensor"]["spec"]["template"]["spec"]["containers"]}
    assert containers["conntrack"]["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN"]}
    assert containers["netflow"]["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    ct = containers["conntrack"]
    assert ct["securityContext"]["runAsUser"] == 0  # an added capability is only effective for uid 0
    ct_env = {e["name"]: e for e in ct["env"]}
    assert ct_env["FLOWTALLY_EXPORTER"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP"
    assert ct_env["FLOWTALLY_ENABLE_SYSCTLS"]["value"] == "false"
    watcher = docs["Deployment", "ft-flowtally-watcher"]["spec"]["template"]["spec"]["containers"][0]
    assert watcher["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert ("ServiceMonitor", "ft-flowtally-watcher") in docs
    env = {e["name"]: e for e in containers["netflow"]["env"]}
    assert env["FLOWTALLY_KAFKA_SASL_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "flowtally-credentials"
    assert env["FLOWTALLY_ALLOW_EXPORTERS"]["value"] == "10.0.0.0/8,2001:db8::/32"
    cm = docs["ConfigMap", "ft-flowtally"]["data"]
    assert cm["FLOWTALLY_KAFKA_SASL_MECHANISM"] == "SCRAM-SHA-512" and cm["FLOWTALLY_FLOWS_TTL_DAYS"] == "30"


@pytest.mark.parametrize("values", sorted(VALUES))
def test_probes_split_readiness_from_liveness(values: str) -> None:
    """Every stage container: liveness and startup on /livez (the loop runs), readiness on
    /healthz (can work now), so no probe restarts a stage into a Kafka outage or a poison batch;
    the enricher and the sink are static group members named after their pod."""
    docs = _by_kind(_render(*VALUES[values]))
    stages = [(name, c) for (kind, name), doc in docs.items() if kind in ("Deployment", "DaemonSet")
              for c in doc["spec"]["template"]["spec"]["containers"]]
    assert {c["name"] for _, c in stages} >= {"netflow", "enricher", "sink"}
    for _, c in stages:
        port = "metrics" if c["name"] != "conntrack" else c["ports"][0]["containerPort"]
        assert c["livenessProbe"]["httpGet"] == {"path": "/livez", "port": port}, c["name"]
        assert c["startupProbe"]["httpGet"] == {"path": "/livez", "port": port}, c["name"]
        assert c["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": port}, c["name"]
    for name, c in stages:
        env = {e["name"]: e.get("value") for e in c.get("env", [])}
        static = c["name"] in ("enricher", "sink")
        assert (env.get("FLOWTALLY_GROUP_INSTANCE_ID") == "{hostname}") == static, (name, c["name"])


def test_configmap_change_rolls_the_pods() -> None:
    a = _by_kind(_render(*DEFAULT_SET))["Deployment", "ft-flowtally-sink"]
    b = _by_kind(_render(*DEFAULT_SET, "--set", "kafka.topicPrefix=other"))["Deployment", "ft-flowtally-sink"]
    key = "checksum/config"
    assert a["spec"]["template"]["metadata"]["annotations"][key] != b["spec"]["template"]["metadata"]["annotations"][key]


def test_configmap_settings_are_accepted_by_the_stages(monkeypatch: pytest.MonkeyPatch) -> None:
    from enricher.k8s.settings import WatcherSettings
    from enricher.settings import EnricherSettings
    from flowtally.settings import StageSettings, load_settings
    from sensors.conntrack.settings import ConntrackSettings
    from sensors.netflow.collector import NetflowSettings
    from sink.settings import SinkSettings

    docs = _by_kind(_render(*VALUES["all"]))
    data = docs["ConfigMap", "ft-flowtally"]["data"]
    for k in list(os.environ):
        if k.startswith("FLOWTALLY_"):
            monkeypatch.delenv(k)
    for k, v in data.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("FLOWTALLY_KAFKA_SASL_PASSWORD", "x")
    load_settings(SinkSettings)
    monkeypatch.delenv("FLOWTALLY_FLOWS_TTL_DAYS")  # a sink/migrate setting
    monkeypatch.delenv("FLOWTALLY_CLICKHOUSE_DATABASE")
    load_settings(NetflowSettings)
    assert load_settings(EnricherSettings).identity_history_s == load_settings(WatcherSettings).identity_history_s
    # Each container's own variables (literal values; fieldRefs stand for an IP or a node name).
    pods: dict[str, tuple[dict[str, Any], type[StageSettings]]] = {
            "netflow": (docs["DaemonSet", "ft-flowtally-sensor"], NetflowSettings),
            "conntrack": (docs["DaemonSet", "ft-flowtally-sensor"], ConntrackSettings),
            "watcher": (docs["Deployment", "ft-flowtally-watcher"], WatcherSettings),
            "enricher": (docs["Deployment", "ft-flowtally-enricher"], EnricherSettings)}
    stand_ins = {"status.hostIP": "10.0.0.11", "status.podIP": "10.0.0.11", "spec.nodeName": "node-1"}
    for container, (doc, model) in pods.items():
        (spec,) = [c for c in doc["spec"]["template"]["spec"]["containers"] if c["name"] == container]
        own: dict[str, str] = {
            e["name"]: (e.get("value") or stand_ins[e["valueFrom"]["fieldRef"]["fieldPath"]]).replace(
                "$(POD_IP)", stand_ins["status.podIP"])
            for e in spec["env"] if e["name"].startswith("FLOWTALLY_") and "secretKeyRef" not in e.get("valueFrom", {})}
        for k, v in own.items():
            monkeypatch.setenv(k, v)
        settings: StageSettings = load_settings(model)
        for k, v in own.items():
            value = getattr(settings, k.removeprefix("FLOWTALLY_").lower())
            shown = ",".join(value) if isinstance(value, list) else str(value)
            assert shown.lower() == v.lower(), (container, k, value)
        for k in own:
            monkeypatch.delenv(k)


@pytest.mark.parametrize("bad", [
    ["--set", "sink.replicas=0"],
    ["--set", "kafka.securityProtocol=TLS"],
    ["--set", "sensor.netflow.port=70000"],
    ["--set", "image.pullPolicy=Sometimes"],
    ["--set", "sensor.netflow.allowExporters={not-a-cidr}"],
    ["--set", "watcher.podLabels={has space}"],
    ["--set", "enricher.privateCidrs={not-a-cidr}"],
    ["--set", "extraEnv.NOT_OURS=1"],
    ["--set", "unknownKey=1"],
    ["--set", "clickhouse.url=ftp://x"],
])
def test_schema_rejects_bad_values(bad: list[str]) -> None:
    proc = _helm("template", "ft", str(CHART), "--kube-version", KUBE_VERSION, *DEFAULT_SET, *bad)
    assert proc.returncode != 0 and "schema" in proc.stderr, proc.stderr


def test_clickhouse_url_or_existing_secret_is_required() -> None:
    proc = _helm("template", "ft", str(CHART), "--kube-version", KUBE_VERSION)
    assert proc.returncode != 0 and "clickhouse.url is required" in proc.stderr
