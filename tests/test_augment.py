"""Tests of loader_service.augment: parameters, each op, batch == per-sample, pieces == whole."""

from __future__ import annotations

import itertools
import json
import math
import random
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from loader_service.augment import (
    AugmentConfig,
    AugmentParams,
    Rect,
    augment_batch,
    augment_image,
    draw_params,
    render_piece,
    source_rect,
    to_output,
)
from loader_service.augment.bench import measure_throughput
from loader_service.augment.colour import HED_FROM_RGB, RGB_FROM_HED, exp2, log2

NONE = AugmentConfig.preset("none")


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread() -> Iterator[None]:
    """These tests run thousands of small ops; on a busy 2-core box OpenMP's thread hand-offs
    make them ~6x slower than one thread. (Results do not depend on the thread count: see
    test_blocking_and_threads_do_not_change_results.)"""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _raw(h: int, w: int, seed: int = 0) -> torch.Tensor:
    """A smooth-ish random RGB image (uint8 HWC) with texture, edges and saturated pixels."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.int32)
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    ramp = torch.stack([yy * 255 // max(h - 1, 1), xx * 255 // max(w - 1, 1), (yy + xx) % 256], -1)
    return ((noise + ramp) // 2).clamp(0, 255).to(torch.uint8)


def _params(**kw: object) -> AugmentParams:
    return AugmentParams(**kw)  # type: ignore[arg-type]


def _chw(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a.transpose(2, 0, 1))


# ---------------------------------------------------------------------------------------------
# Config and params
# ---------------------------------------------------------------------------------------------
def test_config_presets_and_roundtrip() -> None:
    assert AugmentConfig.preset("pathology") == AugmentConfig()
    assert NONE.is_identity and not AugmentConfig().is_identity
    for cfg in (AugmentConfig(), NONE, AugmentConfig(hue=0.1, blur_sigma=(1, 2))):
        wire = json.loads(json.dumps(cfg.to_dict()))
        assert AugmentConfig.from_dict(wire) == cfg
    assert AugmentConfig.from_dict(None) == AugmentConfig()
    over = AugmentConfig.from_dict({"preset": "none", "flip": True})
    assert over.flip and not over.rot90 and over.brightness == 0.0
    with pytest.raises(ValueError, match="unknown augmentation preset"):
        AugmentConfig.preset("heavy")


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"brightness": 1.5}, r"brightness must be .*\[0, 1\)"),
        ({"contrast": -0.1}, "contrast"),
        ({"hue": 0.7}, r"hue must be .*turns"),
        ({"hed_sigma": float("nan")}, "hed_sigma"),
        ({"blur_prob": 2}, "blur_prob"),
        ({"blur_sigma": (2.0, 1.0)}, r"blur_sigma must be a pair \(low, high\)"),
        ({"blur_sigma": (0.0, 1.0)}, "blur_sigma"),
        ({"flip": "yes"}, "flip must be true or false"),
        ({"saturation": True}, "saturation"),
    ],
)
def test_config_validation(kw: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        AugmentConfig(**kw)  # type: ignore[arg-type]


def test_config_from_dict_rejects_unknown_keys() -> None:
    with pytest.raises(ValueError, match="unknown AugmentConfig keys.*valid keys"):
        AugmentConfig.from_dict({"brightnes": 0.2})


def test_params_roundtrip_validation_and_geometry_helpers() -> None:
    p = draw_params(AugmentConfig(blur_prob=1.0), 3, 1, 4)
    assert AugmentParams.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    assert p.halo() == math.ceil(3 * p.blur_sigma) and AugmentParams().halo() == 0
    assert _params(rot90_k=1).output_size(300, 220) == (220, 300)
    assert _params(rot90_k=2).output_size(300, 220) == (300, 220)
    for bad in ({"rot90_k": 4}, {"blur_sigma": -1.0}, {"hed_alpha": (1.0, 1.0)}, {"brightness": 0.0},
                {"flip_h": 1}):
        with pytest.raises(ValueError):
            _params(**bad)
    with pytest.raises(ValueError, match="unknown AugmentParams keys"):
        AugmentParams.from_dict({"blur": 1.0})


# ---------------------------------------------------------------------------------------------
# Determinism of the draws
# ---------------------------------------------------------------------------------------------
def test_draw_params_is_deterministic_and_order_free() -> None:
    cfg = AugmentConfig(blur_prob=0.5)
    keys = [(s, e, i) for s in (0, 7) for e in (0, 1) for i in range(40)]
    forward = [draw_params(cfg, *k) for k in keys]
    shuffled = keys[:]
    random.Random(1).shuffle(shuffled)
    by_key = {k: draw_params(cfg, *k) for k in shuffled}
    assert [by_key[k] for k in keys] == forward
    with ThreadPoolExecutor(max_workers=4) as pool:
        threaded = list(pool.map(lambda k: draw_params(cfg, *k), keys))
    assert threaded == forward
    assert draw_params(cfg, 0, 0, 0) != draw_params(cfg, 0, 0, 1)
    assert draw_params(cfg, 0, 0, 0) != draw_params(cfg, 0, 1, 0)
    assert draw_params(cfg, 0, 0, 0) != draw_params(cfg, 1, 0, 0)
    assert len(set(forward)) == len(forward)
    with pytest.raises(ValueError, match="non-negative"):
        draw_params(cfg, -1, 0, 0)


def test_draw_params_ranges_and_independence_of_ops() -> None:
    cfg = AugmentConfig()
    draws = [draw_params(cfg, 5, 0, i) for i in range(2000)]
    assert 0.45 < np.mean([p.flip_h for p in draws]) < 0.55
    assert {p.rot90_k for p in draws} == {0, 1, 2, 3}
    assert 0.07 < np.mean([p.blur_sigma > 0 for p in draws]) < 0.13
    assert all(0.9 <= p.brightness <= 1.1 and abs(p.hue) <= 0.02 for p in draws)
    assert all(0.97 <= a <= 1.03 for p in draws for a in p.hed_alpha)
    assert all(abs(b) <= 0.01 for p in draws for b in p.hed_beta)
    assert all(0.1 <= p.blur_sigma <= 1.5 for p in draws if p.blur_sigma)
    assert all(draw_params(NONE, 5, 0, i) == AugmentParams() for i in range(50))
    # Turning one op off leaves the others' draws unchanged.
    no_flip = AugmentConfig(flip=False)
    for i in range(20):
        a, b = draw_params(cfg, 5, 0, i), draw_params(no_flip, 5, 0, i)
        assert (a.rot90_k, a.brightness, a.hed_alpha, a.blur_sigma) == (b.rot90_k, b.brightness, b.hed_alpha,
                                                                       b.blur_sigma)


# ---------------------------------------------------------------------------------------------
# Each op does what it says
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flip_h, flip_v, k", list(itertools.product([False, True], [False, True], range(4))))
def test_geometry_matches_numpy(flip_h: bool, flip_v: bool, k: int) -> None:
    raw = _raw(7, 5, seed=k)
    ref = raw.numpy()
    if flip_h:
        ref = np.fliplr(ref)
    if flip_v:
        ref = np.flipud(ref)
    ref = np.rot90(ref, k)
    out = augment_image(raw, _params(flip_h=flip_h, flip_v=flip_v, rot90_k=k))
    assert out.dtype == torch.uint8 and tuple(out.shape[1:]) == _params(rot90_k=k).output_size(7, 5)
    np.testing.assert_array_equal(out.numpy(), _chw(ref))


def test_identity_params_and_zero_amplitudes_are_exact() -> None:
    raw = _raw(33, 41)
    assert torch.equal(augment_image(raw, AugmentParams()), raw.permute(2, 0, 1))
    # saturation amplitude 0 (and everything else off): identity whatever the seed
    cfg = AugmentConfig.from_dict({"preset": "none", "saturation": 0.0})
    assert torch.equal(augment_image(raw, draw_params(cfg, 0, 0, 3)), raw.permute(2, 0, 1))
    # blur sigma 0 is the identity, also next to blurred samples in a batch
    batch = torch.stack([raw, raw])
    out = augment_batch(batch, [AugmentParams(), _params(blur_sigma=1.0)])
    assert torch.equal(out[0], raw.permute(2, 0, 1)) and not torch.equal(out[1], out[0])
    # identity colour / HED next to jittered samples stays exact (identity coefficients, no skipping)
    jittered = draw_params(AugmentConfig(flip=False, rot90=False, blur_prob=0.0), 0, 0, 0)
    out = augment_batch(batch, [AugmentParams(), jittered])
    assert torch.equal(out[0], raw.permute(2, 0, 1)) and torch.equal(out[1], augment_image(raw, jittered))


def test_brightness_contrast_saturation_hue() -> None:
    raw = _raw(32, 32)
    base = raw.permute(2, 0, 1).float()
    up = augment_image(raw, _params(brightness=1.2)).float()
    down = augment_image(raw, _params(brightness=0.8)).float()
    assert up.mean() > base.mean() + 5 and down.mean() < base.mean() - 5
    # contrast pivots on a fixed mid-grey: pixels move away from 127.5, not from the image mean
    hi = augment_image(raw, _params(contrast=1.5)).float()
    assert hi.std() > base.std()
    assert bool((hi[base > 140] >= base[base > 140]).all()) and bool((hi[base < 115] <= base[base < 115]).all())
    # saturation 0 gives grey; hue leaves grey pixels alone
    grey = augment_image(raw, _params(saturation=0.0)).float()
    assert (grey.max(0).values - grey.min(0).values).max() <= 1
    greys = torch.arange(0, 256, 5, dtype=torch.uint8).repeat(3, 1).T.reshape(1, -1, 3).contiguous()
    assert torch.equal(augment_image(greys, _params(hue=0.25)), greys.permute(2, 0, 1))
    rotated = augment_image(raw, _params(hue=0.25)).float()
    assert (rotated - base).abs().mean() > 5
    luma = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)
    unclipped = (rotated > 0) & (rotated < 255)
    assert ((rotated * luma).sum(0) - (base * luma).sum(0))[unclipped.all(0)].abs().max() < 1.5


def test_colour_ops_are_pointwise() -> None:
    """A pixel's colour does not depend on the other pixels (contrast uses no image mean)."""
    raw = _raw(16, 16)
    other = raw.clone()
    other[:8] = 255 - other[:8]
    p = _params(brightness=1.1, contrast=1.3, saturation=0.7, hue=0.05, hed_alpha=(1.02, 0.98, 1.0),
                hed_beta=(0.01, -0.01, 0.0))
    assert torch.equal(augment_image(raw, p)[:, 8:], augment_image(other, p)[:, 8:])


