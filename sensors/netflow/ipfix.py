"""IPFIX (RFC 7011/7012): templates, options templates and data sets, decoded by layout.

The same columnar scheme as :mod:`sensors.netflow.v9`: each message is walked set by set as it
arrives (:meth:`IpfixBatch.add`), templates go into the caller's
:class:`~sensors.netflow.templates.TemplateStore` at once, and the records of every data set are
sliced into a group per template object; :meth:`IpfixBatch.columns` converts each group with one
buffer and strided numpy views per field.

Variable-length fields (length 65535 in the template, then a 1-byte length, or 255 and a 2-byte
length, before each value) move every later field by a per-record amount. Only templates that
have them pay for it: their sets are walked record by record in a tight loop that only reads the
length prefixes (:func:`_walk`), and the group is then *repacked* with one numpy gather into
fixed-size records holding only the fixed-length fields, which the fixed-length code reads
unchanged. No raw.v1 column comes from a variable-length field.

Other rules, and what is counted:

* Set IDs 2 (templates), 3 (options templates), >= 256 (data); 0, 1 and 4-255 are counted as
  ``reserved_set_id``. Template withdrawal (field count 0) forgets the template; a withdrawal of
  template ID 2 (or 3) forgets every template (or options template) of the domain.
* Enterprise-specific fields (E bit, with their PEN) are skipped by their length and counted
  per value in ``ExporterStats.enterprise_fields``, except the RFC 5103 reverse elements
  (PEN 29305): a biflow record whose reverse direction has packets or octets becomes **two
  records**: the forward one as sent, and a reverse one with endpoints, ports and interfaces
  swapped, the reverse counters and reverse TCP flags (and reverse times when sent, else the
  forward ones). Reverse records are counted in ``records`` and ``reverse_records``. This keeps
  byte totals exact, where dropping the reverse counters would lose the answers of every
  conversation.
* Reduced-size encoding (e.g. octetDeltaCount in 4 bytes) is read by the generic unsigned
  reader of :mod:`sensors.netflow.fields`.
* Times, in order of preference: flowStart/EndMilliseconds (152/153), -Nanoseconds (156/157)
  and -Microseconds (154/155) (NTP format), -Seconds (150/151), -DeltaMicroseconds (158/159,
  before the export time), flowStart/EndSysUpTime (22/21) relative to the systemInitTimeMilliseconds
  (160) learnt from options data (with the 32-bit wrap resolved against the export time). A
  set with uptime times but no known init time uses the export time and is counted as
  ``missing_system_init_time``. Records with no time at all get the export time.
* Data sets whose template is unknown are held, like v9's (see :mod:`sensors.netflow.v9`).
* The header's sequence number counts data records; it is checked per domain (see
  :mod:`sensors.netflow.sequence`). A message that holds data for a missing template has an
  unknown record count, so the check only resynchronises on the next one.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, cast

import numpy as np

from sensors.netflow import fields as F
from sensors.netflow.fields import Group
from sensors.netflow.sequence import track
from sensors.netflow.templates import (
    VARIABLE_LENGTH,
    Field,
    PendingSet,
    Template,
    TemplateStore,
    hold_unknown,
)

if TYPE_CHECKING:
    from sensors.netflow.stats import ExporterStats

VERSION = 10
HEADER = struct.Struct("!HHIII")  # version, length, export time, sequence, observation domain
HEADER_LENGTH = HEADER.size  # 16
_SET = struct.Struct("!HH")
_OPTIONS_HEADER = struct.Struct("!HHH")
TEMPLATE_SET, OPTIONS_TEMPLATE_SET, FIRST_DATA_SET = 2, 3, 256
REVERSE_PEN = 29305  # RFC 5103 reverse information elements
_NTP_EPOCH = 2_208_988_800  # seconds from 1900-01-01 to 1970-01-01
_WRAP = 1 << 32

START_S, END_S, START_MS, END_MS, START_US, END_US, START_NS, END_NS = 150, 151, 152, 153, 154, 155, 156, 157
START_DELTA_US, END_DELTA_US = 158, 159
_OPTION_FIELDS = F.OPTIONS_OF_INTEREST | {F.SAMPLER_ID, F.SELECTOR_ID}
#: The first 20 bytes of the usual message: the header and the first set's header.
_HEAD = np.dtype([("version", ">u2"), ("length", ">u2"), ("export", ">u4"), ("sequence", ">u4"),
                  ("domain", ">u4"), ("set_id", ">u2"), ("set_len", ">u2")])
MIN_BULK = F.MIN_BULK


def _is_zero(payload: bytes | memoryview, start: int, end: int) -> bool:
    return bytes(payload[start:end]).count(0) == end - start


class _Plan:
    """How to read one template's records: the fixed-length layout the columns are built from
    and, for templates with variable-length fields, how to walk and repack them."""

    __slots__ = ("enterprise", "fixed", "gather", "has_reverse", "reverse", "segments", "tail", "where")

    def __init__(self, template: Template) -> None:
        all_fields = (*template.scope_fields, *template.fields)
        fixed = [f for f in all_fields if f.length != VARIABLE_LENGTH]
        self.enterprise = sum(1 for f in all_fields if f.enterprise and f.enterprise != REVERSE_PEN)
        # Offsets in the (possibly repacked) fixed-size record.
        self.where: dict[int, tuple[int, int]] = {}
        self.reverse: dict[int, tuple[int, int]] = {}
        offset = 0
        for f in fixed:
            target = (self.where if f.enterprise == 0
                      else self.reverse if f.enterprise == REVERSE_PEN else None)
            if target is not None and f.type not in target:
                target[f.type] = (offset, f.length)
            offset += f.length
        self.has_reverse = any(k in self.reverse for k in (1, 2, 23, 24, 85, 86))
        self.fixed = Template(fields=tuple(fixed))
        # Variable length: fixed bytes before each variable field, and after the last one.
        self.segments: list[int] = []
        self.tail = 0
        self.gather: np.ndarray | None = None
        if template.varlen:
            run = 0
            static: list[int] = []  # per fixed output byte: offset if all variable fields were empty
            nvar: list[int] = []  # per fixed output byte: how many variable fields precede it
            pos = 0
            for f in all_fields:
                if f.length == VARIABLE_LENGTH:
                    self.segments.append(run)
                    run = 0
                else:
                    static.extend(range(pos, pos + f.length))
                    nvar.extend([len(self.segments)] * f.length)
                    run += f.length
                    pos += f.length
            self.tail = run
            self.gather = np.array([static, nvar], dtype=np.int64)


_NONE = np.zeros(0, dtype=np.int64)  # no record starts (fixed-length layouts, until walked)
#: A variable-length data set whose records are counted at the end of the call: (message
#: position, group, index in the group), or the same as arrays for a bulk run's sets of a group.
_Deferred = tuple[int, Group, int] | tuple[np.ndarray, Group, np.ndarray]


class IpfixBatch:
    """The IPFIX messages of one decode call: templates applied as they come, data grouped."""

    __slots__ = ("_applied", "_groups", "_plans", "_tracks")

    def __init__(self) -> None:
        #: id(plan) -> (plan, its records, and for variable-length layouts the record starts and
        #: field lengths :func:`_walk_sets` finds at the end of the call).
        self._groups: dict[int, tuple[_Plan, Group, np.ndarray, np.ndarray]] = {}
        self._plans: dict[int, tuple[Template, _Plan]] = {}
        #: Sequence checks, in message order, run once the records of every message are known:
        #: (stream, sequence of each message, records of its fixed-length sets or None, counts,
        #: deferred variable-length sets as (message position, group, index in the group), or
        #: for a bulk run's sets of one group (positions, group, indices) as arrays).
        #: Nothing else reads the sequence state within a call, so deferring them changes nothing.
        self._tracks: list[tuple[tuple[int, bytes, int], list[int], list[int | None], ExporterStats,
                                 list[_Deferred]]] = []
        #: (exporter, domain) -> (body, templates counted) of the last template set applied in
        #: this call, for recognising unchanged refreshes (see :meth:`add_many`).
        self._applied: dict[tuple[bytes, int], tuple[bytes, int]] = {}

    def _plan(self, template: Template) -> _Plan:
        entry = self._plans.get(id(template))
        if entry is None or entry[0] is not template:
            entry = self._plans[id(template)] = (template, _Plan(template))
        return entry[1]

    def add(self, payload: bytes, exporter: bytes, exporter_index: int, received_ms: int,
            templates: TemplateStore, counts: ExporterStats) -> None:
        """Walk one IPFIX message: store templates, slice data sets, count the rest."""
        size = len(payload)
        if size < HEADER_LENGTH:
            counts.error("truncated_header")
            return
        _, length, export_secs, sequence, domain = HEADER.unpack_from(payload)
        if length < HEADER_LENGTH or length > size:
            counts.error("bad_message_length")
            return
        # Walk the whole datagram, not just the header's length: a shorter length is an exporter
        # bug (Telegraf issue 14370), and the sets are self-delimiting anyway, as tshark has it.
        end = size
        export_ms = export_secs * 1000
        view = memoryview(payload)
        offset = HEADER_LENGTH
        records: int | None = 0
        deferred: list[_Deferred] = []
        while offset + 4 <= end:
            set_id, set_length = _SET.unpack_from(payload, offset)
            if set_length < 4 or offset + set_length > end:
                counts.error("bad_set_length")
                records = None
                break
            body, body_end = offset + 4, offset + set_length
            offset = body_end
            if set_id >= FIRST_DATA_SET:
                template = templates.get(VERSION, exporter, domain, set_id)
                if template is None:
                    records = None
                    held = PendingSet(set_id, bytes(view[body:body_end]), export_ms, 0, received_ms)
                    hold_unknown(templates, VERSION, exporter, domain, held, counts)
                    continue
                n = self._data(template, view, body, body_end, exporter, exporter_index, domain, export_ms,
                               received_ms, templates, counts, deferred)
                if records is not None:
                    records += n
            elif set_id in (TEMPLATE_SET, OPTIONS_TEMPLATE_SET):
                learnt: list[int] = []
                options = set_id == OPTIONS_TEMPLATE_SET
                before = counts.templates
                ok = _parse_templates(payload, body, body_end, options, exporter, domain, templates, counts,
                                      learnt)
                if ok and not options:
                    self._applied[(exporter, domain)] = (payload[body:body_end], counts.templates - before)
                else:  # options templates may reuse the IDs: no refresh is known to be unchanged
                    self._applied.pop((exporter, domain), None)
                if templates.has_pending():
                    for template_id in learnt:
                        self._replay(template_id, exporter, exporter_index, domain, templates, counts)
                if not ok:
                    records = None
                    break
            else:
                counts.error("reserved_set_id")
        self._tracks.append(((VERSION, exporter, domain), [sequence], [records], counts, deferred))

    def add_many(self, payloads: Sequence[bytes], received: Sequence[int], exporter: bytes,
                 exporter_index: int, templates: TemplateStore, counts: ExporterStats,
                 one: Callable[[int], None]) -> None:
        """Walk messages of one exporter, the usual ones in bulk (as
        :meth:`sensors.netflow.v9.V9Batch.add_many` does for v9): a message that is a header and
        one data set of a known flow template filling it exactly, optionally after a template
        set that repeats the last one applied (while nothing waits for a template), is parsed
        with numpy over the whole batch; every other message is handed to ``one(index)``, in
        order. Same records, counters, sequence checks and template state as message by message."""
        scan = F.bulk_scan(payloads, _HEAD, VERSION, TEMPLATE_SET, FIRST_DATA_SET, length_field="length")
        if scan is None:
            for i in range(len(payloads)):
                one(i)
            return

        def bulk(a: int, b: int) -> None:
            self._bulk(a, b, received, scan, exporter, exporter_index, templates, counts, one)

        F.bulk_runs(scan, payloads, "domain", lambda domain: self._applied.get((exporter, domain)),
                    templates.has_pending, bulk, one)

    def _bulk(self, a: int, b: int, received: Sequence[int], scan: F.BulkScan, exporter: bytes,
              exporter_index: int, templates: TemplateStore, counts: ExporterStats,
              one: Callable[[int], None]) -> None:
        """Messages a..b-1, all of the usual shape, decoded together."""
        head = scan.head
        domain = head["domain"][a:b].astype(np.int64)
        keys = domain << 16 | scan.data_id[a:b]
        plan: list[tuple[int, Template, np.ndarray]] = []
        for key in np.unique(keys).tolist():
            template = templates.get(VERSION, exporter, key >> 16, key & 0xFFFF)
            if template is None or template.is_options:
                for i in range(a, b):  # held or options data: message by message
                    one(i)
                return
            plan.append((key >> 16, template, np.flatnonzero(keys == key)))
        counts.templates += int(scan.joined[a:b].sum())
        view = memoryview(scan.buf)
        export_ms = head["export"][a:b].astype(np.int64) * 1000
        body = scan.starts[a:b] + scan.data_at[a:b] + 4
        records = np.zeros(b - a, dtype=np.int64)
        deferred: list[_Deferred] = []
        for dom, template, rows in plan:
            layout = self._plan(template)
            key3 = (VERSION, exporter, dom)
            entry = self._groups.get(id(layout))
            if entry is None:
                entry = self._groups[id(layout)] = (layout, Group(), _NONE, _NONE)
            group = entry[1]
            lengths = scan.data_len[a:b][rows] - 4
            if template.varlen:  # records found at the end of the call (_walk_sets)
                first = len(group.counts)
                spans = zip(body[rows].tolist(), lengths.tolist(), strict=True)
                group.chunks.extend([view[s : s + k] for s, k in spans])
                group.counts.extend([0] * len(rows))
                deferred.append((rows, group, np.arange(first, first + len(rows))))
            else:
                size = template.record_length
                per = lengths // size
                records[rows] = per
                keep = per > 0
                rows, per = rows[keep], per[keep]
                spans = zip(body[rows].tolist(), (per * size).tolist(), strict=True)
                group.chunks.extend([view[s : s + k] for s, k in spans])
                group.counts.extend(per.tolist())
                total = int(per.sum())
                counts.records += total
                if layout.enterprise:
                    counts.enterprise_fields += total * layout.enterprise
            m = len(rows)
            group.export_ms.extend(export_ms[rows].tolist())
            group.base.extend([templates.sys_init.get((exporter, dom), -1)] * m)
            group.domain.extend([dom] * m)
            group.exporter.extend([exporter_index] * m)
            group.received.extend([received[a + r] for r in rows.tolist()])
            group.sampling.extend([templates.domain_rate(key3)] * m)
            group.samplers.extend([templates.samplers.get(key3)] * m)
            group.stats.extend([counts] * m)
        sequence = head["sequence"][a:b].tolist()
        units = cast("list[int | None]", records.tolist())  # ints here; None in add()'s tracks
        if not (domain != domain[0]).any():  # one domain (the usual case): positions are the rows
            self._tracks.append(((VERSION, exporter, int(domain[0])), sequence, units, counts, deferred))
            return
        runs = cast("list[tuple[np.ndarray, Group, np.ndarray]]", deferred)  # only arrays here
        for dom in dict.fromkeys(domain.tolist()):
            mine = domain == dom
            where = np.flatnonzero(mine).tolist()
            position = np.cumsum(mine) - 1  # row -> its position among this domain's messages
            self._tracks.append(((VERSION, exporter, dom), [sequence[j] for j in where],
                                 [units[j] for j in where], counts,
                                 [(position[rows[mine[rows]]], g, idx[mine[rows]]) for rows, g, idx in runs]))

    def _replay(self, template_id: int, exporter: bytes, exporter_index: int, domain: int,
                templates: TemplateStore, counts: ExporterStats) -> None:
        template = templates.get(VERSION, exporter, domain, template_id)
        if template is None:
            return
        for held in templates.release(VERSION, exporter, domain, template_id):
            self._data(template, memoryview(held.data), 0, len(held.data), exporter, exporter_index, domain,
                       held.export_ms, held.received_ms, templates, counts)

    def _data(self, template: Template, view: memoryview, body: int, body_end: int, exporter: bytes,
              exporter_index: int, domain: int, export_ms: int, received_ms: int, templates: TemplateStore,
              counts: ExporterStats, deferred: list[_Deferred] | None = None) -> int:
        """One data set with a known template; returns its record count. The records of a flow
        set with variable-length fields are found later, for all such sets of the call at once
        (:func:`_walk_sets`): the set is added with a count of 0 for now and listed in
        ``deferred``, and 0 is returned."""
        plan = self._plan(template)
        if template.varlen and not template.is_options:
            entry = self._groups.get(id(plan))
            if entry is None:
                entry = self._groups[id(plan)] = (plan, Group(), _NONE, _NONE)
            group = entry[1]
            key = (VERSION, exporter, domain)
            init = templates.sys_init.get((exporter, domain), -1)
            group.add(view[body:body_end], 0, export_ms, init, domain, exporter_index, received_ms,
                      templates.domain_rate(key), templates.samplers.get(key))
            group.stats.append(counts)
            if deferred is not None:
                deferred.append((0, group, len(group.counts) - 1))
            return 0
        if template.varlen:
            starts, consumed, stop = _walk(view, body, body_end, plan.segments, plan.tail)
            n = len(starts)
            if stop < body_end and not _is_zero(view, stop, body_end):
                counts.error("bad_data_record")  # the rest of the set is not a whole record
        else:
            n = (body_end - body) // template.record_length  # the remainder is padding
        if n == 0:
            return 0
        if template.is_options:
            counts.options_records += n
            if template.varlen:
                _learn(view, body, n, template, starts, consumed, plan, exporter, domain, templates)
            else:
                _learn(view, body, n, template, None, None, plan, exporter, domain, templates)
            return n
        entry = self._groups.get(id(plan))
        if entry is None:
            entry = self._groups[id(plan)] = (plan, Group(), _NONE, _NONE)
        group = entry[1]
        chunk = view[body : body + n * template.record_length]  # fixed length: varlen sets were deferred
        key = (VERSION, exporter, domain)
        group.add(chunk, n, export_ms, templates.sys_init.get((exporter, domain), -1), domain, exporter_index,
                  received_ms, templates.domain_rate(key), templates.samplers.get(key))
        group.stats.append(counts)
        counts.records += n
        if plan.enterprise:
            counts.enterprise_fields += n * plan.enterprise
        return n

    def __len__(self) -> int:
        return sum(sum(g.counts) for _, g, _, _ in self._groups.values())

    def finish(self, templates: TemplateStore) -> None:
        """End of the call: find the records of the deferred variable-length sets, count them,
        and run the sequence checks in message order with every message's record count."""
        walked: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        found: dict[int, np.ndarray] = {}  # id(group) -> records of each of its sets as added
        for key, (plan, group, _, _) in self._groups.items():
            if plan.gather is not None:
                starts, consumed, per_set = _walk_sets(plan, group)
                found[id(group)] = np.asarray(per_set, dtype=np.int64)
                walked[key] = (starts, consumed)
        for stream, sequences, records, counts, deferred in self._tracks:
            if deferred and isinstance(deferred[0][0], np.ndarray):  # a bulk run's: arrays, no None
                total = np.asarray(records, dtype=np.int64)
                for rows, group, idx in deferred:
                    total[rows] += found[id(group)][idx]
                records = cast("list[int | None]", total.tolist())
            else:  # one message's sets, walked on their own
                for position, group, i in cast("list[tuple[int, Group, int]]", deferred):
                    known = records[position]
                    if known is not None:
                        records[position] = known + int(found[id(group)][i])
            _track_many(templates, stream, sequences, records, counts)
        self._tracks.clear()
        for key, (starts, consumed) in walked.items():
            plan, group, _, _ = self._groups[key]
            self._groups[key] = (plan, group, starts, consumed)

    def columns(self, exporters: np.ndarray) -> list[dict[str, np.ndarray]]:
        """Column dicts for every layout seen in this call (two for biflow layouts); call
        :meth:`finish` first."""
        out: list[dict[str, np.ndarray]] = []
        for plan, group, starts, consumed in self._groups.values():
            if group.counts and sum(group.counts):
                out.extend(_group_columns(plan, group, starts, consumed, exporters))
        return out


