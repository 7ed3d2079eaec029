"""Template state of NetFlow v9 (and, later, IPFIX) exporters.

A v9 data flowset carries no field descriptions: it names a template that the same exporter sent
earlier, possibly in another packet. The collector therefore keeps state across packets. That state
lives in a :class:`TemplateStore` that the caller creates and hands to the decoder with every call
(the way goflow2's decoders receive a template system), never in a module global: two collectors in
one process, or a test and a replay tool, each keep their own.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import NamedTuple


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
    #: since the decoder needs it for every data flowset.
    record_length: int = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        length = sum(f.length for f in self.scope_fields) + sum(f.length for f in self.fields)
        object.__setattr__(self, "record_length", length)

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

    __slots__ = ("_templates",)

    def __init__(self) -> None:
        self._templates: dict[TemplateKey, Template] = {}

    def get(self, version: int, exporter: bytes, domain: int, template_id: int) -> Template | None:
        """The template in force for this exporter, domain and ID, or None if none was received."""
        return self._templates.get((version, exporter, domain, template_id))

    def put(self, version: int, exporter: bytes, domain: int, template_id: int, template: Template) -> bool:
        """Store a template; True if it is new or changed the layout of the one it replaces.

        A refresh with an unchanged layout keeps the stored object, so the decoder, which groups
        records by template object, keeps one group per layout across refreshes.
        """
        key = (version, exporter, domain, template_id)
        old = self._templates.get(key)
        if old == template:
            return False
        self._templates[key] = template
        return True

    def remove(self, version: int, exporter: bytes, domain: int, template_id: int) -> bool:
        """Forget one template (IPFIX template withdrawal); True if it was known."""
        return self._templates.pop((version, exporter, domain, template_id), None) is not None

    def clear(self, exporter: bytes | None = None) -> None:
        """Forget all templates, or only those of one exporter address."""
        if exporter is None:
            self._templates.clear()
        else:
            for key in [k for k in self._templates if k[1] == exporter]:
                del self._templates[key]

    def __len__(self) -> int:
        return len(self._templates)

    def __iter__(self) -> Iterator[tuple[TemplateKey, Template]]:
        return iter(list(self._templates.items()))
