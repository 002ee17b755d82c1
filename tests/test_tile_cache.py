"""The decoded-tile cache's compiled index against a plain Python model of its policy, pins, and concurrent use."""

from __future__ import annotations

import random
import threading
from collections import OrderedDict
from collections.abc import Hashable

import numpy as np
import pytest

from loader_service.slides import TileCache, open_slide, read_patches_of
from loader_service.slides._cache_kernels import HITS, PINS
from tests.slide_fixtures import FixtureSlide


class ModelCache:
    """The policy TileCache documents, in dicts and ordered dicts (LRU per kind: idle, wanted)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.data: dict[Hashable, np.ndarray] = {}
        self.idle: OrderedDict[Hashable, None] = OrderedDict()
        self.wanted: OrderedDict[Hashable, None] = OrderedDict()
        self.expected: dict[Hashable, int] = {}
        self.expected_bytes = self.bytes = self.hits = self.misses = self.evictions = 0

    def get(self, key: Hashable) -> np.ndarray | None:
        if key in self.data:
            (self.wanted if key in self.expected else self.idle).move_to_end(key)
            self.hits += 1
            return self.data[key]
        self.misses += 1
        return None

    def put(self, key: Hashable, arr: np.ndarray) -> None:
        if arr.nbytes > self.capacity:
            return
        self.drop(key)
        wanted = key in self.expected
        while self.bytes + arr.nbytes > self.capacity:
            if self.idle:
                victim = next(iter(self.idle))
            elif wanted:
                victim = next(iter(self.wanted))
            else:
                return
            self.drop(victim)
            self.evictions += 1
        self.data[key] = arr
        (self.wanted if wanted else self.idle)[key] = None
        self.bytes += arr.nbytes

    def drop(self, key: Hashable) -> None:
        if key in self.data:
            self.bytes -= self.data.pop(key).nbytes
            self.idle.pop(key, None)
            self.wanted.pop(key, None)

    def expect(self, keys: list[Hashable], nbytes: int) -> None:
        for key in keys:
            count = self.expected.get(key, 0)
            self.expected[key] = count + 1
            if not count:
                self.expected_bytes += nbytes
                if key in self.idle:
                    del self.idle[key]
                    self.wanted[key] = None

    def expected_done(self, keys: list[Hashable], nbytes: int) -> None:
        for key in keys:
            count = self.expected.get(key, 0)
            if count > 1:
                self.expected[key] = count - 1
            elif count == 1:
                del self.expected[key]
                self.expected_bytes -= nbytes
                if key in self.wanted:
                    del self.wanted[key]
                    self.idle[key] = None


@pytest.mark.parametrize("seed", range(6))
def test_compiled_index_follows_the_policy_model(seed: int) -> None:
    """Thousands of random gets, puts (several sizes, int and other keys), announcements, withdrawals and
    clears: the same tiles stored, found and evicted as the model's, through table growth and deletions."""
    rng = random.Random(seed)
    capacity = rng.choice([3000, 20000, 100000])
    cache, model = TileCache(capacity), ModelCache(capacity)
    universe: list[Hashable] = list(range(300)) + [f"s{i}" for i in range(40)] + [(1, 2), (3, "x")]
    for step in range(4000):
        op = rng.random()
        if op < 0.35:
            keys = rng.sample(universe, rng.randint(1, 12))
            if rng.random() < 0.5 and all(isinstance(k, int) for k in keys):
                slots, addresses, sizes = cache.acquire(np.asarray(keys, np.int64))
                cache.release(slots)
                got: list[np.ndarray | None] = [None if s < 0 else cache.get_many([k])[0] for s, k in zip(slots, keys)]
                cache._counters[HITS] -= int((slots >= 0).sum())  # the re-gets above are not part of the sequence
                assert all((a != 0) == (s >= 0) for a, s in zip(addresses.tolist(), slots.tolist()))
            else:
                got = cache.get_many(keys)
            want = [model.get(k) for k in keys]
            for g, w, k in zip(got, want, keys):
                assert (g is None) == (w is None), (step, k)
                assert g is None or g is w, (step, k)
        elif op < 0.75:
            keys = rng.sample(universe, rng.randint(1, 6))
            arrays = [np.full(rng.choice([100, 700, 2500]), 7, np.uint8) for _ in keys]
            cache.put_many(keys, arrays)
            for k, a in zip(keys, arrays):
                model.put(k, a)
        elif op < 0.87:
            keys = [rng.choice(universe) for _ in range(rng.randint(1, 20))]
            cache.expect(np.asarray(keys, np.int64) if all(isinstance(k, int) for k in keys) else keys, 500)
            model.expect(keys, 500)
        elif op < 0.995:
            keys = [rng.choice(universe) for _ in range(rng.randint(1, 20))]
            cache.expected_done(keys, 500)
            model.expected_done(keys, 500)
        else:
            cache.clear()
            model.data.clear(), model.idle.clear(), model.wanted.clear()
            model.bytes = 0
        s = cache.stats()
        assert (s.hits, s.misses, s.bytes, s.evictions, s.entries) == (
            model.hits, model.misses, model.bytes, model.evictions, len(model.data)), step
        assert cache.expected_bytes == model.expected_bytes and s.bytes <= capacity
    assert sorted(map(str, (k for k in universe if k in cache))) == sorted(map(str, model.data))