def _track_many(templates: TemplateStore, stream: tuple[int, bytes, int], sequences: list[int],
                records: list[int | None], counts: ExporterStats) -> None:
    """:func:`~sensors.netflow.sequence.track` for consecutive messages of one stream; when each
    follows the previous exactly (the usual case) only the expectation moves."""
    if len(sequences) > 1 and None not in records:
        seq = np.asarray(sequences, dtype=np.int64)
        sizes = np.asarray(records, dtype=np.int64)
        expected = templates.sequences.get(stream)
        in_order = not ((seq[1:] - seq[:-1] - sizes[:-1]) % _WRAP).any()
        if (expected is None or sequences[0] == expected) and in_order:
            templates.set_sequence(stream, (sequences[-1] + int(sizes[-1])) % _WRAP)
            return
    for sequence, units in zip(sequences, records, strict=True):
        track(templates, stream, sequence, units, False, counts)


def _walk(view: memoryview, pos: int, end: int, segments: list[int],
          tail: int) -> tuple[list[int], list[int], int]:
    """Find the records of a set whose template has variable-length fields.

    Returns the start of each whole record, the bytes each variable-length field took (length
    prefix included; len(segments) per record) and where the walk stopped. Only the length
    prefixes are read: this is the one per-record Python loop of the decoder, kept minimal.
    """
    starts: list[int] = []
    consumed: list[int] = []
    k = len(segments)
    while pos < end:
        record = pos
        for gap in segments:
            pos += gap
            if pos >= end:
                break
            length = view[pos]
            if length == 255:
                if pos + 3 > end:
                    pos = end + 1
                    break
                length = ((view[pos + 1] << 8) | view[pos + 2]) + 3
            else:
                length += 1
            consumed.append(length)
            pos += length
        else:
            pos += tail
            if pos <= end:
                starts.append(record)
                continue
        # An incomplete record: padding, or a truncated set. Forget its partial lengths.
        del consumed[len(starts) * k :]
        return starts, consumed, record
    return starts, consumed, pos


