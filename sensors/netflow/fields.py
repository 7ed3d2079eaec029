"""Column extraction shared by the template-based decoders (NetFlow v9 and IPFIX).

Both protocols describe records with (type, length) field lists and use the same IANA element
numbers for the fields that end up in `raw.v1`, so reading a field out of every record of one
layout, picking the address family and working out a record's sampling rate are written once
here. Everything works on a contiguous buffer of equally long records (``size`` bytes each):
IPFIX records with variable-length fields are repacked into that shape first (see
:mod:`sensors.netflow.ipfix`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from sensors.schema import ICMP_PROTOCOLS, icmp_from_port, ipv4_to_mapped

# IANA IPFIX information elements (v9 uses the same numbers for these).
OCTET_DELTA, PACKET_DELTA = 1, 2
PROTOCOL, TCP_FLAGS, SRC_PORT, SRC_V4, INPUT_IF = 4, 6, 7, 8, 10
DST_PORT, DST_V4, OUTPUT_IF = 11, 12, 14
END_UPTIME, START_UPTIME, POST_OCTET_DELTA, POST_PACKET_DELTA = 21, 22, 23, 24
SRC_V6, DST_V6 = 27, 28
SAMPLING_INTERVAL, SAMPLING_ALGORITHM = 34, 35
SAMPLER_ID, SAMPLER_MODE, SAMPLER_RANDOM_INTERVAL = 48, 49, 50
OCTET_TOTAL, PACKET_TOTAL = 85, 86
SELECTOR_ID = 302
SAMPLING_PACKET_INTERVAL, SAMPLING_PACKET_SPACE = 305, 306
SAMPLING_SIZE, SAMPLING_POPULATION, SAMPLING_PROBABILITY = 309, 310, 311
SYSTEM_INIT_MS = 160
# Flow details (raw.v1's DETAIL_COLUMNS).
ICMP_TYPE_CODE_V4, ICMP_TYPE_CODE_V6 = 32, 139  # type << 8 | code
ICMP_TYPE_V4, ICMP_CODE_V4, ICMP_TYPE_V6, ICMP_CODE_V6 = 176, 177, 178, 179
SRC_VLAN, DST_VLAN, DOT1Q_VLAN, POST_DOT1Q_VLAN = 58, 59, 243, 254
FLOW_DIRECTION = 61  # 0 ingress, 1 egress
MPLS_TOP_LABEL = 70  # mplsTopLabelStackSection: label (20 bits), traffic class (3), bottom of stack (1)

#: Fields that make an options record worth parsing: sampling parameters, and IPFIX's
#: systemInitTimeMilliseconds (the base of flowStart/EndSysUpTime).
OPTIONS_OF_INTEREST = frozenset(
    {SAMPLING_INTERVAL, SAMPLER_RANDOM_INTERVAL, SAMPLING_PACKET_INTERVAL, SAMPLING_PACKET_SPACE,
     SAMPLING_SIZE, SAMPLING_POPULATION, SAMPLING_PROBABILITY, SYSTEM_INIT_MS}
)

Where = dict[int, tuple[int, int]]


def field_bytes(buf: bytes, n: int, size: int, offset: int, length: int) -> np.ndarray:
    """An (n, length) uint8 view of one field in every record (records are ``size`` bytes)."""
    return np.ndarray((n, length), dtype=np.uint8, buffer=buf, offset=offset, strides=(size, 1))


_BIG_ENDIAN: dict[int, np.dtype[Any]] = {
    1: np.dtype("u1"), 2: np.dtype(">u2"), 4: np.dtype(">u4"), 8: np.dtype(">u8")}


def uint(buf: bytes, n: int, size: int, offset: int, length: int,
         dtype: type[np.generic] | np.dtype[np.generic] = np.uint64) -> np.ndarray:
    """One big-endian unsigned field of every record as ``dtype`` (uint64 by default, values
    truncated to a narrower ``dtype`` as astype does), whatever its length.

    Lengths 1, 2, 4 and 8 are read through a strided view and converted once; other lengths (3,
    5, 6, 7: MPLS labels, IPFIX reduced-size encoding) are right-aligned into 8 zero bytes first.
    A field wider than 8 bytes keeps its low 64 bits.
    """
    if length == 0:
        return np.zeros(n, dtype=dtype)
    if length > 8:
        offset, length = offset + length - 8, 8
    wire = _BIG_ENDIAN.get(length)
    if wire is not None:
        view = np.ndarray((n,), dtype=wire, buffer=buf, offset=offset, strides=(size,))
        return view.astype(dtype)
    wide = np.zeros((n, 8), dtype=np.uint8)
    wide[:, 8 - length :] = field_bytes(buf, n, size, offset, length)
    return wide.view(">u8").ravel().astype(dtype)


def address16(buf: bytes, n: int, size: int, offset: int, length: int) -> np.ndarray:
    """An IPv6 field as (n, 16) uint8, right-aligned if the exporter sent another length."""
    out = np.zeros((n, 16), dtype=np.uint8)
    take = min(length, 16)
    out[:, 16 - take :] = field_bytes(buf, n, size, offset + length - take, take)
    return out


def addresses(buf: bytes, n: int, size: int, where: Where) -> tuple[np.ndarray, np.ndarray]:
    """Source and destination addresses as (n, 16) uint8, IPv4 in IPv4-mapped form.

    Templates may carry both families (Cisco sends IPv4 and IPv6 fields in one template and
    zeroes the unused pair). A record is IPv6 when the template has IPv6 fields and either no
    IPv4 fields or both IPv4 addresses are 0.0.0.0 while an IPv6 address is set.
    """
    has4 = SRC_V4 in where or DST_V4 in where
    has6 = SRC_V6 in where or DST_V6 in where
    if not has6 and where.get(SRC_V4, (0, 0))[1] == 4 and where.get(DST_V4, (0, 0))[1] == 4:
        # The usual IPv4 template: the 4 wire bytes are the mapped address's last 4 bytes.
        return _mapped(buf, n, size, where[SRC_V4][0]), _mapped(buf, n, size, where[DST_V4][0])
    zeros = np.zeros(n, dtype=np.uint32)
    src4 = uint(buf, n, size, *where[SRC_V4], dtype=np.uint32) if SRC_V4 in where else zeros
    dst4 = uint(buf, n, size, *where[DST_V4], dtype=np.uint32) if DST_V4 in where else zeros
    src = ipv4_to_mapped(src4)
    dst = ipv4_to_mapped(dst4)
    if not has6:
        return src, dst
    blank = np.zeros((n, 16), dtype=np.uint8)
    src6 = address16(buf, n, size, *where[SRC_V6]) if SRC_V6 in where else blank
    dst6 = address16(buf, n, size, *where[DST_V6]) if DST_V6 in where else blank
    if has4:
        use6 = (src4 == 0) & (dst4 == 0) & (src6.any(axis=1) | dst6.any(axis=1))
    else:
        use6 = np.ones(n, dtype=bool)
    return np.where(use6[:, None], src6, src), np.where(use6[:, None], dst6, dst)


_MAPPED_WORD = np.frombuffer(b"\x00\x00\xff\xff", dtype=np.uint32)[0]


def _mapped(buf: bytes, n: int, size: int, offset: int) -> np.ndarray:
    """A 4-byte IPv4 field of every record as (n, 16) uint8 IPv4-mapped addresses: one copy of
    the wire bytes into the last word of zeroed 16-byte rows, no byte-order conversion."""
    out = np.zeros((n, 4), dtype=np.uint32)
    out[:, 2] = _MAPPED_WORD
    out[:, 3] = np.ndarray((n,), dtype=np.uint32, buffer=buf, offset=offset, strides=(size,))
    return out.view(np.uint8)


def rate_from_options(values: Mapping[int, int | float]) -> int | None:
    """The sampling rate (1 in N packets) an options (or data) record announces, else None.

    samplingInterval (34) and samplerRandomInterval (50) are N itself; samplingPacketInterval /
    Space (305/306, "take I, skip S") give (I + S) / I (an interval without a space says
    nothing: Cisco sends interval 1 beside its n-out-of-N parameters); samplingSize / Population
    (309/310, "n out of N") give N / n and win over 305/306; samplingProbability (311) gives
    1 / p. Results are rounded and at
    least 1; zeros and absent values mean the record says nothing about sampling.
    """
    for key in (SAMPLER_RANDOM_INTERVAL, SAMPLING_INTERVAL):
        value = values.get(key)
        if value:
            return max(1, int(value))
    size, population = values.get(SAMPLING_SIZE), values.get(SAMPLING_POPULATION)
    if size and population:
        return max(1, round(population / size))
    interval = values.get(SAMPLING_PACKET_INTERVAL)
    if interval and SAMPLING_PACKET_SPACE in values:
        return max(1, round((interval + values[SAMPLING_PACKET_SPACE]) / interval))
    probability = values.get(SAMPLING_PROBABILITY)
    if probability and 0 < probability <= 1:
        return max(1, round(1 / probability))
    return None


def record_rates(buf: bytes, n: int, size: int, where: Where) -> np.ndarray | None:
    """Per-record sampling rates from fields in the flow records themselves (0 = not stated),
    or None when the template carries no sampling field. Same rules as :func:`rate_from_options`
    (samplingProbability is not looked at in flow records)."""
    out: np.ndarray | None = None

    def fill(values: np.ndarray) -> None:
        nonlocal out
        out = values if out is None else np.where(out == 0, values, out)

    for key in (SAMPLER_RANDOM_INTERVAL, SAMPLING_INTERVAL):
        if key in where:
            fill(uint(buf, n, size, *where[key]))
    if SAMPLING_SIZE in where and SAMPLING_POPULATION in where:
        sz = uint(buf, n, size, *where[SAMPLING_SIZE]).astype(np.float64)
        pop = uint(buf, n, size, *where[SAMPLING_POPULATION]).astype(np.float64)
        fill(np.where(sz > 0, np.rint(pop / np.maximum(sz, 1)), 0).astype(np.uint64))
    if SAMPLING_PACKET_INTERVAL in where and SAMPLING_PACKET_SPACE in where:
        interval = uint(buf, n, size, *where[SAMPLING_PACKET_INTERVAL]).astype(np.float64)
        space = uint(buf, n, size, *where[SAMPLING_PACKET_SPACE]).astype(np.float64)
        rate = np.where(interval > 0, np.rint((interval + space) / np.maximum(interval, 1)), 0)
        fill(rate.astype(np.uint64))
    return out


def sampling_column(
    buf: bytes,
    n: int,
    size: int,
    where: Where,
    counts: np.ndarray,
    defaults: list[int],
    samplers: list[dict[int, int] | None],
    sampler_field: int | None,
) -> np.ndarray:
    """The sampling rate of every record (uint32, 1 = unsampled).

    Precedence: a sampling field in the record itself; else the rate the exporter announced in
    options data for the record's sampler ID (field 48 / 302, when the template has one); else
    the rate announced for the whole (exporter, domain). ``defaults`` and ``samplers`` are
    snapshots per data set, taken when the set was decoded, so an options record later in the
    stream does not change records that came before it.
    """
    rate = np.repeat(np.asarray(defaults, dtype=np.uint64), counts)
    if sampler_field is not None and sampler_field in where and any(samplers):
        ids = uint(buf, n, size, *where[sampler_field])
        # The snapshots are shared objects (replaced, never mutated), so there are few distinct ones.
        distinct: dict[int, tuple[dict[int, int], list[int]]] = {}
        for i, table in enumerate(samplers):
            if table:
                distinct.setdefault(id(table), (table, []))[1].append(i)
        chunk = np.repeat(np.arange(len(counts)), counts)
        for table, chunks in distinct.values():
            in_chunks = np.isin(chunk, chunks)
            for sampler_id, value in table.items():
                rate[in_chunks & (ids == sampler_id)] = value
    own = record_rates(buf, n, size, where)
    if own is not None:
        rate = np.where(own > 0, own, rate)
    rate[rate == 0] = 1
    return np.minimum(rate, 0xFFFFFFFF).astype(np.uint32)


class Group:
    """Data records of one template layout, plus the header context of each data set.

    ``base`` is what the protocol's uptime-relative times are relative to: the v9 header's
    sysUptime, or IPFIX's systemInitTimeMilliseconds (-1 when unknown). ``sampling`` and
    ``samplers`` are the exporter's announced rates when the set was decoded (see
    :func:`sampling_column`).
    """

    __slots__ = ("base", "chunks", "counts", "domain", "export_ms", "exporter", "received", "samplers",
                 "sampling", "stats")

    def __init__(self) -> None:
        self.chunks: list[memoryview | bytes] = []
        self.counts: list[int] = []
        self.export_ms: list[int] = []
        self.base: list[int] = []
        self.domain: list[int] = []
        self.exporter: list[int] = []
        self.received: list[int] = []
        self.sampling: list[int] = []
        self.samplers: list[dict[int, int] | None] = []
        self.stats: list[object] = []  # the ExporterStats of each set (IPFIX biflow counting)

    def add(self, chunk: memoryview | bytes, n: int, export_ms: int, base: int, domain: int, exporter: int,
            received_ms: int, sampling: int, samplers: dict[int, int] | None) -> None:
        """Append one data set's ``n`` records and its context."""
        self.chunks.append(chunk)
        self.counts.append(n)
        self.export_ms.append(export_ms)
        self.base.append(base)
        self.domain.append(domain)
        self.exporter.append(exporter)
        self.received.append(received_ms)
        self.sampling.append(sampling)
        self.samplers.append(samplers)


