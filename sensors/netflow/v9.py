"""NetFlow v9 (RFC 3954): templates, options templates and template-described data flowsets.

Each packet is walked flowset by flowset as it arrives (:meth:`V9Batch.add`): templates go into
the caller's :class:`~sensors.netflow.templates.TemplateStore` at once, so a data flowset later in
the same packet or in a later packet of the same call already finds them. A data flowset is not
decoded there; its record bytes are sliced (no copy) into a group per template layout, with the
packet's header context. :meth:`V9Batch.columns` then turns each group into columns with one
``np.frombuffer`` and strided views per field, never looping over records in Python.

What is held, counted or learnt rather than decoded:

* a data flowset whose template is unknown (not yet received, or lost) is held in the store
  (:meth:`~sensors.netflow.templates.TemplateStore.hold`) and decoded when its template arrives,
  in this call or a later one; what ages out or overflows is counted as
  ``missing_template_expired`` (``missing_template`` when holding is disabled);
* data flowsets of an options template (sampling, interface tables) are counted as options
  records, not flows; the sampling ones (fields 34, 48, 50) are parsed per record and set the
  rate of later flows of the same source ID (per sampler ID when both sides carry field 48);
* the header's sequence number (v9 counts export packets) is checked per source ID;
* the header's record count is not enforced: exporters disagree on whether it counts records or
  flowsets, and every flowset is length-checked on its own anyway.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from sensors.netflow import fields as F
from sensors.netflow.fields import Group
from sensors.netflow.sequence import track
from sensors.netflow.templates import Field, PendingSet, Template, TemplateStore, hold_unknown
from sensors.netflow.v5 import uptime_to_unix_ms

if TYPE_CHECKING:
    from sensors.netflow.stats import ExporterStats

VERSION = 9
HEADER = struct.Struct("!HHIIII")  # version, count, sysUptime, unix secs, sequence, source ID
HEADER_LENGTH = HEADER.size  # 20
_FLOWSET = struct.Struct("!HH")
_OPTIONS_HEADER = struct.Struct("!HHH")

TEMPLATE_FLOWSET = 0
OPTIONS_TEMPLATE_FLOWSET = 1
FIRST_DATA_FLOWSET = 256

SAMPLING_INTERVAL = F.SAMPLING_INTERVAL
FLOW_START_SECONDS, FLOW_END_SECONDS, FLOW_START_MILLISECONDS, FLOW_END_MILLISECONDS = 150, 151, 152, 153
_SAMPLING_OPTIONS = F.OPTIONS_OF_INTEREST | {F.SAMPLER_ID}


def _is_zero_padding(payload: bytes, start: int, end: int) -> bool:
    """True when payload[start:end] is all zero bytes (exporters pad flowsets and packets)."""
    return payload.count(0, start, end) == end - start


#: The first 24 bytes of the usual v9 datagram: the header and the first flowset's header.
_HEAD = np.dtype([("version", ">u2"), ("count", ">u2"), ("uptime", ">u4"), ("secs", ">u4"),
                  ("sequence", ">u4"), ("source", ">u4"), ("set_id", ">u2"), ("set_len", ">u2")])
_MOD = 1 << 32
#: Below this many datagrams per call the per-datagram walk is as cheap as the vectorised one.
MIN_VECTORISED = F.MIN_BULK


class V9Batch:
    """The v9 packets of one decode call: templates applied as they come, data grouped by layout."""

    __slots__ = ("_applied", "_groups")

    def __init__(self) -> None:
        # Keyed by the template object's identity: the store hands out the same object for as
        # long as a template is in force, and hashing a layout per flowset would cost more.
        self._groups: dict[int, tuple[Template, Group]] = {}
        #: (exporter, source ID) -> (body, template count) of the last template flowset applied in
        #: this call: a datagram that repeats it byte for byte changes nothing (an unchanged refresh).
        self._applied: dict[tuple[bytes, int], tuple[bytes, int]] = {}

    def add_many(self, payloads: Sequence[bytes], received: Sequence[int], exporter: bytes,
                 exporter_index: int, templates: TemplateStore, counts: ExporterStats,
                 one: Callable[[int], None]) -> None:
        """Walk datagrams of one exporter, the usual ones in bulk: a datagram that is a v9 header
        and one data flowset of a known flow template filling it exactly (optionally after a
        template flowset that repeats the last one applied) is parsed with numpy over the
        whole batch. Every other datagram is handed to ``one(index)`` (the per-datagram walk),
        in order, and the bulk parts between them see exactly the state a per-datagram walk
        would have left: same records, counters, sequence checks and template state."""
        scan = F.bulk_scan(payloads, _HEAD, VERSION, TEMPLATE_FLOWSET, FIRST_DATA_FLOWSET)
        if scan is None:
            for i in range(len(payloads)):
                one(i)
            return

        def bulk(a: int, b: int) -> None:
            self._bulk(a, b, received, scan, exporter, exporter_index, templates, counts, one)

        F.bulk_runs(scan, payloads, "source", lambda domain: self._applied.get((exporter, domain)),
                    templates.has_pending, bulk, one)

    def _bulk(self, a: int, b: int, received: Sequence[int], scan: F.BulkScan, exporter: bytes,
              exporter_index: int, templates: TemplateStore, counts: ExporterStats,
              one: Callable[[int], None]) -> None:
        """Datagrams a..b-1, all of the usual shape, decoded together."""
        head = scan.head
        source = head["source"][a:b]
        fid = scan.data_id[a:b]
        keys = source.astype(np.int64) << 16 | fid
        distinct = np.unique(keys).tolist()
        plan: list[tuple[int, Template, np.ndarray]] = []
        for key in distinct:
            template = templates.get(VERSION, exporter, key >> 16, key & 0xFFFF)
            if template is None or template.is_options:
                # Held or options data: rare; the per-datagram walk knows how (refreshes taken into
                # the bulk are walked again: unchanged, and not counted yet).
                for i in range(a, b):
                    one(i)
                return
            plan.append((key >> 16, template, np.flatnonzero(keys == key)))
        counts.templates += int(scan.joined[a:b].sum())
        sequence = head["sequence"][a:b].astype(np.int64)
        for domain in np.unique(source).tolist():
            seqs = sequence[source == domain]
            key3 = (VERSION, exporter, domain)
            expected = templates.sequences.get(key3)
            if (expected is not None and int(seqs[0]) != expected) or (
                    len(seqs) > 1 and bool(((np.diff(seqs) % _MOD) != 1).any())):
                for value in seqs.tolist():  # a gap, reordering or restart: count it as one by one
                    track(templates, key3, value, 1, True, counts)
            else:
                templates.set_sequence(key3, (int(seqs[-1]) + 1) % _MOD)
        view = memoryview(scan.buf)
        export_ms = (head["secs"][a:b].astype(np.int64) * 1000)
        uptime = head["uptime"][a:b].astype(np.int64)
        body = scan.starts[a:b] + scan.data_at[a:b] + 4
        for domain, template, rows in plan:
            size = template.record_length
            records = (scan.data_len[a:b][rows] - 4) // size
            keep = records > 0
            rows, records = rows[keep], records[keep]
            if not len(rows):
                continue
            entry = self._groups.get(id(template))
            if entry is None:
                entry = self._groups[id(template)] = (template, Group())
            group = entry[1]
            m = len(rows)
            key3 = (VERSION, exporter, domain)
            spans = zip(body[rows].tolist(), (records * size).tolist(), strict=True)
            group.chunks.extend([view[s : s + k] for s, k in spans])
            group.counts.extend(records.tolist())
            group.export_ms.extend(export_ms[rows].tolist())
            group.base.extend(uptime[rows].tolist())
            group.domain.extend([domain] * m)
            group.exporter.extend([exporter_index] * m)
            group.received.extend([received[a + r] for r in rows.tolist()])
            group.sampling.extend([templates.domain_rate(key3)] * m)
            group.samplers.extend([templates.samplers.get(key3)] * m)
            counts.records += int(records.sum())

    def add(
        self,
        payload: bytes,
        exporter: bytes,
        exporter_index: int,
        received_ms: int,
        templates: TemplateStore,
        counts: ExporterStats,
    ) -> None:
        """Walk one v9 packet: store its templates, slice its data flowsets, count the rest.

        A malformed flowset stops the walk of this packet; what earlier flowsets of the packet
        yielded is kept, since each flowset is self-delimiting and was checked on its own.
        """
        end = len(payload)
        if end < HEADER_LENGTH:
            counts.error("truncated_header")
            return
        _, _count, uptime, secs, sequence, source_id = HEADER.unpack_from(payload)
        track(templates, (VERSION, exporter, source_id), sequence, 1, True, counts)
        export_ms = secs * 1000
        view = memoryview(payload)
        offset = HEADER_LENGTH
        while offset + 4 <= end:
            flowset_id, length = _FLOWSET.unpack_from(payload, offset)
            if length < 4 or offset + length > end:
                if length == 0 and _is_zero_padding(payload, offset, end):
                    break  # zero padding up to the end of the packet
                counts.error("bad_flowset_length")
                return
            body, body_end = offset + 4, offset + length
            offset = body_end
            if flowset_id >= FIRST_DATA_FLOWSET:
                template = templates.get(VERSION, exporter, source_id, flowset_id)
                if template is None:
                    pending = PendingSet(flowset_id, bytes(view[body:body_end]), export_ms, uptime,
                                         received_ms)
                    hold_unknown(templates, VERSION, exporter, source_id, pending, counts)
                    continue
                self._data(template, view, body, body_end, exporter, exporter_index, source_id,
                           export_ms, uptime, received_ms, templates, counts)
            elif flowset_id in (TEMPLATE_FLOWSET, OPTIONS_TEMPLATE_FLOWSET):
                parse = _parse_templates if flowset_id == TEMPLATE_FLOWSET else _parse_options_templates
                learnt: list[int] = []
                ok = parse(payload, body, body_end, exporter, source_id, templates, counts, learnt)
                if ok and flowset_id == TEMPLATE_FLOWSET:
                    self._applied[(exporter, source_id)] = (payload[body:body_end], len(learnt))
                else:  # options templates may reuse the IDs: no refresh is known to be unchanged
                    self._applied.pop((exporter, source_id), None)
                if templates.has_pending():
                    for template_id in learnt:
                        self._replay(template_id, exporter, exporter_index, source_id, templates, counts)
                if not ok:
                    return
            else:
                # IDs 2-255 are reserved: nothing defines their content, so skip and count them.
                counts.error("reserved_flowset_id")

    def _replay(self, template_id: int, exporter: bytes, exporter_index: int, source_id: int,
                templates: TemplateStore, counts: ExporterStats) -> None:
        """Decode the flowsets that waited for the template that just arrived."""
        template = templates.get(VERSION, exporter, source_id, template_id)
        if template is None:
            return
        for held in templates.release(VERSION, exporter, source_id, template_id):
            self._data(template, memoryview(held.data), 0, len(held.data), exporter, exporter_index,
                       source_id, held.export_ms, held.uptime, held.received_ms, templates, counts)

    def _data(self, template: Template, view: memoryview, body: int, body_end: int, exporter: bytes,
              exporter_index: int, source_id: int, export_ms: int, uptime: int, received_ms: int,
              templates: TemplateStore, counts: ExporterStats) -> None:
        """One data flowset whose template is known: options records are parsed for sampling,
        flow records sliced into their layout's group."""
        size = template.record_length
        n = (body_end - body) // size  # the remainder is padding
        if n == 0:
            return
        if template.is_options:
            counts.options_records += n
            where = _options_offsets(template)
            if where:
                for i in range(n):
                    base = body + i * size
                    values = {t: int.from_bytes(view[base + o : base + o + ln], "big")
                              for t, (o, ln) in where.items()}
                    templates.learn_options(VERSION, exporter, source_id, values)
            return
        entry = self._groups.get(id(template))
        if entry is None:
            entry = self._groups[id(template)] = (template, Group())
        key = (VERSION, exporter, source_id)
        entry[1].add(view[body : body + n * size], n, export_ms, uptime, source_id, exporter_index,
                     received_ms,
                     templates.domain_rate(key), templates.samplers.get(key))
        counts.records += n

    def __len__(self) -> int:
        return sum(sum(g.counts) for _, g in self._groups.values())

    def columns(self, exporters: np.ndarray) -> list[dict[str, np.ndarray]]:
        """One column dict per template layout seen in this call (see :func:`group_columns`)."""
        return [group_columns(t, g, exporters) for t, g in self._groups.values()]


