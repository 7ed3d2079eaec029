"""Per-exporter state of NetFlow v9 and IPFIX (and v5 sequence numbers).

A v9 data flowset carries no field descriptions: it names a template that the same exporter sent
earlier, possibly in another packet. The collector therefore keeps state across packets. That state
lives in a :class:`TemplateStore` that the caller creates and hands to the decoder with every call
(the way goflow2's decoders receive a template system), never in a module global: two collectors in
one process, or a test and a replay tool, each keep their own.

Besides templates the store keeps the other state the decoder needs across packets, all scoped
the same way (exporter address and observation domain / source ID):

* data sets that arrived before their template (:meth:`TemplateStore.hold` /
  :meth:`~TemplateStore.release` / :meth:`~TemplateStore.expire`), bounded in count, bytes and age;
* the sampling rates announced in options data, per domain and per sampler ID;
* IPFIX systemInitTimeMilliseconds, the base of flowStart/EndSysUpTime;
* the next expected sequence number of each stream.

Time is whatever the caller says (datagram receive times): the store never reads a clock.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

#: IPFIX (RFC 7011 section 7): a field length of 65535 means variable length, sent per record.
VARIABLE_LENGTH = 0xFFFF

if TYPE_CHECKING:
    from sensors.netflow.stats import ExporterStats


class Field(NamedTuple):
    """One field of a template: its type, its length in bytes and (IPFIX only) its enterprise."""

    type: int
    length: int
    enterprise: int = 0


@dataclass(frozen=True, slots=True)
class Template:
    """The layout of the records of one data flowset.

    Equal layouts compare equal, which tells a template refresh (routers resend their templates
    periodically) from a redefinition.
    ``scope_fields`` is only set for options templates, whose records describe the exporter
    (sampling, interface names) rather than flows.
    """

    fields: tuple[Field, ...]
    scope_fields: tuple[Field, ...] = ()
    is_options: bool = False
    #: Bytes per data record: the sum of all (scope and non-scope) field lengths. Computed once,
    #: since the decoder needs it for every data flowset. With variable-length fields, the
    #: shortest possible record (each variable-length field counted as its 1-byte length).
    record_length: int = field(init=False, compare=False, repr=False)
    #: True when some field has variable length (IPFIX): records must be walked to be found.
    varlen: bool = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        all_fields = (*self.scope_fields, *self.fields)
        varlen = any(f.length == VARIABLE_LENGTH for f in all_fields)
        length = sum(1 if f.length == VARIABLE_LENGTH else f.length for f in all_fields)
        object.__setattr__(self, "record_length", length)
        object.__setattr__(self, "varlen", varlen)

    def offsets(self) -> dict[int, tuple[int, int]]:
        """Map each field type to ``(offset, length)`` within a record; the first occurrence wins."""
        out: dict[int, tuple[int, int]] = {}
        offset = 0
        for f in (*self.scope_fields, *self.fields):
            if f.enterprise == 0 and f.type not in out:
                out[f.type] = (offset, f.length)
            offset += f.length
        return out


#: (version, exporter address, observation domain / source ID, template ID)
TemplateKey = tuple[int, bytes, int, int]
#: (version, exporter address, observation domain / source ID)
DomainKey = tuple[int, bytes, int]


class PendingSet(NamedTuple):
    """A data set held until its template arrives, with the header context it came with."""

    template_id: int
    data: bytes  # the set's body (records and padding), copied out of the datagram
    export_ms: int
    uptime: int  # v9 header sysUptime (0 for IPFIX)
    received_ms: int


class TemplateStore:
    """Templates received from exporters, keyed by (version, exporter address, domain, template ID).

    Scope: templates are scoped by the exporter's IP **address** and its observation domain (v9
    source ID), not by the UDP source port. An exporter that restarts or rebinds its socket keeps
    sending from the same address and domain with a new port; scoping by port (as Wireshark does,
    per transport session) would lose every data flowset until the next template refresh, while
    nfcapd, pmacct and goflow2 keep decoding. The price is that two exporter processes behind one
    address must use distinct source IDs, which RFC 3954 already asks of them. The NetFlow version
    is part of the key too, so a v9 and an IPFIX export from one address never share templates.

    A template received again with a different layout replaces the old one (routers redefine
    template IDs after a configuration change); data decoded earlier keeps the layout it was
    decoded with.
    """

    __slots__ = (
        "_domain_templates",
        "_domains",
        "_exporter_templates",
        "_fields",
        "_fields_total",
        "_held_bytes",
        "_pending",
        "_pending_bytes",
        "_raw",
        "_templates",
        "evicted",
        "max_domains_per_exporter",
        "max_exporters",
        "max_pending_age_ms",
        "max_pending_bytes",
        "max_pending_sets",
        "max_pending_total_bytes",
        "max_template_fields",
        "max_template_fields_per_exporter",
        "max_templates_per_domain",
        "samplers",
        "sampling",
        "sequences",
        "sys_init",
        "templates_evicted",
    )

    def __init__(self, max_pending_sets: int = 256, max_pending_bytes: int = 1 << 20,
                 max_pending_age_ms: int = 30_000, *, max_exporters: int = 1024,
                 max_domains_per_exporter: int = 64, max_templates_per_domain: int = 512,
                 max_template_fields_per_exporter: int = 16_384, max_template_fields: int = 131_072,
                 max_pending_total_bytes: int = 16 << 20) -> None:
        """``max_pending_*`` bound the data sets held for a missing template, per (version,
        exporter, domain): beyond ``max_pending_sets`` sets or ``max_pending_bytes`` bytes the
        oldest is dropped; a set older than ``max_pending_age_ms`` (by receive time) is dropped
        by :meth:`expire`. 0 sets disables holding. ``max_pending_total_bytes`` bounds the
        held sets of all domains together: beyond it a set is not held (counted as dropped).

        The other bounds keep the whole store finite whatever exporters send (every piece of
        state is created on what a datagram claims): at most ``max_exporters`` exporter
        addresses, ``max_domains_per_exporter`` (version, domain) pairs each, and templates at
        most ``max_templates_per_domain`` per domain, ``max_template_fields_per_exporter``
        field specifiers per exporter and ``max_template_fields`` in all (a template's cost is
        its fields: one datagram can define a template of 16,000 of them). Beyond a bound the
        least recently used item goes (a domain or exporter with all its state; beyond the
        total of fields, the least recently used template of the exporter holding the most
        fields), counted in
        :attr:`evicted` and :attr:`templates_evicted`. "Used" is: a template stored or
        refreshed; a domain with any state written (templates, held data, options, sequence
        numbers: every decoded datagram writes its sequence). A well-behaved exporter refreshes
        its templates and sends steadily, so it stays recent; a source inventing domains or
        templates evicts its own first, since the per-exporter bounds come first.
        """
        self._templates: dict[TemplateKey, Template] = {}  # in least recently used order
        #: The wire bytes each template was last built from: a refresh with the same bytes (the
        #: usual case: exporters resend unchanged templates every few packets) is recognised with
        #: one bytes comparison instead of being parsed into Field tuples again.
        self._raw: dict[TemplateKey, bytes] = {}
        self.max_pending_sets = max_pending_sets
        self.max_pending_bytes = max_pending_bytes
        self.max_pending_age_ms = max_pending_age_ms
        self.max_pending_total_bytes = max_pending_total_bytes
        self._held_bytes = 0  # _pending_bytes summed
        self.max_exporters = max(1, max_exporters)
        self.max_domains_per_exporter = max(1, max_domains_per_exporter)
        self.max_templates_per_domain = max(1, max_templates_per_domain)
        self.max_template_fields_per_exporter = max(1, max_template_fields_per_exporter)
        self.max_template_fields = max(1, max_template_fields)
        #: exporter -> its (version, domain) pairs; both levels in least recently used order.
        self._domains: dict[bytes, dict[tuple[int, int], None]] = {}
        #: The template IDs of each domain and the template keys of each exporter, in LRU order.
        self._domain_templates: dict[DomainKey, dict[int, None]] = {}
        self._exporter_templates: dict[bytes, dict[TemplateKey, None]] = {}
        self._fields: dict[bytes, int] = {}  # field specifiers of each exporter's templates
        self._fields_total = 0
        #: What the bounds evicted, by kind (``exporters``, ``domains``, ``pending_sets``) and
        #: templates by reason (``domain_limit``, ``exporter_fields``, ``total_fields``,
        #: ``domain_evicted``): monotonic, read (and reset) by the caller.
        self.evicted: Counter[str] = Counter()
        self.templates_evicted: Counter[str] = Counter()
        self._pending: dict[DomainKey, OrderedDict[int, PendingSet]] = {}
        self._pending_bytes: dict[DomainKey, int] = {}
        #: Sampling rate announced for a whole domain (options data without a sampler ID).
        self.sampling: dict[DomainKey, int] = {}
        #: Sampling rate per sampler ID (v9 48 / IPFIX 48 or 302). Each inner dict is replaced,
        #: never mutated, so the decoder can keep a reference as a snapshot.
        self.samplers: dict[DomainKey, dict[int, int]] = {}
        #: IPFIX systemInitTimeMilliseconds per (exporter, domain).
        self.sys_init: dict[tuple[bytes, int], int] = {}
        #: Next expected sequence number per stream; None after a message whose record count is
        #: unknown (data held for a missing template), so the next one only resynchronises.
        #: Written through :meth:`set_sequence` (which keeps the bounds); read directly.
        self.sequences: dict[DomainKey, int | None] = {}

    # --- the bounds ---------------------------------------------------------------------------

    def touch(self, version: int, exporter: bytes, domain: int) -> None:
        """Mark a domain (and its exporter) as just used, registering it if new: a new domain
        beyond ``max_domains_per_exporter`` evicts the exporter's least recently used one, a new
        exporter beyond ``max_exporters`` the least recently used exporter."""
        domains = self._domains.get(exporter)
        pair = (version, domain)
        if (domains is not None and next(reversed(self._domains)) == exporter
                and next(reversed(domains)) == pair):
            return  # the usual case: the same stream as the last call
        if domains is None:
            domains = self._domains[exporter] = {}
            if len(self._domains) > self.max_exporters:
                self._evict_exporter(next(iter(self._domains)))
        else:
            del self._domains[exporter]
            self._domains[exporter] = domains
        if pair in domains:
            del domains[pair]
            domains[pair] = None
            return
        domains[pair] = None
        if len(domains) > self.max_domains_per_exporter:
            old_version, old_domain = next(iter(domains))
            self._evict_domain(old_version, exporter, old_domain)

    def set_sequence(self, key: DomainKey, value: int | None) -> None:
        """Set a stream's next expected sequence number (see :attr:`sequences`), within the bounds."""
        self.touch(*key)
        self.sequences[key] = value

    def _evict_exporter(self, exporter: bytes) -> None:
        self.evicted["exporters"] += 1
        for version, domain in list(self._domains.get(exporter, ())):
            self._evict_domain(version, exporter, domain, count=False)
        self._domains.pop(exporter, None)

    def _evict_domain(self, version: int, exporter: bytes, domain: int, *, count: bool = True) -> None:
        """Forget every piece of state of one domain (its templates counted as evicted)."""
        if count:
            self.evicted["domains"] += 1
        dkey = (version, exporter, domain)
        for template_id in list(self._domain_templates.get(dkey, ())):
            self._drop_template((version, exporter, domain, template_id))
            self.templates_evicted["domain_evicted"] += 1
        self._forget_domain(dkey)

    def _forget_domain(self, dkey: DomainKey) -> None:
        version, exporter, domain = dkey
        queue = self._pending.pop(dkey, None)
        if queue:
            self.evicted["pending_sets"] += len(queue)
        self._held_bytes -= self._pending_bytes.pop(dkey, 0)
        self.sampling.pop(dkey, None)
        self.samplers.pop(dkey, None)
        self.sequences.pop(dkey, None)
        if version == 10:
            self.sys_init.pop((exporter, domain), None)
        domains = self._domains.get(exporter)
        if domains is not None:
            domains.pop((version, domain), None)
            if not domains:
                del self._domains[exporter]

    def _drop_template(self, key: TemplateKey) -> Template | None:
        """Remove one template from the store and every index of it."""
        template = self._templates.pop(key, None)
        self._raw.pop(key, None)
        if template is None:
            return None
        exporter = key[1]
        ids = self._domain_templates.get(key[:3])
        if ids is not None:
            ids.pop(key[3], None)
            if not ids:
                del self._domain_templates[key[:3]]
        keys = self._exporter_templates.get(exporter)
        if keys is not None:
            keys.pop(key, None)
            if not keys:
                del self._exporter_templates[exporter]
        weight = _weight(template)
        self._fields_total -= weight
        left = self._fields.get(exporter, 0) - weight
        if left > 0:
            self._fields[exporter] = left
        else:
            self._fields.pop(exporter, None)
        return template

    def _used(self, key: TemplateKey) -> None:
        """Move a stored template to the most recently used end of every order."""
        ids = self._domain_templates.get(key[:3])
        if ids is not None and key[3] in ids:
            del ids[key[3]]
            ids[key[3]] = None
        keys = self._exporter_templates.get(key[1])
        if keys is not None and key in keys:
            del keys[key]
            keys[key] = None
        self._templates[key] = self._templates.pop(key)

    def _enforce(self, key: TemplateKey) -> None:
        """Evict least recently used templates until every template bound holds again."""
        exporter = key[1]
        ids = self._domain_templates.get(key[:3])
        while ids and len(ids) > self.max_templates_per_domain:
            self._drop_template((*key[:3], next(iter(ids))))
            self.templates_evicted["domain_limit"] += 1
            ids = self._domain_templates.get(key[:3])
        while self._fields.get(exporter, 0) > self.max_template_fields_per_exporter:
            self._drop_template(next(iter(self._exporter_templates[exporter])))
            self.templates_evicted["exporter_fields"] += 1
        while self._fields_total > self.max_template_fields:
            # From the exporter holding the most: under the total bound, a source that floods
            # the cache pays for it, not the small, steady exporters beside it.
            heaviest = max(self._fields, key=self._fields.__getitem__)
            self._drop_template(next(iter(self._exporter_templates[heaviest])))
            self.templates_evicted["total_fields"] += 1

    def template_fields(self) -> int:
        """Field specifiers of all stored templates (what the total bound counts)."""
        return self._fields_total

    def domain_count(self) -> int:
        """(exporter, version, domain) streams with state."""
        return sum(len(d) for d in self._domains.values())

    def exporter_count(self) -> int:
        """Exporter addresses with state."""
        return len(self._domains)

    # --- templates ----------------------------------------------------------------------------

    def get(self, version: int, exporter: bytes, domain: int, template_id: int) -> Template | None:
        """The template in force for this exporter, domain and ID, or None if none was received."""
        return self._templates.get((version, exporter, domain, template_id))

    def put(self, version: int, exporter: bytes, domain: int, template_id: int, template: Template,
            raw: bytes | None = None) -> bool:
        """Store a template; True if it is new or changed the layout of the one it replaces.

        A refresh with an unchanged layout keeps the stored object, so the decoder, which groups
        records by template object, keeps one group per layout across refreshes. ``raw`` is the
        template record's wire bytes, remembered for :meth:`same_raw`. The bounds are enforced
        (least recently used templates evicted, this one last).
        """
        self.touch(version, exporter, domain)
        key = (version, exporter, domain, template_id)
        old = self._templates.get(key)
        if old == template:
            if raw is not None:
                self._raw[key] = raw
            else:
                self._raw.pop(key, None)
            self._used(key)
            return False
        if old is not None:
            self._drop_template(key)
        self._templates[key] = template
        if raw is not None:
            self._raw[key] = raw
        self._domain_templates.setdefault(key[:3], {})[template_id] = None
        self._exporter_templates.setdefault(exporter, {})[key] = None
        weight = _weight(template)
        self._fields[exporter] = self._fields.get(exporter, 0) + weight
        self._fields_total += weight
        self._enforce(key)
        return True

    def same_raw(self, version: int, exporter: bytes, domain: int, template_id: int, raw: bytes) -> bool:
        """True when the template in force was built from exactly these wire bytes (a refresh
        that needs no parsing); such a refresh counts as a use of the template and its domain."""
        key = (version, exporter, domain, template_id)
        if self._raw.get(key) == raw and key in self._templates:
            self.touch(version, exporter, domain)
            self._used(key)
            return True
        return False

    def remove(self, version: int, exporter: bytes, domain: int, template_id: int) -> bool:
        """Forget one template (IPFIX template withdrawal); True if it was known."""
        return self._drop_template((version, exporter, domain, template_id)) is not None

    def remove_domain(self, version: int, exporter: bytes, domain: int, options: bool | None = None) -> int:
        """Forget every template of one domain (IPFIX withdraw-all); ``options`` limits it to
        options templates (True) or data templates (False). Returns how many were removed."""
        ids = self._domain_templates.get((version, exporter, domain), ())
        keys = [(version, exporter, domain, t) for t in ids]
        keys = [k for k in keys if options is None or self._templates[k].is_options == options]
        for key in keys:
            self._drop_template(key)
        return len(keys)

    def clear(self, exporter: bytes | None = None) -> None:
        """Forget all templates and other state, or only those of one exporter address."""
        if exporter is None:
            for state in (self._templates, self._raw, self._pending, self._pending_bytes, self.sampling,
                          self.samplers, self.sys_init, self.sequences, self._domains, self._domain_templates,
                          self._exporter_templates, self._fields):
                state.clear()
            self._fields_total = self._held_bytes = 0
            return
        for key in list(self._exporter_templates.get(exporter, ())):
            self._drop_template(key)
        self._held_bytes -= sum(n for k, n in self._pending_bytes.items() if k[1] == exporter)
        for state in (self._pending, self._pending_bytes, self.sampling, self.samplers, self.sequences):
            for dkey in [k for k in state if k[1] == exporter]:
                del state[dkey]
        for ikey in [k for k in self.sys_init if k[0] == exporter]:
            del self.sys_init[ikey]
        self._domains.pop(exporter, None)

    # --- data sets waiting for their template ---------------------------------------------

    def hold(self, version: int, exporter: bytes, domain: int, pending: PendingSet) -> int:
        """Keep a data set until its template arrives; returns how many sets were dropped to
        stay within the bounds (the oldest ones, or this one if holding is disabled)."""
        if self.max_pending_sets <= 0 or len(pending.data) > self.max_pending_bytes or \
                self._held_bytes + len(pending.data) > self.max_pending_total_bytes:
            return 1
        self.touch(version, exporter, domain)
        key = (version, exporter, domain)
        queue = self._pending.get(key)
        if queue is None:
            queue = self._pending[key] = OrderedDict()
            self._pending_bytes[key] = 0
        # A per-domain serial keeps arrival order across template IDs.
        serial = next(reversed(queue)) + 1 if queue else 0
        queue[serial] = pending
        self._pending_bytes[key] += len(pending.data)
        self._held_bytes += len(pending.data)
        dropped = 0
        while len(queue) > self.max_pending_sets or self._pending_bytes[key] > self.max_pending_bytes:
            _, old = queue.popitem(last=False)
            self._pending_bytes[key] -= len(old.data)
            self._held_bytes -= len(old.data)
            dropped += 1
        return dropped

    def release(self, version: int, exporter: bytes, domain: int, template_id: int) -> list[PendingSet]:
        """Take out, in arrival order, the held data sets of one template (it just arrived)."""
        key = (version, exporter, domain)
        queue = self._pending.get(key)
        if not queue:
            return []
        serials = [s for s, p in queue.items() if p.template_id == template_id]
        out = [queue.pop(s) for s in serials]
        released = sum(len(p.data) for p in out)
        self._pending_bytes[key] -= released
        self._held_bytes -= released
        if not queue:
            del self._pending[key], self._pending_bytes[key]
        return out

    def expire(self, now_ms: int | None) -> list[tuple[bytes, int]]:
        """Drop held sets received more than ``max_pending_age_ms`` before ``now_ms`` (all of
        them if ``now_ms`` is None, e.g. at the end of a capture); returns (exporter, sets
        dropped) pairs for the caller to count."""
        out: list[tuple[bytes, int]] = []
        for key in list(self._pending):
            queue = self._pending[key]
            old = [s for s, p in queue.items()
                   if now_ms is None or now_ms - p.received_ms > self.max_pending_age_ms]
            if not old:
                continue
            for s in old:
                size = len(queue.pop(s).data)
                self._pending_bytes[key] -= size
                self._held_bytes -= size
            if not queue:
                del self._pending[key], self._pending_bytes[key]
            out.append((key[1], len(old)))
        return out

    # --- what options data announced -----------------------------------------------------------

    def learn_options(self, version: int, exporter: bytes, domain: int,
                      values: Mapping[int, int | float]) -> None:
        """Remember what one options data record says: a sampling rate (for its sampler ID,
        field 48 or 302, or else for the whole domain) and IPFIX's systemInitTimeMilliseconds."""
        from sensors.netflow.fields import SAMPLER_ID, SELECTOR_ID, SYSTEM_INIT_MS, rate_from_options

        self.touch(version, exporter, domain)
        init = values.get(SYSTEM_INIT_MS)
        if init and init < 1 << 62:  # beyond is noise, and would overflow the int64 time columns
            self.sys_init[(exporter, domain)] = int(init)
        rate = rate_from_options(values)
        if rate is None:
            return
        rate = min(rate, 0xFFFFFFFF)  # the sampling_rate column is uint32 (fields 34/50 are 4 bytes)
        key = (version, exporter, domain)
        sampler = values.get(SAMPLER_ID, values.get(SELECTOR_ID))
        if sampler is None:
            self.sampling[key] = rate
        else:
            table = self.samplers.get(key, {})
            if table.get(int(sampler)) != rate:
                self.samplers[key] = {**table, int(sampler): rate}  # replaced: see ``samplers``

    def domain_rate(self, key: DomainKey) -> int:
        """The rate for flows of a domain that name no sampler: the one announced for the domain,
        else, when the exporter announced exactly one sampler (with an ID the flows do not
        carry, as Cisco's IPFIX selectorId), that sampler's; else 1."""
        rate = self.sampling.get(key)
        if rate is not None:
            return rate
        table = self.samplers.get(key)
        if table and len(table) == 1:
            return next(iter(table.values()))
        return 1

    def pending_bytes(self) -> int:
        """Bytes of data sets currently held for a missing template, all exporters."""
        return self._held_bytes

    def pending_sets(self) -> int:
        """Data sets currently held for a missing template, all exporters."""
        return sum(len(q) for q in self._pending.values())

    def has_pending(self) -> bool:
        """True when some data set waits for its template (cheap: checked per template)."""
        return bool(self._pending)

    def __len__(self) -> int:
        return len(self._templates)

    def __iter__(self) -> Iterator[tuple[TemplateKey, Template]]:
        return iter(list(self._templates.items()))


def _weight(template: Template) -> int:
    """What a template costs the bounds: its field specifiers (at least 1)."""
    return max(1, len(template.fields) + len(template.scope_fields))


def hold_unknown(templates: TemplateStore, version: int, exporter: bytes, domain: int,
                 pending: PendingSet, counts: ExporterStats) -> None:
    """Hold a data set whose template is unknown and count the outcome: ``missing_template``
    when holding is disabled, else one held set plus whatever the bounds pushed out."""
    dropped = templates.hold(version, exporter, domain, pending)
    if templates.max_pending_sets <= 0:
        counts.error("missing_template")
        return
    counts.pending_sets += 1
    if dropped:
        counts.error("missing_template_expired", dropped)