def _walk_sets(plan: _Plan, group: Group) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Find the records of every set of a group whose template has variable-length fields, all
    sets in lockstep (one numpy step per record position instead of Python per record), with
    the rules of :func:`_walk`. Fills ``group.counts``, counts records, enterprise fields and
    ``bad_data_record`` in each set's ExporterStats, and returns the record starts (offsets in
    the group's joined buffer) and the bytes each variable-length field took, record by record
    in set order, as :func:`_repack` wants them, and the records of each set as it was added.
    The group's chunks are replaced by their join (one chunk: joined once, not again for the
    columns); sets without records then leave the group's per-set lists (not its bytes)."""
    sizes = np.fromiter(map(len, group.chunks), dtype=np.int64, count=len(group.chunks))
    ends = np.cumsum(sizes)
    joined = b"".join(group.chunks)
    buf = np.frombuffer(joined, dtype=np.uint8)
    k = len(plan.segments)
    pos = ends - sizes
    sets = np.arange(len(sizes) if len(buf) else 0)  # no bytes at all: no records
    found_sets: list[np.ndarray] = []
    found_starts: list[np.ndarray] = []
    found_lengths: list[np.ndarray] = []
    stops = ends.copy()
    while len(sets):
        end = ends[sets]
        p = pos
        ok = p < end
        lengths = np.empty((len(sets), k), dtype=np.int64)
        for j, gap in enumerate(plan.segments):
            p = p + gap
            ok &= p < end
            # Clipped reads past the buffer only happen where ok is already False.
            first = buf.take(p, mode="clip").astype(np.int64)
            wide = first == 255
            if wide.any():
                ok &= ~wide | (p + 3 <= end)
                high = buf.take(p + 1, mode="clip").astype(np.int64)
                long_len = (high << 8 | buf.take(p + 2, mode="clip")) + 3
                lengths[:, j] = np.where(wide, long_len, first + 1)
            else:
                lengths[:, j] = first + 1
            p = p + lengths[:, j]
        p = p + plan.tail
        ok &= p <= end
        if ok.all():
            found_sets.append(sets)
            found_starts.append(pos)
            found_lengths.append(lengths)
            keep = p < end
        else:
            if ok.any():
                found_sets.append(sets[ok])
                found_starts.append(pos[ok])
                found_lengths.append(lengths[ok])
            # A set ends where a record does not fit (padding or a truncated record), or at its end.
            stops[sets[~ok]] = pos[~ok]
            keep = ok & (p < end)
        sets, pos = sets[keep], p[keep]
    if found_sets:
        all_sets = np.concatenate(found_sets)
        order = np.argsort(all_sets, kind="stable")
        starts = np.concatenate(found_starts)[order]
        consumed = np.concatenate(found_lengths)[order].ravel()
        per_set = np.bincount(all_sets, minlength=len(sizes))
    else:
        starts = consumed = np.zeros(0, dtype=np.int64)
        per_set = np.zeros(len(sizes), dtype=np.int64)
    added = per_set.tolist()
    group.counts[:] = added
    # Counters per ExporterStats object (usually one for the whole group: no loop over the sets).
    by_stats: dict[int, tuple[object, list[int] | None]] = {}
    if group.stats and len(set(map(id, group.stats))) == 1:
        by_stats[id(group.stats[0])] = (group.stats[0], None)
    else:
        for i, stats in enumerate(group.stats):
            members_of = by_stats.setdefault(id(stats), (stats, []))[1]
            assert members_of is not None
            members_of.append(i)
    for stats, members in by_stats.values():
        n = int(per_set.sum()) if members is None else int(per_set[members].sum())
        stats.records += n  # type: ignore[attr-defined]
        if plan.enterprise:
            stats.enterprise_fields += n * plan.enterprise  # type: ignore[attr-defined]
    for i in np.flatnonzero(stops < ends).tolist():
        if buf[stops[i] : ends[i]].any():
            group.stats[i].error("bad_data_record")  # type: ignore[attr-defined]
    group.chunks[:] = [joined]
    empty = per_set == 0
    if empty.any():
        # Sets without records leave the per-set lists (a biflow's per-set sums need every set
        # to have one); the joined bytes stay as they are, so the starts need no change.
        kept = np.flatnonzero(~empty).tolist()
        for name in Group.__slots__:
            if name != "chunks":
                values = getattr(group, name)
                setattr(group, name, [values[i] for i in kept])
    return starts, consumed, added


