"""Locality sampling: several patches cut from one region, shuffled across a window of regions."""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
import torch

from loader_service.dataset import DatasetIndex, SlideHandles
from loader_service.errors import InvalidRequest
from loader_service.metrics import Metrics
from loader_service.pipeline import BatchBuilder
from loader_service.requests import parse_open
from loader_service.sampling import CandidateCache, EpochPlan, Sample, SamplingSpec, ShardCursor
from loader_service.server import LoaderServer
from trainer_client import LoaderClient, StreamConfig
from wsi_loader.v1 import loader_pb2 as pb

K, WINDOW = 4, 4  # 128² regions of four 64² patches, four regions shuffled together


def local(**kw: Any) -> SamplingSpec:
    values: dict[str, Any] = dict(patch_size=64, samples_per_epoch=96, seed=3, patches_per_region=K,
                                  locality_window=WINDOW)
    values.update(kw)
    return SamplingSpec(**values)


def plan(ds: DatasetIndex, spec: SamplingSpec, rank: int = 0, world: int = 1, epoch: int = 1) -> EpochPlan:
    return EpochPlan(ds, spec, epoch, rank, world, CandidateCache())


def key(s: Sample) -> tuple[str, int, int, tuple[int, int, int, int] | None]:
    return s.record.slide_id, s.x, s.y, s.region


@pytest.fixture(scope="module")
def ds(server: LoaderServer) -> DatasetIndex:
    return server.datasets["train"]


def test_k1_is_the_independent_sampling_of_before(ds: DatasetIndex) -> None:
    p = plan(ds, SamplingSpec(patch_size=64, samples_per_epoch=48, seed=3))
    got = [(s.record.slide_id, s.x, s.y, s.region) for s in (p.sample(i) for i in range(6))]
    # Produced by EpochPlan before locality sampling existed (same fixture dataset, seed 3, epoch 1).
    before = [("slides/slide_0001_tumor.tiff", 1492, 822), ("slides/slide_0002_normal.tiff", 1440, 992),
              ("slides/slide_0000_normal.tiff", 1379, 860), ("slides/slide_0002_normal.tiff", 1384, 731),
              ("slides/slide_0000_normal.tiff", 672, 1237), ("slides/slide_0001_tumor.tiff", 583, 824)]
    assert got == [(*b, None) for b in before]


def test_samples_are_a_pure_function_of_seed_epoch_and_index(ds: DatasetIndex) -> None:
    first = plan(ds, local())
    forward = [key(first.sample(i)) for i in range(96)]
    fresh = plan(ds, local())
    backward = [key(fresh.sample(i)) for i in reversed(range(96))][::-1]  # no dependence on call order or caches
    assert forward == backward
    other_seed, other_epoch = plan(ds, local(seed=4)), plan(ds, local(), epoch=2)
    assert [key(other_seed.sample(i)) for i in range(96)] != forward
    assert [key(other_epoch.sample(i)) for i in range(96)] != forward


