"""Network namespaces for the conntrack tests: a "node" namespace with "pods" routed through it.

Each pod namespace has an ``eth0`` (a /32 IPv4 and a /128 IPv6 address) whose peer lives in the
node namespace; the pod's default route points at the node (169.254.1.1 and fe80::1 on the node's
end of every veth), and the node routes each pod address to its veth, as Calico does.
So every packet between pods crosses the node namespace's netfilter hooks, where iptables DNAT
rules imitate kube-proxy's ClusterIP translation (a plain bridge would need br_netfilter).

Everything is created under names unique to the test run and removed by :meth:`Topology.destroy`
(deleting a namespace removes its veths and iptables rules; processes still inside are killed
first). Sockets can be opened inside a namespace from this process (:func:`socket_in`), and
:class:`PortBridge` forwards a TCP port from one namespace to another (the sensor in the node
namespace reaches the test's Kafka on 127.0.0.1 of the root namespace through one).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

CLONE_NEWNET = 0x40000000
NETNS_DIR = "/var/run/netns"
T = TypeVar("T")

_libc = ctypes.CDLL(None, use_errno=True)


class NetnsError(RuntimeError):
    """The machine does not allow what the test needs; the message says what."""


def require_tools() -> None:
    """Fail (not skip) with what is missing: root, ip, iptables, conntrack."""
    missing = [t for t in ("ip", "iptables", "conntrack") if shutil.which(t) is None]
    if missing:
        raise NetnsError(f"missing commands {missing} (Debian packages iproute2, iptables, conntrack; "
                         "deploy/local/setup.sh installs them)")
    if os.geteuid() != 0:
        raise NetnsError("network namespace tests need root (CAP_SYS_ADMIN and CAP_NET_ADMIN)")


def sh(*argv: str, ns: str | None = None, check: bool = True, timeout: float = 30) -> str:
    """Run a command (inside namespace ``ns`` if given); its stdout. Fails with its stderr."""
    cmd = ["ip", "netns", "exec", ns, *argv] if ns else list(argv)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise NetnsError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def in_netns(ns: str | None, fn: Callable[[], T]) -> T:
    """Call ``fn`` in a fresh thread that has entered namespace ``ns`` (None: this one); sockets
    it creates stay in that namespace after the thread is gone."""
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            if ns is not None:
                fd = os.open(f"{NETNS_DIR}/{ns}", os.O_RDONLY)
                try:
                    if _libc.setns(fd, CLONE_NEWNET) != 0:
                        err = ctypes.get_errno()
                        raise OSError(err, f"setns({ns}): {os.strerror(err)}")
                finally:
                    os.close(fd)
            result.append(fn())
        except BaseException as exc:
            error.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


def socket_in(ns: str | None, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM,
              proto: int = 0) -> socket.socket:
    """A socket created inside namespace ``ns``."""
    return in_netns(ns, lambda: socket.socket(family, kind, proto))


class PortBridge:
    """Forwards TCP connections from ``listen`` in namespace ``listen_ns`` to ``target`` in
    ``target_ns`` (None = the test's own namespace), one thread per direction per connection."""

    def __init__(self, listen_ns: str | None, listen: tuple[str, int], target_ns: str | None,
                 target: tuple[str, int]) -> None:
        self._target_ns, self._target = target_ns, target
        self._server = socket_in(listen_ns)
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._server.bind(listen)
        self._server.listen(64)
        self.address: tuple[str, int] = self._server.getsockname()[:2]
        self._stop = threading.Event()
        self._sockets: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            if not _readable(self._server, 0.2):
                continue
            try:
                client, _ = self._server.accept()
                upstream = socket_in(self._target_ns)
                upstream.connect(self._target)
            except OSError:
                with contextlib.suppress(NameError):
                    client.close()
                continue
            self._sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while not self._stop.is_set():
                if not _readable(src, 0.2):
                    continue
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._server.close()
        for s in self._sockets:
            with contextlib.suppress(OSError):
                s.close()


def _readable(sock: socket.socket, timeout_s: float) -> bool:
    """Whether ``sock`` has data (or EOF) within ``timeout_s``. poll, not select: a long test run
    holds more than 1024 descriptors and select() refuses those above FD_SETSIZE."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(timeout_s * 1000))


@dataclass(frozen=True)
class Pod:
    """A pod namespace and its addresses."""

    ns: str
    ip4: str
    ip6: str


@dataclass
class Topology:
    """A node namespace, pods routed through it, and kube-proxy-like DNAT rules."""

    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    node: str = ""
    pods: dict[str, Pod] = field(default_factory=dict)
    created: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.node = self.node or f"ftnode-{self.run_id}"

    def add_namespace(self, name: str) -> str:
        sh("ip", "netns", "add", name)
        self.created.append(name)
        sh("ip", "-n", name, "link", "set", "lo", "up")
        return name

    def create_node(self) -> None:
        self.add_namespace(self.node)
        for key, value in (("net.ipv4.ip_forward", "1"), ("net.ipv6.conf.all.forwarding", "1")):
            sh("sysctl", "-q", "-w", f"{key}={value}", ns=self.node)

    def add_pod(self, name: str, index: int) -> Pod:
        """Pod ``name`` with 10.244.0.<index> and fd00:244::<index>, routed through the node."""
        ns = self.add_namespace(f"ft{self.run_id}-{name}")
        pod = Pod(ns, f"10.244.0.{index}", f"fd00:244::{index:x}")
        host_if = f"veth-{name}"[:15]
        n = self.node
        sh("ip", "-n", n, "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", ns)
        sh("sysctl", "-q", "-w", f"net.ipv6.conf.{host_if}.accept_dad=0", ns=n)
        sh("sysctl", "-q", "-w", "net.ipv6.conf.all.accept_dad=0", ns=ns)
        sh("sysctl", "-q", "-w", "net.ipv6.conf.default.accept_dad=0", ns=ns)
        sh("ip", "-n", n, "link", "set", host_if, "up")
        sh("ip", "-n", n, "addr", "add", "169.254.1.1/32", "dev", host_if)
        sh("ip", "-n", n, "addr", "add", "fe80::1/64", "dev", host_if, "nodad")
        sh("ip", "-n", n, "route", "add", f"{pod.ip4}/32", "dev", host_if)
        sh("ip", "-n", n, "-6", "route", "add", f"{pod.ip6}/128", "dev", host_if)
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        sh("ip", "-n", ns, "addr", "add", f"{pod.ip4}/32", "dev", "eth0")
        sh("ip", "-n", ns, "-6", "addr", "add", f"{pod.ip6}/128", "dev", "eth0", "nodad")
        sh("ip", "-n", ns, "route", "add", "169.254.1.1", "dev", "eth0", "scope", "link")
        sh("ip", "-n", ns, "route", "add", "default", "via", "169.254.1.1", "dev", "eth0")
        sh("ip", "-n", ns, "-6", "route", "add", "default", "via", "fe80::1", "dev", "eth0")
        self.pods[name] = pod
        return pod

    def add_service(self, name: str, cluster_ip: str, port: int, proto: str, backends: list[tuple[str, int]]
                    ) -> None:
        """kube-proxy's chains for one service: ClusterIP:port DNATed to the backends in turn
        (``statistic --mode nth``, so which backend answers is deterministic)."""
        tool = "ip6tables" if ":" in cluster_ip else "iptables"
        svc = f"SVC-{name}"[:28]
        sh(tool, "-t", "nat", "-N", svc, ns=self.node)
        for i, (ip, bport) in enumerate(backends):
            target = f"[{ip}]:{bport}" if ":" in ip else f"{ip}:{bport}"
            rule = ["-t", "nat", "-A", svc, "-p", proto]
            left = len(backends) - i
            if left > 1:
                rule += ["-m", "statistic", "--mode", "nth", "--every", str(left), "--packet", "0"]
            sh(tool, *rule, "-j", "DNAT", "--to-destination", target, ns=self.node)
        sh(tool, "-t", "nat", "-A", "PREROUTING", "-d", cluster_ip, "-p", proto, "--dport", str(port),
           "-j", svc, ns=self.node)

    def destroy(self) -> None:
        """Kill what runs inside, delete every namespace created (with their links and rules)."""
        for ns in reversed(self.created):
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.created.clear()


_FIELD = re.compile(r"(?<![\w-])(\w+)=(\S+)")
_CT_ID = re.compile(r"\bid=(\d+)")
_PROTO = re.compile(r"\b(?:tcp|udp|icmp|icmpv6|sctp|udplite|dccp|gre|unknown)\s+(\d+)\b")
_TUPLE_KEYS = {"src", "dst", "sport", "dport", "type", "code", "id", "packets", "bytes"}


@dataclass(frozen=True)
class OracleEntry:
    """One connection as conntrack-tools printed it (`-o extended,id`)."""

    proto: int
    orig: dict[str, str]
    reply: dict[str, str]
    flags: tuple[str, ...]
    id: int


def parse_conntrack_line(line: str) -> OracleEntry | None:
    """A line of `conntrack -L` or `conntrack -E` with ``-o extended,id``."""
    proto = _PROTO.search(line)
    if proto is None:
        return None
    ids = list(_CT_ID.finditer(line))
    ct_id = ids[-1] if ids else None  # the last id= is the conntrack ID (ICMP tuples have one too)
    body = line[:ct_id.start()] if ct_id else line
    orig: dict[str, str] = {}
    reply: dict[str, str] = {}
    for k, v in _FIELD.findall(body):
        if k not in _TUPLE_KEYS:
            continue
        target = reply if (k in orig or reply) else orig
        target[k] = v
    flags = tuple(re.findall(r"\[(\w+)\]", line))
    return OracleEntry(int(proto[1]), orig, reply, flags, int(ct_id[1]) if ct_id else 0)


def conntrack_list(ns: str) -> list[OracleEntry]:
    """The table of namespace ``ns`` as conntrack-tools (an independent netlink reader) lists it."""
    entries = (parse_conntrack_line(line) for line in sh("conntrack", "-L", "-o", "extended,id", ns=ns)
               .splitlines())
    return [e for e in entries if e is not None]


class DestroyOracle:
    """`conntrack -E -e DESTROY -o extended,id` in namespace ``ns``: the kernel's final counters
    of every connection that ends, as conntrack-tools receives them (a 64 MiB buffer)."""

    def __init__(self, ns: str, path: str) -> None:
        self.path = path
        with open(path, "wb") as out:
            self.process = subprocess.Popen(
                ["ip", "netns", "exec", ns, "conntrack", "-E", "-e", "DESTROY", "-o", "extended,id",
                 "-b", str(64 << 20)], stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while b"buffer size" not in Path(path).read_bytes() and time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise NetnsError(f"conntrack -E exited: {Path(path).read_text(errors='replace')}")
            time.sleep(0.05)

    def entries(self) -> list[OracleEntry]:
        with open(self.path, errors="replace") as f:
            lines = [line for line in f if line.startswith("[DESTROY]")]
        return [e for e in map(parse_conntrack_line, lines) if e is not None]

    def overrun(self) -> bool:
        with open(self.path, errors="replace") as f:
            return "ENOBUFS" in f.read()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
