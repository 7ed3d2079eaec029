"""The identity topic's record format: round trip, host ports, tombstones and bad records."""

from __future__ import annotations

import pytest

from enricher.identity import OPEN, OwnerInfo, Version, labels_text
from enricher.identity_topic import IdentityRecordError, decode_record, encode_key, encode_versions
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
