"""A fake Kubernetes API server at the HTTP boundary, for the watcher's tests.

A real HTTP/1.1 server (``http.server``, a thread per connection) on 127.0.0.1 and an ephemeral
port that speaks the part of the API the watcher uses, in the API's own JSON shapes:

- list: ``GET /api/v1/pods`` (and services, nodes, namespaces; EndpointSlices, ReplicaSets, Jobs
  under their groups) with ``metadata.resourceVersion``, ``limit``/``continue`` paging;
- watch: ``?watch=true&resourceVersion=N`` answers with a chunked stream of newline-delimited
  events (``ADDED``/``MODIFIED``/``DELETED``, ``BOOKMARK`` when ``allowWatchBookmarks=true``,
  ``ERROR`` with a 410 ``Status`` when the version is too old), ending after ``timeoutSeconds``;
- bearer-token authentication (401 ``Status`` otherwise).

A test scripts a scenario with :meth:`FakeApiServer.put` / :meth:`delete` (each a new
resourceVersion and a watch event), :meth:`bookmark`, :meth:`drop_connections` (watch streams cut
mid-stream, no final chunk), :meth:`expire` (history compacted: open watches get an ERROR 410 and a
watch from an older version too, so the client must relist), :meth:`fail_next_watch` (an HTTP
error status for the next watch request) and :meth:`restart` (the port closes, then the server
comes back on the same port with its objects but without its watch history, as an API server
whose watch cache starts empty). :attr:`requests` records every request for assertions.
:meth:`write_kubeconfig` writes a kubeconfig pointing at it. With ``tls=`` (:func:`self_signed_cert`)
it serves HTTPS, and :meth:`write_service_account` writes the token and CA a pod gets, for clients
that find the server in-cluster (KUBERNETES_SERVICE_HOST/PORT).
"""

from __future__ import annotations

import copy
import json
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

#: resource -> (collection path, kind, apiVersion, namespaced)
RESOURCES: dict[str, tuple[str, str, str, bool]] = {
    "pods": ("/api/v1/pods", "Pod", "v1", True),
    "services": ("/api/v1/services", "Service", "v1", True),
    "nodes": ("/api/v1/nodes", "Node", "v1", False),
    "namespaces": ("/api/v1/namespaces", "Namespace", "v1", False),
    "endpointslices": ("/apis/discovery.k8s.io/v1/endpointslices", "EndpointSlice", "discovery.k8s.io/v1", True),
    "replicasets": ("/apis/apps/v1/replicasets", "ReplicaSet", "apps/v1", True),
    "jobs": ("/apis/batch/v1/jobs", "Job", "batch/v1", True),
}
_BY_PATH = {path: name for name, (path, *_rest) in RESOURCES.items()}


def status(code: int, reason: str, message: str) -> dict[str, Any]:
    """A ``metav1.Status`` failure object."""
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


@dataclass
class Request:
    """One request the server received."""

    resource: str
    watch: bool
    query: dict[str, str]
    status: int = 0


@dataclass
class _Event:
    rv: int
    resource: str
    type: str
    object: dict[str, Any]


@dataclass
class _State:
    """Objects and watch history; survives :meth:`FakeApiServer.restart`."""

    rv: int = 100
    oldest_rv: int = 100  # a watch from an older version gets 410
    objects: dict[str, dict[str, dict[str, Any]]] = field(default_factory=lambda: {r: {} for r in RESOURCES})
    log: list[_Event] = field(default_factory=list)
    drop_generation: int = 0
    expire_generation: int = 0
    fail_next: dict[str, int] = field(default_factory=dict)  # resource -> HTTP status