def _parse_templates(
    payload: bytes,
    pos: int,
    end: int,
    exporter: bytes,
    source_id: int,
    templates: TemplateStore,
    counts: ExporterStats,
    learnt: list[int],
) -> bool:
    """Store every template of a template flowset (their IDs appended to ``learnt``); False (and
    counted) if one is malformed."""
    while pos + 4 <= end:
        template_id, field_count = _FLOWSET.unpack_from(payload, pos)
        fields_end = pos + 4 + 4 * field_count
        if template_id < FIRST_DATA_FLOWSET or field_count == 0 or fields_end > end:
            if _is_zero_padding(payload, pos, end):
                return True
            counts.error("bad_template")
            return False
        wire = payload[pos + 4 : fields_end]
        if not templates.same_raw(VERSION, exporter, source_id, template_id, wire):
            raw = struct.unpack_from(f"!{2 * field_count}H", payload, pos + 4)
            template = Template(fields=tuple(Field(t, n) for t, n in zip(raw[::2], raw[1::2], strict=True)))
            # v9 has no variable-length fields: 65535 (IPFIX's marker) cannot fit a datagram.
            if template.record_length == 0 or template.varlen:
                counts.error("bad_template")
                return False
            templates.put(VERSION, exporter, source_id, template_id, template, wire)
        learnt.append(template_id)
        counts.templates += 1
        pos = fields_end
    return True