def _hed_reference(rgb_u8: np.ndarray, alpha: tuple[float, ...], beta: tuple[float, ...]) -> np.ndarray:
    """float64 skimage rgb2hed -> alpha*s + beta -> hed2rgb (without clipping stains at 0)."""
    rgb = np.maximum(rgb_u8.astype(np.float64) / 255.0, 1e-6)
    adjust = np.log(1e-6)
    stains = (np.log(rgb) / adjust) @ HED_FROM_RGB
    stains = stains * np.asarray(alpha) + np.asarray(beta)
    out = np.exp((stains * adjust) @ RGB_FROM_HED)
    return np.clip(out * 255.0, 0, 255)


def test_hed_jitter() -> None:
    raw = _raw(40, 40)
    ident = augment_image(raw, _params(hed_alpha=(1.0, 1.0, 1.0), hed_beta=(0.0, 0.0, 0.0)))
    assert (ident.int() - raw.permute(2, 0, 1).int()).abs().max() <= 1
    alpha, beta = (1.03, 0.97, 1.01), (0.01, -0.01, 0.005)
    out = augment_image(raw, _params(hed_alpha=alpha, hed_beta=beta)).numpy()
    ref = _hed_reference(raw.numpy(), alpha, beta)
    assert np.abs(out.astype(np.float64) - _chw(ref)).max() <= 0.51
    assert np.abs(out.astype(int) - _chw(raw.numpy()).astype(int)).mean() > 1
    # the exact-arithmetic log2/exp2 are accurate
    x = torch.rand(10000) + 1e-6
    assert torch.allclose(log2(x).double(), torch.log2(x.double()), atol=2e-6, rtol=0)
    y = -20 * torch.rand(10000)
    assert torch.allclose(exp2(y).double(), torch.exp2(y.double()), rtol=1e-6, atol=0)


