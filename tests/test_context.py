"""Multi-scale context: aligned patches at coarser resolutions, re-read equal, augmented like their sample."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from trainer_client import InvalidRequestError, StreamConfig


def _batches(client: Any, n: int = 2, **kw: Any) -> list[dict[str, Any]]:
    kw = {"augment": False, "mode": "grid", "grid_stride": 64, "level": 0, "tissue_threshold": 0.5, "batch_size": 6,
          **kw}
    kw = {"transport": "grpc", **kw}
    stream = client.stream(StreamConfig(dataset="train", patch_size=64, **kw))
    batches = [b for _, b in zip(range(n), stream)]
    stream.close()
    return batches


def _reread(client: Any, slide_id: str, place: tuple[int, float, int, int, int]) -> torch.Tensor:
    level, mpp, x, y, size = place
    return client.read_region("train", slide_id, x, y, size, size, level=level, mpp=mpp).permute(2, 0, 1)


def test_context_patches_are_centred_and_equal_read_regions_at_each_level(client: Any) -> None:
    scales = ((4.0, 64), (2.0, 32), (3.0, 40))  # levels 2 and 1; 3× is no level: read at 3× the level-0 mpp
    for batch in _batches(client, context=scales):
        assert len(batch["context"]) == 3
        for (factor, size), tensor, places in zip(scales, batch["context"], batch["context_place"]):
            assert tensor.shape == (6, 3, size, size) and tensor.dtype == torch.uint8
            for j, place in enumerate(places):
                level, mpp, x, y, _ = place
                assert (level, mpp > 0) == ({4.0: 2, 2.0: 1}.get(factor, 0), factor == 3.0)
                centre = int(batch["x"][j]) + 32
                assert abs((x + size / 2) * factor - centre) < factor  # the same centre, to a coarse pixel
                assert torch.equal(tensor[j], _reread(client, batch["slide_id"][j], place))


def test_every_scale_gets_the_samples_augmentation(client: Any) -> None:
    from loader_service.augment import AugmentConfig, augment_image, draw_params

    config = {"preset": "pathology", "blur_prob": 0.5}
    batch = _batches(client, n=1, augment=True, augment_config=config, seed=11, context=((4.0, 64),))[0]
    params = [draw_params(AugmentConfig.from_dict(config), 11, 0, int(i)) for i in batch["index"]]
    assert len({p.geometry_key for p in params}) > 1  # the batch mixes flips and rotations
    for j, p in enumerate(params):
        raw = client.read_region("train", batch["slide_id"][j], int(batch["x"][j]), int(batch["y"][j]), 64, 64)
        assert torch.equal(batch["images"][j], augment_image(raw, p))
        ctx_raw = _reread(client, batch["slide_id"][j], batch["context_place"][0][j]).permute(1, 2, 0)
        assert torch.equal(batch["context"][0][j], augment_image(ctx_raw, p))


def test_context_with_stain_and_float_output(client: Any) -> None:
    batch = _batches(client, n=1, context=((2.0, 64),), stain="reinhard", stain_fit_samples=8, dtype="float32",
                     mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))[0]
    assert batch["context"][0].dtype == torch.float32 and batch["context"][0].shape == (6, 3, 64, 64)
    assert batch["context"][0].abs().max() < 2.01


def test_bad_context_requests_are_invalid_argument(client: Any) -> None:
    with pytest.raises(InvalidRequestError, match="whole slide"):
        _batches(client, view="image", batch_size=1, whole_slide=True, level=2, context=((4.0, 64),))
    with pytest.raises(InvalidRequestError, match="scale or crop"):
        _batches(client, augment=True, augment_config={"scale": 0.2}, context=((4.0, 64),))
    with pytest.raises(InvalidRequestError, match="context factor"):
        _batches(client, context=((0.5, 64),))


def test_context_on_a_shared_memory_session_equals_grpc(client: Any) -> None:
    from trainer_client.shm import shm_supported

    if not shm_supported():
        pytest.skip("no shared /dev/shm here")
    via_grpc = _batches(client, n=1, context=((4.0, 32),), augment=True, seed=5)[0]
    via_shm = _batches(client, n=1, context=((4.0, 32),), augment=True, seed=5, transport="shm")[0]
    assert torch.equal(via_grpc["images"], via_shm["images"])
    assert torch.equal(via_grpc["context"][0], via_shm["context"][0])


@pytest.mark.parametrize("other", [dict(context=((2.0, 64),)), dict(unservable="fallback"),
                                   dict(stain="reinhard")])
def test_ranks_of_one_job_must_agree_on_context_stain_unservable(client: Any, other: dict) -> None:
    base = dict(dataset="train", patch_size=64, batch_size=4, samples_per_epoch=4000, augment=False, transport="grpc",
                job_id=f"job-{sorted(other)[0]}", context=((4.0, 64),))
    with client.stream(StreamConfig(**base), rank=0, world_size=2) as a, \
            client.stream(StreamConfig(**{**base, **other}), rank=1, world_size=2) as b:
        first = iter(a)  # keep rank 0's session open
        next(first)
        with pytest.raises(InvalidRequestError, match="disagrees"):
            next(iter(b))


def test_context_counts_in_the_message_size_limit_at_open(client: Any) -> None:
    from trainer_client import ResourceExhaustedError

    with pytest.raises(ResourceExhaustedError, match="max_batch_bytes") as info:  # 3 GiB of context, 0.4 MiB images
        _batches(client, n=1, batch_size=32, context=((2.0, 4096), (4.0, 4096)))
    assert "context" in str(info.value)


def test_context_counts_in_the_memory_budget(dataset_dir: Any) -> None:
    from loader_service.server import LoaderServer
    from tests.conftest import make_config
    from trainer_client import LoaderClient

    with LoaderServer(make_config(dataset_dir, max_inflight_mb=4)) as srv, \
            LoaderClient(f"127.0.0.1:{srv.port}", timeout_s=30) as small:
        with pytest.raises(Exception, match="max_inflight_mb"):  # 6 MiB of context per batch, 0.1 MiB of images
            _batches(small, n=1, batch_size=8, context=((2.0, 512),))
        assert srv.budget.used == 0
        batch = _batches(small, n=1, batch_size=8, context=((2.0, 64),))[0]  # what fits is served
        assert batch["context"][0].shape == (8, 3, 64, 64)


def test_message_bytes_count_images_context_and_masks() -> None:
    from loader_service.requests import parse_open
    from wsi_loader.v1 import loader_pb2 as pb

    config = StreamConfig(dataset="train", batch_size=4, patch_size=64, context=((2.0, 32), (4.0, 16)),
                          dtype="float16", masks=True)
    request = parse_open(config.open_message(0, 0, 1, 0, pb.GRPC), 2**30, 2**26)  # type: ignore[arg-type]
    images, context, masks = 4 * 3 * 64 * 64 * 2, 4 * 3 * (32 * 32 + 16 * 16) * 2, 4 * 64 * 64
    assert request.tensor_bytes() == images and request.message_bytes() == images + context + masks
