"""Enrichment of a raw batch (pure): the raw columns, the identity of both ends at the flow's
time, MaxMind data for public addresses, the flow's direction and the service it addressed;
second observations of a connection are dropped and every outcome is counted.

Identity (:class:`enricher.identity.IdentityIndex`): each end's address at the flow's end time;
on addresses that hostNetwork pods share with their node, the end's port and the protocol pick
the pod (a ``host_ports`` match) or the node.

Service attribution with DNAT (conntrack records): ``nat_addr`` is what the initiator addressed
before the translation (e.g. a ClusterIP), on both direction records of a connection. When it is
set and its owner at the flow's time is a service, the *service side* of the record (dst for a
record of the initiator's direction, ``initiator`` 0 or 1; src for a reply record, ``initiator``
2) gets that service in ``*_service`` (it replaces the EndpointSlice list the backend pod carries:
the address says which of its services was used), while the side's pod identity stays the
backend's. ``nat_namespace``/``nat_service`` name the addressed service on every record with a
translated address ("" otherwise), so "reached through the ClusterIP" stays distinguishable from
"addressed the pod directly". Without ``nat_addr`` a backend pod keeps the ``service`` of its
identity version (from the EndpointSlices).

One observation per connection (:class:`ObservedNodes`): conntrack on the client's node and on
the server's node both report a connection between two nodes. The rule: keep the observation
made at the initiator's node. A record is dropped when its ``observer`` (the reporting node) is
not empty, its ``initiator`` is known (1 or 2), the initiator's end has a node (pod,
hostNetwork pod or node owner), that node is not the observer, and that node is itself observed
(its sensor reported within ``window_ms``: tracked from the observers in the stream and, in the
stage, from the sensors' completeness rows, which every enricher reads whole, so enrichers that
split the raw partitions share one view: :mod:`enricher.observer_feed`), so a connection whose
initiator's node has no sensor keeps the other node's record. Records without an observer
(NetFlow from routers) or without a known initiator are never dropped.

Direction (per flow record, from the two kinds; NetFlow records are one-way, so a reply is
labelled by where *its* packets go):

=================================================  ==================
src kind                      dst kind             direction
=================================================  ==================
pod, host-network             pod, host-network    ``pod-to-pod``
pod, host-network, node       service (ClusterIP)  ``pod-to-service``
private, external             any cluster kind     ``ingress``
pod, host-network, node       private, external    ``egress``
anything else (node->pod, unknown->unknown, ignored)  ``other``
=================================================  ==================

A flow to a pod IP that an EndpointSlice lists (after kube-proxy's DNAT) stays ``pod-to-pod``
(the direction describes the two ends that exchanged the packets); its ``dst_service`` names the
service, and ``nat_service`` the one it was addressed through.

Implausible flow times (:mod:`enricher.times`, when a window is given): decided first, before
any lookup, so a clamped flow is enriched at its new (receive) time and a row for the DLQ is not
enriched at all; counted as ``implausible_time``.

Counts (:class:`EnrichStats` for metrics; :class:`sensors.completeness.CompletenessAccumulator`
rows of stage ``enricher`` per (minute processed, exporter, observation domain)): flows with an
end whose private address no owner held (``unknown_addresses``), flows with an ignored end,
flows with an end later than the identity history (``late``), dropped second observations
(``duplicates_dropped``), flows with an implausible time, clamped or for the DLQ
(``implausible_time``). A flow counts once per counter even when both ends qualify.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cache

import numpy as np
import pyarrow as pa

from enricher.geo import GeoDatabases, GeoStats, empty_columns
from enricher.identity import IdentityIndex, LookupStats, SideLookup
from enricher.schema import DIRECTIONS, ENRICHED_SCHEMA, NAT_FIELDS, SIDES
from enricher.times import TimeWindow, check_times
from sensors.completeness import CompletenessAccumulator
from sensors.schema import address_bytes


@cache
def _direction_dict() -> pa.Array:
    # Built on first use, not at import: pyarrow imports pandas on its first pa.array() (40 MB
    # resident) unless enricher.app has kept pandas out of the process by then.
    return pa.array(list(DIRECTIONS), pa.string())


# Kind classes: 0 other/unknown, 1 pod-like, 2 service, 3 node, 4 outside (private/external).
_KIND_CLASS = {"pod": 1, "host-network": 1, "service": 2, "node": 3, "private": 4, "external": 4}
# _DIRECTION_TABLE[src class, dst class] -> index into DIRECTIONS
_DIRECTION_TABLE = np.zeros((5, 5), dtype=np.int32)
_DIRECTION_TABLE[1, 1] = DIRECTIONS.index("pod-to-pod")
_DIRECTION_TABLE[[1, 3], 2] = DIRECTIONS.index("pod-to-service")
_DIRECTION_TABLE[4, 1:4] = DIRECTIONS.index("ingress")
_DIRECTION_TABLE[[1, 3], 4] = DIRECTIONS.index("egress")

#: How long a node counts as observed after its last record (default of the setting).
DEFAULT_OBSERVER_WINDOW_MS = 900_000


@dataclass
class EnrichStats:
    """What enrichment counted (accumulated over batches)."""

    sides: dict[str, LookupStats] = field(default_factory=lambda: {s: LookupStats() for s in SIDES})
    geo: GeoStats = field(default_factory=GeoStats)
    flows_in: int = 0
    flows_out: int = 0
    duplicates_dropped: int = 0
    #: Flows whose service side was attributed through a translated address (nat_addr).
    nat_service: int = 0
    #: Flows with an address no owner held (a private address) on either end.
    unknown_addresses: int = 0
    ignored: int = 0
    late: int = 0
    #: Flows with an end outside the plausible window, by action ("clamp", "dlq").
    implausible_time: dict[str, int] = field(default_factory=dict)
    #: The rows taken out for the DLQ (policy dlq), as received: the caller parks them.
    implausible_rows: list[pa.Table] = field(default_factory=list)


class ObservedNodes:
    """Which observers (node names) have sent records recently: ``note`` the names of each
    batch, ``active`` those seen within ``window_ms`` (the caller passes the clock)."""

    def __init__(self, window_ms: int = DEFAULT_OBSERVER_WINDOW_MS) -> None:
        if window_ms <= 0:
            raise ValueError("window_ms must be positive")
        self.window_ms = window_ms
        self._last: dict[str, int] = {}

    def note(self, names: Iterable[str], now_ms: int) -> None:
        """Record that ``names`` sent records at ``now_ms`` ("" is not a node and is skipped)."""
        for name in names:
            if name:
                self._last[name] = max(now_ms, self._last.get(name, now_ms))

    def active(self, now_ms: int) -> list[str]:
        """Observers seen within the window (forgetting older ones)."""
        horizon = now_ms - self.window_ms
        for name in [n for n, t in self._last.items() if t < horizon]:
            del self._last[name]
        return list(self._last)


def _numpy(raw: pa.Table, name: str) -> np.ndarray:
    column = raw.column(name)
    if column.num_chunks == 1:
        return column.chunk(0).to_numpy(zero_copy_only=False)
    return column.combine_chunks().to_numpy(zero_copy_only=False)


def _dictionary(raw: pa.Table, name: str) -> tuple[list[str], np.ndarray]:
    column = raw.column(name)
    chunk = column.chunk(0) if column.num_chunks == 1 else column.unify_dictionaries().combine_chunks()
    return chunk.dictionary.to_pylist(), chunk.indices.to_numpy(zero_copy_only=False)


def _duplicates(raw: pa.Table, index: IdentityIndex, src: SideLookup, dst: SideLookup,
                observers: ObservedNodes, now_ms: int) -> np.ndarray:
    """Mask of the records to drop as second observations (the rule in the module docstring)."""
    names, observer = _dictionary(raw, "observer")
    used = np.flatnonzero(np.bincount(observer, minlength=len(names)))
    observers.note((names[i] for i in used.tolist()), now_ms)
    initiator = _numpy(raw, "initiator")
    if not names or not (initiator > 0).any():
        return np.zeros(raw.num_rows, dtype=bool)
    init_node = np.where(initiator == 1, index.codes("node", src.slot),
                         np.where(initiator == 2, index.codes("node", dst.slot), 0))
    active = [c for c in (index.code_of("node", name) for name in observers.active(now_ms)) if c > 0]
    # Per observer name: its node code; -1 for "" (no observer); -2 for a name no owner carries
    # as its node (it differs from every initiator's node).
    codes = [index.code_of("node", name) if name else -1 for name in names]
    observer_node = np.array([c if c != -1 or not name else -2 for c, name in zip(codes, names, strict=True)],
                             dtype=np.int64)
    obs = observer_node[observer]
    return (obs != -1) & (init_node > 0) & (obs != init_node) & np.isin(init_node, active)


def _add_completeness(acc: CompletenessAccumulator, raw: pa.Table, now_ms: int,
                      counters: dict[str, np.ndarray]) -> None:
    """Add per-flow masks to the rows of each (exporter, observation domain) of ``raw``."""
    totals = {name: int(np.count_nonzero(mask)) for name, mask in counters.items()}
    if not any(totals.values()):
        return
    exporters = address_bytes(raw.column("exporter"))
    domains = _numpy(raw, "observation_domain").astype(np.uint32)
    if (exporters == exporters[0]).all() and (domains == domains[0]).all():  # the usual case
        row = acc.counts(now_ms, exporters[0].tobytes(), int(domains[0]))
        for name, total in totals.items():
            setattr(row, name, getattr(row, name) + total)
        return
    keys = np.empty((len(domains), 20), dtype=np.uint8)
    keys[:, :16] = exporters
    keys[:, 16:] = domains.astype(">u4").view(np.uint8).reshape(-1, 4)
    uniq, first, inverse = np.unique(keys.view("V20").ravel(), return_index=True, return_inverse=True)
    sums = {name: np.bincount(inverse, weights=mask, minlength=len(uniq)) for name, mask in counters.items()}
    for g, r in enumerate(first.tolist()):
        if not any(per_group[g] for per_group in sums.values()):
            continue  # a group with nothing to count gets no row
        row = acc.counts(now_ms, exporters[r].tobytes(), int(domains[r]))
        for name, per_group in sums.items():
            setattr(row, name, getattr(row, name) + int(per_group[g]))


def enrich_batch(raw: pa.Table, index: IdentityIndex, geo: GeoDatabases | None = None,
                 stats: EnrichStats | None = None, *, observers: ObservedNodes | None = None,
                 completeness: CompletenessAccumulator | None = None, now_ms: int = 0,
                 time_window: TimeWindow | None = None) -> pa.Table:
    """Return the `enriched.v1` table for a `raw.v1` table.

    ``observers``: track observing nodes and drop second observations of a connection (None:
    keep every record). ``completeness``: add the batch's counts to rows of the minute of
    ``now_ms`` (the processing time, also the clock of ``observers``). ``time_window``: the window of
    plausible flow times (:mod:`enricher.times`; None: times are not judged); rows taken out
    for the DLQ are in ``stats.implausible_rows``.
    """
    stats = stats if stats is not None else EnrichStats()
    if time_window is not None and raw.num_rows:
        checked = check_times(raw, time_window)
        if checked.count:
            policy = time_window.policy
            stats.implausible_time[policy] = stats.implausible_time.get(policy, 0) + checked.count
            if completeness is not None:
                _add_completeness(completeness, raw.filter(pa.array(checked.implausible)), now_ms,
                                  {"implausible_time": np.ones(checked.count, dtype=bool)})
            if checked.rejected is not None:
                stats.implausible_rows.append(checked.rejected)
            stats.flows_in += raw.num_rows - checked.table.num_rows  # in, but not enriched
            raw = checked.table
    n_in = raw.num_rows
    times = _numpy(raw, "end").astype(np.int64, copy=False)
    protos = _numpy(raw, "proto")
    addresses = {s: address_bytes(raw.column(f"{s}_addr")) for s in SIDES}
    ports = {s: _numpy(raw, f"{s}_port") for s in SIDES}
    lookups = {s: index.side(addresses[s], times, ports[s], protos) for s in SIDES}

    dropped = np.zeros(n_in, dtype=bool)
    if observers is not None and n_in:
        dropped = _duplicates(raw, index, lookups["src"], lookups["dst"], observers, now_ms)
    if dropped.any():
        if completeness is not None:
            _add_completeness(completeness, raw.filter(pa.array(dropped)), now_ms,
                              {"duplicates_dropped": np.ones(int(dropped.sum()), dtype=bool)})
        kept = np.flatnonzero(~dropped)
        raw = raw.take(pa.array(kept))
        times, protos = times[kept], protos[kept]
        addresses = {s: a[kept] for s, a in addresses.items()}
        lookups = {s: lk.take(kept) for s, lk in lookups.items()}
    n = raw.num_rows
    stats.flows_in += n_in
    stats.flows_out += n
    stats.duplicates_dropped += n_in - n

    late = {s: index.count(lookups[s], times, stats.sides[s]) for s in SIDES}
    kinds = {s: index.codes("kind", lookups[s].slot) for s in SIDES}
    src, dst = lookups["src"], lookups["dst"]
    unknown = (~src.owned & src.private) | (~dst.owned & dst.private)
    ignored = (kinds["src"] == index.ignored_code) | (kinds["dst"] == index.ignored_code)
    any_late = late["src"] | late["dst"]
    stats.unknown_addresses += int(np.count_nonzero(unknown))
    stats.ignored += int(np.count_nonzero(ignored))
    stats.late += int(np.count_nonzero(any_late))
    if completeness is not None and n:
        _add_completeness(completeness, raw, now_ms,
                          {"unknown_addresses": unknown, "ignored": ignored, "late": any_late})

    # DNAT: the addressed service, on the record's service side.
    no_owner = np.full(n, index.versions, dtype=np.int64)  # the "private, no owner" slot: all ""
    nat_slot = no_owner
    overrides: dict[str, dict[str, np.ndarray]] = {}
    nat = address_bytes(raw.column("nat_addr"))
    translated = np.flatnonzero(nat.any(axis=1)) if n else np.zeros(0, dtype=np.int64)
    if len(translated):
        nat_side = index.side(nat[translated], times[translated])
        is_service = index.codes("kind", nat_side.slot) == index.service_code
        rows, svc_slot = translated[is_service], nat_side.slot[is_service]
        if len(rows):
            nat_slot = no_owner.copy()
            nat_slot[rows] = svc_slot
            service = index.codes("service", svc_slot)
            reply = _numpy(raw, "initiator")[rows] == 2
            for side, on_side in (("src", reply), ("dst", ~reply)):
                if on_side.any():
                    codes = index.codes("service", lookups[side].slot)
                    codes[rows[on_side]] = service[on_side]
                    overrides[side] = {"service": codes}
            stats.nat_service += len(rows)

    columns: dict[str, pa.Array | pa.ChunkedArray] = {name: raw.column(name) for name in raw.column_names}
    for side in SIDES:
        lookup = lookups[side]
        for name, array in index.arrow_columns(lookup.slot, overrides.get(side)).items():
            columns[f"{side}_{name}"] = array
        public = ~lookup.owned & ~lookup.private
        if geo is not None and n:
            geo_cols = geo.columns(addresses[side], public, stats.geo)
        else:
            geo_cols = empty_columns(n)
        for name, array in geo_cols.items():
            columns[f"{side}_{name}"] = array
    classes = np.array([_KIND_CLASS.get(k, 0) for k in index.kind_values()], dtype=np.int32)
    direction = _DIRECTION_TABLE[classes[kinds["src"]], classes[kinds["dst"]]]
    columns["direction"] = pa.DictionaryArray.from_arrays(pa.array(direction, pa.int32()), _direction_dict())
    for name, array in index.arrow_columns(nat_slot, fields=NAT_FIELDS).items():
        columns[f"nat_{name}"] = array
    return pa.Table.from_arrays([columns[name] for name in ENRICHED_SCHEMA.names], schema=ENRICHED_SCHEMA)