def common_columns(buf: bytes, n: int, size: int, where: Where, group: Group, counts: np.ndarray,
                   exporters: np.ndarray) -> dict[str, np.ndarray]:
    """The `raw.v1` columns v9 and IPFIX derive the same way (all but version and times).

    Counter fallbacks: octetDeltaCount/packetDeltaCount (1/2), else postOctet/PacketDeltaCount
    (23/24, egress-only exporters), else the totals 85/86; a record without any reports 0.
    """
    single = len(counts) == 1 or (
        len(set(group.received)) == 1 and len(set(group.domain)) == 1 and len(set(group.exporter)) == 1)

    def per_record(values: list[int], dtype: type[np.generic] = np.int64) -> np.ndarray:
        if single:  # one value for the whole group (the usual case: one exporter, one batch)
            return np.full(n, values[0], dtype=dtype)
        return np.repeat(np.asarray(values, dtype=dtype), counts)

    def uint_or_zero(dtype: type[np.generic], *field_types: int) -> np.ndarray:
        value = _first_field(buf, n, size, where, dtype, *field_types)
        return np.zeros(n, dtype=dtype) if value is None else value

    src_addr, dst_addr = addresses(buf, n, size, where)
    proto = uint_or_zero(np.uint8, PROTOCOL)
    dst_port = uint_or_zero(np.uint16, DST_PORT)
    sampler_field = SAMPLER_ID if SAMPLER_ID in where else (SELECTOR_ID if SELECTOR_ID in where else None)
    return {
        "time_received": per_record(group.received),
        "exporter": (np.broadcast_to(exporters[group.exporter[0]], (n, 16)) if single
                     else exporters[per_record(group.exporter)]),
        "observation_domain": per_record(group.domain, np.uint32),
        "src_addr": src_addr,
        "dst_addr": dst_addr,
        "src_port": uint_or_zero(np.uint16, SRC_PORT),
        "dst_port": dst_port,
        "proto": proto,
        "bytes": uint_or_zero(np.uint64, OCTET_DELTA, POST_OCTET_DELTA, OCTET_TOTAL),
        "packets": uint_or_zero(np.uint64, PACKET_DELTA, POST_PACKET_DELTA, PACKET_TOTAL),
        "sampling_rate": sampling_column(buf, n, size, where, counts, group.sampling, group.samplers,
                                         sampler_field),
        "tcp_flags": uint_or_zero(np.uint8, TCP_FLAGS),
        "in_if": uint_or_zero(np.uint32, INPUT_IF),
        "out_if": uint_or_zero(np.uint32, OUTPUT_IF),
    } | detail_columns(buf, n, size, where, proto, dst_port)


