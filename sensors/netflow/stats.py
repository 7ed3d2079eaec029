"""What the NetFlow decoders count, per exporter: plain counters, no metrics library (the
collector exports them to Prometheus and to the completeness records).

Its own module because every decoder layer fills them (v5, v9, IPFIX, the template store, the
sequence trackers) and the decoder and collector read them: here, nobody imports back.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass(slots=True)
class ExporterStats:
    """What one exporter sent in the decoded datagrams.

    The integer fields are stable names the collector exports as metrics (all are monotonic
    counters when instances are merged call after call):

    - ``packets``: datagrams received; ``records``: flow records decoded (including RFC 5103
      reverse records, also counted in ``reverse_records``);
    - ``options_records``: v9/IPFIX options data records (sampling, interface tables): not flows;
    - ``templates``: template and options template records received (IPFIX withdrawals included);
    - ``pending_sets``: data sets that arrived before their template and were held; each is later
      either decoded (its records counted in ``records``) or dropped and counted as the error
      ``missing_template_expired``;
    - ``sequence_gaps``: forward jumps of the export sequence number; ``lost_packets`` (v9, which
      numbers packets) and ``lost_records`` (v5 flows, IPFIX data records) what they skipped;
    - ``reordered``: datagrams that arrived behind the sequence (within a small window); their
      units were counted as lost when the gap was seen and are counted again in
      ``late_packets`` / ``late_records``: net loss = lost - late;
    - ``sequence_resets``: jumps too large to be loss or reordering (exporter restart);
    - ``enterprise_fields``: enterprise-specific IPFIX field values skipped (records x fields);
    - ``reverse_records``: RFC 5103 biflow reverse directions emitted as their own records.
    """

    packets: int = 0
    records: int = 0
    options_records: int = 0
    templates: int = 0
    pending_sets: int = 0
    sequence_gaps: int = 0
    lost_packets: int = 0
    lost_records: int = 0
    reordered: int = 0
    late_packets: int = 0
    late_records: int = 0
    sequence_resets: int = 0
    enterprise_fields: int = 0
    reverse_records: int = 0
    errors: Counter[str] = field(default_factory=Counter)  # reason -> count

    def error(self, reason: str, n: int = 1) -> None:
        """Count ``n`` occurrences of ``reason``."""
        self.errors[reason] += n

    def merge(self, other: ExporterStats) -> None:
        """Add another instance's counts to this one."""
        for name in _COUNTER_FIELDS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.errors.update(other.errors)

    def counters(self) -> dict[str, int]:
        """The integer counters by name (everything but ``errors``)."""
        return {name: getattr(self, name) for name in _COUNTER_FIELDS}


_COUNTER_FIELDS = tuple(name for name in ExporterStats.__dataclass_fields__ if name != "errors")


@dataclass(slots=True)
class DecodeStats:
    """Counters of what the decoder saw, per exporter (keyed by its printable IP, "10.0.0.1").

    The collector turns them into Prometheus metrics (plain ints and Counters keep this module
    free of any metrics library): iterate :meth:`by_exporter`, then :meth:`reset` after exporting
    if the metrics are fed deltas, or create a fresh instance per decode call. Error reasons are
    the short strings listed in the module docstring.
    """

    exporters: dict[str, ExporterStats] = field(default_factory=dict)

    def exporter(self, label: str) -> ExporterStats:
        """The counters of one exporter, created on first use."""
        counts = self.exporters.get(label)
        if counts is None:
            counts = self.exporters[label] = ExporterStats()
        return counts

    def by_exporter(self) -> dict[str, ExporterStats]:
        """Exporter label -> its counters (the live objects, not a copy)."""
        return self.exporters

    @property
    def packets(self) -> int:
        """Datagrams seen, all exporters."""
        return sum(c.packets for c in self.exporters.values())

    @property
    def records(self) -> int:
        """Flow records decoded, all exporters."""
        return sum(c.records for c in self.exporters.values())

    @property
    def options_records(self) -> int:
        """Options data records seen (not decoded as flows), all exporters."""
        return sum(c.options_records for c in self.exporters.values())

    @property
    def templates(self) -> int:
        """Template records received, all exporters."""
        return sum(c.templates for c in self.exporters.values())

    def errors_by_reason(self) -> Counter[str]:
        """Errors summed over exporters."""
        out: Counter[str] = Counter()
        for counts in self.exporters.values():
            out.update(counts.errors)
        return out

    def merge(self, other: DecodeStats) -> None:
        """Add another instance's counts to this one (e.g. one decode call's into a running total)."""
        for label, counts in other.exporters.items():
            self.exporter(label).merge(counts)

    def reset(self) -> None:
        """Forget every count (after the caller exported them as deltas)."""
        self.exporters.clear()

    def as_dict(self) -> dict[str, object]:
        """Totals over all exporters, with errors by reason: a compact summary for logs."""
        return {
            "packets": self.packets,
            "records": self.records,
            "options_records": self.options_records,
            "templates": self.templates,
            "errors": dict(sorted(self.errors_by_reason().items())),
        }
