"""ASN/GeoIP columns from MaxMind's test databases, the cache, and a hot reload to another file."""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from enricher.enrich import EnrichStats, enrich_batch
from enricher.geo import GeoIP
from enricher.identity import IdentityIndex
from sensors.schema import address16, build_raw_table
from tests.oracle import shared_testdata

ASN = shared_testdata("mmdb", "GeoLite2-ASN-Test.mmdb")
CITY = shared_testdata("mmdb", "GeoLite2-City-Test.mmdb")
COUNTRY = shared_testdata("mmdb", "GeoLite2-Country-Test.mmdb")


def _a(*texts: str) -> np.ndarray:
    return np.frombuffer(b"".join(address16(t) for t in texts), dtype=np.uint8).reshape(-1, 16)


def test_columns_for_public_addresses_only() -> None:
    geo = GeoIP(ASN, CITY)
    try:
        addrs = ["1.128.0.1", "81.2.69.160", "89.160.20.112", "10.1.2.3", "8.8.8.8", "2001:218::1", "81.2.69.160"]
        raw = build_raw_table({"src_addr": _a(*addrs), "dst_addr": _a(*addrs[::-1]), "end": np.zeros(7)})
        stats = EnrichStats()
        out = enrich_batch(raw, IdentityIndex(), geo.current(), stats)
        assert out.column("src_asn").to_pylist() == [1221, 0, 29518, 0, 0, 0, 0]
        assert out.column("src_as_org").to_pylist()[0] == "Telstra Pty Ltd"
        assert out.column("src_country").to_pylist() == ["", "GB", "SE", "", "", "JP", "GB"]
        assert out.column("src_city").to_pylist()[1] == "London"
        assert out.column("src_city").to_pylist()[2] == "Linköping"
        lat = out.column("src_lat").to_pylist()
        assert abs(lat[1] - 51.5142) < 1e-3 and math.isnan(lat[3]) and math.isnan(lat[0])
        assert out.column("dst_country").to_pylist()[0] == "GB"
        # 6 public addresses per side, 5 distinct; the second side hits the cache entirely
        assert stats.geo.addresses == 12 and stats.geo.distinct == 10 and stats.geo.cache_misses == 5
    finally:
        geo.close()


def test_hot_reload_when_the_file_changes(tmp_path: Path) -> None:
    city = tmp_path / "geo.mmdb"
    shutil.copy(COUNTRY, city)
    now = [0.0]
    geo = GeoIP(None, city, check_interval_s=10, clock=lambda: now[0])
    try:
        probe = _a("175.16.199.1", "81.2.69.160")
        public = np.ones(2, dtype=bool)
        assert geo.current().columns(probe, public)["country"].to_pylist() == ["", "GB"]
        tmp = tmp_path / "geo.mmdb.new"
        shutil.copy(CITY, tmp)
        os.replace(tmp, city)  # as geoipupdate does
        now[0] = 5.0  # not yet due
        assert geo.current().columns(probe, public)["country"].to_pylist() == ["", "GB"]
        now[0] = 11.0
        cols = geo.current().columns(probe, public)
        assert cols["country"].to_pylist() == ["CN", "GB"] and cols["city"].to_pylist() == ["Changchun", "London"]
        assert geo.reloads == 1
        # a broken file keeps the loaded one in service
        tmp.write_bytes(b"not an mmdb")
        os.replace(tmp, city)
        now[0] = 30.0
        assert geo.current().columns(probe, public)["country"].to_pylist() == ["CN", "GB"]
        assert geo.reload_failures == 1
    finally:
        geo.close()


def test_a_configured_file_that_appears_later_is_loaded_then(tmp_path: Path) -> None:
    asn, city = tmp_path / "GeoLite2-ASN.mmdb", tmp_path / "GeoLite2-City.mmdb"
    now = [0.0]
    geo = GeoIP(asn, city, check_interval_s=10, clock=lambda: now[0])  # an empty volume: no error
    try:
        probe, public = _a("81.2.69.160", "1.128.0.1"), np.ones(2, dtype=bool)
        assert geo.current().columns(probe, public)["country"].to_pylist() == ["", ""]
        shutil.copy(CITY, city)
        now[0] = 11.0
        cols = geo.current().columns(probe, public)
        assert cols["country"].to_pylist() == ["GB", ""] and cols["asn"].to_pylist() == [0, 0]
        shutil.copy(ASN, asn)
        now[0] = 22.0
        assert geo.current().columns(probe, public)["asn"].to_pylist() == [0, 1221]
        assert geo.reloads == 2 and geo.reload_failures == 0
        # a loaded file that goes away keeps the loaded set in service
        asn.unlink()
        now[0] = 33.0
        assert geo.current().columns(probe, public)["asn"].to_pylist() == [0, 1221]
        assert geo.reload_failures == 1
    finally:
        geo.close()


def test_an_unreadable_file_at_start_is_an_error(tmp_path: Path) -> None:
    bad = tmp_path / "GeoLite2-City.mmdb"
    bad.write_bytes(b"not an mmdb")
    with pytest.raises(Exception, match=r"metadata|MaxMind|database"):
        GeoIP(None, bad)