def detail_columns(buf: bytes, n: int, size: int, where: Where, proto: np.ndarray,
                   dst_port: np.ndarray) -> dict[str, np.ndarray]:
    """raw.v1's flow details from whichever elements the template carries; a column no element
    (and for ICMP, no ICMP record) gives is left out, to be filled with 0 by the table builder.

    - ``flow_direction``: flowDirection (61) + 1, so 0 stays "not reported" (values other than
      0 and 1 are not defined and read as 0).
    - ``icmp_type``/``icmp_code``: :func:`icmp_columns`.
    - ``src_vlan``: srcVlan (58), else dot1qVlanId (243); ``dst_vlan``: dstVlan (59), else
      postDot1qVlanId (254); 12 bits.
    - ``mpls_label``: the label of mplsTopLabelStackSection (70), its first 20 bits.
    """
    out = icmp_columns(buf, n, size, where, proto, dst_port)
    direction = _first_field(buf, n, size, where, np.uint8, FLOW_DIRECTION)
    if direction is not None:
        out["flow_direction"] = np.where(direction <= 1, direction + 1, 0).astype(np.uint8)
    for name, ids in (("src_vlan", (SRC_VLAN, DOT1Q_VLAN)), ("dst_vlan", (DST_VLAN, POST_DOT1Q_VLAN))):
        vlan = _first_field(buf, n, size, where, np.uint16, *ids)
        if vlan is not None:
            out[name] = vlan & 0xFFF
    offset, length = where.get(MPLS_TOP_LABEL, (0, 0))
    if length >= 3:  # the label is the first 20 bits of the 3-byte stack entry
        out["mpls_label"] = (uint(buf, n, size, offset, 3, dtype=np.uint32) >> 4).astype(np.uint32)
    return out


