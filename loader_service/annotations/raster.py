"""Point-in-polygon at pixel centres, even-odd rule: exact, and the same for a grid and for single points.

An edge from (x0, y0) to (x1, y1) is crossed by the horizontal ray from (px, py) towards +x when
``min(y0, y1) <= py < max(y0, y1)`` (half-open in y, so a vertex is counted once) and the crossing
``x0 + (py - y0) * (x1 - x0) / (y1 - y0)`` is ``> px``. A point is inside when that count is odd.
"""

from __future__ import annotations

import numpy as np

__all__ = ["inside_points", "inside_grid"]

_CHUNK = 1 << 20  # points x edges per step of inside_points


def inside_grid(edges: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """(len(ys), len(xs)) bool: whether (xs[j], ys[i]) is inside.

    Vectorised and exact: every (row, edge) crossing x is computed as in :func:`inside_points`; the crossing
    is beyond the columns before ``searchsorted(xs, x, 'left')`` (those with px < x), so a reversed running
    count of crossings per row gives each pixel's crossings beyond it without comparing any shifted value.
    """
    xs, ys = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
    out = np.zeros((len(ys), len(xs)), dtype=bool)
    if not len(edges) or not len(xs) or not len(ys):
        return out
    order = None
    if len(xs) > 1 and not (np.diff(xs) >= 0).all():
        order = np.argsort(xs, kind="stable")
        xs = xs[order]
    ylo, yhi = np.minimum(edges[:, 1], edges[:, 3]), np.maximum(edges[:, 1], edges[:, 3])
    band = (yhi > ys.min()) & (ylo <= ys.max())
    edges, ylo, yhi = edges[band], ylo[band], yhi[band]
    if not len(edges):
        return out
    x0, y0, x1, y1 = edges.T
    width = len(xs)
    step = max(1, _CHUNK // len(edges))
    for r0 in range(0, len(ys), step):
        py = ys[r0:r0 + step]
        rows, cols = np.nonzero((ylo[None, :] <= py[:, None]) & (py[:, None] < yhi[None, :]))
        if not len(rows):
            continue
        e0, f0, e1, f1 = x0[cols], y0[cols], x1[cols], y1[cols]
        cx = e0 + (py[rows] - f0) * (e1 - e0) / (f1 - f0)
        first_not_before = np.searchsorted(xs, cx, side="left")  # columns j < this have xs[j] < cx
        counts = np.bincount(rows * (width + 1) + first_not_before, minlength=len(py) * (width + 1))
        beyond = np.cumsum(counts.reshape(len(py), width + 1)[:, ::-1], axis=1)[:, ::-1]
        out[r0:r0 + len(py)] = (beyond[:, 1:] % 2) == 1
    if order is not None:
        unsorted = np.empty_like(out)
        unsorted[:, order] = out
        out = unsorted
    return out


def inside_points(edges: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """(n,) bool: whether each point (xs[k], ys[k]) is inside."""
    xs, ys = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
    out = np.zeros(len(xs), dtype=bool)
    if not len(edges) or not len(xs):
        return out
    x0, y0, x1, y1 = (edges[:, k][None, :] for k in range(4))
    step = max(1, _CHUNK // len(edges))
    for start in range(0, len(xs), step):
        px, py = xs[start:start + step, None], ys[start:start + step, None]
        hit = (np.minimum(y0, y1) <= py) & (py < np.maximum(y0, y1))
        with np.errstate(divide="ignore", invalid="ignore"):
            cx = x0 + (py - y0) * (x1 - x0) / (y1 - y0)
        out[start:start + step] = ((hit & (cx > px)).sum(axis=1) % 2) == 1
    return out
