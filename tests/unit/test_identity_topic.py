"""The identity topic's record format: round trip, host ports, tombstones and bad records."""

from __future__ import annotations

import pytest

from enricher.identity import OPEN, OwnerInfo, Version, labels_text
from enricher.identity_topic import (
    IdentityRecordError,
    IdentityRecordTooLarge,
    decode_record,
    encode_key,
    encode_versions,
    fit_versions,
)
from flowtally.wire import MESSAGE_OVERHEAD
from sensors.schema import address16


def test_round_trip_with_host_ports_and_an_open_version() -> None:
    versions = [
        Version(OwnerInfo(kind="pod", namespace="shop", name="cart-1", pod_uid="u1", workload="cart",
                          workload_kind="Deployment", service="cart", node="node-1",
                          labels=labels_text({"team": "shop", "app": "cart"})), 1000, 2000),
        Version(OwnerInfo(kind="host-network", namespace="kube-system", name="node-exporter-x",
                          node="node-1", host_ports=((6, 9100), (17, 53))), 2000, OPEN),
    ]
    value = encode_versions(versions)
    assert value is not None and b'"labels":{"app":"cart","team":"shop"}' in value  # an object, readable
    address, back = decode_record(encode_key("10.0.0.7"), value)
    assert address == address16("10.0.0.7")
    assert back == versions


def test_tombstone_and_bad_records() -> None:
    assert decode_record(b"fd00::5", None) == (address16("fd00::5"), None)
    with pytest.raises(IdentityRecordError, match="not an address"):
        decode_record(b"not-an-ip", b"{}")
    with pytest.raises(IdentityRecordError, match="version"):
        decode_record(b"10.0.0.1", b'{"v": 99, "versions": []}')
    with pytest.raises(IdentityRecordError):
        decode_record(b"10.0.0.1", b'{"v": 1, "versions": [{"from": 1, "host_ports": [[6]]}]}')
    with pytest.raises(IdentityRecordError, match="labels"):
        decode_record(b"10.0.0.1", b'{"v": 1, "versions": [{"from": 1, "labels": {"app": 7}}]}')
    # labels written in any key order read back in the one text form
    _, back = decode_record(b"10.0.0.1", b'{"v": 1, "versions": [{"from": 1, "labels": {"b": "2", "a": "1"}}]}')
    assert back is not None and back[0].owner.labels == '{"a":"1","b":"2"}'


def _pod(i: int, start: int, end: int = OPEN, labels: int = 0) -> Version:
    owner = OwnerInfo(kind="pod", namespace="shop", name=f"cart-{i}", pod_uid=f"uid-{i:04d}", workload="cart",
                      workload_kind="Deployment", node="node-1",
                      labels=labels_text({f"label-{j}": "v" * 50 for j in range(labels)}))
    return Version(owner, start, end)


def test_a_record_that_fits_is_written_whole() -> None:
    versions = [_pod(0, 0, 10), _pod(1, 10)]
    assert fit_versions(versions, b"10.0.0.7", 1_048_576) == (encode_versions(versions), 0)
    assert fit_versions(None, b"10.0.0.7", 1_048_576) == (None, 0)  # a tombstone


def test_a_record_too_large_loses_its_oldest_ended_versions_first() -> None:
    # 600 short-lived pods in turn on one address (ended, in order), the last one still open,
    # and one that started early but ended last of the ended ones (kept longest)
    versions = [_pod(999, 100, 7000)] + [_pod(i, i * 10, i * 10 + 10) for i in range(600)] + [_pod(1000, 7000)]
    limit = 32_768
    whole = encode_versions(versions)
    assert whole is not None and len(whole) > limit
    value, trimmed = fit_versions(versions, b"10.0.0.7", limit)
    assert value is not None and len(value) <= limit - MESSAGE_OVERHEAD - len(b"10.0.0.7")
    _, back = decode_record(b"10.0.0.7", value)
    assert back is not None and trimmed == len(versions) - len(back) > 0
    assert back == versions[:1] + versions[1 + trimmed:]  # exactly the ones that ended first are gone
    assert back[-1].open and back[0].owner.name == "cart-999"
    # as few left out as needed: with one more version it would not fit
    more = encode_versions(versions[:1] + versions[trimmed:])
    assert more is not None and len(more) > limit - MESSAGE_OVERHEAD - len(b"10.0.0.7")


def test_a_record_whose_open_versions_alone_do_not_fit_is_refused() -> None:
    versions = [_pod(0, 0, 10), _pod(1, 10, labels=800)]  # ~50 KB of labels on the open version
    with pytest.raises(IdentityRecordTooLarge, match=r"10\.0\.0\.7 is \d+ bytes with its 1 open"):
        fit_versions(versions, b"10.0.0.7", 32_768)