def test_pinned_tiles_are_neither_evicted_nor_replaced() -> None:
    cache = TileCache(2 * 100)
    a, b = np.full(100, 1, np.uint8), np.full(100, 2, np.uint8)
    cache.put_many([1, 2], [a, b])
    slots, addresses, sizes = cache.acquire(np.array([1, 5], np.int64))
    assert slots[1] == -1 and addresses[0] == a.ctypes.data and sizes.tolist() == [100, 0]
    cache.put_many([3, 4], [np.zeros(100, np.uint8), np.zeros(100, np.uint8)])  # only 2 could go, and 4 evicts 3
    assert 1 in cache and 2 not in cache and 3 not in cache and 4 in cache
    cache.put(1, np.zeros(100, np.uint8))  # pinned: kept as it is
    assert cache.get(1) is a
    cache.release(slots)
    cache.put(1, np.zeros(100, np.uint8))
    assert cache.get(1) is not a


def test_concurrent_acquire_and_put_never_read_a_freed_tile() -> None:
    """Readers copy through acquired addresses while writers churn a small cache: every copy sees its tile."""
    import ctypes

    cache = TileCache(40 * 4096)
    stop = threading.Event()
    errors: list[str] = []

    def writer(seed: int) -> None:
        rng = np.random.default_rng(seed)
        while not stop.is_set():
            keys = rng.integers(0, 200, 8)
            cache.put_many(keys, [np.full(4096, k % 251, np.uint8) for k in keys.tolist()])

    def reader(seed: int) -> None:
        rng = np.random.default_rng(seed)
        buf = np.empty(4096, np.uint8)
        for _ in range(3000):
            keys = rng.integers(0, 200, 16)
            slots, addresses, _ = cache.acquire(keys)
            try:
                for k, address in zip(keys.tolist(), addresses.tolist()):
                    if address:
                        ctypes.memmove(buf.ctypes.data, address, 4096)
                        if not (buf == k % 251).all():
                            errors.append(f"tile {k} changed under a pin")
            finally:
                cache.release(slots)

    writers = [threading.Thread(target=writer, args=(s,)) for s in range(2)]
    readers = [threading.Thread(target=reader, args=(10 + s,)) for s in range(2)]
    for t in writers + readers:
        t.start()
    for t in readers:
        t.join(timeout=120)
    stop.set()
    for t in writers:
        t.join(timeout=60)
    assert not errors, errors[:3]
    assert cache.stats().bytes <= 40 * 4096 and cache._slots[:, PINS].sum() == 0  # no pin left behind


def test_batch_reads_in_threads_through_a_tiny_cache(tiff_jpeg_ycbcr: FixtureSlide) -> None:
    """Four threads read random patches through a cache of a few tiles (evictions at every read, tiles pinned
    by one read evicted by the next): each patch equals an uncached region read."""
    path = tiff_jpeg_ycbcr.path
    with open_slide(path, backend="tiff") as plain, \
            open_slide(path, backend="tiff", cache=TileCache(6 * 256 * 256 * 3)) as cached:
        w, h = plain.info.levels[0].width, plain.info.levels[0].height
        errors: list[str] = []

        def run(seed: int) -> None:
            rng = np.random.default_rng(seed)
            for _ in range(15):
                xs, ys = rng.integers(0, w - 200, 8), rng.integers(0, h - 200, 8)
                out = np.empty((8, 200, 200, 3), np.uint8)
                read_patches_of([(cached, 0, xs, ys, np.arange(8))], 200, 200, out)
                for k in range(8):
                    if not np.array_equal(out[k], plain.read_region(0, int(xs[k]), int(ys[k]), 200, 200)):
                        errors.append(f"patch at {xs[k]}, {ys[k]}")

        threads = [threading.Thread(target=run, args=(s,)) for s in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert not errors, errors[:3]
        assert cached._cache.stats().evictions > 0  # type: ignore[attr-defined]
