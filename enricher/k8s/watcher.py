"""List and watch the cluster's resources with the ``kubernetes`` client (the I/O shell).

One thread per resource (the client is synchronous), each running the usual informer loop:

1. *list* the resource (pages of ``list_page_size``, ``limit``/``continue``), hand the whole list
   over (the core replaces what it held: objects missing from a relist are gone), note the list's
   resourceVersion;
2. *watch* from that version with ``allowWatchBookmarks`` and a server-side ``timeoutSeconds``;
   every event and bookmark moves the version on; a stream that ends (timeout, dropped
   connection, API server restart) is watched again from the last version;
3. ``410 Gone`` (an ``ERROR`` event with a 410 Status, or an HTTP 410 answer) means the version
   is too old for the server: list again (a *relist*, counted);
4. any failure (connection refused, 5xx, timeouts) waits with capped exponential backoff
   (``backoff_initial_s`` doubling up to ``backoff_max_s``) and retries (a *reconnect*, counted).

Responses are read raw (``_preload_content=False``) and parsed with orjson into plain dicts: the
core reads a handful of fields, and the client's model deserialisation would cost far more than
the watch itself on a big cluster.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.config import incluster_config
from kubernetes.watch.watch import iter_resp_lines
from prometheus_client import Counter

from enricher.k8s.objects import RESOURCES
from enricher.k8s.settings import WatcherSettings

log = logging.getLogger(__name__)

EVENTS = Counter("flowtally_watcher_events_total", "Watch events received", ["resource", "type"])
LISTS = Counter("flowtally_watcher_lists_total", "Full lists of a resource (the first and every relist)",
                ["resource"])
RELISTS = Counter("flowtally_watcher_relists_total", "Lists after the first (410 Gone: too old a version)",
                  ["resource"])
RECONNECTS = Counter("flowtally_watcher_reconnects_total", "Requests retried after a failure (with backoff)",
                     ["resource"])
WATCHES = Counter("flowtally_watcher_watch_requests_total", "Watch requests made", ["resource"])


@dataclass(frozen=True, slots=True)
class Listed:
    """A full list of ``resource``."""

    resource: str
    items: list[dict[str, Any]]


@dataclass(frozen=True, slots=True)
class Changed:
    """One watch event (``ADDED``/``MODIFIED``/``DELETED``) of ``resource``."""

    resource: str
    type: str
    object: dict[str, Any]


Item = Listed | Changed


class Gone(Exception):
    """The server no longer has the version we watch from (410): relist."""


class ClusterAccessError(Exception):
    """The API server's address or credentials could not be read (says from where)."""


def api_client(settings: WatcherSettings) -> client.ApiClient:
    """An API client from the kubeconfig setting, the pod's service account, or the default
    kubeconfig (in that order); :class:`ClusterAccessError` names the source that failed."""
    configuration = client.Configuration()
    try:
        if settings.kubeconfig is not None:
            source = f"kubeconfig {settings.kubeconfig}"
            config.load_kube_config(config_file=str(settings.kubeconfig), context=settings.kube_context,
                                    client_configuration=configuration)
        elif os.environ.get("KUBERNETES_SERVICE_HOST"):
            sa = settings.service_account_dir
            source = f"service account in {sa} (KUBERNETES_SERVICE_HOST is set)"
            # The loader re-reads the token file as it expires: projected service account tokens
            # are rotated by the kubelet (hourly), and a watcher runs for months.
            incluster_config.InClusterConfigLoader(
                token_filename=str(sa / "token"), cert_filename=str(sa / "ca.crt"),
            ).load_and_set(configuration)
        else:
            source = "the default kubeconfig ($KUBECONFIG or ~/.kube/config)"
            config.load_kube_config(context=settings.kube_context, client_configuration=configuration)
    except (config.ConfigException, OSError, ValueError) as exc:
        raise ClusterAccessError(f"cannot reach the Kubernetes API through {source}: {exc}") from exc
    # No retries inside urllib3: the watch loop retries with its own backoff and counts them.
    configuration.retries = 0
    return client.ApiClient(configuration)


def list_functions(api: client.ApiClient) -> dict[str, Callable[..., Any]]:
    """The client's list/watch function of each resource (all namespaces)."""
    core, apps = client.CoreV1Api(api), client.AppsV1Api(api)
    batch, discovery = client.BatchV1Api(api), client.DiscoveryV1Api(api)
    return {
        "namespaces": core.list_namespace, "nodes": core.list_node,
        "pods": core.list_pod_for_all_namespaces, "services": core.list_service_for_all_namespaces,
        "endpointslices": discovery.list_endpoint_slice_for_all_namespaces,
        "replicasets": apps.list_replica_set_for_all_namespaces,
        "jobs": batch.list_job_for_all_namespaces,
    }


