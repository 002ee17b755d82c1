"""A slide's annotations: class-named shapes in level-0 pixels, or a label-mask image; classified at points."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from loader_service.annotations.raster import inside_grid, inside_points

__all__ = ["Shape", "LabelMask", "SlideAnnotations", "AnnotationError"]


class AnnotationError(ValueError):
    """An annotation file that cannot be used: the message names the file and the feature, and what to fix."""

    def __init__(self, message: str, reason: str = "annotation_malformed") -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Shape:
    """One annotation: its class and its rings (polygon exteriors and holes, every part of a multipolygon).

    A point is inside when a ray from it crosses the rings an odd number of times (even-odd rule over all rings
    of the shape): holes are holes, and parts of a multipolygon add up (overlapping parts cancel)."""

    name: str
    rings: tuple[np.ndarray, ...]  # each (n, 2) float64 (x, y) in level-0 pixels, closed implicitly

    @cached_property
    def edges(self) -> np.ndarray:
        """(e, 4) float64 edges (x0, y0, x1, y1) of every ring."""
        parts = [np.concatenate([r, np.roll(r, -1, axis=0)], axis=1) for r in self.rings if len(r) >= 3]
        return np.concatenate(parts) if parts else np.zeros((0, 4))

    @cached_property
    def bounds(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1): no point outside it is inside the shape."""
        points = np.concatenate(self.rings)
        return float(points[:, 0].min()), float(points[:, 1].min()), float(points[:, 0].max()), float(points[:, 1].max())

    def may_touch(self, xs: np.ndarray, ys: np.ndarray) -> bool:
        """Whether the box of the points meets the shape's bounds (else no point is inside)."""
        x0, y0, x1, y1 = self.bounds
        return bool(len(xs)) and xs.min() <= x1 and xs.max() >= x0 and ys.min() <= y1 and ys.max() >= y0


@dataclass(frozen=True)
class LabelMask:
    """A label image: pixel value v > 0 is class ``str(v)``; one pixel covers ``downsample`` level-0 pixels."""

    values: np.ndarray  # (h, w) integer
    downsample: float


@dataclass(frozen=True)
class SlideAnnotations:
    """Shapes painted in file order (a later shape wins where they overlap), or a label mask."""

    source: str  # the file as the manifest names it (for messages)
    shapes: tuple[Shape, ...] = ()
    mask: LabelMask | None = None
    names: tuple[str, ...] = field(default=())  # class names present, sorted

    def classify_points(self, xs: np.ndarray, ys: np.ndarray, index: dict[str, int]) -> np.ndarray:
        """Class index (``index[name]``; 0 = none) at each level-0 point (xs[i], ys[i])."""
        xs, ys = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
        out = np.zeros(len(xs), dtype=np.int64)
        if self.mask is not None:
            return self._mask_lookup(xs, ys, index)
        for shape in self.shapes:
            x0, y0, x1, y1 = shape.bounds
            near = np.flatnonzero((xs >= x0) & (xs <= x1) & (ys >= y0) & (ys <= y1))  # only these can be inside
            if len(near):
                out[near[inside_points(shape.edges, xs[near], ys[near])]] = index[shape.name]
        return out

    def classify_grid(self, xs: np.ndarray, ys: np.ndarray, index: dict[str, int]) -> np.ndarray:
        """Class index at every (xs[j], ys[i]) of a grid: (len(ys), len(xs)) int64."""
        xs, ys = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
        if self.mask is not None:
            gx, gy = np.meshgrid(xs, ys)
            return self._mask_lookup(gx.ravel(), gy.ravel(), index).reshape(len(ys), len(xs))
        out = np.zeros((len(ys), len(xs)), dtype=np.int64)
        for shape in self.shapes:
            if shape.may_touch(xs, ys):
                out[inside_grid(shape.edges, xs, ys)] = index[shape.name]
        return out

    def _mask_lookup(self, xs: np.ndarray, ys: np.ndarray, index: dict[str, int]) -> np.ndarray:
        assert self.mask is not None
        values = self.mask.values
        h, w = values.shape
        col = np.floor(np.asarray(xs) / self.mask.downsample).astype(np.int64)
        row = np.floor(np.asarray(ys) / self.mask.downsample).astype(np.int64)
        ok = (col >= 0) & (col < w) & (row >= 0) & (row < h)
        found = np.zeros(len(col), dtype=np.int64)
        found[ok] = values[row[ok], col[ok]]
        lut = np.zeros(int(values.max()) + 1 if values.size else 1, dtype=np.int64)
        for v in np.unique(values):
            if v > 0:
                lut[v] = index[str(int(v))]
        return lut[found]
