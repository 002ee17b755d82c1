"""A decoded-tile LRU cache bounded in bytes, shared across slides, threads and sessions."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass

import numpy as np

__all__ = ["TileCache", "CacheStats", "data_address"]


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


def data_address(arr: np.ndarray) -> int:
    """The address of a C-contiguous uint8 array's first byte, or 0 for any other array."""
    if arr.dtype != np.uint8 or not arr.flags.c_contiguous or arr.size == 0:
        return 0
    return int(arr.ctypes.data)


class TileCache:
    """Least-recently-used cache of decoded tiles, bounded by the sum of the arrays' ``nbytes``.

    Keys are built by the slides: ``(slide identity, level, tile index, scale)`` where the
    identity is ``(path, mtime_ns, size)``, so a file rewritten in place is not served stale.
    Stored arrays are made read-only. All methods are thread-safe. A tile larger than the whole
    capacity is not stored. ``capacity_bytes=0`` disables caching (every lookup is a miss).
    """

    def __init__(self, capacity_bytes: int) -> None:
        if capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be >= 0, got {capacity_bytes}")
        self._capacity = int(capacity_bytes)
        self._data: OrderedDict[Hashable, tuple[np.ndarray, int]] = OrderedDict()  # key -> (tile, its address)
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
        return self.get_many_addressed(keys)[0]

    def get_many_addressed(self, keys: list[Hashable]) -> tuple[list[np.ndarray | None], list[int]]:
        """:meth:`get_many`, and each tile's data address (0 for a miss, or a tile that is not C-contiguous):
        what a compiled copy needs to read the tiles without a Python object per tile."""
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
                    out.append(entry[0])
                    addresses.append(entry[1])
                else:
                    out.append(None)
                    addresses.append(0)
            self._hits += found
            self._misses += len(keys) - found
        return out, addresses

    def put(self, key: Hashable, arr: np.ndarray) -> None:
        """Store ``arr`` (made read-only) under ``key``, evicting least-recently-used entries."""
        size = int(arr.nbytes)
        if size > self._capacity:
            return
        if arr.flags.writeable:
            arr.flags.writeable = False
        address = data_address(arr)
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self._bytes -= int(old[0].nbytes)
            self._data[key] = (arr, address)
            self._bytes += size
            while self._bytes > self._capacity:
                _, (evicted, _) = self._data.popitem(last=False)
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
