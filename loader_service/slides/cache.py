"""A decoded-tile LRU cache bounded in bytes, shared across slides, threads and sessions."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass

import numpy as np

__all__ = ["TileCache", "CacheStats"]


@dataclass(frozen=True)
class CacheStats:
    """A snapshot of a :class:`TileCache`'s counters."""

    hits: int
    misses: int
    bytes: int
    capacity: int
    evictions: int
    entries: int = 0

    def __post_init__(self) -> None:
        for name in ("hits", "misses", "bytes", "capacity", "evictions", "entries"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


class TileCache:
    """Least-recently-used cache of decoded tiles, bounded by the sum of the arrays' ``nbytes``.

    Keys are built by the slides: ``(slide identity, level, tile index, scale)`` where the
    identity is ``(path, mtime_ns, size)``, so a file rewritten in place is not served stale.
    Stored arrays are made read-only. All methods are thread-safe. A tile larger than the whole
    capacity is not stored. ``capacity_bytes=0`` disables caching (every lookup is a miss).
    :meth:`lookup` also gives the data address of each C-contiguous (h, w, 3) uint8 tile, recorded when it
    was stored, for kernels that copy from many tiles in one call (``slides.assemble``).
    """

    def __init__(self, capacity_bytes: int) -> None:
        if capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be >= 0, got {capacity_bytes}")
        self._capacity = int(capacity_bytes)
        self._data: OrderedDict[Hashable, tuple[np.ndarray, int]] = OrderedDict()  # (tile, data address or 0)
        self._bytes = 0
        self._hits = 0
        self._misses = 0
        self._evictions = 0
        self._lock = threading.Lock()

    @property
    def capacity(self) -> int:
        return self._capacity

    def get(self, key: Hashable) -> np.ndarray | None:
        """The cached array for ``key`` (counted as a hit), or None (counted as a miss)."""
        with self._lock:
            entry = self._data.get(key)
            if entry is None:
                self._misses += 1
                return None
            self._data.move_to_end(key)
            self._hits += 1
            return entry[0]

    def get_many(self, keys: list[Hashable]) -> list[np.ndarray | None]:
        """:meth:`get` of each key, under one lock (the tiles of one region read)."""
        out: list[np.ndarray | None] = []
        found = 0
        with self._lock:
            data = self._data
            for key in keys:
                entry = data.get(key)
                if entry is not None:
                    data.move_to_end(key)
                    found += 1
                    out.append(entry[0])
                else:
                    out.append(None)
            self._hits += found
            self._misses += len(keys) - found
        return out

    def lookup(self, keys: list[Hashable], shape: tuple[int, int, int]) -> tuple[list[np.ndarray | None], np.ndarray]:
        """:meth:`get_many`, and an int64 array of the tiles' data addresses: 0 for a miss and for a tile that is
        not a C-contiguous uint8 array of ``shape``. An address is valid while the caller holds the tile."""
        out: list[np.ndarray | None] = []
        addresses: list[int] = []
        found = 0
        with self._lock:
            data = self._data
            for key in keys:
                entry = data.get(key)
                if entry is not None:
                    data.move_to_end(key)
                    found += 1
                    arr, address = entry
                    out.append(arr)
                    addresses.append(address if arr.shape == shape else 0)
                else:
                    out.append(None)
                    addresses.append(0)
            self._hits += found
            self._misses += len(keys) - found
        return out, np.array(addresses, dtype=np.int64)

    def put(self, key: Hashable, arr: np.ndarray) -> None:
        """Store ``arr`` (made read-only) under ``key``, evicting least-recently-used entries."""
        size = int(arr.nbytes)
        if size > self._capacity:
            return
        if arr.flags.writeable:
            arr.flags.writeable = False
        address = 0
        if arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3 and arr.flags.c_contiguous:
            address = int(arr.__array_interface__["data"][0])
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self._bytes -= int(old[0].nbytes)
            self._data[key] = (arr, address)
            self._bytes += size
            while self._bytes > self._capacity:
                _, (evicted, _address) = self._data.popitem(last=False)
                self._bytes -= int(evicted.nbytes)
                self._evictions += 1

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._data

    def __len__(self) -> int:
        with self._lock:
            return len(self._data)

    def clear(self) -> None:
        """Drop every entry (the counters are kept)."""
        with self._lock:
            self._data.clear()
            self._bytes = 0

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(
                hits=self._hits,
                misses=self._misses,
                bytes=self._bytes,
                capacity=self._capacity,
                evictions=self._evictions,
                entries=len(self._data),
            )

    def __repr__(self) -> str:
        s = self.stats()
        return f"TileCache({s.bytes}/{s.capacity} bytes, {s.entries} tiles, hits={s.hits}, misses={s.misses})"
