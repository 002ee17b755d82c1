"""Announced reads: the tile cache keeps the tiles sessions say they will read next (loader_service.forecast)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from loader_service.server import LoaderServer
from loader_service.slides import TileCache
from tests.conftest import make_config
from trainer_client import LoaderClient, StreamConfig

TILE = np.zeros((16, 16, 3), np.uint8)  # 768 bytes


def _cache(tiles: int) -> TileCache:
    return TileCache(tiles * TILE.nbytes)


def test_announced_tiles_outlive_unannounced_ones() -> None:
    cache = _cache(3)
    cache.expect(["a"], TILE.nbytes)
    for key in ("a", "b", "c", "d", "e"):  # LRU alone would evict "a" first
        cache.put(key, TILE.copy())
    assert "a" in cache and "e" in cache and len(cache) == 3
    assert cache.expected_bytes == TILE.nbytes


def test_nothing_unannounced_evicts_a_full_cache_of_announced_tiles() -> None:
    cache = _cache(2)
    cache.expect(["a", "b", "c"], TILE.nbytes)
    for key in ("a", "b"):
        cache.put(key, TILE.copy())
    cache.put("x", TILE.copy())  # no read announced: not stored, the announced ones stay
    assert "x" not in cache and "a" in cache and "b" in cache
    cache.put("c", TILE.copy())  # announced too: evicts the least recently used announced tile
    assert "c" in cache and "a" not in cache and len(cache) == 2
    assert cache.stats().bytes == 2 * TILE.nbytes


def test_withdrawn_announcements_make_tiles_ordinary_again() -> None:
    cache = _cache(2)
    cache.expect(["a", "a", "b"], TILE.nbytes)  # "a" twice: two reads to come
    assert cache.expected_bytes == 2 * TILE.nbytes
    cache.put("a", TILE.copy())
    cache.put("b", TILE.copy())
    cache.expected_done(["a", "b"], TILE.nbytes)
    assert cache.expected_bytes == TILE.nbytes  # one read of "a" still to come
    cache.put("c", TILE.copy())
    assert "b" not in cache and "a" in cache  # "b" ordinary again: evicted first
    cache.expected_done(["a", "zzz"], TILE.nbytes)  # withdrawing what was never announced is harmless
    assert cache.expected_bytes == 0
    cache.put("d", TILE.copy())  # "a" counts as just read (most recent): "c" goes
    assert "c" not in cache and "a" in cache and "d" in cache


def test_cache_hits_and_clear_with_announcements() -> None:
    cache = _cache(4)
    cache.expect(["a"], TILE.nbytes)
    cache.put("a", TILE.copy())
    cache.put("b", TILE.copy())
    tiles, addresses = cache.get_many_addressed(["a", "b", "c"])
    assert tiles[2] is None and addresses[2] == 0 and all(addresses[:2])
    assert addresses[0] == tiles[0].ctypes.data  # type: ignore[union-attr]
    s = cache.stats()
    assert (s.hits, s.misses, s.entries) == (2, 1, 2)
    cache.clear()
    assert len(cache) == 0 and cache.expected_bytes == TILE.nbytes  # announcements outlive a clear
    cache.put("c", TILE.copy())
    assert "c" in cache


def _stream(port: int) -> list[dict]:
    config = StreamConfig(dataset="train", batch_size=16, patch_size=256, samples_per_epoch=960, seed=5, level=0,
                          timeout_s=120, transport="grpc", augment=None)
    with LoaderClient(f"127.0.0.1:{port}", timeout_s=60) as client, client.stream(config) as stream:
        return list(stream)


@pytest.mark.parametrize("workers", [1, 2])
def test_announced_reads_save_decodes_and_change_no_pixel(dataset_dir: Path, workers: int) -> None:
    """The same epoch through a small tile cache, with and without announced reads: the same samples and
    pixels, fewer tile decodes with them, and no announcement left behind once the session ended."""
    results = {}
    for batches_ahead in (0, 64):
        cfg = make_config(dataset_dir, workers=workers, tile_cache_bytes=16 * 2**20, forecast_batches=batches_ahead)
        with LoaderServer(cfg) as srv:
            batches = _stream(srv.port)
            stats = srv.tile_cache.stats()
            assert srv.tile_cache.expected_bytes == 0  # every announcement withdrawn
            results[batches_ahead] = (batches, stats.misses)
    plain, announced = results[0][0], results[64][0]
    assert len(plain) == len(announced) == 60
    for a, b in zip(plain, announced):
        assert list(a["x"]) == list(b["x"]) and list(a["y"]) == list(b["y"])
        assert torch.equal(a["images"], b["images"])
    assert results[64][1] < 0.9 * results[0][1], f"tile decodes: {results[64][1]} announced vs {results[0][1]} LRU"


def test_concurrent_sessions_share_the_forecast_and_lose_nothing(dataset_dir: Path) -> None:
    """Four sessions at once (the ranks of a job) through a small cache: with announced reads each gets the
    pixels it gets alone, the tile decodes of all of them together are no more than with plain LRU, and
    nothing stays announced."""
    import threading

    def run(port: int) -> list[list[dict]]:
        out: list[list[dict]] = [[] for _ in range(4)]

        def one(rank: int) -> None:
            config = StreamConfig(dataset="train", batch_size=16, patch_size=256, samples_per_epoch=1024, seed=9,
                                  level=0, timeout_s=120, transport="grpc", augment=None)
            with LoaderClient(f"127.0.0.1:{port}", timeout_s=60) as client, \
                    client.stream(config, rank=rank, world_size=4) as stream:
                out[rank] = list(stream)

        threads = [threading.Thread(target=one, args=(r,)) for r in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        return out

    misses = {}
    got = {}
    for batches_ahead in (0, 64):
        cfg = make_config(dataset_dir, tile_cache_bytes=16 * 2**20, forecast_batches=batches_ahead)
        with LoaderServer(cfg) as srv:
            got[batches_ahead] = run(srv.port)
            misses[batches_ahead] = srv.tile_cache.stats().misses
            assert srv.tile_cache.expected_bytes == 0
    for rank in range(4):
        assert len(got[0][rank]) == len(got[64][rank]) == 16
        for a, b in zip(got[0][rank], got[64][rank]):
            assert torch.equal(a["images"], b["images"])
    assert misses[64] <= misses[0], f"tile decodes: {misses[64]} announced vs {misses[0]} LRU"


@pytest.mark.parametrize("transport", ["grpc", "shm"])
def test_a_client_that_leaves_mid_epoch_leaves_nothing_announced(dataset_dir: Path, transport: str) -> None:
    """A trainer that stops reading and closes after two batches: the server withdraws what the session
    announced (it would otherwise keep tiles nobody reads in the cache for the life of the service)."""
    import time

    cfg = make_config(dataset_dir, tile_cache_bytes=16 * 2**20)
    with LoaderServer(cfg) as srv:
        config = StreamConfig(dataset="train", batch_size=8, patch_size=256, samples_per_epoch=4096, seed=2, level=0,
                              timeout_s=60, transport=transport, augment=None)
        with LoaderClient(f"127.0.0.1:{srv.port}", timeout_s=60) as client, client.stream(config) as stream:
            for k, _ in enumerate(stream):
                if k == 1:
                    assert srv.tile_cache.expected_bytes > 0  # the session announced batches ahead
                    break
        deadline = time.monotonic() + 30
        while srv.tile_cache.expected_bytes and time.monotonic() < deadline:
            time.sleep(0.05)
        assert srv.tile_cache.expected_bytes == 0
        assert srv.tile_cache.stats().announced_bytes == 0
