"""ASN and GeoIP data for public addresses, from MaxMind mmdb files.

Two layers:

- :class:`GeoDatabases` (the core): open readers (any object with ``get(address)``, e.g. a
  ``maxminddb.Reader``) and a bounded cache; :meth:`GeoDatabases.columns` resolves a column of
  addresses, looking up each *distinct* selected address once (``np.unique``) and each address
  at most once per cache lifetime. Python runs per distinct uncached address, never per flow.
- :class:`GeoIP` (the shell): owns the files. :meth:`GeoIP.current` re-checks the files'
  (mtime, size) at most every ``check_interval_s``; when one changed, it opens the new set, swaps
  it in atomically (one attribute assignment: a batch uses the set it started with) and closes the
  previous set at the next check, when no batch can still hold it. A file that fails to open
  keeps the old set in service (logged and counted). Replace files by rename (as
  ``geoipupdate`` does), not by writing into them: the readers memory-map the files.

ASN fields come from a GeoLite2-ASN (or GeoIP2-ISP) file; country, city and coordinates from a
GeoLite2-City file, or a Country file (no city, no coordinates).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import maxminddb
import numpy as np
import pyarrow as pa

from flowtally.settings import SettingsError

log = logging.getLogger(__name__)

GEO_COLUMNS = ("asn", "as_org", "country", "city", "lat", "lon")
DEFAULT_CACHE_SIZE = 200_000

# (asn, as_org, country, city, lat, lon)
Record = tuple[int, str, str, str, float, float]
_NOTHING: Record = (0, "", "", "", float("nan"), float("nan"))


class Reader(Protocol):
    """What we need of a ``maxminddb.Reader``."""

    def get(self, ip_address: Any) -> Any: ...

    def close(self) -> None: ...


def _address_arg(address: bytes) -> Any:
    import ipaddress

    return ipaddress.IPv6Address(address)  # the MaxMind IPv6 trees map IPv4 at ::ffff:0:0/96


def empty_columns(n: int) -> dict[str, pa.Array]:
    """Geo columns meaning "not looked up"."""
    codes = pa.array(np.zeros(n, dtype=np.int32))
    empty_dict = pa.DictionaryArray.from_arrays(codes, pa.array([""], pa.string()))
    nan = pa.array(np.full(n, np.nan, dtype=np.float32))
    return {"asn": pa.array(np.zeros(n, dtype=np.uint32)), "as_org": empty_dict, "country": empty_dict,
            "city": empty_dict, "lat": nan, "lon": nan}


@dataclass
class GeoStats:
    """Counts of geo lookups."""

    addresses: int = 0  # public addresses in the batches
    distinct: int = 0  # distinct ones per batch
    cache_misses: int = 0  # reader lookups
    found: int = 0  # flows with an ASN or a country


class GeoDatabases:
    """Open ASN and city/country readers plus a cache of their answers (no file handling)."""

    def __init__(self, asn: Reader | None, city: Reader | None, *,
                 cache_size: int = DEFAULT_CACHE_SIZE) -> None:
        self.asn = asn
        self.city = city
        self.cache_size = cache_size
        self._cache: dict[bytes, Record] = {}

    def record(self, address: bytes) -> Record:
        """Everything known about one 16-byte address (cached)."""
        hit = self._cache.get(address)
        if hit is not None:
            return hit
        asn, org, country, city, lat, lon = _NOTHING
        ip = _address_arg(address)
        if self.asn is not None:
            a = self.asn.get(ip)
            if isinstance(a, dict):
                asn = int(a.get("autonomous_system_number") or 0)
                org = str(a.get("autonomous_system_organization") or "")
        if self.city is not None:
            c = self.city.get(ip)
            if isinstance(c, dict):
                country = str((c.get("country") or {}).get("iso_code") or "")
                city = str(((c.get("city") or {}).get("names") or {}).get("en") or "")
                location = c.get("location") or {}
                if "latitude" in location and "longitude" in location:
                    lat, lon = float(location["latitude"]), float(location["longitude"])
        rec: Record = (asn, org, country, city, lat, lon)
        if len(self._cache) >= self.cache_size:
            self._cache.clear()  # bounded: a full cache starts over (cheap, and rare)
        self._cache[address] = rec
        return rec

    def columns(self, addresses: np.ndarray, mask: np.ndarray,
                stats: GeoStats | None = None) -> dict[str, pa.Array]:
        """Geo columns for the rows of ``addresses`` ((n, 16) uint8) selected by ``mask``."""
        n = len(addresses)
        sel = np.flatnonzero(mask)
        if len(sel) == 0 or (self.asn is None and self.city is None):
            return empty_columns(n)
        queries = np.ascontiguousarray(addresses[sel], dtype=np.uint8).view("S16").ravel()
        distinct, inverse = np.unique(queries, return_inverse=True)
        misses_before = 0
        records = []
        for key in distinct.tolist():
            key = key.ljust(16, b"\x00")  # numpy strips trailing NULs from S16 items
            if key not in self._cache:
                misses_before += 1
            records.append(self.record(key))
        asn_u = np.array([r[0] for r in records], dtype=np.uint32)
        lat_u = np.array([r[4] for r in records], dtype=np.float32)
        lon_u = np.array([r[5] for r in records], dtype=np.float32)
        asn = np.zeros(n, dtype=np.uint32)
        lat = np.full(n, np.nan, dtype=np.float32)
        lon = np.full(n, np.nan, dtype=np.float32)
        asn[sel], lat[sel], lon[sel] = asn_u[inverse], lat_u[inverse], lon_u[inverse]
        out: dict[str, pa.Array] = {"asn": pa.array(asn), "lat": pa.array(lat), "lon": pa.array(lon)}
        for name, i in (("as_org", 1), ("country", 2), ("city", 3)):
            values: dict[str, int] = {"": 0}
            codes_u = np.array([values.setdefault(str(r[i]), len(values)) for r in records], dtype=np.int32)
            codes = np.zeros(n, dtype=np.int32)
            codes[sel] = codes_u[inverse]
            out[name] = pa.DictionaryArray.from_arrays(pa.array(codes), pa.array(list(values), pa.string()))
        if stats is not None:
            stats.addresses += len(sel)
            stats.distinct += len(distinct)
            stats.cache_misses += misses_before
            found_u = (asn_u > 0) | np.array([bool(r[2]) for r in records])
            stats.found += int(np.count_nonzero(found_u[inverse]))
        return out

    def close(self) -> None:
        """Close the readers."""
        for reader in (self.asn, self.city):
            if reader is not None:
                reader.close()


def _signature(path: Path | None) -> tuple[int, int] | None:
    """(mtime, size) of a configured file; None when none is configured or it is not there (yet)."""
    if path is None:
        return None
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_mtime_ns, st.st_size)


class GeoIPError(SettingsError):
    """A configured mmdb file is there but cannot be used (not a MaxMind database, unreadable)."""


def open_reader(path: Path) -> Reader:
    """A MaxMind reader for ``path`` (memory-mapped, C extension when available)."""
    try:
        reader: Reader = maxminddb.open_database(str(path), maxminddb.MODE_AUTO)
    except (OSError, ValueError, maxminddb.InvalidDatabaseError) as exc:
        raise GeoIPError(f"GeoIP database {path} cannot be opened: "
                         f"{getattr(exc, 'strerror', None) or exc}") from None
    return reader


class GeoIP:
    """The mmdb files, re-read when they change on disk."""

    def __init__(self, asn_path: Path | None, city_path: Path | None, *, check_interval_s: float = 30.0,
                 cache_size: int = DEFAULT_CACHE_SIZE, clock: Callable[[], float] = time.monotonic,
                 on_reload: Callable[[str], None] | None = None) -> None:
        self.asn_path = Path(asn_path) if asn_path else None
        self.city_path = Path(city_path) if city_path else None
        self.check_interval_s = check_interval_s
        self.cache_size = cache_size
        self._clock = clock
        self._on_reload = on_reload
        self._signatures = (_signature(self.asn_path), _signature(self.city_path))
        # A configured file that is not there yet (a fresh volume that geoipupdate has not
        # filled) is not an error: public addresses get no ASN/location until it appears, and
        # the periodic check loads it then. A file that is there but unreadable is one.
        for path, signature in zip((self.asn_path, self.city_path), self._signatures, strict=True):
            if path is not None and signature is None:
                log.warning("geoip: %s does not exist (yet); public addresses get no ASN/location "
                            "until it appears (checked every %g s)", path, check_interval_s)
        self._db = self._open()
        self._retired: GeoDatabases | None = None
        self._checked = clock()
        self.reloads = 0
        self.reload_failures = 0

    def _open(self) -> GeoDatabases:
        paths = (self.asn_path, self.city_path)
        asn_path, city_path = (p if s is not None else None
                               for p, s in zip(paths, self._signatures, strict=True))
        asn = open_reader(asn_path) if asn_path else None
        try:
            city = open_reader(city_path) if city_path else None
        except Exception:
            if asn is not None:
                asn.close()
            raise
        return GeoDatabases(asn, city, cache_size=self.cache_size)

    def current(self) -> GeoDatabases:
        """The database set to use for the next batch (re-checking the files when due)."""
        now = self._clock()
        if now - self._checked >= self.check_interval_s:
            self._checked = now
            self.check()
        return self._db

    def check(self) -> bool:
        """Reload now if a file changed; returns whether a new set is in service."""
        if self._retired is not None:
            self._retired.close()
            self._retired = None
        try:
            signatures = (_signature(self.asn_path), _signature(self.city_path))
        except OSError as exc:
            log.warning("geoip: cannot stat the mmdb files (%s); keeping the loaded ones", exc)
            self.reload_failures += 1
            return False
        if signatures == self._signatures:
            return False
        pairs = zip(self._signatures, signatures, strict=True)
        if any(old is not None and new is None for old, new in pairs):
            log.warning("geoip: a loaded mmdb file is gone; keeping the loaded ones")
            self.reload_failures += 1
            return False
        previous, self._signatures = self._signatures, signatures
        try:
            fresh = self._open()
        except Exception as exc:
            log.error("geoip: reload failed (%s); keeping the loaded files", exc)
            self._signatures = previous
            self.reload_failures += 1
            return False
        self._retired, self._db = self._db, fresh
        self.reloads += 1
        log.info("geoip: reloaded %s", ", ".join(str(p) for p in (self.asn_path, self.city_path) if p))
        if self._on_reload is not None:
            self._on_reload("ok")
        return True

    def close(self) -> None:
        """Close every open reader."""
        for db in (self._db, self._retired):
            if db is not None:
                db.close()
        self._retired = None