def _repack(buf: bytes, plan: _Plan, starts: list[int] | np.ndarray,
            consumed: list[int] | np.ndarray) -> bytes:
    """Fixed-size records (only the fixed-length fields) gathered out of variable-length ones:
    each run of fixed-length fields between the variable ones is copied row by row out of a
    view of the buffer's windows (no index per byte) into its columns of the output."""
    n = len(starts)
    k = len(plan.segments)
    shift = np.zeros((n, k + 1), dtype=np.int64)
    if k:
        np.cumsum(np.asarray(consumed, dtype=np.int64).reshape(n, k), axis=1, out=shift[:, 1:])
    first = np.asarray(starts, dtype=np.int64)
    size = plan.fixed.record_length
    out = np.empty(n * size, dtype=np.uint8)
    offset = column = 0
    for r, length in enumerate((*plan.segments, plan.tail)):
        if length and len(buf) >= length:
            # Every `length`-byte window of the buffer as one opaque item: gathering items copies
            # each run in one piece (faster than rows of a (windows, length) uint8 view).
            windows = np.ndarray((len(buf) - length + 1,), dtype=np.dtype((np.void, length)), buffer=buf,
                                 strides=(1,))
            target = np.ndarray((n,), dtype=windows.dtype, buffer=out, offset=column, strides=(size,))
            target[:] = windows[first + offset + shift[:, r]]
            column += length
        offset += length
    return out.tobytes()