def icmp_columns(buf: bytes, n: int, size: int, where: Where, proto: np.ndarray,
                 dst_port: np.ndarray) -> dict[str, np.ndarray]:
    """``icmp_type``/``icmp_code`` of the records, or nothing when none is ICMP or ICMPv6.

    ICMP (protocol 1) records: icmpTypeIPv4/icmpCodeIPv4 (176/177), else icmpTypeCodeIPv4 (32,
    ``type << 8 | code``), else the destination port, where pmacctd and v5-style exporters put
    ``type << 8 | code``; ICMPv6 (58) records the IPv6 elements (178/179, 139) the same way.
    Records of other protocols get 0.
    """
    # Two comparisons, not np.isin (which sorts: 0.01 us/flow, a tenth of the whole decode).
    if not ((proto == ICMP_PROTOCOLS[0]).any() or (proto == ICMP_PROTOCOLS[1]).any()):
        return {}
    icmp_type, icmp_code = icmp_from_port(proto, dst_port)
    for family, (type_id, code_id, both_id) in zip(
            ICMP_PROTOCOLS, ((ICMP_TYPE_V4, ICMP_CODE_V4, ICMP_TYPE_CODE_V4),
                             (ICMP_TYPE_V6, ICMP_CODE_V6, ICMP_TYPE_CODE_V6)), strict=True):
        ours = proto == family
        kind = _first_field(buf, n, size, where, np.uint8, type_id)
        value = _first_field(buf, n, size, where, np.uint16, both_id)
        if kind is not None:
            code = _first_field(buf, n, size, where, np.uint8, code_id)
            icmp_type = np.where(ours, kind, icmp_type).astype(np.uint8)
            icmp_code = np.where(ours, 0 if code is None else code, icmp_code).astype(np.uint8)
        elif value is not None:
            icmp_type = np.where(ours, value >> 8, icmp_type).astype(np.uint8)
            icmp_code = np.where(ours, value & 0xFF, icmp_code).astype(np.uint8)
    return {"icmp_type": icmp_type, "icmp_code": icmp_code}


