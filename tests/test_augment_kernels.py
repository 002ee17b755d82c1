"""The fused CPU kernels (numba) give the same bits as the torch ops they replace on the CPU."""

from __future__ import annotations

import itertools
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from loader_service.augment import AugmentConfig, AugmentParams, augment_batch, draw_params, to_nchw
from loader_service.augment import cpu_kernels
from loader_service.augment.pipeline import _augment_batch_torch, _blur, _blur_torch, _pointwise, _pointwise_torch


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _images(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Random pixels with saturated and dark values mixed in (the clips and the log floor)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, h, w, 3), dtype=torch.uint8, generator=g)
    x[:, : h // 4] = 255
    x[:, h // 4: h // 2, : w // 2] = 0
    return x


def _reference(batch: torch.Tensor, params: list[AugmentParams], layout: str = "NHWC") -> torch.Tensor:
    x = batch.permute(0, 3, 1, 2) if layout == "NHWC" else batch
    return _augment_batch_torch(x, params, params[0].output_size(x.shape[2], x.shape[3]))


def _equal(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype
    diff = (a.int() - b.int()).abs()
    assert torch.equal(a, b), f"{int((diff > 0).sum())} values differ, max by {int(diff.max())}"


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
def test_batch_equals_torch_ops_bit_for_bit(layout: str) -> None:
    config = AugmentConfig(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, hed_sigma=0.2, hed_bias=0.05,
                           blur_prob=0.5, blur_sigma=(0.1, 3.0))
    params = [draw_params(config, 7, 1, i) for i in range(24)]
    assert {p.geometry_key for p in params} and any(p.halo() for p in params) and not all(p.halo() for p in params)
    batch = _images(24, 40, 40)
    if layout == "NCHW":
        batch = batch.permute(0, 3, 1, 2).contiguous()
    _equal(augment_batch(batch, params, layout=layout), _reference(batch, params, layout))


@pytest.mark.parametrize("flip_h,flip_v,k", list(itertools.product([False, True], [False, True], range(4))))
def test_every_geometry_on_non_square_images(flip_h: bool, flip_v: bool, k: int) -> None:
    params = [AugmentParams(flip_h=flip_h, flip_v=flip_v, rot90_k=k, brightness=1.2, hue=0.05,
                            hed_alpha=(1.05, 0.97, 1.0), hed_beta=(0.01, -0.01, 0.0), blur_sigma=s)
              for s in (0.0, 0.7)]
    batch = _images(2, 13, 29, seed=k)
    out = augment_batch(batch, params)
    assert tuple(out.shape) == (2, 3, *params[0].output_size(13, 29))
    _equal(out, _reference(batch, params))


def test_identity_and_partial_identity_batches() -> None:
    batch = _images(3, 16, 16)
    identity = [AugmentParams()] * 3
    _equal(augment_batch(batch, identity), batch.permute(0, 3, 1, 2))
    mixed = [AugmentParams(), AugmentParams(hed_alpha=(1.1, 1.0, 1.0)), AugmentParams(contrast=0.8)]
    _equal(augment_batch(batch, mixed), _reference(batch, mixed))


def test_blur_wider_than_the_image_and_tiny_images() -> None:
    params = [AugmentParams(blur_sigma=4.5, brightness=0.9), AugmentParams(blur_sigma=4.4, saturation=1.3)]
    for h, w in ((1, 1), (2, 7), (5, 3)):
        batch = _images(2, h, w)
        _equal(augment_batch(batch, params), _reference(batch, params))


def test_stages_equal_their_torch_versions() -> None:
    params = [draw_params(AugmentConfig(hed_sigma=0.3, blur_prob=1.0), 3, 0, i) for i in range(4)]
    by_radius = [p for p in params if p.halo() == params[0].halo()]
    x = _images(len(by_radius), 21, 17).permute(0, 3, 1, 2)  # a non-contiguous NCHW view
    f = _pointwise(x, by_radius)
    assert torch.equal(f, _pointwise_torch(x, by_radius))
    r = by_radius[0].halo()
    padded = torch.nn.functional.pad(f, (r, r, r, r), mode="reflect")
    assert torch.equal(_blur(padded, by_radius), _blur_torch(padded, by_radius))


def test_threads_running_kernels_at_once_agree() -> None:
    params = [draw_params(AugmentConfig(blur_prob=0.3), 0, 0, i) for i in range(8)]
    batch = _images(8, 64, 64)
    expected = augment_batch(batch, params)
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda _: augment_batch(batch, params), range(8)))
    for out in outs:
        _equal(out, expected)


def test_warm_up_and_geometry_maps() -> None:
    cpu_kernels.warm_up()
    p = AugmentParams(flip_h=True, rot90_k=1)
    a, b, c, d, e, f = cpu_kernels.geometry_maps([p], (4, 6))[0]
    raw = np.arange(24).reshape(4, 6)
    aug = np.rot90(np.fliplr(raw), 1)
    for i, j in itertools.product(range(aug.shape[0]), range(aug.shape[1])):
        assert aug[i, j] == raw[a + b * i + c * j, d + e * i + f * j]


def test_to_nchw_equals_the_permuted_copy() -> None:
    x = _images(3, 7, 5)
    out = to_nchw(x)
    assert out.is_contiguous() and torch.equal(out, x.permute(0, 3, 1, 2))
    strided = x[:, ::2]  # not contiguous: the torch path
    assert torch.equal(to_nchw(strided), strided.permute(0, 3, 1, 2))
    out[0, 0, 0, 0] ^= 1  # a copy, not a view
    assert not torch.equal(out, x.permute(0, 3, 1, 2))


def test_kernel_constants_equal_colour_constants() -> None:
    """The kernels keep their own copy (numba's disk cache only tracks their file): it must not drift."""
    from loader_service.augment import _numba_kernels, colour

    for name, value in _numba_kernels.CONSTANTS.items():
        assert getattr(colour, name) == value, name


def test_empty_images_are_rejected_with_a_message() -> None:
    with pytest.raises(ValueError, match="at least 1x1"):
        augment_batch(torch.zeros((2, 4, 0, 3), dtype=torch.uint8), [AugmentParams(blur_sigma=1.0)] * 2)
