"""The identity topic's record format (pure): one record per address, JSON (orjson).

The topic ``<prefix>.k8s.identity`` is compacted and has one partition. Key: the address as text
(``10.244.1.7``, ``fd00::5``; IPv4 never in mapped form). Value: the *whole* version list of that
address, so compaction keeping the last record per key keeps everything an enricher needs::

    {"v": 1, "versions": [
        {"from": 1700000000000, "to": 1700000060000, "kind": "pod", "namespace": "shop",
         "name": "cart-7d9c6-x2x1q", "pod_uid": "…", "workload": "cart",
         "workload_kind": "Deployment", "service": "cart", "node": "node-1"},
        {"from": 1700000120000, "to": null, …}]}

A host-network pod's version also lists the ports it serves: ``"host_ports": [[6, 10250], …]``
(protocol number, port). A pod's version carries its chosen labels (the watcher's ``pod_labels``)
as ``"labels": {"app": "cart", …}``.

``to: null`` means the version is open. Empty fields may be left out. A record with no value (a
tombstone) forgets the address. JSON rather than Arrow: identity changes are few (pods starting
and stopping), records are small, and they stay readable with ``kafka-console-consumer``.

A record fits ``kafka.max_message_bytes`` by construction (:func:`fit_versions`): an address with
so many versions (or such long label sets) that its record would not fit loses its oldest
*ended* versions from the record (a late flow of that time is then attributed as unknown); the
open version is never trimmed, and a record that does not fit even so is refused.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Any

import orjson

from enricher.identity import OPEN, OwnerInfo, Version, labels_text
from flowtally.wire import MESSAGE_OVERHEAD
from sensors.schema import address16, address_text

FORMAT_VERSION = 1
_FIELDS = ("kind", "namespace", "name", "pod_uid", "workload", "workload_kind", "service", "node")


class IdentityRecordError(ValueError):
    """A record of the identity topic that cannot be read."""


class IdentityRecordTooLarge(ValueError):
    """An address's record does not fit the message limit even with only its open versions."""


def encode_key(address: bytes | str) -> bytes:
    """The record key of an address (16 bytes or text)."""
    if isinstance(address, bytes):
        return address_text(address).encode()
    return str(ipaddress.ip_address(address)).encode()


def encode_versions(versions: Sequence[Version] | None) -> bytes | None:
    """The record value for a version list (None: a tombstone)."""
    if versions is None:
        return None
    return orjson.dumps({"v": FORMAT_VERSION, "versions": [_item(v) for v in versions]})


def _item(v: Version) -> dict[str, Any]:
    item: dict[str, Any] = {"from": v.valid_from_ms, "to": None if v.open else v.valid_to_ms}
    for f in _FIELDS:
        value = getattr(v.owner, f)
        if value:
            item[f] = value
    if v.owner.labels:
        item["labels"] = orjson.Fragment(v.owner.labels)  # already JSON (labels_text)
    if v.owner.host_ports:
        item["host_ports"] = [list(p) for p in v.owner.host_ports]
    return item


def fit_versions(versions: Sequence[Version] | None, key: bytes, limit: int) -> tuple[bytes | None, int]:
    """The record value of ``versions`` (None: a tombstone) for a message of at most ``limit``
    bytes with ``key`` (plus :data:`~flowtally.wire.MESSAGE_OVERHEAD`), and how many versions
    were left out to fit: the ended ones that ended first. Raises :class:`IdentityRecordTooLarge`
    when the open versions alone do not fit."""
    value = encode_versions(versions)
    budget = limit - MESSAGE_OVERHEAD - len(key)
    if value is None or len(value) <= budget:
        return value, 0
    assert versions is not None
    # Each version's share of the record: its item plus the comma between items.
    sizes = [len(orjson.dumps(_item(v))) + 1 for v in versions]
    total = len(value)
    ended = sorted((i for i, v in enumerate(versions) if not v.open),
                   key=lambda i: (versions[i].valid_to_ms, versions[i].valid_from_ms))
    dropped: set[int] = set()
    taken = 0
    while True:
        while total > budget and taken < len(ended):
            dropped.add(ended[taken])
            total -= sizes[ended[taken]]
            taken += 1
        kept = [v for i, v in enumerate(versions) if i not in dropped]
        value = encode_versions(kept)
        assert value is not None
        if len(value) <= budget:
            return value, len(dropped)
        if taken == len(ended):
            raise IdentityRecordTooLarge(
                f"record of {key.decode(errors='replace')} is {len(value)} bytes with its {len(kept)} open "
                f"version(s) only, more than the {budget} bytes a message of {limit} leaves for it")
        total = len(value)  # the estimate was short: trim on from the real size


def _labels(value: Any) -> str:
    if value is None:
        return ""
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise IdentityRecordError(f"labels must be an object of strings, not {value!r}")
    return labels_text(value)


def decode_record(key: bytes | None, value: bytes | None) -> tuple[bytes, list[Version] | None]:
    """(16-byte address, versions or None for a tombstone) of one record."""
    if not key:
        raise IdentityRecordError("record without a key")
    try:
        address = address16(key.decode())
    except (ValueError, UnicodeDecodeError) as exc:
        raise IdentityRecordError(f"key {key!r} is not an address") from exc
    if value is None:
        return address, None
    try:
        data = orjson.loads(value)
        if data.get("v") != FORMAT_VERSION:
            raise IdentityRecordError(f"unknown identity record version {data.get('v')!r}")
        versions = [
            Version(OwnerInfo(**{f: str(item.get(f, "") or "") for f in _FIELDS},
                              labels=_labels(item.get("labels")),
                              host_ports=tuple((int(p), int(n)) for p, n in item.get("host_ports", ()))),
                    int(item["from"]), OPEN if item.get("to") is None else int(item["to"]))
            for item in data["versions"]
        ]
    except IdentityRecordError:
        raise
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise IdentityRecordError(f"record for {key.decode(errors='replace')}: {exc}") from exc
    return address, versions
