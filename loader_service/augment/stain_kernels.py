"""Stain normalisation on the CPU as fused numba kernels: what ``stain``'s torch ops compute, 3-4.6x faster.

The torch formulation (the reference, and what runs on GPUs) makes ~40 passes over each image; for a
256² patch most of its time goes to small batched matmuls (``od @ plane``, ``od @ pinv``), two
``nanquantile`` sorts, ``atan2``/``log``/``exp`` passes and ``pow`` (Reinhard's sRGB and cube roots).
Here each image takes a handful of fused passes:

* **Macenko**: (1) gather the OD of the tissue pixels of the statistics' subsample, once; (2) their
  covariance; (3) the 1st/99th percentile angles in the plane of its two leading eigenvectors (ordered by
  their tangent v/u while every u > 0, as tissue OD against the leading eigenvector has; atan2 of the
  selected pixels only); (4) the 99th percentiles of their concentrations; (5) one pass per pixel: OD,
  concentrations, rescale, re-render, grey level. OD comes from a 256-entry table computed with the torch op
  itself; percentiles select (quickselect) the same order statistics as ``torch.nanquantile`` and
  interpolate as it does. The tiny batched steps between the passes (``eigh`` of the 3×3 covariances,
  stain vectors from the angles, ``pinv``) are the very torch functions of the reference (``leading_plane``,
  ``stain_vectors``, ``unmixing``).
* **Reinhard**: one pass to L*a*b* (sRGB linearisation from a table computed with the torch ops) and its
  sums, one for the variance, one back to sRGB, all per image.
* Grey levels (``round(240 exp(-OD))``; the sRGB gamma and rounding) come from *step tables*: the float32
  inputs at which the torch ops' output steps, found by bisection with those ops, so this last stage equals
  the reference exactly for every float32 input (``_steps``).

**Not bit for bit; tolerance stated and tested.** The covariance, means and variances are summed in float64
(torch sums float32 in its own blocked order and its matmuls may use FMA), and ``atan2``/``pow`` are libm's
rather than torch's vectorised ones, so values differ from the reference in the last float32 bits and
a pixel can round to the neighbouring grey level: ``tests/test_stain_kernels.py`` asserts, on several images
and both methods, **at most 1 grey level anywhere and a mean absolute difference < 0.05** (in practice well
under 0.01). One exception: Reinhard on a perfectly flat image (std 0), where the torch ops' float32 rounding
noise divided by ~0 gives an arbitrary colour and the kernels give the target's mean colour (tested). The result
is a pure function of the pixels and the target (no threads inside the kernels, fixed summation order), so it
is deterministic whatever the service's thread count; the kernels release the GIL (``nogil``) so the service's
batch threads run them in parallel. No fast-math.
"""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Any, Callable

import numpy as np
import torch

from . import stain as ref

__all__ = ["normalise_cpu", "warm_up"]


def _compiled() -> ModuleType:
    """The kernels' module, imported (compiled, or loaded from numba's cache) on first use."""
    from . import _stain_numba

    return _stain_numba


def _table(fn: Callable[[torch.Tensor], torch.Tensor]) -> np.ndarray:
    """A 256-entry float32 table: the torch op ``fn`` applied to uint8 values 0..255 (same bits as in bulk)."""
    values = torch.arange(256, dtype=torch.uint8)[None, :, None].expand(1, 256, 3).contiguous()
    return np.ascontiguousarray(fn(values)[0, :, 0].numpy())


def _ordered(x: np.ndarray) -> np.ndarray:
    """float32 -> int64 keys in the floats' order (-0.0 and 0.0 alike)."""
    bits = np.asarray(x, np.float32).view(np.int32).astype(np.int64)
    return np.where(bits >= 0, bits, -(bits & 0x7FFFFFFF))


def _unordered(keys: np.ndarray) -> np.ndarray:
    bits = np.where(keys >= 0, keys, (-keys) | 0x80000000)
    return (bits & 0xFFFFFFFF).astype(np.uint32).view(np.float32)


def _steps(level: Callable[[torch.Tensor], torch.Tensor], lo: float, hi: float,
           buckets: int) -> tuple[np.ndarray, np.ndarray, float]:
    """A non-decreasing map ``level`` (float32 tensor -> grey levels 0..255, 0 at ``lo``, the torch ops of the
    reference) as where it steps: (steps, start, bucket scale) for ``_stain_numba._level``. steps[k-1] is the
    smallest float32 x in [lo, hi] with level(x) >= k (bisection on the floats' order; +inf if none), so the
    lookup gives the reference's level for every float32 input, exactly. start[b] counts the steps below
    bucket b (of ``buckets`` over [lo, hi]), less a margin; the kernel walks the rest."""
    wanted = np.arange(1, 256)
    at = lambda keys: level(torch.from_numpy(_unordered(keys))).numpy()  # noqa: E731
    below, above = np.full(255, _ordered(lo), np.int64), np.full(255, _ordered(hi), np.int64)
    if at(below[:1])[0] != 0:
        raise AssertionError(f"stain step table: level({lo}) must be 0")
    reached = at(above) >= wanted
    while np.any(above - below > 1):
        mid = (below + above) // 2
        ok = at(mid) >= wanted
        above, below = np.where(ok, mid, above), np.where(ok, below, mid)
    steps = np.append(_unordered(above), np.full(2, np.inf, np.float32))
    steps[:255][~reached] = np.inf
    scale = buckets / (hi - lo)
    edges = lo + (np.arange(buckets + 1) + np.array([[-0.01], [0.01]])) / scale  # a hundredth of a bucket wider
    start, end = np.searchsorted(steps[:255], edges.astype(np.float32), side="right").astype(np.int32)
    if int((end[1:] - start[:-1]).max()) > 2:  # the kernel walks at most 2 steps from start
        raise AssertionError("stain step table: more than 2 steps in a bucket; use more buckets")
    return steps, start[:-1].copy(), float(np.float32(scale))