def _learn(view: memoryview, body: int, n: int, template: Template, starts: list[int] | None,
           consumed: list[int] | None, plan: _Plan, exporter: bytes, domain: int,
           templates: TemplateStore) -> None:
    """Parse the options records that announce sampling or the init time (few: per record is fine)."""
    wanted = {t: w for t, w in plan.where.items() if t in _OPTION_FIELDS and 0 < w[1] <= 8}
    if not wanted:
        return
    if starts is None:
        size = template.record_length
        buf = bytes(view[body : body + n * size])
    else:
        size = plan.fixed.record_length
        buf = _repack(bytes(view), plan, starts, consumed or [])
    for i in range(n):
        base = i * size
        values: dict[int, int | float] = {}
        for t, (o, ln) in wanted.items():
            raw = buf[base + o : base + o + ln]
            is_float = t == F.SAMPLING_PROBABILITY and ln == 8  # float64 in RFC 7012
            values[t] = struct.unpack("!d", raw)[0] if is_float else int.from_bytes(raw, "big")
        templates.learn_options(VERSION, exporter, domain, values)


def _parse_templates(payload: bytes, pos: int, end: int, options: bool, exporter: bytes, domain: int,
                     templates: TemplateStore, counts: ExporterStats, learnt: list[int]) -> bool:
    """Store (or withdraw) every template of a (options) template set; False if one is malformed."""
    while pos + 4 <= end:
        template_id, field_count = _SET.unpack_from(payload, pos)
        scope_count = 0
        if field_count == 0:
            # Withdrawal (RFC 7011 8.1): the 4-byte header alone, then maybe padding.
            if template_id == (OPTIONS_TEMPLATE_SET if options else TEMPLATE_SET):
                templates.remove_domain(VERSION, exporter, domain, options)
            elif template_id >= FIRST_DATA_SET:
                templates.remove(VERSION, exporter, domain, template_id)
            elif _is_zero(payload, pos, end):
                return True
            else:
                counts.error("bad_template")
                return False
            counts.templates += 1
            pos += 4
            continue
        if options:
            if pos + 6 > end:
                counts.error("bad_template")
                return False
            scope_count = _OPTIONS_HEADER.unpack_from(payload, pos)[2]
        p = pos + (6 if options else 4)
        # An unchanged refresh (same wire bytes as the template in force) needs no parsing.
        if template_id >= FIRST_DATA_SET and (not options or 0 < scope_count <= field_count):
            known = _known_length(payload, p, end, field_count)
            if known:
                wire = (b"o" if options else b"d") + payload[pos:known]
                if templates.same_raw(VERSION, exporter, domain, template_id, wire):
                    learnt.append(template_id)
                    counts.templates += 1
                    pos = known
                    continue
        start = pos
        fields: list[Field] = []
        for _ in range(field_count):
            if p + 4 > end:
                counts.error("bad_template")
                return False
            ftype, flen = _SET.unpack_from(payload, p)
            p += 4
            pen = 0
            if ftype & 0x8000:
                if p + 4 > end:
                    counts.error("bad_template")
                    return False
                pen = int.from_bytes(payload[p : p + 4], "big")
                ftype &= 0x7FFF
                p += 4
            fields.append(Field(ftype, flen, pen))
        if template_id < FIRST_DATA_SET or scope_count > field_count or (options and scope_count == 0):
            counts.error("bad_template")
            return False
        template = Template(fields=tuple(fields[scope_count:]), scope_fields=tuple(fields[:scope_count]),
                            is_options=options)
        if template.record_length == 0:
            counts.error("bad_template")
            return False
        templates.put(VERSION, exporter, domain, template_id, template,
                      (b"o" if options else b"d") + payload[start:p])
        learnt.append(template_id)
        counts.templates += 1
        pos = p
    return True