def _parse_options_templates(
    payload: bytes,
    pos: int,
    end: int,
    exporter: bytes,
    source_id: int,
    templates: TemplateStore,
    counts: ExporterStats,
    learnt: list[int],
) -> bool:
    """Store every options template of an options template flowset; False if one is malformed.

    Options templates are kept so that their data flowsets are recognised as options records
    (counted, not decoded as flows) instead of being reported as missing templates.
    """
    while pos + _OPTIONS_HEADER.size <= end:
        template_id, scope_length, option_length = _OPTIONS_HEADER.unpack_from(payload, pos)
        fields_end = pos + _OPTIONS_HEADER.size + scope_length + option_length
        if (
            template_id < FIRST_DATA_FLOWSET
            or scope_length % 4
            or option_length % 4
            or scope_length + option_length == 0
            or fields_end > end
        ):
            if _is_zero_padding(payload, pos, end):
                return True
            counts.error("bad_template")
            return False
        raw = struct.unpack_from(f"!{(scope_length + option_length) // 2}H", payload, pos + 6)
        fields = tuple(Field(t, n) for t, n in zip(raw[::2], raw[1::2], strict=True))
        split = scope_length // 4
        template = Template(fields=fields[split:], scope_fields=fields[:split], is_options=True)
        if template.record_length == 0 or template.varlen:
            counts.error("bad_template")
            return False
        templates.put(VERSION, exporter, source_id, template_id, template)
        learnt.append(template_id)
        counts.templates += 1
        pos = fields_end
    return True


