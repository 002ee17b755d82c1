"""Fused CPU kernels for the augmentation, compiled with numba: the same pixels as the torch ops.

On the CPU the torch formulation of the colour and HED stages is ~70 elementwise passes over each
block (its log2/exp2 are built from exactly rounded operations, see ``colour.py``), and it spends
most of its time in memory traffic and op dispatch. These kernels do the whole per-pixel chain in
one pass: geometry (as an index map), uint8 -> float32, colour matrix and clip, HED (log2,
matrix, exp2, multiply, clip) and, for samples without blur, the rounding to uint8. The blur is a
second kernel with the same fixed-order sums as ``blur.blur_valid``.

**Same bits as the torch path.** Every operation is the one the torch code does, in the same
order, in float32, with IEEE rounding: numba compiles float arithmetic without fast-math, so LLVM
neither reassociates nor fuses multiply-adds, and vectorised and scalar iterations compute
identical bits. ``tests/test_augment_kernels.py`` checks equality with the torch ops bit for bit.
So CPU pieces still stitch to CPU whole images exactly, and the GPU (torch ops) stays within one
grey level of the CPU, as before.

``error_model="numpy"`` keeps IEEE semantics for division (no Python ZeroDivisionError branch),
which is what lets LLVM vectorise the log2. The kernels release the GIL (``nogil``), so the
service's batch threads run them in parallel. numba is imported on first use, and compiled
kernels are cached on disk where numba finds a writable cache directory (rules in ``_numba_kernels``).
"""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Sequence

import numpy as np
import torch

from .blur import gaussian_kernel
from .colour import (_LOG2_ADJUST, _MID_GREY, _RGB_TO_YIQ, _YIQ_TO_RGB, GREY_WEIGHTS, HED_FROM_RGB,
                     RGB_FROM_HED)
from .geometry import aug_to_raw_point, reflect_indices
from .params import AugmentParams, halos, params_halos, params_table

__all__ = ["pointwise", "coefficients", "blur", "blur_reflected_into", "to_planar", "geometry_maps", "warm_up"]

def geometry_maps(params: Sequence[AugmentParams], image_hw: tuple[int, int]) -> np.ndarray:
    """(N, 6) int64 ``(a, b, c, d, e, f)``: augmented pixel ``(i, j)`` of sample n shows raw pixel
    ``(a + b*i + c*j, d + e*i + f*j)`` (flips and quarter turns are affine index maps; the batch at once, in
    one compiled call, the same maps as ``geometry.aug_to_raw_point``)."""
    table = params_table(params)
    maps = np.empty((len(table), 6), np.int64)
    _compiled().geometry_kernel(np.array(table, np.float64, order="C"), image_hw[0], image_hw[1], maps)  # a copy:
    # a ParamsBatch's table is read-only, which the kernel's signature is not
    return maps


def _compiled() -> ModuleType:
    """The kernels' module, imported (compiled, or loaded from numba's cache) on first use; the import
    system makes that happen once, whatever the number of threads asking."""
    from . import _numba_kernels

    return _numba_kernels


def _nhwc_numpy(x_u8: torch.Tensor, layout: str) -> np.ndarray:
    """A uint8 (N, H, W, 3) numpy view of a CPU tensor, no copy (any strides)."""
    arr = x_u8.numpy()
    return arr if layout == "NHWC" else arr.transpose(0, 2, 3, 1)


