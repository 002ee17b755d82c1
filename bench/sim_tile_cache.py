"""Tile decodes per patch under three cache policies, by simulation: plain LRU, announced reads (the real
``TileCache`` with ``expect``/``expected_done``, batches announced as ``loader_service.forecast`` does), and
Belady's optimum (evict the tile used farthest in the future: the bound no policy beats).

Random ``patch``² patches over a ``size``² slide of ``tile``² tiles, read in batches of 64; the cache holds
``--fraction`` of the slide's tiles. No pixels: each tile is a 1-byte array, so the cache counts tiles.

    python -m bench.sim_tile_cache [--fraction 0.64] [--patches 40000] [--size 16384]
"""

from __future__ import annotations

import argparse
import heapq
from collections import OrderedDict

import numpy as np

from loader_service.slides import TileCache

BATCH = 64
SHARE = 0.9  # as TileForecast: announce while the announced tiles fit in 90 % of the cache


def accesses(patches: int, size: int, tile: int, patch: int, seed: int) -> list[list[int]]:
    """The tiles each patch reads, patch by patch."""
    rng = np.random.default_rng(seed)
    across = size // tile
    out = []
    for x, y in zip(rng.integers(0, size - patch, patches).tolist(), rng.integers(0, size - patch, patches).tolist()):
        out.append([ty * across + tx for ty in range(y // tile, (y + patch - 1) // tile + 1)
                    for tx in range(x // tile, (x + patch - 1) // tile + 1)])
    return out


def lru(reads: list[list[int]], capacity: int) -> int:
    cache: OrderedDict[int, None] = OrderedDict()
    misses = 0
    for tiles in reads:
        for t in tiles:
            if t in cache:
                cache.move_to_end(t)
                continue
            misses += 1
            cache[t] = None
            if len(cache) > capacity:
                cache.popitem(last=False)
    return misses


def announced(reads: list[list[int]], capacity: int, max_batches: int = 64) -> int:
    cache = TileCache(capacity)
    one = np.zeros(1, np.uint8)
    batches = [reads[i:i + BATCH] for i in range(0, len(reads), BATCH)]
    keys = [sorted({t for tiles in b for t in tiles}) for b in batches]
    ahead = 0  # batches announced so far
    for b, batch in enumerate(batches):
        while ahead < len(batches) and ahead - b < max_batches and cache.expected_bytes < SHARE * capacity:
            cache.expect(keys[ahead], 1)
            ahead += 1
        for tiles in batch:
            found = cache.get_many(tiles)
            for t, tile in zip(tiles, found):
                if tile is None:
                    cache.put(t, one.copy())
        if b < ahead:
            cache.expected_done(keys[b], 1)
    return cache.stats().misses


def belady(reads: list[list[int]], capacity: int) -> int:
    flat = [t for tiles in reads for t in tiles]
    never = len(flat)
    nxt, last = [never] * len(flat), {}
    for i in range(len(flat) - 1, -1, -1):
        nxt[i], last[flat[i]] = last.get(flat[i], never), i
    cached: dict[int, int] = {}  # tile -> its next use
    heap: list[tuple[int, int]] = []  # (-next use, tile), stale entries skipped
    misses = 0
    for i, t in enumerate(flat):
        if t not in cached:
            misses += 1
        cached[t] = nxt[i]
        heapq.heappush(heap, (-nxt[i], t))
        while len(cached) > capacity:
            use, victim = heapq.heappop(heap)
            if cached.get(victim) == -use:
                del cached[victim]
    return misses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fraction", type=float, nargs="+", default=[0.64, 0.3])
    parser.add_argument("--patches", type=int, default=40000)
    parser.add_argument("--size", type=int, default=16384)
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--patch", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    reads = accesses(args.patches, args.size, args.tile, args.patch, args.seed)
    n_tiles = (args.size // args.tile) ** 2
    print(f"{args.patches} random {args.patch}² patches over {n_tiles} tiles of {args.tile}², "
          f"{sum(map(len, reads)) / len(reads):.2f} tile reads per patch")
    for fraction in args.fraction:
        capacity = int(fraction * n_tiles)
        got = {name: fn(reads, capacity) / len(reads) for name, fn in
               (("LRU", lru), ("announced reads", announced), ("Belady (optimum)", belady))}
        print(f"cache = {fraction:.2f} of the slide: " + ", ".join(f"{k} {v:.2f}" for k, v in got.items())
              + " tile decodes per patch")


if __name__ == "__main__":
    main()
