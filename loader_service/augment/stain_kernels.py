"""Stain normalisation on the CPU as fused numba kernels: what ``stain``'s torch ops compute, ~10x faster.

The torch formulation (the reference, and what runs on GPUs) makes ~40 passes over each image; for a
256² patch most of its time goes to small batched matmuls (``od @ plane``, ``od @ pinv``), two
``nanquantile`` sorts, ``atan2``/``log``/``exp`` passes and ``pow`` (Reinhard's sRGB and cube roots).
Here each image takes a handful of fused passes:

* **Macenko**: (1) OD covariance of the tissue pixels of the statistics' subsample; (2) their angles in
  the plane of its two leading eigenvectors and the 1st/99th percentile angles; (3) the 99th percentiles
  of their concentrations; (4) one pass per pixel: OD, concentrations, rescale, re-render, round. OD comes
  from a 256-entry table computed with the torch op itself; percentiles select (``np.partition``) the
  same order statistics as ``torch.nanquantile`` and interpolate as it does. The tiny batched steps
  between the passes (``eigh`` of the 3×3 covariances, stain vectors from the angles, ``pinv``) are the
  very torch functions of the reference (``leading_plane``, ``stain_vectors``, ``unmixing``).
* **Reinhard**: one pass to L*a*b* (sRGB linearisation from a table computed with the torch ops) and its
  sums, one for the variance, one back to sRGB, all per image.

**Not bit for bit; tolerance stated and tested.** The covariance, means and variances are summed in float64
(torch sums float32 in its own blocked order and its matmuls may use FMA), and ``exp``/``atan2``/``pow`` are
libm's rather than torch's vectorised ones, so values differ from the reference in the last float32 bits and
a pixel can round to the neighbouring grey level: ``tests/test_stain_kernels.py`` asserts, on several images
and both methods, **at most 1 grey level anywhere and a mean absolute difference < 0.05** (in practice well
under 0.01). The result is a pure function of the pixels and the target (no threads inside the kernels, fixed
summation order), so it is deterministic whatever the service's thread count; the kernels release the GIL
(``nogil``) so the service's batch threads run them in parallel. No fast-math.
"""

from __future__ import annotations

from types import ModuleType
from typing import Callable

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


_TABLES: dict[str, np.ndarray] = {}


def _tables() -> dict[str, np.ndarray]:
    if not _TABLES:  # idempotent: a racing thread computes the same tables
        rgb = lambda v: v.to(torch.float32) / 255.0  # noqa: E731  (as _reinhard and rgb_to_lab do)
        _TABLES.update(
            od=_table(ref._optical_density),
            lin=_table(lambda v: torch.where(rgb(v) > 0.04045, ((rgb(v) + 0.055) / 1.055) ** 2.4, rgb(v) / 12.92)),
            to_xyz=ref._RGB_TO_XYZ.to(torch.float32).numpy().copy(),
            to_rgb=torch.linalg.inv(ref._RGB_TO_XYZ).to(torch.float32).numpy().copy(),
            white=np.asarray(ref._WHITE, np.float32),
            lab=np.asarray([0.008856, 0.206893, 0.0031308, 1 / 2.4], np.float32))
    return _TABLES


def _macenko(x: np.ndarray, target: torch.Tensor, out: np.ndarray) -> None:
    k, t = _compiled(), _tables()
    n, h, w, _ = x.shape
    step = max(1, (h * w) // ref.STATS_PIXELS)
    threshold = np.float32(ref.OD_THRESHOLD)
    cov, count = np.empty((n, 3, 3)), np.empty(n, np.int64)
    k.macenko_cov_kernel(x, step, t["od"], threshold, cov, count)
    plane = ref.leading_plane(torch.from_numpy(cov)).contiguous()
    q = np.empty((n, 2), np.float32)
    k.macenko_angle_kernel(x, step, t["od"], threshold, plane.numpy(), np.float32(ref.ANGLE_PERCENTILE), q)
    stains = ref.stain_vectors(plane, torch.from_numpy(q).T)
    pinv_t = ref.unmixing(stains).contiguous()
    high = np.empty((n, 2), np.float32)
    k.macenko_high_kernel(x, step, t["od"], threshold, pinv_t.numpy(), np.float32(ref.MAX_PERCENTILE), high)
    scale = ref.concentration_scale(torch.from_numpy(high), target).contiguous().numpy()
    target_stains = np.ascontiguousarray(target[:6].view(2, 3).T.numpy())
    keep = count < ref.MIN_TISSUE_PIXELS
    k.macenko_render_kernel(x, t["od"], pinv_t.numpy(), scale, target_stains, keep, np.float32(ref.BACKGROUND), out)


def _reinhard(x: np.ndarray, target: torch.Tensor, out: np.ndarray) -> None:
    t = _tables()
    tgt = target.numpy()
    _compiled().reinhard_kernel(x, t["lin"], t["to_xyz"], t["white"], t["to_rgb"], t["lab"],
                                np.ascontiguousarray(tgt[:3]), np.ascontiguousarray(tgt[3:]), out)


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
