"""Per-batch work (#12): the batch paths compute exactly what the per-sample reference computes.

The per-sample functions (``numpy.random.Generator(Philox(SeedSequence(...)))``, ``draw_params``,
``EpochPlan.sample``, ``_colour_matrix``, ``_hed_matrix``, ``aug_to_raw_point``, ``gaussian_kernel``) stay the
reference; every batch path is compared with them bit for bit, on many draws.
"""

from __future__ import annotations

import dataclasses
import threading
import time

import numpy as np
import pytest

from loader_service.augment import AugmentConfig, AugmentParams, ParamsBatch, draw_params, draw_params_batch
from loader_service.augment.blur import gaussian_kernel
from loader_service.augment.colour import _colour_matrix, _hed_matrix, colour_coefficients, hed_coefficients
from loader_service.augment.cpu_kernels import _kernels_of, coefficients, geometry_maps
from loader_service.augment.geometry import aug_to_raw_point
from loader_service.augment.params import TABLE_COLUMNS, halos, params_table
from loader_service.dataset import DatasetIndex
from loader_service.handoff import HandoffPool, Wakeup
from loader_service.sampling import CandidateCache, EpochPlan, SamplingSpec, ShardCursor
from loader_service.sampling.streams import StreamBatch, entropy_words, uniforms
from loader_service.server import LoaderServer
from loader_service.slides import TileCache

CONFIGS = [AugmentConfig.preset("pathology"), AugmentConfig.preset("none"),
           AugmentConfig(scale=0.5, crop=0.3, blur_prob=1.0, hue=0.5, hed_sigma=0.2, hed_bias=0.2)]


def _numpy_rng(*words: int) -> np.random.Generator:
    return np.random.Generator(np.random.Philox(np.random.SeedSequence(list(words))))


# --- streams: numpy's own numbers ----------------------------------------------------------------------------
def test_entropy_words_are_numpy_seedsequence_words() -> None:
    for values in ([0], [1, 2, 3], [2**32], [2**63 - 1, 0, 5], [0xA65EED2026]):
        words = [int(w) for w in entropy_words(values)]
        assert all(0 <= w < 2**32 for w in words)
        assert np.array_equal(np.random.SeedSequence(words).generate_state(4),
                              np.random.SeedSequence(values).generate_state(4))


@pytest.mark.parametrize("salt", [[0x5A17], [0xA65EED2026], [7, 2**40]])
def test_uniforms_equal_numpy_philox_bit_for_bit(salt: list[int]) -> None:
    rs = np.random.default_rng(11)
    for seed in (0, 1, 123456789, 2**63 - 1, int(rs.integers(0, 2**63))):
        for epoch in (0, 3, 2**33):
            idx = np.array([0, 1, 2**32 - 1, 2**32, 2**40 + 5, *rs.integers(0, 10**9, 40)], np.int64)
            got = uniforms([seed, epoch], idx, salt, 21)
            for row, index in zip(got, idx.tolist()):
                assert np.array_equal(row, _numpy_rng(seed, epoch, index, *salt).random(21))


