"""NetFlow v9 (RFC 3954): templates, options templates and template-described data flowsets.

Each packet is walked flowset by flowset as it arrives (:meth:`V9Batch.add`): templates go into
the caller's :class:`~sensors.netflow.templates.TemplateStore` at once, so a data flowset later in
the same packet or in a later packet of the same call already finds them. A data flowset is not
decoded there; its record bytes are sliced (no copy) into a group per template layout, with the
packet's header context. :meth:`V9Batch.columns` then turns each group into columns with one
``np.frombuffer`` and strided views per field, never looping over records in Python.

What is counted rather than decoded:

* a data flowset whose template is unknown (not yet received, or lost) is counted once per
  flowset as ``missing_template`` and its records are dropped;
* data flowsets of an options template (sampling, interface tables) are counted as options
  records, not flows;
* the header's record count is not enforced: exporters disagree on whether it counts records or
  flowsets, and every flowset is length-checked on its own anyway.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

import numpy as np

from sensors.netflow.templates import Field, Template, TemplateStore
from sensors.netflow.v5 import uptime_to_unix_ms
from sensors.schema import ipv4_to_mapped

if TYPE_CHECKING:
    from sensors.netflow.decoder import ExporterStats

VERSION = 9
HEADER = struct.Struct("!HHIIII")  # version, count, sysUptime, unix secs, sequence, source ID
HEADER_LENGTH = HEADER.size  # 20
_FLOWSET = struct.Struct("!HH")
_OPTIONS_HEADER = struct.Struct("!HHH")

TEMPLATE_FLOWSET = 0
OPTIONS_TEMPLATE_FLOWSET = 1
FIRST_DATA_FLOWSET = 256

# Field types (RFC 3954 section 8 and the IANA IPFIX registry, which v9 exporters also use).
IN_BYTES, IN_PKTS = 1, 2
PROTOCOL, TCP_FLAGS, L4_SRC_PORT, IPV4_SRC_ADDR, INPUT_SNMP = 4, 6, 7, 8, 10
L4_DST_PORT, IPV4_DST_ADDR, OUTPUT_SNMP = 11, 12, 14
LAST_SWITCHED, FIRST_SWITCHED, OUT_BYTES, OUT_PKTS = 21, 22, 23, 24
IPV6_SRC_ADDR, IPV6_DST_ADDR, SAMPLING_INTERVAL = 27, 28, 34
TOTAL_BYTES, TOTAL_PKTS = 85, 86
FLOW_START_SECONDS, FLOW_END_SECONDS, FLOW_START_MILLISECONDS, FLOW_END_MILLISECONDS = 150, 151, 152, 153


def _is_zero_padding(payload: bytes, start: int, end: int) -> bool:
    """True when payload[start:end] is all zero bytes (exporters pad flowsets and packets)."""
    return payload.count(0, start, end) == end - start


class _Group:
    """Data records of one template layout, plus the header context of each flowset."""

    __slots__ = ("chunks", "counts", "domain", "export_ms", "exporter", "received", "uptime")

    def __init__(self) -> None:
        self.chunks: list[memoryview] = []
        self.counts: list[int] = []
        self.export_ms: list[int] = []
        self.uptime: list[int] = []
        self.domain: list[int] = []
        self.exporter: list[int] = []
        self.received: list[int] = []


class V9Batch:
    """The v9 packets of one decode call: templates applied as they come, data grouped by layout."""

    __slots__ = ("_groups",)

    def __init__(self) -> None:
        # Keyed by the template object's identity: the store hands out the same object for as
        # long as a template is in force, and hashing a layout per flowset would cost more.
        self._groups: dict[int, tuple[Template, _Group]] = {}

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
        _, _count, uptime, secs, _seq, source_id = HEADER.unpack_from(payload)
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
                    counts.error("missing_template")
                    continue
                size = template.record_length
                n = (body_end - body) // size  # the remainder is padding
                if n == 0:
                    continue
                if template.is_options:
                    counts.options_records += n
                    continue
                entry = self._groups.get(id(template))
                if entry is None:
                    entry = self._groups[id(template)] = (template, _Group())
                group = entry[1]
                group.chunks.append(view[body : body + n * size])
                group.counts.append(n)
                group.export_ms.append(export_ms)
                group.uptime.append(uptime)
                group.domain.append(source_id)
                group.exporter.append(exporter_index)
                group.received.append(received_ms)
                counts.records += n
            elif flowset_id in (TEMPLATE_FLOWSET, OPTIONS_TEMPLATE_FLOWSET):
                parse = _parse_templates if flowset_id == TEMPLATE_FLOWSET else _parse_options_templates
                if not parse(payload, body, body_end, exporter, source_id, templates, counts):
                    return
            else:
                # IDs 2-255 are reserved: nothing defines their content, so skip and count them.
                counts.error("reserved_flowset_id")

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
) -> bool:
    """Store every template of a template flowset; False (and counted) if one is malformed."""
    while pos + 4 <= end:
        template_id, field_count = _FLOWSET.unpack_from(payload, pos)
        fields_end = pos + 4 + 4 * field_count
        if template_id < FIRST_DATA_FLOWSET or field_count == 0 or fields_end > end:
            if _is_zero_padding(payload, pos, end):
                return True
            counts.error("bad_template")
            return False
        raw = struct.unpack_from(f"!{2 * field_count}H", payload, pos + 4)
        template = Template(fields=tuple(Field(t, n) for t, n in zip(raw[::2], raw[1::2], strict=True)))
        if template.record_length == 0:
            counts.error("bad_template")
            return False
        templates.put(VERSION, exporter, source_id, template_id, template)
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
        if template.record_length == 0:
            counts.error("bad_template")
            return False
        templates.put(VERSION, exporter, source_id, template_id, template)
        counts.templates += 1
        pos = fields_end
    return True


def _field_bytes(buf: bytes, n: int, size: int, offset: int, length: int) -> np.ndarray:
    """An (n, length) uint8 view of one field in every record (records are ``size`` bytes)."""
    return np.ndarray((n, length), dtype=np.uint8, buffer=buf, offset=offset, strides=(size, 1))


def _uint(buf: bytes, n: int, size: int, offset: int, length: int) -> np.ndarray:
    """One big-endian unsigned field of every record as uint64, whatever its length.

    Lengths 1, 2, 4 and 8 are read through a strided view; other lengths (3, 5, 6, 7: MPLS
    labels, reduced-size encoding) are right-aligned into 8 zero bytes first. A field wider than
    8 bytes keeps its low 64 bits.
    """
    if length == 0:
        return np.zeros(n, dtype=np.uint64)
    if length > 8:
        offset, length = offset + length - 8, 8
    if length in (1, 2, 4, 8):
        dtype = np.dtype(f">u{length}")
        return np.ndarray((n,), dtype=dtype, buffer=buf, offset=offset, strides=(size,)).astype(np.uint64)
    wide = np.zeros((n, 8), dtype=np.uint8)
    wide[:, 8 - length :] = _field_bytes(buf, n, size, offset, length)
    return wide.view(">u8").ravel().astype(np.uint64)


def _address16(buf: bytes, n: int, size: int, offset: int, length: int) -> np.ndarray:
    """An IPv6 field as (n, 16) uint8, right-aligned if the exporter sent another length."""
    out = np.zeros((n, 16), dtype=np.uint8)
    take = min(length, 16)
    out[:, 16 - take :] = _field_bytes(buf, n, size, offset + length - take, take)
    return out


def group_columns(template: Template, group: _Group, exporters: np.ndarray) -> dict[str, np.ndarray]:
    """Columns of the `raw.v1` schema for all records of one template layout.

    Counter fallbacks: IN_BYTES/IN_PKTS, else OUT_BYTES/OUT_PKTS (egress-only exporters), else
    the totals 85/86; a record without any counter reports 0. Times: absolute flowStart/End
    milliseconds (152/153) or seconds (150/151) when present, else FIRST/LAST_SWITCHED converted
    from uptime; a record with only one of start/end uses it for both, and one with neither uses
    the export time. ICMP_TYPE (32) is deliberately not folded into the ports.
    """
    buf = b"".join(group.chunks)
    counts = np.asarray(group.counts, dtype=np.int64)
    n = int(counts.sum())
    size = template.record_length
    where = template.offsets()

    def per_record(values: list[int], dtype: type[np.generic] = np.int64) -> np.ndarray:
        return np.repeat(np.asarray(values, dtype=dtype), counts)

    def uint(*field_types: int) -> np.ndarray | None:
        for field_type in field_types:
            if field_type in where:
                return _uint(buf, n, size, *where[field_type])
        return None

    def uint_or_zero(dtype: type[np.generic], *field_types: int) -> np.ndarray:
        values = uint(*field_types)
        return np.zeros(n, dtype=dtype) if values is None else values.astype(dtype)

    export_ms = per_record(group.export_ms)
    uptime = per_record(group.uptime)

    def timestamp(ms_field: int, s_field: int, switched_field: int) -> np.ndarray | None:
        if ms_field in where:
            return _uint(buf, n, size, *where[ms_field]).astype(np.int64)
        if s_field in where:
            return _uint(buf, n, size, *where[s_field]).astype(np.int64) * 1000
        if switched_field in where:
            return uptime_to_unix_ms(export_ms, uptime, _uint(buf, n, size, *where[switched_field]))
        return None

    start = timestamp(FLOW_START_MILLISECONDS, FLOW_START_SECONDS, FIRST_SWITCHED)
    end = timestamp(FLOW_END_MILLISECONDS, FLOW_END_SECONDS, LAST_SWITCHED)
    if start is None:
        start = export_ms if end is None else end
    if end is None:
        end = start

    src_addr, dst_addr = _addresses(buf, n, size, where)
    sampling = uint_or_zero(np.uint32, SAMPLING_INTERVAL)
    sampling[sampling == 0] = 1
    return {
        "time_received": per_record(group.received),
        "exporter": exporters[per_record(group.exporter)],
        "observation_domain": per_record(group.domain, np.uint32),
        "version": np.full(n, VERSION, dtype=np.uint16),
        "start": start,
        "end": end,
        "src_addr": src_addr,
        "dst_addr": dst_addr,
        "src_port": uint_or_zero(np.uint16, L4_SRC_PORT),
        "dst_port": uint_or_zero(np.uint16, L4_DST_PORT),
        "proto": uint_or_zero(np.uint8, PROTOCOL),
        "bytes": uint_or_zero(np.uint64, IN_BYTES, OUT_BYTES, TOTAL_BYTES),
        "packets": uint_or_zero(np.uint64, IN_PKTS, OUT_PKTS, TOTAL_PKTS),
        "sampling_rate": sampling,
        "tcp_flags": uint_or_zero(np.uint8, TCP_FLAGS),
        "in_if": uint_or_zero(np.uint32, INPUT_SNMP),
        "out_if": uint_or_zero(np.uint32, OUTPUT_SNMP),
    }


def _addresses(
    buf: bytes, n: int, size: int, where: dict[int, tuple[int, int]]
) -> tuple[np.ndarray, np.ndarray]:
    """Source and destination addresses as (n, 16) uint8, IPv4 in IPv4-mapped form.

    Templates may carry both families (Cisco sends IPv4 and IPv6 fields in one template and
    zeroes the unused pair). A record is IPv6 when the template has IPv6 fields and either no
    IPv4 fields or both IPv4 addresses are 0.0.0.0 while an IPv6 address is set.
    """
    zeros = np.zeros(n, dtype=np.uint64)
    has4 = IPV4_SRC_ADDR in where or IPV4_DST_ADDR in where
    has6 = IPV6_SRC_ADDR in where or IPV6_DST_ADDR in where
    src4 = _uint(buf, n, size, *where[IPV4_SRC_ADDR]) if IPV4_SRC_ADDR in where else zeros
    dst4 = _uint(buf, n, size, *where[IPV4_DST_ADDR]) if IPV4_DST_ADDR in where else zeros
    src = ipv4_to_mapped(src4.astype(np.uint32))
    dst = ipv4_to_mapped(dst4.astype(np.uint32))
    if not has6:
        return src, dst
    blank = np.zeros((n, 16), dtype=np.uint8)
    src6 = _address16(buf, n, size, *where[IPV6_SRC_ADDR]) if IPV6_SRC_ADDR in where else blank
    dst6 = _address16(buf, n, size, *where[IPV6_DST_ADDR]) if IPV6_DST_ADDR in where else blank
    if has4:
        use6 = (src4 == 0) & (dst4 == 0) & (src6.any(axis=1) | dst6.any(axis=1))
    else:
        use6 = np.ones(n, dtype=bool)
    return np.where(use6[:, None], src6, src), np.where(use6[:, None], dst6, dst)