def test_blur_matches_reference_with_reflect_border() -> None:
    raw = _raw(24, 30)
    sigma = 1.3
    out = augment_image(raw, _params(blur_sigma=sigma)).numpy().astype(np.float64)
    r = math.ceil(3 * sigma)
    t = np.arange(-r, r + 1)
    k = np.exp(-t * t / (2 * sigma * sigma))
    k /= k.sum()
    img = np.pad(_chw(raw.numpy()).astype(np.float64), ((0, 0), (r, r), (r, r)), mode="reflect")
    rows = sum(k[i] * img[:, :, i:i + 30] for i in range(2 * r + 1))
    ref = sum(k[i] * rows[:, i:i + 24, :] for i in range(2 * r + 1))
    assert np.abs(out - np.round(ref)).max() <= 1
    assert out.std() < _chw(raw.numpy()).std()
    flat = torch.full((9, 9, 3), 77, dtype=torch.uint8)
    assert bool((augment_image(flat, _params(blur_sigma=1.5)) == 77).all())


# ---------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------
def _check_batch_equals_loop(device: str) -> None:
    cfg = AugmentConfig(blur_prob=0.5, hue=0.1)
    params = [draw_params(cfg, 11, 2, i) for i in range(16)]
    assert len({p.geometry_key for p in params}) > 3 and len({p.halo() for p in params}) > 2
    batch = torch.stack([_raw(48, 48, seed=i) for i in range(16)]).to(device)
    out = augment_batch(batch, params)
    assert out.device == batch.device and out.dtype == torch.uint8 and out.shape == (16, 3, 48, 48)
    loop = torch.stack([augment_image(batch[i], p) for i, p in enumerate(params)])
    assert torch.equal(out, loop)
    assert torch.equal(augment_batch(batch.permute(0, 3, 1, 2), params, layout="NCHW"), out)
    assert torch.equal(augment_batch(batch, params), out)