def test_places_equal_the_per_sample_draw_for_any_range() -> None:
    rs = np.random.default_rng(5)
    for trial in range(25):
        seed, epoch = int(rs.integers(0, 2**63)), int(rs.integers(0, 4))
        n = int(rs.integers(1, 6))
        cells = [rs.integers(0, 9000, (int(rs.integers(1, 5000)), 2)) for _ in range(n)]
        weights = rs.random(n) + 0.05
        cdf = np.cumsum(weights / weights.sum())
        limits = rs.integers(9300, 12000, (n, 2))
        width, height = int(rs.integers(1, 700)), int(rs.integers(1, 700))
        jitter = bool(trial % 3)
        indices = rs.integers(0, 10**7, 120)
        got = StreamBatch([seed, epoch], [0x5A17], cdf, cells, limits).places(indices, width, height, jitter)
        for (slide, x, y), index in zip(got.tolist(), indices.tolist()):
            rng = _numpy_rng(seed, epoch, index, 0x5A17)
            want_slide = min(int(np.searchsorted(cdf, rng.random(), side="right")), n - 1)
            cx, cy = cells[want_slide][int(rng.integers(len(cells[want_slide])))]
            jx = int(rng.integers(-(width // 2), width // 2 + 1))
            jy = int(rng.integers(-(height // 2), height // 2 + 1))
            jx, jy = (jx, jy) if jitter else (0, 0)
            want = (want_slide, min(max(int(cx) + jx, 0), int(limits[want_slide, 0]) - width),
                    min(max(int(cy) + jy, 0), int(limits[want_slide, 1]) - height))
            assert (slide, x, y) == want


# --- the sampler ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ds(server: LoaderServer) -> DatasetIndex:
    return server.datasets["train"]


@pytest.mark.parametrize("balance", ["area", "slide", "label"])
def test_plan_batches_equal_samples_drawn_one_by_one(ds: DatasetIndex, balance: str) -> None:
    spec = SamplingSpec(patch_size=64, patch_height=48, samples_per_epoch=300, seed=9, balance=balance)
    for rank, world in ((0, 1), (1, 3)):
        plan = EpochPlan(ds, spec, 2, rank, world, CandidateCache())
        one_by_one = [plan.sample(i) for i in range(plan.shard_length)]
        assert plan.samples(0, plan.shard_length) == one_by_one
        assert plan.samples(7, 40) == one_by_one[7:40]


def test_plan_batches_substitute_quarantined_slides_as_one_by_one(ds: DatasetIndex) -> None:
    spec = SamplingSpec(patch_size=64, samples_per_epoch=200, seed=4)
    first = EpochPlan(ds, spec, 0, 0, 1, CandidateCache())
    avoid = {first.sample(0).record.path: "quarantined in this test"}
    plan = EpochPlan(ds, spec, 0, 0, 1, CandidateCache(), avoid=avoid)
    batch = plan.samples(0, plan.shard_length)
    assert batch == [plan.sample(i) for i in range(plan.shard_length)]
    assert batch[0].substituted == "quarantined" and all(s.record.path not in avoid for s in batch)


def test_cursor_batches_use_the_batch_draw(ds: DatasetIndex) -> None:
    spec = SamplingSpec(patch_size=64, samples_per_epoch=50, seed=1)
    cursor = ShardCursor(EpochPlan(ds, spec, 0, 0, 1, CandidateCache()), batch_size=16)
    plan = cursor.plan
    got = []
    while (batch := cursor.next_batch()) is not None:
        got.extend(batch)
    assert got == [plan.sample(i) for i in range(plan.shard_length)]


# --- augmentation parameters ---------------------------------------------------------------------------------
@pytest.mark.parametrize("config", CONFIGS)
def test_draw_params_batch_equals_draw_params_field_for_field(config: AugmentConfig) -> None:
    for seed, epoch in ((0, 0), (7, 3), (2**62 + 3, 1)):
        indices = [0, 1, 5, *range(100, 3000, 7), 2**33]
        batch = draw_params_batch(config, seed, epoch, indices)
        assert isinstance(batch, ParamsBatch) and len(batch) == len(indices)
        for i, got in zip(indices, batch):
            want = draw_params(config, seed, epoch, i)
            assert got == want
            for field in dataclasses.fields(AugmentParams):
                assert type(getattr(got, field.name)) is type(getattr(want, field.name))
        assert np.array_equal(params_table(list(batch)), batch.table)


def test_params_batch_is_a_sequence_of_params() -> None:
    batch = draw_params_batch(CONFIGS[0], 1, 2, list(range(10)))
    assert batch[-1] == batch[9] and batch[2:4] == [batch[2], batch[3]]
    assert batch == list(batch)
    with pytest.raises(IndexError):
        batch[10]
    with pytest.raises(ValueError, match="columns"):
        ParamsBatch(np.zeros((2, 3)))
    assert batch.table.shape == (10, len(TABLE_COLUMNS)) and not batch.table.flags.writeable


def test_a_config_outside_the_ranges_fails_as_draw_params_does() -> None:
    bad = AugmentConfig.preset("pathology")
    object.__setattr__(bad, "brightness", 1.5)  # draws factors <= 0 (AugmentConfig itself refuses 1.5)
    with pytest.raises(ValueError, match="brightness"):
        [draw_params(bad, 0, 0, i) for i in range(200)]
    with pytest.raises(ValueError, match="brightness"):
        draw_params_batch(bad, 0, 0, list(range(200)))


@pytest.mark.parametrize("config", CONFIGS)
def test_coefficients_equal_the_per_sample_matrices(config: AugmentConfig) -> None:
    params = list(draw_params_batch(config, 3, 1, list(range(4000)))) + [AugmentParams()]
    want_colour = np.stack([_colour_matrix(p)[:3, :] for p in params]).astype(np.float32)
    want_hed = np.stack([_hed_matrix(p) for p in params]).astype(np.float32)
    assert np.array_equal(colour_coefficients(params), want_colour)
    assert np.array_equal(hed_coefficients(params), want_hed)
    for table in (params_table(params), ParamsBatch(params_table(params)).table):  # the CPU path's kernel
        kernel_colour, kernel_hed = coefficients(table)
        assert np.array_equal(kernel_colour, want_colour) and np.array_equal(kernel_hed, want_hed)
    assert colour_coefficients([]).shape == hed_coefficients([]).shape == (0, 3, 4)


def test_geometry_maps_and_blur_kernels_equal_the_per_sample_ones() -> None:
    params = draw_params_batch(CONFIGS[2], 0, 0, list(range(300)))
    for hw in ((5, 7), (256, 256), (1, 3)):
        want = []
        for p in params:
            (y0, x0), (y1, x1), (y2, x2) = (aug_to_raw_point(p, hw, i, j) for i, j in ((0, 0), (1, 0), (0, 1)))
            want.append((y0, y1 - y0, y2 - y0, x0, x1 - x0, x2 - x0))
        assert np.array_equal(geometry_maps(params, hw), np.array(want))
    radius = halos(params.table)
    assert radius.tolist() == [p.halo() for p in params]
    for r in set(radius.tolist()) - {0}:
        group = ParamsBatch(params.table[radius == r].copy())
        assert np.array_equal(_kernels_of(group), np.stack([gaussian_kernel(p.blur_sigma) for p in group]))


# --- hand-offs -----------------------------------------------------------------------------------------------
def test_handoff_pool_runs_work_returns_errors_and_cleans_up() -> None:
    pool = HandoffPool(3, thread_name_prefix="test")
    assert [f.result(timeout=10) for f in [pool.submit(pow, 2, i) for i in range(50)]] == [2**i for i in range(50)]
    failing = pool.submit(int, "not a number")
    with pytest.raises(ValueError):
        failing.result(timeout=10)
    gate = threading.Event()
    started = threading.Barrier(4)  # the three workers and this thread: every blocker is running

    def block() -> bool:
        started.wait(10)
        return gate.wait(10)

    blockers = [pool.submit(block) for _ in range(3)]
    started.wait(10)
    queued = [pool.submit(time.sleep, 0) for _ in range(5)]
    pool.shutdown(wait=False, cancel_futures=True)
    assert all(f.cancelled() for f in queued)
    with pytest.raises(RuntimeError, match="after shutdown"):
        pool.submit(time.sleep, 0)
    gate.set()
    assert all(f.result(timeout=10) for f in blockers)
    pool.shutdown(wait=True)
    assert not any(t.is_alive() for t in pool._threads)
    assert not pool._pipe._close.alive  # its pipe's two descriptors were closed by the last worker


def test_wakeup_waits_with_a_timeout_and_ignores_sets_after_close() -> None:
    wake = Wakeup()
    started = time.monotonic()
    assert wake.wait(0.05) is False and time.monotonic() - started >= 0.04
    wake.set()
    wake.set()
    assert wake.wait(1.0) is True
    assert wake.wait(0.01) is False  # both sets were consumed by one wait
    threading.Timer(0.05, wake.set).start()
    assert wake.wait(5.0) is True
    wake.close()
    wake.set()  # a build ending after its session: ignored, no write to a closed descriptor
    assert wake.wait(0.01) is False


# --- the tile cache ------------------------------------------------------------------------------------------
def test_get_many_is_get_of_each_key() -> None:
    cache = TileCache(3 * 16)
    tiles = {k: np.full(16, k, np.uint8) for k in range(4)}
    for k in range(3):
        cache.put(k, tiles[k])
    got = cache.get_many([0, 9, 2])
    assert got[1] is None and np.array_equal(got[0], tiles[0]) and np.array_equal(got[2], tiles[2])
    stats = cache.stats()
    assert (stats.hits, stats.misses) == (2, 1)
    cache.put(3, tiles[3])  # evicts the least recently used: 1 (0 and 2 were just used)
    assert 1 not in cache and 0 in cache and 2 in cache
