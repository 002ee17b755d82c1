"""Point-in-polygon at pixel centres, even-odd rule: exact, and the same for a grid and for single points.

An edge from (x0, y0) to (x1, y1) is crossed by the horizontal ray from (px, py) towards +x when
``min(y0, y1) <= py < max(y0, y1)`` (half-open in y, so a vertex is counted once) and the crossing
``x0 + (py - y0) * (x1 - x0) / (y1 - y0)`` is ``> px``. A point is inside when that count is odd.
"""

from __future__ import annotations

import numpy as np

__all__ = ["inside_points", "inside_grid"]

_CHUNK = 1 << 20  # points x edges per step of inside_points


def _crossings(edges: np.ndarray, py: float) -> np.ndarray:
    """Sorted x of the crossings of the horizontal line y = py with ``edges``."""
    x0, y0, x1, y1 = edges.T
    hit = (np.minimum(y0, y1) <= py) & (py < np.maximum(y0, y1))
    if not hit.any():
        return np.zeros(0)
    x0, y0, x1, y1 = x0[hit], y0[hit], x1[hit], y1[hit]
    return np.sort(x0 + (py - y0) * (x1 - x0) / (y1 - y0))


def inside_grid(edges: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """(len(ys), len(xs)) bool: whether (xs[j], ys[i]) is inside, one scanline per row."""
    xs, ys = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
    out = np.zeros((len(ys), len(xs)), dtype=bool)
    if not len(edges):
        return out
    top, bottom = edges[:, [1, 3]].min(), edges[:, [1, 3]].max()
    for i, py in enumerate(ys):
        if not top <= py < bottom:
            continue
        cross = _crossings(edges, float(py))
        if len(cross):
            beyond = len(cross) - np.searchsorted(cross, xs, side="right")  # crossings with x > px
            out[i] = (beyond % 2) == 1
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