def test_batch_equals_per_sample_loop() -> None:
    _check_batch_equals_loop("cpu")


def test_blocking_and_threads_do_not_change_results(monkeypatch: pytest.MonkeyPatch) -> None:
    """CPU blocks (whole images, or row bands of big ones) and thread counts give the same bits."""
    from loader_service.augment import pipeline

    params = [draw_params(AugmentConfig(blur_prob=1.0, blur_sigma=(0.5, 2.0)), 2, 0, i) for i in range(6)]
    batch = torch.stack([_raw(40, 40, seed=i) for i in range(6)])
    raw = _raw(70, 50)
    monkeypatch.setattr(pipeline, "CPU_BLOCK_ELEMENTS", 1 << 30)
    one_block = augment_batch(batch, params)
    piece = render_piece(params[0], (70, 50), Rect(3, 4, 40, 30), _reader(raw, []), "cpu")
    for limit in (3 * 40 * 40 * 2, 1000, 1):  # two images per block; bands of rows; single rows
        monkeypatch.setattr(pipeline, "CPU_BLOCK_ELEMENTS", limit)
        assert torch.equal(augment_batch(batch, params), one_block)
        assert torch.equal(render_piece(params[0], (70, 50), Rect(3, 4, 40, 30), _reader(raw, []), "cpu"), piece)
    monkeypatch.setattr(pipeline, "CPU_BLOCK_ELEMENTS", 1 << 30)
    torch.set_num_threads(2)
    try:
        assert torch.equal(augment_batch(batch, params), one_block)
    finally:
        torch.set_num_threads(1)


def test_batch_non_square_and_errors() -> None:
    batch = torch.stack([_raw(20, 30, seed=i) for i in range(3)])
    odd = [_params(rot90_k=1), _params(rot90_k=3, flip_h=True), _params(rot90_k=1, blur_sigma=0.7)]
    assert augment_batch(batch, odd).shape == (3, 3, 30, 20)
    with pytest.raises(ValueError, match="different sizes"):
        augment_batch(batch, [_params(rot90_k=1), AugmentParams(), AugmentParams()])
    with pytest.raises(ValueError, match="one per image"):
        augment_batch(batch, odd[:2])
    with pytest.raises(ValueError, match="3 \\(RGB\\) channels"):
        augment_batch(torch.zeros(1, 8, 8, 4, dtype=torch.uint8), [AugmentParams()])
    with pytest.raises(TypeError, match="uint8"):
        augment_batch(batch.float(), odd)