def _first_field(buf: bytes, n: int, size: int, where: Where, dtype: type[np.generic],
                 *field_types: int) -> np.ndarray | None:
    """The first of ``field_types`` the template carries, of every record, else None."""
    for field_type in field_types:
        if field_type in where:
            return uint(buf, n, size, *where[field_type], dtype=dtype)
    return None


#: Below this many datagrams per call the per-datagram walk is as cheap as the bulk one.
MIN_BULK = 8


class BulkScan:
    """Where the usual datagrams of a batch keep their one data set (see :func:`bulk_scan`).

    ``head`` is one record per datagram of the protocol's header dtype (its last two fields are
    the first set's ID and length); ``data_at`` is the offset of the data set's header in the
    datagram (-1: not the usual shape), ``data_id`` / ``data_len`` its set ID and length, and
    ``joined`` the template records of unchanged refreshes taken into the bulk (filled by
    :func:`bulk_runs`).
    """

    __slots__ = ("buf", "data_at", "data_id", "data_len", "head", "joined", "starts")

    def __init__(self, buf: bytes, head: np.ndarray, starts: np.ndarray, data_at: np.ndarray,
                 data_id: np.ndarray, data_len: np.ndarray) -> None:
        self.buf = buf
        self.head = head
        self.starts = starts
        self.data_at = data_at
        self.data_id = data_id
        self.data_len = data_len
        self.joined = np.zeros(len(starts), dtype=np.int64)


