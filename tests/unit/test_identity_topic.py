"""The identity topic's record format: round trip, host ports, tombstones and bad records."""

from __future__ import annotations

import pytest

from enricher.identity import OPEN, OwnerInfo, Version
from enricher.identity_topic import IdentityRecordError, decode_record, encode_key, encode_versions
from sensors.schema import address16


def test_round_trip_with_host_ports_and_an_open_version() -> None:
    versions = [
        Version(OwnerInfo(kind="pod", namespace="shop", name="cart-1", pod_uid="u1", workload="cart",
                          workload_kind="Deployment", service="cart", node="node-1"), 1000, 2000),
        Version(OwnerInfo(kind="host-network", namespace="kube-system", name="node-exporter-x",
                          node="node-1", host_ports=((6, 9100), (17, 53))), 2000, OPEN),
    ]
    address, back = decode_record(encode_key("10.0.0.7"), encode_versions(versions))
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