def _options_offsets(template: Template) -> dict[int, tuple[int, int]]:
    """Where the sampling fields of a v9 options record are (non-scope fields only: v9 scope
    types 1-5 are not IPFIX elements, e.g. scope 1 "System" is not octetDeltaCount)."""
    where: dict[int, tuple[int, int]] = {}
    offset = sum(f.length for f in template.scope_fields)
    for f in template.fields:
        if f.type in _SAMPLING_OPTIONS and f.type not in where and 0 < f.length <= 8:
            where[f.type] = (offset, f.length)
        offset += f.length
    return where


def group_columns(template: Template, group: Group, exporters: np.ndarray) -> dict[str, np.ndarray]:
    """Columns of the `raw.v1` schema for all records of one template layout.

    Counter fallbacks: IN_BYTES/IN_PKTS, else OUT_BYTES/OUT_PKTS (egress-only exporters), else
    the totals 85/86; a record without any counter reports 0. Times: absolute flowStart/End
    milliseconds (152/153) or seconds (150/151) when present, else FIRST/LAST_SWITCHED converted
    from uptime; a record with only one of start/end uses it for both, and one with neither uses
    the export time. ICMP_TYPE (32) is not folded into the ports: it fills icmp_type/icmp_code
    (:func:`sensors.netflow.fields.detail_columns`). Sampling: see
    :func:`sensors.netflow.fields.sampling_column`.
    """
    buf = b"".join(group.chunks)
    counts = np.asarray(group.counts, dtype=np.int64)
    n = int(counts.sum())
    size = template.record_length
    where = template.offsets()

    def per_record(values: list[int], dtype: type[np.generic] = np.int64) -> np.ndarray:
        return np.repeat(np.asarray(values, dtype=dtype), counts)

    export_ms = per_record(group.export_ms)
    uptime = per_record(group.base)

    def timestamp(ms_field: int, s_field: int, switched_field: int) -> np.ndarray | None:
        if ms_field in where:
            return F.uint(buf, n, size, *where[ms_field]).astype(np.int64)
        if s_field in where:
            return F.uint(buf, n, size, *where[s_field]).astype(np.int64) * 1000
        if switched_field in where:
            return uptime_to_unix_ms(export_ms, uptime, F.uint(buf, n, size, *where[switched_field]))
        return None

    start = timestamp(FLOW_START_MILLISECONDS, FLOW_START_SECONDS, F.START_UPTIME)
    end = timestamp(FLOW_END_MILLISECONDS, FLOW_END_SECONDS, F.END_UPTIME)
    if start is None:
        start = export_ms if end is None else end
    if end is None:
        end = start
    columns = F.common_columns(buf, n, size, where, group, counts, exporters)
    columns.update(version=np.full(n, VERSION, dtype=np.uint16), start=start, end=end)
    return columns