_EXP_LO = -0.1  # OD below this renders as 255 (240 exp(0.1) > 255.5)


def _render_level(od: torch.Tensor) -> torch.Tensor:
    """As _macenko renders OD, counted down from 255 (so non-decreasing)."""
    return 255 - (ref.BACKGROUND * torch.exp(-od)).round_().clamp_(0.0, 255.0).to(torch.int64)


def _gamma_level(lin: torch.Tensor) -> torch.Tensor:
    """As lab_to_rgb and _reinhard finish, from linear RGB clipped to [0, 1]."""
    srgb = torch.where(lin > 0.0031308, 1.055 * lin ** (1 / 2.4) - 0.055, 12.92 * lin)
    return (srgb * 255.0).round_().clamp_(0.0, 255.0).to(torch.int64)


@functools.lru_cache(maxsize=None)
def _tables() -> dict[str, Any]:
    """The kernels' tables, made once with the reference's torch ops (a few ms)."""
    rgb = lambda v: v.to(torch.float32) / 255.0  # noqa: E731  (as _reinhard and rgb_to_lab do)
    exp_steps, exp_start, exp_scale = _steps(_render_level, _EXP_LO, 10.0, 4096)
    gamma_steps, gamma_start, gamma_scale = _steps(_gamma_level, 0.0, 1.0, 4096)
    return dict(
        od=_table(ref._optical_density),
        lin=_table(lambda v: torch.where(rgb(v) > 0.04045, ((rgb(v) + 0.055) / 1.055) ** 2.4, rgb(v) / 12.92)),
        to_xyz=ref._RGB_TO_XYZ.to(torch.float32).numpy().copy(),
        to_rgb=torch.linalg.inv(ref._RGB_TO_XYZ).to(torch.float32).numpy().copy(),
        white=np.asarray(ref._WHITE, np.float32),
        lab=np.asarray([0.008856, 0.206893], np.float32),
        exp_lo=np.float32(_EXP_LO), exp_steps=exp_steps, exp_start=exp_start, exp_scale=np.float32(exp_scale),
        gamma_steps=gamma_steps, gamma_start=gamma_start, gamma_scale=np.float32(gamma_scale))


def _macenko(x: np.ndarray, target: torch.Tensor, out: np.ndarray) -> None:
    k, t = _compiled(), _tables()
    n, h, w, _ = x.shape
    step = max(1, (h * w) // ref.STATS_PIXELS)
    buf, count = np.empty((n, (h * w + step - 1) // step, 3), np.float32), np.empty(n, np.int64)
    k.macenko_gather_kernel(x, step, t["od"], np.float32(ref.OD_THRESHOLD), buf, count)
    cov = np.empty((n, 3, 3))
    k.macenko_cov_kernel(buf, count, cov)
    plane = ref.leading_plane(torch.from_numpy(cov)).contiguous()
    q = np.empty((n, 2), np.float32)
    k.macenko_angle_kernel(buf, count, plane.numpy(), np.float32(ref.ANGLE_PERCENTILE),
                           np.float32(1 - ref.ANGLE_PERCENTILE), q)  # as the reference's quantile tensor
    stains = ref.stain_vectors(plane, torch.from_numpy(q).T)
    pinv_t = ref.unmixing(stains).contiguous()
    high = np.empty((n, 2), np.float32)
    k.macenko_high_kernel(buf, count, pinv_t.numpy(), np.float32(ref.MAX_PERCENTILE), high)
    scale = ref.concentration_scale(torch.from_numpy(high), target).contiguous().numpy()
    target_stains = np.ascontiguousarray(target[:6].view(2, 3).T.numpy())
    keep = count < ref.MIN_TISSUE_PIXELS
    k.macenko_render_kernel(x, t["od"], pinv_t.numpy(), scale, target_stains, keep, t["exp_steps"], t["exp_start"],
                            t["exp_lo"], t["exp_scale"], out)


def _reinhard(x: np.ndarray, target: torch.Tensor, out: np.ndarray) -> None:
    t = _tables()
    tgt = target.numpy()
    _compiled().reinhard_kernel(x, t["lin"], t["to_xyz"], t["white"], t["to_rgb"], t["lab"],
                                np.ascontiguousarray(tgt[:3]), np.ascontiguousarray(tgt[3:]), t["gamma_steps"],
                                t["gamma_start"], t["gamma_scale"], out)


def normalise_cpu(images: torch.Tensor, method: str, target: torch.Tensor, layout: str) -> torch.Tensor:
    """``stain.normalise_batch`` for a CPU uint8 batch (validated by the caller: 4-D, 3 channels,
    non-empty), as a new tensor in the same layout; ``target`` float32 (CPU)."""
    out = torch.empty_like(images, memory_format=torch.contiguous_format)
    x, o = images.numpy(), out.numpy()
    if layout == "NCHW":  # channels-last views: the kernels take any strides
        x, o = x.transpose(0, 2, 3, 1), o.transpose(0, 2, 3, 1)
    (_macenko if method == "macenko" else _reinhard)(x, target, o)
    return out


def warm_up() -> None:
    """Compile (or load) the kernels now, on a tiny batch, rather than on the first real one."""
    x = torch.full((1, 4, 4, 3), 120, dtype=torch.uint8)
    normalise_cpu(x, "macenko", torch.tensor([0.6, 0.7, 0.4, 0.2, 0.8, 0.6, 1.0, 1.0]), "NHWC")
    normalise_cpu(x, "reinhard", torch.tensor([50.0, 10.0, -10.0, 10.0, 5.0, 5.0]), "NHWC")
