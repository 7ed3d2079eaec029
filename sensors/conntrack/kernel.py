"""The kernel settings the conntrack sensor depends on: check them, turn them on if permitted.

All of them are per network namespace and read from /proc/sys of the namespace the process is
in (the node's, under hostNetwork):

- ``net.netfilter.nf_conntrack_acct``: byte and packet counters per connection. Without it every
  counter is 0 and there is nothing to report.
- ``net.netfilter.nf_conntrack_timestamp``: start and stop times per connection.
- ``net.netfilter.nf_conntrack_events``: 0 disables ctnetlink events (NEW/DESTROY); 1 and 2
  (2 = "when someone listens", the default of recent kernels) deliver them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

SYSCTL_DIR = Path("/proc/sys/net/netfilter")

#: sysctl -> (acceptable values, value to set, why it matters)
REQUIRED: dict[str, tuple[tuple[str, ...], str, str]] = {
    "nf_conntrack_acct": (("1",), "1", "without it conntrack keeps no byte or packet counters"),
    "nf_conntrack_timestamp": (("1",), "1", "without it connections have no start/stop times"),
    "nf_conntrack_events": (("1", "2"), "1", "without it the kernel sends no NEW/DESTROY events"),
}


class KernelSetupError(RuntimeError):
    """The kernel cannot give the sensor what it needs; the message says what is missing."""


@dataclass(frozen=True, slots=True)
class TableSize:
    """Entries in the conntrack table and its limit (nf_conntrack_count / nf_conntrack_max)."""

    count: int
    max: int


def ensure_sysctls(enable: bool = True, sysctl_dir: Path = SYSCTL_DIR) -> list[str]:
    """Check the sysctls of :data:`REQUIRED`, setting those that are off when ``enable``;
    returns what was changed. Raises :class:`KernelSetupError` naming every problem."""
    if not sysctl_dir.is_dir():
        raise KernelSetupError(
            f"{sysctl_dir} does not exist: connection tracking (the nf_conntrack module) is not "
            "loaded in this network namespace; load it (modprobe nf_conntrack) or start the sensor "
            "in the node's network namespace")
    changed: list[str] = []
    problems: list[str] = []
    for name, (ok, wanted, why) in REQUIRED.items():
        path = sysctl_dir / name
        key = f"net.netfilter.{name}"
        try:
            value = path.read_text().strip()
        except OSError as exc:
            problems.append(f"{key} cannot be read ({exc.strerror}): {why}")
            continue
        if value in ok:
            continue
        if not enable:
            problems.append(f"{key} is {value}, needs {wanted}: {why} "
                            f"(sysctl -w {key}={wanted}, or let the sensor set it: enable_sysctls)")
            continue
        try:
            path.write_text(wanted)
        except OSError as exc:
            problems.append(f"{key} is {value} and the sensor may not set it to {wanted} "
                            f"({exc.strerror}; it needs root with CAP_NET_ADMIN in this network "
                            f"namespace): {why}; run sysctl -w {key}={wanted} on the node")
            continue
        changed.append(f"{key}={wanted}")
        log.info("set %s=%s (was %s)", key, wanted, value)
    if problems:
        raise KernelSetupError("; ".join(problems))
    return changed


def table_size(sysctl_dir: Path = SYSCTL_DIR) -> TableSize:
    """The current table size and its maximum."""
    return TableSize(int((sysctl_dir / "nf_conntrack_count").read_text()),
                     int((sysctl_dir / "nf_conntrack_max").read_text()))