def test_to_output() -> None:
    x = torch.stack([_raw(8, 8, seed=i) for i in range(2)]).permute(0, 3, 1, 2).contiguous()
    assert to_output(x, "uint8", None, None) is not None and torch.equal(to_output(x, "uint8", None, None), x)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    f32 = to_output(x, "float32", mean, std)
    ref = (x.double() / 255 - torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)) / torch.tensor(
        std, dtype=torch.float64).view(1, 3, 1, 1)
    assert f32.dtype == torch.float32 and torch.allclose(f32.double(), ref, atol=1e-5)
    plain = to_output(x, "float16", None, None)
    assert plain.dtype == torch.float16 and float(plain.min()) >= 0 and float(plain.max()) <= 1
    assert torch.allclose(plain.float(), x.float() / 255, atol=1e-3)
    nhwc = to_output(x, "float32", mean, std, channels_last=True)
    assert nhwc.shape == (2, 8, 8, 3) and torch.equal(nhwc, f32.permute(0, 2, 3, 1))
    for args, match in [(("uint8", mean, std), "float output"), (("float32", mean[:2], std[:2]), "per channel"),
                        (("float32", mean, (1.0, 0.0, 1.0)), "> 0"), (("int8", None, None), "dtype"),
                        (("float32", mean, None), "both")]:
        with pytest.raises(ValueError, match=match):
            to_output(x, *args)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Pieces of the virtual augmented image
# ---------------------------------------------------------------------------------------------
def _reader(raw: torch.Tensor, calls: list[Rect]):  # type: ignore[no-untyped-def]
    h, w = raw.shape[:2]

    def read(rect: Rect) -> torch.Tensor:
        assert 0 <= rect.y and 0 <= rect.x and rect.y1 <= h and rect.x1 <= w and rect.height and rect.width
        calls.append(rect)
        return raw[rect.y:rect.y1, rect.x:rect.x1]
    return read


def _tiles(h: int, w: int, size: tuple[int, int], stride: tuple[int, int]) -> list[Rect]:
    out = []
    for y in range(0, h, stride[0]):
        for x in range(0, w, stride[1]):
            out.append(Rect(y, x, min(size[0], h - y), min(size[1], w - x)))
            if x + size[1] >= w:
                break
        if y + size[0] >= h:
            break
    return out


def _grid_with_halo(h: int, w: int, rows: int, cols: int, halo: int) -> list[tuple[Rect, Rect]]:
    """(shard with halo, core) for a rows x cols grid, the halo clipped to the image."""
    ys = [round(i * h / rows) for i in range(rows + 1)]
    xs = [round(j * w / cols) for j in range(cols + 1)]
    out = []
    for i, j in itertools.product(range(rows), range(cols)):
        core = Rect(ys[i], xs[j], ys[i + 1] - ys[i], xs[j + 1] - xs[j])
        y0, x0 = max(core.y - halo, 0), max(core.x - halo, 0)
        y1, x1 = min(core.y1 + halo, h), min(core.x1 + halo, w)
        out.append((Rect(y0, x0, y1 - y0, x1 - x0), core))
    return out


def _check_stitching(params: AugmentParams, raw: torch.Tensor, device: str) -> None:
    hw = (raw.shape[0], raw.shape[1])
    whole = augment_batch(raw[None].to(device), [params])[0]
    oh, ow = params.output_size(*hw)
    assert tuple(whole.shape) == (3, oh, ow)
    tilings = [
        _tiles(oh, ow, (64, 64), (64, 64)),           # no overlap, ragged edges
        _tiles(oh, ow, (50, 70), (38, 55)),           # overlapping
        _tiles(oh, ow, (oh, 9), (oh, 9)),             # thin strips, narrower than the halo
        [core for _, core in _grid_with_halo(oh, ow, 1, 1, 0)],
    ]
    for pieces in tilings:
        canvas = torch.zeros_like(whole)
        for piece in pieces:
            calls: list[Rect] = []
            out = render_piece(params, hw, piece, _reader(raw, calls), device)
            assert calls == [source_rect(params, hw, piece)]
            assert out.device == whole.device and out.dtype == torch.uint8
            # overlapping pieces must agree where they overlap: compare each piece, then paste
            assert torch.equal(out, whole[:, piece.y:piece.y1, piece.x:piece.x1])
            canvas[:, piece.y:piece.y1, piece.x:piece.x1] = out
        assert torch.equal(canvas, whole)
    # a 2 x 3 grid of shards with halo: each shard (halo included) is exact, cores stitch exactly
    canvas = torch.zeros_like(whole)
    for shard, core in _grid_with_halo(oh, ow, 2, 3, halo=max(params.halo(), 3)):
        out = render_piece(params, hw, shard, _reader(raw, []), device)
        assert torch.equal(out, whole[:, shard.y:shard.y1, shard.x:shard.x1])
        cy, cx = core.y - shard.y, core.x - shard.x
        canvas[:, core.y:core.y1, core.x:core.x1] = out[:, cy:cy + core.height, cx:cx + core.width]
    assert torch.equal(canvas, whole)


