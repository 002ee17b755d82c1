"""Image-level random scale and crop: the read-side step that turns a sample's region into its raw image.

With ``scale`` s and ``crop_shift`` (fy, fx), the raw image of an ``H x W`` sample is a resampling of the
slide around the region: output pixel ``i`` of an axis of size ``n`` (pixel centre ``i + 0.5``) shows the
slide at continuous position ``n/2 + f*n + (i + 0.5 - n/2) / s`` (region coordinates, pixel edges at
integers). s > 1 zooms in (a window of ``n/s`` source pixels), s < 1 zooms out; the window may reach
beyond the region (the slide around it is read; outside the slide is white).

The filter is a triangle (bilinear when zooming in, widened to ``1/s`` source pixels when zooming out, as
PIL's and torch's antialiased bilinear). Rows are resampled first, then columns, each as a fixed-order sum
of separately rounded float32 products over a fixed number of taps. Every output pixel is therefore the
same arithmetic on the same source pixels whatever rectangle of the image is asked for: pieces resampled
on their own stitch to the whole image bit for bit. The result is rounded half-to-even to uint8, so the
rest of the augmentation sees an ordinary uint8 region.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from .params import AugmentParams, Rect

__all__ = ["axis_taps", "resample_rect", "source_window"]


def _radius(scale: float) -> float:
    return max(1.0, 1.0 / scale)


def axis_taps(start: int, stop: int, size: int, scale: float, shift: float) -> tuple[np.ndarray, np.ndarray]:
    """Source indices ``(n, T)`` (int64, region coordinates) and float32 weights ``(n, T)`` of output pixels
    ``start..stop-1`` of an axis of ``size`` pixels. Each row of weights sums to 1 (zero-weight taps pad
    rows to the same ``T``). A pure function of (i, size, scale, shift) per output pixel ``i``."""
    if not scale > 0.0:
        raise ValueError(f"scale must be > 0 (got {scale}).")
    r = _radius(scale)
    taps = int(math.ceil(2.0 * r)) + 1
    i = np.arange(start, stop, dtype=np.float64)
    centre = size / 2.0 + shift * size
    u = centre + (i + 0.5 - size / 2.0) / scale - 0.5  # source pixel-centre coordinate
    first = np.floor(u - r).astype(np.int64) + 1
    idx = first[:, None] + np.arange(taps, dtype=np.int64)[None, :]
    w = np.maximum(0.0, 1.0 - np.abs(idx - u[:, None]) / r)
    w /= w.sum(axis=1, keepdims=True)
    return idx, w.astype(np.float32)


def source_window(params: AugmentParams, image_hw: tuple[int, int], rect: Rect) -> Rect:
    """The rectangle of source pixels (region coordinates; may lie outside the region) that
    :func:`resample_rect` reads for ``rect`` of the raw image."""
    (iy, _), (ix, _) = _taps(params, image_hw, rect)
    return Rect(int(iy.min()), int(ix.min()), int(iy.max() - iy.min()) + 1, int(ix.max() - ix.min()) + 1)


def _taps(params: AugmentParams, image_hw: tuple[int, int],
          rect: Rect) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    h, w = image_hw
    if rect.height <= 0 or rect.width <= 0 or rect.y < 0 or rect.x < 0 or rect.y1 > h or rect.x1 > w:
        raise ValueError(f"{rect} must be a non-empty rectangle inside the {h}x{w} image.")
    return (axis_taps(rect.y, rect.y1, h, params.scale, params.crop_shift[0]),
            axis_taps(rect.x, rect.x1, w, params.scale, params.crop_shift[1]))


def _weighted_sum(src: torch.Tensor, dim: int, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """sum_t w[:, t] * src.index_select(dim, idx[:, t]), accumulated in tap order (no fused ops)."""
    shape = [1] * src.dim()
    shape[dim] = -1
    acc: torch.Tensor | None = None
    for t in range(idx.shape[1]):
        term = src.index_select(dim, idx[:, t]) * w[:, t].reshape(shape)
        acc = term if acc is None else acc + term
    assert acc is not None
    return acc


def resample_rect(
    params: AugmentParams,
    image_hw: tuple[int, int],
    rect: Rect,
    read: Callable[[Rect], torch.Tensor | np.ndarray],
) -> torch.Tensor:
    """``rect`` of the sample's raw image (uint8 ``HWC`` on the CPU) under ``params.scale`` and
    ``params.crop_shift``. ``read(window)`` is called once with :func:`source_window` and must return
    those source pixels (region coordinates, possibly outside the region) as uint8 ``HWC``."""
    (iy, wy), (ix, wx) = _taps(params, image_hw, rect)
    y0, x0 = int(iy.min()), int(ix.min())
    window = Rect(y0, x0, int(iy.max()) - y0 + 1, int(ix.max()) - x0 + 1)
    raw = read(window)
    src = torch.from_numpy(np.ascontiguousarray(raw)) if isinstance(raw, np.ndarray) else raw.cpu()
    if src.dtype != torch.uint8 or tuple(src.shape) != (window.height, window.width, 3):
        raise ValueError(f"read({window}) returned {src.dtype} {tuple(src.shape)}; expected uint8 "
                         f"({window.height}, {window.width}, 3) HWC.")
    f = src.to(torch.float32)
    rows = _weighted_sum(f, 0, torch.from_numpy(iy - y0), torch.from_numpy(wy))
    out = _weighted_sum(rows, 1, torch.from_numpy(ix - x0), torch.from_numpy(wx))
    return out.round_().clamp_(0.0, 255.0).to(torch.uint8)
