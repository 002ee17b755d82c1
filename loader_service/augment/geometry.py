"""Geometric ops (flip, rot90) and the coordinate maps between augmented and raw pixels.

The augmented image of a raw ``H x W`` region is ``A = rot90(flipud?(fliplr?(R)), k)`` with
``numpy.rot90`` semantics (counter-clockwise, rows towards columns). Every such map is a
permutation of pixels that sends rectangles to rectangles and image borders to image borders, so
a piece of ``A`` is the same transform applied to a rectangle of ``R``.
"""

from __future__ import annotations

import torch

from .params import AugmentParams, Rect

__all__ = ["apply_geometry", "aug_to_raw_point", "aug_rect_to_raw", "reflect_indices", "clip_rect"]


def apply_geometry(x: torch.Tensor, flip_h: bool, flip_v: bool, k: int) -> torch.Tensor:
    """Flip then rotate ``x`` (``(..., H, W)``): ``rot90(flipud?(fliplr?(x)), k)``."""
    dims = [d for d, on in ((-1, flip_h), (-2, flip_v)) if on]
    if dims:
        x = torch.flip(x, dims)
    if k % 4:
        x = torch.rot90(x, k % 4, dims=(-2, -1))
    return x


def aug_to_raw_point(params: AugmentParams, image_hw: tuple[int, int], i: int, j: int) -> tuple[int, int]:
    """Raw pixel ``(y, x)`` shown at augmented pixel ``(i, j)``."""
    h, w = image_hw
    k = params.rot90_k
    if k == 0:
        p, q = i, j
    elif k == 1:
        p, q = j, w - 1 - i
    elif k == 2:
        p, q = h - 1 - i, w - 1 - j
    else:
        p, q = h - 1 - j, i
    y = h - 1 - p if params.flip_v else p
    x = w - 1 - q if params.flip_h else q
    return y, x


def aug_rect_to_raw(params: AugmentParams, image_hw: tuple[int, int], rect: Rect) -> Rect:
    """The raw rectangle whose transform is ``rect`` of the augmented image (inside both images)."""
    y0, x0 = aug_to_raw_point(params, image_hw, rect.y, rect.x)
    y1, x1 = aug_to_raw_point(params, image_hw, rect.y1 - 1, rect.x1 - 1)
    return Rect(min(y0, y1), min(x0, x1), abs(y1 - y0) + 1, abs(x1 - x0) + 1)


def reflect_indices(start: int, stop: int, size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Indices ``start..stop-1`` folded into ``[0, size)`` by reflection without repeating the edge
    pixel (``... 2 1 | 0 1 2 ... n-1 | n-2 ...``, OpenCV BORDER_REFLECT_101 / torch 'reflect'),
    repeated as often as needed so any size works (a 1-pixel image replicates)."""
    idx = torch.arange(start, stop, dtype=torch.int64)
    if size == 1:
        return torch.zeros_like(idx).to(device)
    period = 2 * (size - 1)
    m = torch.remainder(idx, period)
    return torch.where(m < size, m, period - m).to(device)


def clip_rect(rect: Rect, hw: tuple[int, int]) -> Rect:
    """``rect`` intersected with ``[0, h) x [0, w)`` (may be empty)."""
    y0, x0 = max(rect.y, 0), max(rect.x, 0)
    y1, x1 = min(rect.y1, hw[0]), min(rect.x1, hw[1])
    return Rect(y0, x0, max(y1 - y0, 0), max(x1 - x0, 0))