class ResourceWatcher:
    """The list-then-watch loop of one resource, in its own thread."""

    def __init__(self, resource: str, func: Callable[..., Any], settings: WatcherSettings,
                 emit: Callable[[Item], None]) -> None:
        self.resource = resource
        self._func = func
        self._settings = settings
        self._emit = emit
        self._stop = threading.Event()
        self._resp: Any = None
        self._lists = 0
        #: The version to watch from (the last list's, event's or bookmark's); None: list first.
        self._version: str | None = None
        self._thread = threading.Thread(target=self._run, name=f"watch-{resource}", daemon=True)

    def start(self) -> None:
        """Start the thread."""
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the loop to end, cut its open watch stream, wait for the thread."""
        self._stop.set()
        resp = self._resp
        if resp is not None:
            # Unblocks a read waiting on a quiet watch stream (already closed: nothing to do).
            with contextlib.suppress(Exception):
                resp.shutdown()
        self._thread.join(timeout)

    def _run(self) -> None:
        s = self._settings
        delay = s.backoff_initial_s
        while not self._stop.is_set():
            try:
                if self._version is None:
                    self._version = self._list()
                    delay = s.backoff_initial_s
                self._watch()
                delay = s.backoff_initial_s
            except Gone as exc:
                log.info("%s: %s: relisting", self.resource, exc)
                self._version = None
            except Exception as exc:
                if self._stop.is_set():
                    break
                RECONNECTS.labels(self.resource).inc()
                # The version of the last event or bookmark stays: the next watch resumes there.
                log.warning("%s: %s; retrying in %.1f s", self.resource, _describe(exc), delay)
                self._stop.wait(delay)
                delay = min(delay * 2, s.backoff_max_s)

    def _list(self) -> str:
        s = self._settings
        items: list[dict[str, Any]] = []
        token: str | None = None
        version = ""
        while True:
            kwargs: dict[str, Any] = {"limit": s.list_page_size}
            if token:
                kwargs["_continue"] = token
            resp = self._func(**kwargs, _preload_content=False,
                              _request_timeout=(s.request_timeout_s, s.request_timeout_s))
            try:
                page = orjson.loads(resp.data)
            finally:
                resp.release_conn()
            items.extend(page.get("items") or ())
            meta = page.get("metadata") or {}
            version = version or str(meta.get("resourceVersion") or "")
            token = meta.get("continue")
            if not token:
                break
        if self._lists:
            RELISTS.labels(self.resource).inc()
        self._lists += 1
        LISTS.labels(self.resource).inc()
        self._emit(Listed(self.resource, items))
        log.info("%s: listed %d at version %s", self.resource, len(items), version)
        return version

    def _watch(self) -> None:
        """Watch from :attr:`_version` until the stream ends, moving it on with every event."""
        s = self._settings
        version = self._version
        WATCHES.labels(self.resource).inc()
        try:
            resp = self._func(watch=True, resource_version=version, allow_watch_bookmarks=True,
                              timeout_seconds=s.watch_timeout_s, _preload_content=False,
                              _request_timeout=(s.request_timeout_s, s.watch_timeout_s + s.request_timeout_s))
        except ApiException as exc:
            if exc.status == 410:
                raise Gone(f"watch from version {version} answered 410") from exc
            raise
        self._resp = resp
        try:
            for line in iter_resp_lines(resp):
                if self._stop.is_set():
                    break
                if not line:
                    continue
                event = orjson.loads(line)
                etype, obj = event.get("type"), event.get("object") or {}
                EVENTS.labels(self.resource, str(etype)).inc()
                if etype == "ERROR":
                    if obj.get("code") == 410:
                        raise Gone(f"watch: {obj.get('message', 'gone')}")
                    raise RuntimeError(f"watch error {obj.get('code')}: {obj.get('message')}")
                new_version = (obj.get("metadata") or {}).get("resourceVersion")
                if etype != "BOOKMARK":
                    self._emit(Changed(self.resource, str(etype), obj))
                if new_version:
                    self._version = str(new_version)
        finally:
            self._resp = None
            resp.close()  # a partly read stream must not go back to the pool
            resp.release_conn()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ApiException):
        return f"API server answered {exc.status} {exc.reason}"
    return f"{type(exc).__name__}: {exc}"


def start_watchers(settings: WatcherSettings, functions: dict[str, Callable[..., Any]],
                   emit: Callable[[Item], None]) -> list[ResourceWatcher]:
    """A started watcher per resource (``functions``: :func:`list_functions`), all feeding
    ``emit`` (called from their threads)."""
    watchers = [ResourceWatcher(r, functions[r], settings, emit) for r in RESOURCES]
    for w in watchers:
        w.start()
    return watchers