def test_groups_hold_window_regions_of_k_patches_in_shuffled_order(ds: DatasetIndex) -> None:
    p = plan(ds, local())
    samples = [p.sample(i) for i in range(96)]
    for g in range(96 // (K * WINDOW)):
        group = samples[g * K * WINDOW:(g + 1) * K * WINDOW]
        per_region = Counter((s.record.slide_id, s.region) for s in group)
        assert len(per_region) == WINDOW and set(per_region.values()) == {K}
        # the four patches of a region are distinct cells of its 2×2 grid: no overlap
        for region in per_region:
            cells = {(s.x, s.y) for s in group if (s.record.slide_id, s.region) == region}
            assert len(cells) == K
    # consecutive samples usually come from different regions (sequential order would give 3 repeats in 4)
    repeats = sum(a.region == b.region and a.record == b.record for a, b in zip(samples, samples[1:]))
    assert repeats < len(samples) // 2


def test_patches_lie_inside_their_region_and_the_slide(ds: DatasetIndex) -> None:
    for spec in (local(), local(patches_per_region=3, locality_region_size=100), local(patches_per_region=9)):
        p = plan(ds, spec)
        for i in range(p.shard_length):
            s = p.sample(i)
            assert s.region is not None
            rx, ry, rw, rh = s.region
            assert (rh, rw) == spec.region_shape
            assert rx <= s.x and s.x + s.width <= rx + rw and ry <= s.y and s.y + s.height <= ry + rh
            info = s.record.info
            assert info is not None
            assert 0 <= rx and rx + rw <= info.levels[0].width and 0 <= ry and ry + rh <= info.levels[0].height


def test_rank_shards_are_disjoint_and_their_union_is_the_epoch(ds: DatasetIndex) -> None:
    spec = local(samples_per_epoch=90)
    whole = plan(ds, spec)
    everything = [key(whole.sample(i)) for i in range(whole.shard_length)]
    shards = [plan(ds, spec, rank, 3) for rank in range(3)]
    assert [p.shard_length for p in shards] == [30, 30, 30]
    interleaved = [key(shards[i % 3].sample(i // 3)) for i in range(90)]
    assert interleaved == everything


def test_resume_from_a_cursor_repeats_nothing_and_skips_nothing(ds: DatasetIndex) -> None:
    full = ShardCursor(plan(ds, local(), 1, 2), batch_size=8)
    expected = [key(s) for batch in iter(full.next_batch, None) for s in batch]
    head = ShardCursor(plan(ds, local(), 1, 2), batch_size=8)
    got = [key(s) for _ in range(2) for s in head.next_batch() or []]
    resumed = ShardCursor(plan(ds, local(), 1, 2), batch_size=8, cursor=head.state_dict()["cursor"])
    got += [key(s) for batch in iter(resumed.next_batch, None) for s in batch]
    assert got == expected and len(got) == 48


def test_locality_needs_random_mode_and_a_region_that_fits() -> None:
    with pytest.raises(ValueError, match="random mode only"):
        SamplingSpec(mode="grid", patches_per_region=4)
    with pytest.raises(ValueError, match="locality_region_size 32 is smaller"):
        SamplingSpec(patch_size=64, patches_per_region=4, locality_region_size=32)
    with pytest.raises(InvalidRequest, match="patches_per_region"):
        parse_open(pb.OpenSession(dataset="train", patch_size=256, mode=pb.GRID, patches_per_region=4), 2**30, 2**26)
    request = parse_open(pb.OpenSession(dataset="train", patch_size=256, patches_per_region=4), 2**30, 2**26)
    assert request.spec.patches_per_region == 4 and request.spec.locality_window == 16


def _counting_builder(threads: int) -> tuple[BatchBuilder, Counter[str], ThreadPoolExecutor]:
    """A builder over its own slide handles whose real slides count their read_region calls."""
    handles = SlideHandles(16, None, None)
    reads: Counter[str] = Counter()
    opened = handles.get

    def get(path: Any, *args: Any) -> Any:  # (path, roots, mpp): the roots re-check at every get
        slide = opened(path, *args)
        if not hasattr(slide, "_counted"):
            real = slide.read_region

            def read_region(*args: Any, **kwargs: Any) -> np.ndarray:
                reads[str(path)] += 1
                return real(*args, **kwargs)

            slide.read_region, slide._counted = read_region, True  # type: ignore[method-assign, attr-defined]
        return slide

    handles.get = get  # type: ignore[method-assign]
    pool = ThreadPoolExecutor(threads)
    return BatchBuilder(handles, pool, torch.device("cpu"), Metrics()), reads, pool


def test_a_batch_reads_each_region_once_with_the_pixels_of_separate_reads(ds: DatasetIndex) -> None:
    p = plan(ds, local())
    batches = [[p.sample(i) for i in range(b * K * WINDOW, (b + 1) * K * WINDOW)] for b in range(3)]
    results = []
    for threads in (1, 4):
        builder, reads, pool = _counting_builder(threads)
        with pool:
            pixels = [builder.read(batch) for batch in batches]
        results.append(pixels)
        for batch in batches:  # whole groups: every region's four patches are in the batch
            assert len({(s.record.path, s.region) for s in batch}) == WINDOW
        assert sum(reads.values()) == 3 * WINDOW  # one read per region, not one per patch
    for a, b in zip(*results):
        assert torch.equal(a, b)
    handles = SlideHandles(16, None, None)
    for batch, pixels in zip(batches, results[0]):
        for s, got in zip(batch, pixels):
            alone = handles.get(s.record.path).read_region(s.level, s.x, s.y, s.width, s.height)
            assert np.array_equal(got.numpy(), alone)


def test_stream_with_locality_serves_the_planned_patches(client: LoaderClient, ds: DatasetIndex) -> None:
    cfg = StreamConfig(dataset="train", batch_size=16, patch_size=64, samples_per_epoch=48, seed=3, level=0,
                       transport="grpc", augment=False, timeout_s=60, patches_per_region=K, locality_window=WINDOW)
    with client.stream(cfg, epoch=1) as stream:
        batches = list(stream)
    coords = [(sid, int(x), int(y)) for b in batches for sid, x, y in zip(b["slide_id"], b["x"], b["y"])]
    p = plan(ds, local(samples_per_epoch=48))
    assert coords == [(s.record.slide_id, s.x, s.y) for s in (p.sample(i) for i in range(48))]
    for b in batches:
        for i in range(len(b["slide_id"])):
            region = client.read_region("train", b["slide_id"][i], int(b["x"][i]), int(b["y"][i]), 64, 64)
            assert np.array_equal(region.permute(2, 0, 1).numpy(), b["images"][i].numpy())
