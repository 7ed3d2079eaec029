"""Export sequence numbers: counting what the network (or the exporter) lost before us.

Each protocol numbers its stream per (exporter, domain) differently: NetFlow v5 counts flows
sent before this packet, v9 counts export packets, IPFIX counts data records sent before this
message. :func:`track` compares a packet's number with the one expected from its predecessor
(modulo 2**32, so the counter's wrap is invisible) and sorts the difference into:

* in order: nothing to count;
* ahead by at most ``max_gap`` units: a gap; the skipped units are counted as lost;
* behind by at most ``window`` units: a late (reordered) datagram, counted as late; its units
  had been counted lost when the gap was seen, so *net loss = lost - late* (the counters stay
  monotonic, which is what Prometheus counters need);
* anything else: the exporter restarted (or jumped): counted as a reset, no loss inferred.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sensors.netflow.stats import ExporterStats
    from sensors.netflow.templates import DomainKey, TemplateStore

_MOD = 1 << 32

#: (reorder window, largest gap still counted as loss) per unit. v9 counts packets, which are
#: ~30 times rarer than records.
PACKET_LIMITS = (64, 1 << 16)
RECORD_LIMITS = (4096, 1 << 22)


def track(store: TemplateStore, key: DomainKey, sequence: int, units: int | None, per_packet: bool,
          counts: ExporterStats) -> None:
    """Check ``sequence`` against the stream's expectation and count gaps, late datagrams and
    resets in ``counts``. ``units`` is what this datagram adds to the counter (1 for v9, the
    record count for v5/IPFIX); None when unknown (IPFIX data held for a missing template): the
    next datagram then only resynchronises."""
    expected = store.sequences.get(key)
    window, max_gap = PACKET_LIMITS if per_packet else RECORD_LIMITS
    if expected is not None:
        ahead = (sequence - expected) % _MOD
        if ahead:
            if ahead <= max_gap:
                counts.sequence_gaps += 1
                if per_packet:
                    counts.lost_packets += ahead
                else:
                    counts.lost_records += ahead
            elif _MOD - ahead <= window:
                counts.reordered += 1
                if per_packet:
                    counts.late_packets += 1
                else:
                    counts.late_records += units or 0
                return  # the stream's expectation stays where the newest datagram put it
            else:
                counts.sequence_resets += 1
    store.set_sequence(key, None if units is None else (sequence + units) % _MOD)