def bulk_scan(payloads: Sequence[bytes], head: np.dtype[Any], version: int, template_set: int,
              first_data_set: int, length_field: str | None = None) -> BulkScan | None:
    """Parse the fixed headers of a batch of v9 or IPFIX datagrams with numpy, or None when the
    batch is too small (or has a datagram too short) for the bulk path to pay.

    ``head`` is the header dtype followed by the first set's ID and length (its itemsize is the
    header length + 4). The usual datagram is the header and one data set (ID >=
    ``first_data_set``) filling it exactly, or a template set (ID ``template_set``) followed by
    such a data set: a refresh, taken into the bulk only if :func:`bulk_runs` finds it unchanged.
    ``length_field``: a header field that must equal the datagram's length (IPFIX's).
    """
    n = len(payloads)
    header_length = head.itemsize - 4
    lengths = np.fromiter(map(len, payloads), dtype=np.int64, count=n)
    if n < MIN_BULK or int(lengths.min()) < header_length + 4:
        return None
    buf = b"".join(payloads)
    raw = np.frombuffer(buf, dtype=np.uint8)
    starts = np.zeros(n, dtype=np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    heads = raw[starts[:, None] + np.arange(head.itemsize)].view(head).ravel()
    assert head.names is not None
    set_field, len_field = head.names[-2], head.names[-1]
    usual = heads["version"] == version
    if length_field is not None:
        usual &= heads[length_field] == lengths
    set_id, set_len = heads[set_field].astype(np.int64), heads[len_field].astype(np.int64)
    whole = usual & (set_id >= first_data_set) & (set_len >= 4) & (set_len + header_length == lengths)
    data_at = np.where(whole, header_length, -1)
    data_id, data_len = set_id.copy(), set_len.copy()
    refresh = np.flatnonzero(usual & (set_id == template_set) & (set_len >= 4)
                             & (header_length + set_len + 4 <= lengths))
    if len(refresh):
        second = (starts[refresh] + header_length + set_len[refresh])[:, None] + np.arange(4)
        pair = raw[second].view(">u2").astype(np.int64)
        ok = (pair[:, 0] >= first_data_set) & (pair[:, 1] >= 4) & (
            header_length + set_len[refresh] + pair[:, 1] == lengths[refresh])
        refresh, pair = refresh[ok], pair[ok]
        data_id[refresh], data_len[refresh] = pair[:, 0], pair[:, 1]
        # A refresh datagram's data set is found but not taken yet: data_at stays -1.
    return BulkScan(buf, heads, starts, data_at, data_id, data_len)


def bulk_runs(scan: BulkScan, payloads: Sequence[bytes], domain_field: str,
              applied: Callable[[int], tuple[bytes, int] | None], pending: Callable[[], bool],
              bulk: Callable[[int, int], None], one: Callable[[int], None]) -> None:
    """Hand the datagrams of ``scan`` over in order: runs of usual ones to ``bulk(a, b)``
    (datagrams a..b-1), every other one to ``one(i)`` (the per-datagram walk).

    A template refresh whose template set repeats byte for byte the last one applied in the
    call for its domain (``applied(domain)``: (set body, template records counted) or None)
    changes nothing, so it joins the bulk (its template records counted in ``scan.joined``);
    not while a data set waits for a template (``pending()``), which a refresh would release.
    """
    head = scan.head
    names = head.dtype.names
    assert names is not None
    header_length = head.dtype.itemsize - 4
    data_at = scan.data_at
    irregular = np.flatnonzero(data_at < 0)
    # Refresh datagrams: bulk_scan found a data set after their template set.
    refresh = (scan.data_id[irregular] != head[names[-2]][irregular]).tolist()
    domains = head[domain_field][irregular].tolist()
    first_len = head[names[-1]][irregular].tolist()
    a = 0
    for k, i in enumerate(irregular.tolist()):
        if refresh[k] and not pending():
            last = applied(domains[k])
            end = header_length + first_len[k]
            if last is not None and last[0] == payloads[i][header_length + 4 : end]:
                data_at[i] = end
                scan.joined[i] = last[1]
                continue
        if a < i:
            bulk(a, i)
        one(i)
        a = i + 1
    if a < len(data_at):
        bulk(a, len(data_at))