def _known_length(payload: bytes, p: int, end: int, field_count: int) -> int:
    """Where the field specifiers starting at ``p`` end, or 0 if they run past ``end``."""
    for _ in range(field_count):
        if p + 4 > end:
            return 0
        p += 8 if payload[p] & 0x80 else 4
    return p if p <= end else 0


def _ntp_ms(value: np.ndarray) -> np.ndarray:
    """NTP 64-bit timestamps (RFC 7011 dateTimeMicro/Nanoseconds) as Unix milliseconds."""
    secs = (value >> np.uint64(32)).astype(np.int64) - _NTP_EPOCH
    frac = (value & np.uint64(0xFFFFFFFF)).astype(np.int64)
    return secs * 1000 + ((frac * 1000) >> 32)


def _times(buf: bytes, n: int, size: int, where: dict[int, tuple[int, int]], export_ms: np.ndarray,
           sys_init: np.ndarray, start_ids: tuple[int, ...],
           end_ids: tuple[int, ...]) -> tuple[np.ndarray | None, np.ndarray | None]:
    def one(ms: int, ns: int, us: int, s: int, delta: int, uptime: int) -> np.ndarray | None:
        if ms in where:
            return F.uint(buf, n, size, *where[ms]).astype(np.int64)
        for ntp in (ns, us):
            if ntp in where and where[ntp][1] == 8:
                return _ntp_ms(F.uint(buf, n, size, *where[ntp]))
        if s in where:
            return F.uint(buf, n, size, *where[s]).astype(np.int64) * 1000
        if delta in where:
            return export_ms - F.uint(buf, n, size, *where[delta]).astype(np.int64) // 1000
        if uptime in where:
            rel = F.uint(buf, n, size, *where[uptime]).astype(np.int64)
            t = sys_init + rel
            # A 32-bit ms uptime wraps every 49.7 days: take the wrap that puts t nearest the export.
            t += np.rint((export_ms - t) / _WRAP).astype(np.int64) * _WRAP
            return np.where(sys_init < 0, export_ms, t)
        return None

    return one(*start_ids), one(*end_ids)


