"""The fused CPU stain kernels against the torch ops they replace (the reference, ``cpu_kernels=False``).

Stated tolerance (``stain_kernels``' docstring, docs/pathology.md): at most 1 grey level on any pixel, mean
absolute difference < 0.05 over a batch. The step tables that turn OD and linear RGB into grey levels are
exact: checked on every float32 of a range against the torch ops."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from loader_service.augment import stain_kernels
from loader_service.augment.stain import BACKGROUND, StainConfig, fit_target, normalise_batch, rgb_to_lab
from tests.test_stain import E_OTHER, E_REF, H_OTHER, H_REF, beer_lambert

MAX_DIFF = 1
MEAN_DIFF = 0.05


def blocky_he(n: int, size: int, seed: int, background: float = 0.25) -> torch.Tensor:
    """H&E-like uint8 (n, size, size, 3): Beer–Lambert, concentrations constant over 4×4 blocks times texture,
    a ``background`` fraction of blocks unstained, plus sensor noise."""
    rng = np.random.default_rng(seed)
    b = max(1, size // 4)
    conc = np.stack([rng.uniform(0, 1.4, (n, b, b)), rng.uniform(0, 0.9, (n, b, b))], axis=-1)
    conc *= rng.random((n, b, b))[..., None] >= background
    conc = conc.repeat(4, axis=1).repeat(4, axis=2)[:, :size, :size] * rng.uniform(0.5, 1.0, (n, size, size, 1))
    h, e = H_OTHER / np.linalg.norm(H_OTHER), E_OTHER / np.linalg.norm(E_OTHER)
    pixels = 240.0 * np.exp(-(conc @ np.stack([h, e]))) + rng.normal(0, 3.0, (n, size, size, 3))
    return torch.from_numpy(np.clip(np.round(pixels), 0, 255).astype(np.uint8))


def assert_close_to_reference(images: torch.Tensor, config: StainConfig, layout: str = "NHWC") -> torch.Tensor:
    got = normalise_batch(images, config, layout)
    want = normalise_batch(images, config, layout, cpu_kernels=False)
    assert got.shape == want.shape and got.dtype == torch.uint8 and got.is_contiguous()
    diff = (got.int() - want.int()).abs()
    assert int(diff.max()) <= MAX_DIFF, f"{config.method}: max difference {int(diff.max())} grey levels"
    assert float(diff.float().mean()) < MEAN_DIFF, f"{config.method}: mean difference {float(diff.float().mean())}"
    return got


@pytest.fixture(scope="module")
def targets() -> dict[str, StainConfig]:
    reference = torch.from_numpy(beer_lambert(H_REF, E_REF, 11, size=128))
    return {m: fit_target(m, reference) for m in ("macenko", "reinhard")}


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_kernels_stay_within_a_grey_level_of_the_torch_ops(method: str, targets: dict[str, StainConfig]) -> None:
    batches = [blocky_he(6, 96, seed=1), blocky_he(3, 128, seed=2, background=0.6),
               torch.from_numpy(beer_lambert(H_OTHER, E_OTHER, 3, size=80, n=3)),
               torch.from_numpy(beer_lambert(H_REF, E_REF, 4, size=64, n=2))]
    for batch in batches:
        got = assert_close_to_reference(batch, targets[method])
        assert not torch.equal(got, batch)  # it did normalise


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_kernels_handle_layouts_odd_sizes_and_strided_input(method: str, targets: dict[str, StainConfig]) -> None:
    batch = blocky_he(3, 72, seed=5)[:, :, :57]  # 72×57: odd width, a non-contiguous view
    nhwc = assert_close_to_reference(batch, targets[method])
    nchw = assert_close_to_reference(batch.permute(0, 3, 1, 2).contiguous(), targets[method], "NCHW")
    assert torch.equal(nchw, nhwc.permute(0, 3, 1, 2))
    assert torch.equal(normalise_batch(batch[1:2], targets[method])[0], nhwc[1])  # one image = in a batch


def test_macenko_kernels_pass_images_without_tissue_unchanged(targets: dict[str, StainConfig]) -> None:
    white = torch.full((2, 32, 32, 3), 245, dtype=torch.uint8)
    faint = blocky_he(1, 64, seed=6)
    faint[0, 1:], faint[0, 0, 40:] = 238, 238  # 40 tissue pixels left: fewer than MIN_TISSUE_PIXELS (64)
    mixed = torch.cat([white[:1], blocky_he(1, 32, seed=7), torch.zeros((1, 32, 32, 3), dtype=torch.uint8)])
    assert torch.equal(normalise_batch(white, targets["macenko"]), white)
    assert torch.equal(normalise_batch(faint, targets["macenko"]), faint)
    got = assert_close_to_reference(mixed, targets["macenko"])
    assert torch.equal(got[0], mixed[0]) and not torch.equal(got[1], mixed[1])


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_kernels_on_tiny_flat_and_empty_images(method: str, targets: dict[str, StainConfig]) -> None:
    for images in (blocky_he(2, 1, seed=8), blocky_he(2, 3, seed=9),
                   torch.full((2, 16, 16, 3), 255, dtype=torch.uint8), torch.zeros((1, 8, 8, 3), dtype=torch.uint8)):
        assert_close_to_reference(images, targets[method])
    flat = torch.full((1, 9, 9, 3), 120, dtype=torch.uint8)  # OD 0.69 everywhere: "tissue" for Macenko
    if method == "macenko":
        assert_close_to_reference(flat, targets[method])
        return
    # Reinhard on a flat image: its std is 0, and the torch ops' float32 sums leave rounding noise there (~1e-7)
    # that (lab - mean) / std amplifies to an arbitrary colour; the kernels (float64 sums) give the flat image of
    # the target's mean colour. The one documented exception to the tolerance.
    got = normalise_batch(flat, targets[method])
    assert torch.equal(got, got[:, :1, :1].expand_as(got))
    lab = rgb_to_lab(got[0, 0, 0].float() / 255)
    np.testing.assert_allclose(lab.numpy(), targets[method].target[:3], atol=1.0)
    empty = torch.zeros((0, 8, 8, 3), dtype=torch.uint8)
    assert normalise_batch(empty, targets[method]).shape == empty.shape


def test_step_tables_give_the_reference_grey_levels_exactly() -> None:
    tables = stain_kernels._tables()
    kernels = stain_kernels._compiled()
    rng = np.random.default_rng(0)
    od = np.concatenate([rng.uniform(-0.2, 7.0, 200_000), np.linspace(-0.1, 6.5, 100_000)]).astype(np.float32)
    want = (BACKGROUND * torch.exp(-torch.from_numpy(od))).round_().clamp_(0.0, 255.0).to(torch.uint8).numpy()
    got = 255 - np.searchsorted(tables["exp_steps"], od, side="right")
    np.testing.assert_array_equal(got, want)
    lin = np.concatenate([rng.uniform(0, 1, 200_000), np.linspace(0, 1, 100_000)]).astype(np.float32)
    t = torch.from_numpy(lin)
    want = (torch.where(t > 0.0031308, 1.055 * t ** (1 / 2.4) - 0.055, 12.92 * t) * 255.0).round_().clamp_(0, 255)
    np.testing.assert_array_equal(np.searchsorted(tables["gamma_steps"], lin, side="right"), want.numpy())
    # ... and the kernels' bucketed lookup (start of the bucket, at most 2 steps on) finds that count:
    levels = np.empty(lin.shape[0], np.int64)
    kernels.levels_kernel(lin, tables["gamma_steps"], tables["gamma_start"], np.float32(0.0), tables["gamma_scale"],
                          levels)
    np.testing.assert_array_equal(levels, want.numpy())
    levels = np.empty(od.shape[0], np.int64)
    kernels.levels_kernel(od, tables["exp_steps"], tables["exp_start"], tables["exp_lo"], tables["exp_scale"], levels)
    np.testing.assert_array_equal(255 - levels, (BACKGROUND * torch.exp(-torch.from_numpy(od))).round_()
                                  .clamp_(0.0, 255.0).numpy())


def test_kernels_are_deterministic_across_threads(targets: dict[str, StainConfig]) -> None:
    from concurrent.futures import ThreadPoolExecutor

    batch = blocky_he(4, 64, seed=10)
    for config in targets.values():
        once = normalise_batch(batch, config)
        with ThreadPoolExecutor(4) as pool:
            for again in pool.map(lambda _: normalise_batch(batch, config), range(8)):
                assert torch.equal(again, once)


@pytest.mark.parametrize("spread", [0.6, 3.0])  # 3.0: projections with u <= 0 too (the kernel's atan2-everywhere path)
def test_angle_percentiles_equal_torch_nanquantile_of_atan2(spread: float) -> None:
    rng = np.random.default_rng(12)
    count = np.array([5000, 1, 2, 777], np.int64)
    buf = rng.uniform(0.15, 2.0, (4, 5000, 3)).astype(np.float32)
    angle_turn = rng.uniform(-spread, spread, (4, 1))
    plane = np.zeros((4, 3, 2), np.float32)
    plane[:, :, 0] = np.array([0.6, 0.6, 0.5]) * np.cos(angle_turn) + np.array([0.7, -0.7, 0.0]) * np.sin(angle_turn)
    plane[:, :, 1] = np.array([0.7, -0.7, 0.0]) * np.cos(angle_turn) - np.array([0.6, 0.6, 0.5]) * np.sin(angle_turn)
    got = np.empty((4, 2), np.float32)
    stain_kernels._compiled().macenko_angle_kernel(buf, count, plane, np.float32(0.01), np.float32(0.99), got)
    for i, c in enumerate(count):
        proj = torch.from_numpy(buf[i, :c]) @ torch.from_numpy(plane[i])
        angles = torch.atan2(proj[:, 1], proj[:, 0])
        want = torch.nanquantile(angles, torch.tensor([0.01, 0.99]))
        np.testing.assert_allclose(got[i], want.numpy(), rtol=0, atol=2e-6)
    if spread > 1:
        assert (buf @ plane[..., :1] <= 0).any()  # the fallback path ran