def pointwise(x_u8: torch.Tensor, params: Sequence[AugmentParams], layout: str, float_for: Sequence[bool] | np.ndarray,
              geometry: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Geometry (when ``geometry``; else ``x_u8`` is already flipped and turned), colour and HED on
    a CPU uint8 batch (``layout`` NHWC or NCHW).

    Returns ``(u8, f)``: ``u8`` (N, 3, oh, ow) uint8 holds the finished samples (those with
    ``float_for[n]`` False); ``f`` (K, 3, oh, ow) float32 holds the K others, in order, before blur
    and rounding (None when K = 0). Bit-identical to the torch ops of ``pipeline``."""
    n = len(params)
    src = _nhwc_numpy(x_u8, layout)
    hw = (src.shape[1], src.shape[2])
    table = np.array(params_table(params), np.float64, order="C")  # a copy: the kernel takes writable arrays
    if not geometry:
        table[:, :3] = 0.0  # x_u8 is already flipped and turned: identity maps
    flags = np.ascontiguousarray(float_for, np.bool_)
    geo = np.empty((n, 6), np.int64)
    colour, hed = np.empty((n, 3, 4), np.float32), np.empty((n, 3, 4), np.float32)
    fidx = np.empty(n, np.int64)
    parity = -2
    if flags.shape == (n,) and src.shape[0] == n and src.shape[3] == 3 and min(hw) >= 1:
        parity, do_colour, do_hed, k = _compiled().prepare_pointwise_kernel(
            table, hw[0], hw[1], flags, GREY_WEIGHTS, _YIQ_TO_RGB, _RGB_TO_YIQ, HED_FROM_RGB, RGB_FROM_HED,
            _LOG2_ADJUST, _MID_GREY, geo, colour, hed, fidx)
        if parity == -1 and hw[0] == hw[1]:
            parity = 0  # mixed quarter turns of square images: one output size
    if parity < 0:
        sizes = {hw[::-1] if odd else hw for odd in set((table[:, 2] % 2).tolist())}
        raise ValueError(f"pointwise: {n} params, {flags.size} flags for a batch of shape {src.shape} "
                         f"({layout}) with output sizes {sorted(sizes)}; need one set of each per image, "
                         "3 channels, non-empty images, and one output size")
    oh, ow = hw[::-1] if parity else hw
    u8 = torch.empty((n, 3, oh, ow), dtype=torch.uint8)
    f = torch.empty((k, 3, oh, ow), dtype=torch.float32) if k else None
    out_f = f.numpy() if f is not None else np.empty((1, 3, 1, 1), np.float32)
    _compiled().pointwise_kernel(src, geo, colour, hed, bool(do_colour), bool(do_hed), fidx, u8.numpy(), out_f)
    return u8, f


def coefficients(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(colour_coefficients, hed_coefficients)`` of a parameter table, in one GIL-free kernel: the same
    float32 values as the numpy functions of ``colour`` (tested)."""
    n = len(table)  # copied below: a ParamsBatch's table is read-only, which the kernel's signature is not
    colour, hed = np.empty((n, 3, 4), np.float32), np.empty((n, 3, 4), np.float32)
    _compiled().coefficients_kernel(np.array(table, np.float64, order="C"), GREY_WEIGHTS, _YIQ_TO_RGB, _RGB_TO_YIQ,
                                    HED_FROM_RGB, RGB_FROM_HED, _LOG2_ADJUST, _MID_GREY, colour, hed)
    return colour, hed


def _kernels_of(params: Sequence[AugmentParams]) -> np.ndarray:
    """(N, 2r+1) float32 Gaussian kernels of samples that share one halo r: ``gaussian_kernel`` of each, the
    batch at once (the same float64 steps, row by row)."""
    sigma = params_table(params)[:, 13]
    radius = int(halos(params_table(params)).max()) if len(sigma) else 0
    if radius == 0 or (sigma <= 0.0).any():
        return np.ascontiguousarray(np.stack([gaussian_kernel(s) for s in sigma.tolist()]), dtype=np.float32)
    return _gaussian_rows(sigma, radius)


def _gaussian_rows(sigma: np.ndarray, radius: int) -> np.ndarray:
    """``gaussian_kernel`` of each sigma (> 0, all with this radius), as rows of one float32 array."""
    g = np.exp(_minus_t_squared(radius)[None, :] / (2.0 * sigma * sigma)[:, None])
    return np.ascontiguousarray((g / g.sum(axis=1, keepdims=True)).astype(np.float32))


@functools.lru_cache(maxsize=64)
def _minus_t_squared(radius: int) -> np.ndarray:
    """``-(t * t)`` for t = -radius..radius in float64, as ``gaussian_kernel`` computes it (cached, read-only)."""
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    out = -(t * t)
    out.flags.writeable = False
    return out


def blur(xp: torch.Tensor, params: Sequence[AugmentParams]) -> torch.Tensor:
    """``blur.blur_valid`` on CPU: padded (N, C, H+2r, W+2r) float32, all samples with one halo r."""
    r = int(halos(params_table(params[:1]))[0])
    n, c, hp, wp = xp.shape
    out = torch.empty((n, c, hp - 2 * r, wp - 2 * r), dtype=torch.float32)
    ry, rx = np.arange(hp, dtype=np.int64), np.arange(wp, dtype=np.int64)
    _compiled().blur_kernel(np.ascontiguousarray(xp.numpy()), _kernels_of(params), ry, rx, np.full(n, -1, np.int64), out.numpy(),
                   np.empty((1, 1, 1, 1), np.uint8))
    return out


def blur_reflected_into(f: torch.Tensor, params: Sequence[AugmentParams], dest: Sequence[int],
                        out_u8: torch.Tensor) -> None:
    """Blur (N, C, H, W) float32 ``f`` (image n with its own halo, ``params[n]``, at least 1) with the image
    reflected at its edges (reflect-101, as ``geometry.reflect_indices``), round, and write image n to
    ``out_u8[dest[n]]``, in one GIL-free call. Same bits as padding with ``index_select`` then
    ``blur.blur_valid`` and ``_to_uint8``, image by image."""
    table = params_table(params)
    radius = params_halos(params)
    n, _, h, w = f.shape
    if h < 1 or w < 1:
        raise ValueError(f"cannot blur empty images ({h}x{w})")
    if len(radius) != n or len(dest) != n or (n and radius.min() < 1):
        raise ValueError(f"blur_reflected_into: {n} images, {len(radius)} params, {len(dest)} destinations, "
                         f"halos {sorted(set(radius.tolist()))}; need one blurring param (sigma > 0) per image")
    if not n:
        return
    top = int(radius.max())
    kernels = np.zeros((n, 2 * top + 1), np.float32)
    for r in sorted(set(radius.tolist())):  # a few distinct halos per batch
        rows = radius == r
        kernels[rows, :2 * r + 1] = _gaussian_rows(table[rows, 13], r)
    _compiled().blur_reflect_kernel(np.ascontiguousarray(f.numpy()), kernels, radius, _reflect_table(top, h),
                                    _reflect_table(top, w), np.asarray(dest, dtype=np.int64), out_u8.numpy())


@functools.lru_cache(maxsize=64)
def _reflect_table(top: int, size: int) -> np.ndarray:
    """Row r (1..top): ``reflect_indices(-r, size + r, size)``, then zeros (a few sizes and halos recur: cached;
    never written, but writable: the kernel's signature takes mutable arrays)."""
    table = np.zeros((top + 1, size + 2 * top), np.int64)
    for r in range(1, top + 1):
        table[r, :size + 2 * r] = reflect_indices(-r, size + r, size).numpy()
    return table


def to_planar(x_u8: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC (CPU) -> a new contiguous NCHW tensor: ``x.permute(0, 3, 1, 2).contiguous()`` without
    torch's slow 3-channel transpose (0.014 against 0.19 ms per 256² image here)."""
    n, h, w, c = x_u8.shape
    if c != 3 or not x_u8.is_contiguous():
        return x_u8.permute(0, 3, 1, 2).contiguous()
    out = torch.empty((n, 3, h, w), dtype=torch.uint8)
    _compiled().to_planar_kernel(x_u8.numpy(), out.numpy())
    return out


def warm_up() -> None:
    """Compile (or load) the kernels now, on a tiny batch, rather than on the first real one."""
    x = torch.zeros((1, 3, 3, 3), dtype=torch.uint8)
    p = AugmentParams(brightness=1.1, hed_alpha=(1.01, 1.0, 1.0), blur_sigma=0.3)
    _, f = pointwise(x, [p], "NHWC", [True], geometry=True)
    assert f is not None
    blur(f[:, :, [1, 0, 1, 2, 1]][:, :, :, [1, 0, 1, 2, 1]], [p])
    blur_reflected_into(f, [p], [0], torch.empty((1, 3, 3, 3), dtype=torch.uint8))
    pointwise(x, [p], "NCHW", [False], geometry=False)
    to_planar(x)

