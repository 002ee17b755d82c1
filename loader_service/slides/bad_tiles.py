"""Tiles found damaged, remembered so that no read touches their bytes again."""

from __future__ import annotations

import threading
from collections.abc import Hashable

__all__ = ["BadTiles"]


class BadTiles:
    """Tiles whose bytes could not be read or decoded, keyed like the tile cache without the scale.

    Keys are ``(slide identity, level, tile index)``; the identity ``(path, mtime_ns, size)`` changes when
    the file is rewritten, so a repaired slide is read again. Bounded: past ``capacity`` entries the oldest
    are forgotten (they are then read, and fail, once more). Thread-safe.
    """

    def __init__(self, capacity: int = 65536) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self._capacity = capacity
        self._bad: dict[Hashable, str] = {}
        self._lock = threading.Lock()

    def add(self, key: Hashable, reason: str) -> None:
        with self._lock:
            self._bad[key] = reason
            while len(self._bad) > self._capacity:
                del self._bad[next(iter(self._bad))]

    def get(self, key: Hashable) -> str | None:
        """Why the tile was found damaged, or None when it is not known to be."""
        with self._lock:
            return self._bad.get(key)

    def __len__(self) -> int:
        with self._lock:
            return len(self._bad)