def self_signed_cert(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 signed by itself (so it is its own CA), and its key."""
    cert, key = directory / "apiserver.crt", directory / "apiserver.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "1", "-subj", "/CN=fake-apiserver",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


class _Server(ThreadingHTTPServer):
    """The HTTP server, quiet about clients that hang up mid-request: a client refusing the TLS
    certificate (as the watcher must with the wrong CA) leaves its connection half-read, and
    socketserver's default would print a traceback per connection into the test output."""

    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Nothing for a connection the client dropped; the default traceback for anything else
        (a bug in the handler must still show)."""
        if not isinstance(sys.exc_info()[1], (ConnectionError, ssl.SSLError)):
            super().handle_error(request, client_address)


class FakeApiServer:
    """The server; use as a context manager or call :meth:`start` / :meth:`stop`."""

    def __init__(self, token: str = "flowtally-test-token", tls: tuple[Path, Path] | None = None) -> None:
        """``tls``: (certificate, key) PEM files to serve HTTPS with (see :func:`self_signed_cert`),
        as a real API server does; None serves plain HTTP."""
        self.token = token
        self.tls = tls
        self.requests: list[Request] = []
        self._state = _State()
        self._cond = threading.Condition()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._port = 0
        self._serving = False
        self._active = 0

    # -- lifecycle -----------------------------------------------------------------------------

    def __enter__(self) -> FakeApiServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The listening port (kept across :meth:`restart`)."""
        return self._port

    @property
    def url(self) -> str:
        """``http(s)://127.0.0.1:PORT``."""
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self._port}"

    def start(self) -> None:
        """Listen (on the previous port after a :meth:`stop`, else an ephemeral one)."""
        server = _Server(("127.0.0.1", self._port), self._handler_class())
        if self.tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*self.tls)
            server.socket = context.wrap_socket(server.socket, server_side=True)
        self._server = server
        self._port = int(server.server_address[1])
        with self._cond:
            self._serving = True
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fake-apiserver", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop listening and cut every open connection."""
        with self._cond:
            self._serving = False
            self._state.drop_generation += 1
            self._cond.notify_all()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def restart(self, down_s: float = 0.0, while_down: Callable[[], None] | None = None) -> None:
        """An API server restart: connections cut, the port refuses connections for ``down_s``
        (``while_down`` runs then: objects may change meanwhile), then the server is back on the
        same port with the same objects and an empty watch history (older versions get 410)."""
        self.stop()
        if while_down is not None:
            while_down()
        time.sleep(down_s)
        with self._cond:
            self._state.log.clear()
            self._state.rv += 1000  # like a new watch cache: versions move on
            self._state.oldest_rv = self._state.rv
        self.start()

    # -- scenario ------------------------------------------------------------------------------

    @property
    def resource_version(self) -> int:
        """The current resourceVersion."""
        with self._cond:
            return self._state.rv

    def _key(self, resource: str, obj: dict[str, Any]) -> str:
        meta = obj["metadata"]
        return f"{meta.get('namespace', '')}/{meta['name']}" if RESOURCES[resource][3] else str(meta["name"])

    def _record(self, resource: str, etype: str, obj: dict[str, Any]) -> None:
        st = self._state
        _, kind, api_version, _ = RESOURCES[resource]
        st.log.append(_Event(st.rv, resource, etype, {"kind": kind, "apiVersion": api_version, **obj}))
        self._cond.notify_all()

    def put(self, resource: str, obj: dict[str, Any]) -> int:
        """Create or replace an object (``ADDED`` or ``MODIFIED``); its new resourceVersion."""
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        with self._cond:
            st = self._state
            st.rv += 1
            key = self._key(resource, obj)
            meta.setdefault("uid", str(uuid.uuid5(uuid.NAMESPACE_URL, f"{resource}/{key}")))
            meta.setdefault("creationTimestamp", "2026-01-01T00:00:00Z")
            meta["resourceVersion"] = str(st.rv)
            etype = "MODIFIED" if key in st.objects[resource] else "ADDED"
            st.objects[resource][key] = obj
            self._record(resource, etype, obj)
            return st.rv

    def delete(self, resource: str, name: str, namespace: str = "") -> int:
        """Delete an object (``DELETED`` with its last state); the new resourceVersion."""
        with self._cond:
            st = self._state
            key = f"{namespace}/{name}" if RESOURCES[resource][3] else name
            obj = copy.deepcopy(st.objects[resource].pop(key))
            st.rv += 1
            obj["metadata"]["resourceVersion"] = str(st.rv)
            self._record(resource, "DELETED", obj)
            return st.rv

    def remove_silently(self, resource: str, name: str, namespace: str = "") -> None:
        """Delete an object without an event (as if it went while the watch history was lost):
        only a relist can tell."""
        with self._cond:
            key = f"{namespace}/{name}" if RESOURCES[resource][3] else name
            del self._state.objects[resource][key]
            self._state.rv += 1

    def bookmark(self, resource: str | None = None) -> None:
        """A ``BOOKMARK`` with the current resourceVersion to the watches of ``resource`` (all
        resources: None) that asked for bookmarks."""
        with self._cond:
            for r in [resource] if resource else list(RESOURCES):
                _, kind, api_version, _ = RESOURCES[r]
                self._state.log.append(_Event(self._state.rv, r, "BOOKMARK", {
                    "kind": kind, "apiVersion": api_version,
                    "metadata": {"resourceVersion": str(self._state.rv)}}))
            self._cond.notify_all()

    def drop_connections(self) -> None:
        """Cut every open watch stream mid-stream (the client sees a truncated chunked body)."""
        with self._cond:
            self._state.drop_generation += 1
            self._cond.notify_all()

    def expire(self) -> None:
        """Compact the watch history: open watches end with an ERROR 410 event, and a watch from
        any version older than now gets one as well."""
        with self._cond:
            self._state.log.clear()
            self._state.oldest_rv = self._state.rv
            self._state.expire_generation += 1
            self._cond.notify_all()

    def fail_next_watch(self, resource: str, code: int = 410) -> None:
        """Answer the next watch request of ``resource`` with HTTP ``code`` and a Status body."""
        with self._cond:
            self._state.fail_next[resource] = code

    def watch_requests(self, resource: str) -> list[Request]:
        """The watch requests received for ``resource``."""
        return [r for r in list(self.requests) if r.resource == resource and r.watch]

    def list_requests(self, resource: str) -> list[Request]:
        """The list requests received for ``resource`` (pages included)."""
        return [r for r in list(self.requests) if r.resource == resource and not r.watch]

    def active_watches(self) -> int:
        """Watch streams open right now."""
        with self._cond:
            return self._active

    def wait_watching(self, count: int = len(RESOURCES), timeout: float = 30.0) -> None:
        """Wait until ``count`` watch streams are open."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._active < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{self._active} watch streams open, wanted {count}")
                self._cond.wait(left)

    def write_kubeconfig(self, path: Path) -> Path:
        """A kubeconfig with one context pointing at this server (bearer token)."""
        config = {
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake", "user": {"token": self.token}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
        }
        path.write_text(json.dumps(config))  # JSON is YAML
        return path

    def write_service_account(self, directory: Path) -> Path:
        """What Kubernetes mounts into a pod for its service account (``token``, ``ca.crt``);
        with KUBERNETES_SERVICE_HOST/PORT pointing here, a client finds this server in-cluster."""
        if self.tls is None:
            raise ValueError("in-cluster clients speak HTTPS only: give the server tls=")
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "token").write_text(self.token)
        shutil.copyfile(self.tls[0], directory / "ca.crt")
        return directory

    # -- HTTP ----------------------------------------------------------------------------------

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                url = urlsplit(self.path)
                query = {k: v[-1] for k, v in parse_qs(url.query).items()}
                resource = _BY_PATH.get(url.path)
                watch = query.get("watch") in ("true", "1")
                request = Request(resource or url.path, watch, query)
                fake.requests.append(request)
                # The scheme is case-insensitive (RFC 7235; the API server lowercases it, and the
                # client's in-cluster loader sends "bearer").
                scheme, _, token = (self.headers.get("Authorization") or "").partition(" ")
                if scheme.lower() != "bearer" or token != fake.token:
                    request.status = 401
                    self._json(401, status(401, "Unauthorized", "Unauthorized"))
                elif resource is None:
                    request.status = 404
                    self._json(404, status(404, "NotFound", f"the server could not find {url.path}"))
                elif watch:
                    fake._watch(self, resource, query, request)
                else:
                    request.status = 200
                    self._json(200, fake._list(resource, query))

            def _json(self, code: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler

    def _list(self, resource: str, query: dict[str, str]) -> dict[str, Any]:
        _, kind, api_version, _ = RESOURCES[resource]
        with self._cond:
            items = [copy.deepcopy(o) for _, o in sorted(self._state.objects[resource].items())]
            rv = self._state.rv
        start = 0
        if query.get("continue"):
            rv_text, _, offset = query["continue"].partition(":")
            rv, start = int(rv_text), int(offset)
        limit = int(query.get("limit") or 0) or len(items) or 1
        page = items[start:start + limit]
        meta: dict[str, Any] = {"resourceVersion": str(rv)}
        if start + limit < len(items):
            meta["continue"] = f"{rv}:{start + limit}"
        return {"kind": f"{kind}List", "apiVersion": api_version, "metadata": meta, "items": page}

    def _watch(self, handler: BaseHTTPRequestHandler, resource: str, query: dict[str, str],
               request: Request) -> None:
        bookmarks = query.get("allowWatchBookmarks") in ("true", "1")
        timeout = float(query.get("timeoutSeconds") or 1800)
        with self._cond:
            st = self._state
            failing = st.fail_next.pop(resource, None)
            since = int(query.get("resourceVersion") or st.rv)
            too_old = since < st.oldest_rv
            pos = next((i for i, e in enumerate(st.log) if e.rv > since), len(st.log))
            drop_gen, expire_gen = st.drop_generation, st.expire_generation
        if failing is not None:
            request.status = failing
            data = json.dumps(status(failing, "Expired" if failing == 410 else "InternalError",
                                     f"injected failure {failing}")).encode()
            handler.send_response(failing)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(data)))
            handler.end_headers()
            handler.wfile.write(data)
            return
        request.status = 200
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()

        def send(event: dict[str, Any]) -> None:
            data = json.dumps(event).encode() + b"\n"
            handler.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            handler.wfile.flush()

        def end() -> None:
            handler.wfile.write(b"0\r\n\r\n")
            handler.wfile.flush()

        if too_old:
            send({"type": "ERROR", "object": status(
                410, "Expired", f"too old resource version: {since} ({self._state.oldest_rv})")})
            end()
            return
        deadline = time.monotonic() + timeout
        with self._cond:
            self._active += 1
            self._cond.notify_all()
        try:
            while True:
                def woken(seen: int = pos) -> bool:
                    st = self._state
                    return (len(st.log) > seen or not self._serving or st.drop_generation != drop_gen
                            or st.expire_generation != expire_gen)

                with self._cond:
                    self._cond.wait_for(woken, timeout=max(0.0, min(0.5, deadline - time.monotonic())))
                    cut = self._state.drop_generation != drop_gen or not self._serving
                    expired = self._state.expire_generation != expire_gen
                    events = [e for e in self._state.log[pos:] if e.resource == resource] if not cut else []
                    pos = len(self._state.log)
                if cut:
                    # No terminating chunk: the client sees the body end too early.
                    handler.connection.shutdown(socket.SHUT_RDWR)
                    return
                for e in events:
                    if e.type != "BOOKMARK" or bookmarks:
                        send({"type": e.type, "object": e.object})
                if expired:
                    send({"type": "ERROR", "object": status(410, "Expired", "too old resource version")})
                    end()
                    return
                if time.monotonic() >= deadline:
                    end()
                    return
        except (BrokenPipeError, ConnectionResetError):
            return
        finally:
            with self._cond:
                self._active -= 1
                self._cond.notify_all()