GEOMETRIES = list(itertools.product([False, True], [False, True], range(4)))


@pytest.mark.parametrize("flip_h, flip_v, k", GEOMETRIES)
def test_stitched_pieces_equal_whole_image_cpu(flip_h: bool, flip_v: bool, k: int) -> None:
    raw = _raw(220, 300, seed=k)  # non-square: odd rot90 swaps the output size
    idx = GEOMETRIES.index((flip_h, flip_v, k))
    drawn = draw_params(AugmentConfig(blur_prob=1.0, blur_sigma=(0.2, 2.0), hue=0.1), 4, 0, idx)
    params = AugmentParams(**{**drawn.to_dict(), "flip_h": flip_h, "flip_v": flip_v, "rot90_k": k})
    assert params.blur_sigma > 0
    _check_stitching(params, raw, "cpu")


def test_random_pieces_and_tiny_images() -> None:
    rng = random.Random(0)
    cfg = AugmentConfig(blur_prob=0.8, blur_sigma=(0.5, 3.0), hue=0.2, saturation=0.5)
    for trial in range(40):
        h, w = rng.randint(1, 40), rng.randint(1, 40)
        raw = _raw(h, w, seed=trial)
        p = draw_params(cfg, 9, 0, trial)
        whole = augment_image(raw, p)  # halo may exceed the image: reflection repeats
        oh, ow = p.output_size(h, w)
        for _ in range(5):
            y, x = rng.randrange(oh), rng.randrange(ow)
            piece = Rect(y, x, rng.randint(1, oh - y), rng.randint(1, ow - x))
            out = render_piece(p, (h, w), piece, _reader(raw, []), "cpu")
            assert torch.equal(out, whole[:, y:piece.y1, x:piece.x1]), (trial, p, piece)


def test_render_piece_contract() -> None:
    raw = _raw(20, 30)
    p = _params(rot90_k=1, blur_sigma=1.0)
    with pytest.raises(ValueError, match="inside the augmented image"):
        render_piece(p, (20, 30), Rect(0, 0, 21, 21), _reader(raw, []), "cpu")
    with pytest.raises(ValueError, match="expected"):
        render_piece(p, (20, 30), Rect(0, 0, 4, 4), lambda r: raw[:2, :2], "cpu")
    # numpy from read() is accepted; source rect is the halo-grown piece mapped back to raw
    out = render_piece(p, (20, 30), Rect(5, 5, 4, 4), lambda r: raw[r.y:r.y1, r.x:r.x1].numpy(), "cpu")
    assert out.shape == (3, 4, 4)
    assert source_rect(p, (20, 30), Rect(5, 5, 4, 4)) == Rect(2, 30 - 12, 10, 10)
    assert source_rect(AugmentParams(), (20, 30), Rect(5, 5, 4, 4)) == Rect(5, 5, 4, 4)


def test_throughput_smoke() -> None:
    assert measure_throughput(batch=4, size=32, device="cpu", repeats=1) > 0


# ---------------------------------------------------------------------------------------------
# CUDA (run by the lead on a GPU machine)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flip_h, flip_v, k", GEOMETRIES)
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_stitched_pieces_equal_whole_image_cuda(flip_h: bool, flip_v: bool, k: int) -> None:
    raw = _raw(220, 300, seed=k)
    idx = GEOMETRIES.index((flip_h, flip_v, k))
    drawn = draw_params(AugmentConfig(blur_prob=1.0, blur_sigma=(0.2, 2.0), hue=0.1), 4, 0, idx)
    params = AugmentParams(**{**drawn.to_dict(), "flip_h": flip_h, "flip_v": flip_v, "rot90_k": k})
    _check_stitching(params, raw, "cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_batch_equals_loop_cuda_and_close_to_cpu() -> None:
    _check_batch_equals_loop("cuda")
    params = [draw_params(AugmentConfig(blur_prob=0.5), 1, 0, i) for i in range(8)]
    batch = torch.stack([_raw(64, 64, seed=i) for i in range(8)])
    cpu = augment_batch(batch, params)
    gpu = augment_batch(batch.cuda(), params).cpu()
    assert (cpu.int() - gpu.int()).abs().max() <= 1
