"""A decoded-tile LRU cache bounded in bytes, shared across slides, threads and sessions."""

from __future__ import annotations

import threading
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["TileCache", "CacheStats", "data_address", "KEY_LOW_BITS"]

#: bits of a tile key below the slide's :meth:`TileCache.key_base` (level: 6 bits, scale: 4, tile index: 30)
KEY_LOW_BITS = 40
#: int keys below this are used as they are; any other key is given a number from here on (``_number``)
_INT_KEYS = 1 << 62


@dataclass(frozen=True)
class CacheStats:
    """A snapshot of a :class:`TileCache`'s counters."""

    hits: int
    misses: int
    bytes: int
    capacity: int
    evictions: int
    entries: int = 0
    announced_bytes: int = 0  # decoded size of the distinct tiles with reads announced (TileCache.expect)

    def __post_init__(self) -> None:
        for name in ("hits", "misses", "bytes", "capacity", "evictions", "entries", "announced_bytes"):
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
    """A cache of decoded tiles bounded by the sum of the arrays' ``nbytes``: least recently used first,
    except tiles that reads to come have announced.

    Keys are built by the slides. A TIFF slide's tile is one int: :meth:`key_base` of its identity
    ``(path, mtime_ns, size)`` (so a file rewritten in place is not served stale) plus
    ``(level << 34) | (scale << 30) | tile index``. A batch's keys come from numpy as one int64 array, and the
    cache's index is integer arrays too (``_cache_kernels``): :meth:`acquire`, :meth:`put_many`, :meth:`expect`
    and :meth:`expected_done` are one compiled call without the GIL for all the keys of a batch. Any other
    hashable key works as well (it is given a number of its own, remembered for the cache's life).
    Stored arrays are made read-only. All methods are thread-safe. A tile larger than the whole
    capacity is not stored. ``capacity_bytes=0`` disables caching (every lookup is a miss).

    **Announced reads.** A session knows the patches of its next batches (the sample order is a pure function
    of seed and epoch), so it can announce their tiles with :meth:`expect` and withdraw them with
    :meth:`expected_done` once read (``loader_service.forecast``). Tiles with announced reads pending are
    "wanted": eviction takes the least recently used tile nobody announced first, a wanted tile only when
    none is left, and a tile nobody announced is then not stored at all. Under random access over more tiles
    than fit, plain LRU keeps an arbitrary ~capacity/size share; announced reads keep the ones about to be
    used (docs/benchmarks.md: 1.26 -> 0.72 decodes per patch on a slide 1.6x the cache).

    **Pinned tiles.** :meth:`acquire` hands out the data addresses of cached tiles for a compiled copy, without a
    Python reference per tile; the tiles it found stay pinned (never evicted nor replaced) until
    :meth:`release`.
    """

    def __init__(self, capacity_bytes: int) -> None:
        if capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be >= 0, got {capacity_bytes}")
        from . import _cache_kernels as kernels  # numba: imported on first use

        self._k = kernels
        self._capacity = int(capacity_bytes)
        self._counters = np.zeros(len(kernels.COUNTERS), np.int64)
        self._counters[kernels.CAPACITY] = self._capacity
        self._table = np.full((64, 2), kernels.EMPTY, np.int64)  # key -> slot
        self._expected = np.full((64, 2), kernels.EMPTY, np.int64)  # key -> announced reads pending
        self._slots = np.zeros((0, len(kernels.SLOT_FIELDS)), np.int64)
        self._free = np.zeros(0, np.int64)
        self._tiles: list[np.ndarray | None] = []  # slot -> the stored array
        self._expected_bytes = 0  # decoded size of the distinct announced tiles
        self._numbers: dict[Hashable, int] = {}  # a key that is not a small int -> its number (_number)
        self._bases: dict[Hashable, int] = {}  # slide identity -> its key base (see key_base)
        self._lock = threading.Lock()

    def key_base(self, identity: Hashable) -> int:
        """A number of the slide identity's own, shifted left by :data:`KEY_LOW_BITS`: its tiles' keys are this
        plus numbers below ``2**KEY_LOW_BITS``. The same identity always gets the same base (a slide opened again
        finds its tiles). Each distinct identity is remembered for the cache's life: one small dict entry per
        slide file (version) ever opened, never reused, so keys of two files can never meet."""
        with self._lock:
            base = self._bases.get(identity)
            if base is None:
                base = len(self._bases) << KEY_LOW_BITS
                if base + (1 << KEY_LOW_BITS) > _INT_KEYS:
                    raise RuntimeError(f"the tile cache has keyed {len(self._bases)} slide files: restart the "
                                       "service to key more")
                self._bases[identity] = base
            return base

    @property
    def capacity(self) -> int:
        return self._capacity

    # --- keys ---------------------------------------------------------------------------------------------
    def _number(self, key: Hashable) -> int:
        if isinstance(key, (int, np.integer)) and 0 <= key < _INT_KEYS:
            return int(key)
        number = self._numbers.get(key)
        if number is None:
            number = self._numbers[key] = _INT_KEYS + len(self._numbers)
        return number

    def _key_array(self, keys: Sequence[Hashable] | np.ndarray) -> np.ndarray:
        """int64 keys (an int64 array as it is: TIFF keys, all below ``2**62``). Call with the lock held."""
        if isinstance(keys, np.ndarray):
            return np.ascontiguousarray(keys, np.int64)
        return np.fromiter((self._number(k) for k in keys), np.int64, len(keys))

    def _room(self, table: np.ndarray, entries: int) -> np.ndarray:
        """``table``, or a rehashed larger one, at most half full with ``entries``. Call with the lock held."""
        if 2 * entries <= table.shape[0]:
            return table
        size = table.shape[0]
        while 2 * entries > size:
            size *= 2
        grown = np.full((size, 2), self._k.EMPTY, np.int64)
        self._k.rehash(table, grown)
        return grown

    # --- lookups --------------------------------------------------------------------------------------------
    def get(self, key: Hashable) -> np.ndarray | None:
        """The cached array for ``key`` (counted as a hit), or None (counted as a miss)."""
        return self.get_many_addressed([key])[0][0]

    def get_many(self, keys: Sequence[Hashable]) -> list[np.ndarray | None]:
        """:meth:`get` of each key, under one lock (the tiles of one region read)."""
        return self.get_many_addressed(keys)[0]

    def get_many_addressed(self, keys: Sequence[Hashable]) -> tuple[list[np.ndarray | None], list[int]]:
        """:meth:`get_many`, and each tile's data address (0 for a miss, or a tile that is not C-contiguous)."""
        with self._lock:
            slots, addresses, _ = self._acquire(self._key_array(keys), 0)
            tiles = self._tiles
            return [tiles[s] if s >= 0 else None for s in slots.tolist()], addresses.tolist()

    def acquire(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Look up int64 ``keys`` in one call: for each, the slot, data address and ``nbytes`` of its cached tile
        (-1, 0, 0 for a miss; the address is 0 for a tile that is not a C-contiguous uint8 array). The tiles
        found stay pinned (neither evicted nor replaced) until :meth:`release` of the slots: call it, in a
        ``finally``, once the copy that reads them is done."""
        with self._lock:
            return self._acquire(np.ascontiguousarray(keys, np.int64), 1)

    def _acquire(self, keys: np.ndarray, pin: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        slots, addresses, sizes = (np.empty(len(keys), np.int64) for _ in range(3))
        self._k.acquire(keys, pin, self._table, self._slots, self._counters, slots, addresses, sizes)
        return slots, addresses, sizes

    def release(self, slots: np.ndarray) -> None:
        """Unpin the slots :meth:`acquire` returned (misses, -1, are ignored)."""
        with self._lock:
            self._k.release(np.ascontiguousarray(slots, np.int64), self._slots)

    # --- stores ---------------------------------------------------------------------------------------------
    def put(self, key: Hashable, arr: np.ndarray) -> None:
        """Store ``arr`` (made read-only) under ``key``, evicting as the class says (possibly not storing it)."""
        self.put_many([key], [arr])

    def put_many(self, keys: Sequence[Hashable] | np.ndarray, arrays: Sequence[np.ndarray]) -> None:
        """:meth:`put` of each array under its key, in order, in one compiled call (the decoded tiles of a read).
        A key that is stored and pinned keeps its tile."""
        if len(keys) != len(arrays):
            raise ValueError(f"{len(keys)} keys for {len(arrays)} arrays")
        if not len(arrays):
            return
        for arr in arrays:
            if arr.flags.writeable:
                arr.flags.writeable = False
        addresses = np.fromiter((data_address(a) for a in arrays), np.int64, len(arrays))
        sizes = np.fromiter((a.nbytes for a in arrays), np.int64, len(arrays))
        k = self._k
        with self._lock:
            key_array = self._key_array(keys)
            self._make_room(len(arrays))
            out = np.empty(len(arrays), np.int64)
            released = np.empty(self._slots.shape[0] + len(arrays), np.int64)
            count = k.put_many(key_array, addresses, sizes, self._table, self._expected, self._slots, self._free,
                               self._counters, out, released)
            tiles = self._tiles
            for s in released[:count].tolist():
                tiles[s] = None
            for s, arr in zip(out.tolist(), arrays):
                if s >= 0:
                    tiles[s] = arr

    def _make_room(self, more: int) -> None:
        """Free slots and table rows for ``more`` new tiles. Call with the lock held."""
        k = self._k
        counters = self._counters
        self._table = self._room(self._table, int(counters[k.ENTRIES]) + more)
        free = int(counters[k.FREE])
        if free >= more:
            return
        old = self._slots.shape[0]
        size = max(64, 2 * old, old + more - free)
        slots = np.zeros((size, len(k.SLOT_FIELDS)), np.int64)
        slots[:old] = self._slots
        stack = np.empty(size, np.int64)
        stack[:free] = self._free[:free]
        stack[free:free + size - old] = np.arange(size - 1, old - 1, -1)
        self._slots, self._free = slots, stack
        counters[k.FREE] = free + size - old
        self._tiles.extend([None] * (size - old))

    # --- announced reads ------------------------------------------------------------------------------------
    def expect(self, keys: Sequence[Hashable] | np.ndarray, nbytes: int) -> None:
        """Announce one read to come of each key (a tile of ``nbytes`` decoded); withdraw with :meth:`expected_done`."""
        with self._lock:
            key_array = self._key_array(keys)
            self._expected = self._room(self._expected, int(self._counters[self._k.EXPECTED]) + len(key_array))
            new = self._k.expect(key_array, self._expected, self._table, self._slots, self._counters)
            self._expected_bytes += new * nbytes

    def expected_done(self, keys: Sequence[Hashable] | np.ndarray, nbytes: int) -> None:
        """Withdraw reads announced with :meth:`expect` (the same keys and size), whether they happened or not."""
        with self._lock:
            gone = self._k.expected_done(self._key_array(keys), self._expected, self._table, self._slots,
                                         self._counters)
            self._expected_bytes -= gone * nbytes

    @property
    def expected_bytes(self) -> int:
        """Decoded size of the distinct tiles with reads announced (what announcing more would ask to keep)."""
        return self._expected_bytes

    # --- the rest -------------------------------------------------------------------------------------------
    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return bool(self._k.find(self._table, self._number(key)) >= 0)

    def __len__(self) -> int:
        return int(self._counters[self._k.ENTRIES])

    def clear(self) -> None:
        """Drop every entry not pinned by a read under way (the counters and announced reads are kept)."""
        with self._lock:
            released = np.empty(self._slots.shape[0], np.int64)
            count = self._k.clear(self._table, self._slots, self._free, self._counters, released)
            for s in released[:count].tolist():
                self._tiles[s] = None

    def stats(self) -> CacheStats:
        k = self._k
        with self._lock:
            c = self._counters.tolist()
            return CacheStats(hits=c[k.HITS], misses=c[k.MISSES], bytes=c[k.BYTES], capacity=self._capacity,
                              evictions=c[k.EVICTIONS], entries=c[k.ENTRIES], announced_bytes=self._expected_bytes)

    def __repr__(self) -> str:
        s = self.stats()
        return f"TileCache({s.bytes}/{s.capacity} bytes, {s.entries} tiles, hits={s.hits}, misses={s.misses})"