_START = (START_MS, START_NS, START_US, START_S, START_DELTA_US, F.START_UPTIME)
_END = (END_MS, END_NS, END_US, END_S, END_DELTA_US, F.END_UPTIME)


def _group_columns(plan: _Plan, group: Group, starts: np.ndarray, consumed: np.ndarray,
                   exporters: np.ndarray) -> list[dict[str, np.ndarray]]:
    buf = b"".join(group.chunks)
    if plan.gather is not None:
        buf = _repack(buf, plan, starts, consumed)
    counts = np.asarray(group.counts, dtype=np.int64)
    n = int(counts.sum())
    size = plan.fixed.record_length
    where = plan.where
    export_ms = np.repeat(np.asarray(group.export_ms, dtype=np.int64), counts)
    sys_init = np.repeat(np.asarray(group.base, dtype=np.int64), counts)
    if F.START_UPTIME in where or F.END_UPTIME in where:
        for stats, base in zip(group.stats, group.base, strict=True):
            if base < 0:
                stats.error("missing_system_init_time")  # type: ignore[attr-defined]
    start, end = _times(buf, n, size, where, export_ms, sys_init, _START, _END)
    if start is None:
        start = export_ms if end is None else end
    if end is None:
        end = start
    columns = F.common_columns(buf, n, size, where, group, counts, exporters)
    columns.update(version=np.full(n, VERSION, dtype=np.uint16), start=start, end=end)
    if not plan.has_reverse:
        return [columns]
    # RFC 5103: the reverse direction as its own record, where it carried anything.
    rev = plan.reverse

    def rev_uint(dtype: type[np.generic], *ids: int) -> np.ndarray:
        for i in ids:
            if i in rev:
                return F.uint(buf, n, size, *rev[i]).astype(dtype)
        return np.zeros(n, dtype=dtype)

    rbytes = rev_uint(np.uint64, 1, 23, 85)
    rpackets = rev_uint(np.uint64, 2, 24, 86)
    keep = (rbytes > 0) | (rpackets > 0)
    if not keep.any():
        return [columns]
    rstart, rend = _times(buf, n, size, rev, export_ms, sys_init, _START, _END)
    reverse = {
        **columns,
        "src_addr": columns["dst_addr"], "dst_addr": columns["src_addr"],
        "src_port": columns["dst_port"], "dst_port": columns["src_port"],
        "in_if": columns["out_if"], "out_if": columns["in_if"],
        "bytes": rbytes, "packets": rpackets,
        "tcp_flags": rev_uint(np.uint8, F.TCP_FLAGS),
        # ICMP of the answers: the reverse ICMP elements, else the reverse's own destination port.
        **F.icmp_columns(buf, n, size, rev, columns["proto"], columns["src_port"]),
        "start": start if rstart is None else rstart,
        "end": end if rend is None else rend,
    }
    if "src_vlan" in columns or "dst_vlan" in columns:  # the way in of the answers is the way out
        none = np.zeros(n, dtype=np.uint16)
        reverse["src_vlan"] = columns.get("dst_vlan", none)
        reverse["dst_vlan"] = columns.get("src_vlan", none)
    reverse = {k: v[keep] for k, v in reverse.items()}
    per_set = np.add.reduceat(keep.astype(np.int64), np.concatenate(([0], np.cumsum(counts)[:-1])))
    for stats, k in zip(group.stats, per_set.tolist(), strict=True):
        stats.records += k  # type: ignore[attr-defined]
        stats.reverse_records += k  # type: ignore[attr-defined]
    return [columns, reverse]

