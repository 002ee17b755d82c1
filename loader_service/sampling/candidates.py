"""Where patches may come from: grid cells of a slide whose tissue fraction passes a threshold."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from loader_service.dataset import SlideRecord
from loader_service.errors import InvalidRequest
from loader_service.slides import MAX_READ_FACTOR
from loader_service.slides.base import MPP_TOLERANCE

_DCT_REACH = 8  # JPEG tiles decode at down to 1/8 scale

__all__ = ["SlideGeometry", "Candidates", "Unservable", "mpp_reach", "slide_geometry", "tissue_cells", "CandidateCache"]


@dataclass(frozen=True)
class SlideGeometry:
    """A slide seen in a session's sampling grid: ``scale`` level-0 pixels per sample pixel."""

    level: int  # pyramid level read (for mpp requests: the level read before resizing)
    mpp: float  # µm/px of the sample grid (0 when the slide has no mpp)
    scale: float
    width: int  # slide size in sample pixels
    height: int


@dataclass(frozen=True)
class Candidates:
    geometry: SlideGeometry
    cells: np.ndarray  # (n, 2) int64 top-left (x, y) in sample pixels, ordered by row then column


class Unservable(InvalidRequest):
    """A slide cannot serve a session's level or mpp. ``reason``: level_missing, no_mpp, mpp_too_fine
    or mpp_too_coarse (beyond MAX_READ_FACTOR of the coarsest level)."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def mpp_reach(record: SlideRecord) -> float:
    """The coarsest mpp the slide serves within MAX_READ_FACTOR (0 without mpp metadata)."""
    info = record.info
    assert info is not None
    last = info.levels[-1]
    return (info.mpp or 0.0) * last.downsample * (_DCT_REACH if last.compression == "jpeg" else 1) * MAX_READ_FACTOR


def slide_geometry(record: SlideRecord, level: int, mpp: float, fallback_downsample: float | None = None
                   ) -> SlideGeometry:
    """The slide in the sampling grid of ``level`` or ``mpp``; raises :class:`Unservable` when it has no such grid.

    ``fallback_downsample`` (mixed datasets, fallback asked): instead of raising, a missing level is read at that
    downsample (resampled from the nearest level; the coarsest level when the slide has no mpp) and a too-fine
    mpp is upsampled from level 0. A slide without mpp still cannot serve an mpp.
    """
    info = record.info
    assert info is not None
    width0, height0 = info.levels[0].width, info.levels[0].height
    base_mpp = info.mpp or 0.0
    fallback = fallback_downsample is not None
    if mpp > 0:
        if not base_mpp:
            raise Unservable(f"slide {record.slide_id} has no microns-per-pixel metadata, so it cannot be read at "
                             f"{mpp} µm/px", "no_mpp")
        scale = mpp / base_mpp
        if scale < 0.999 and not fallback:
            raise Unservable(f"{mpp} µm/px is finer than slide {record.slide_id}'s full resolution "
                             f"({base_mpp:.4f} µm/px)", "mpp_too_fine")
        level_read = 0
        for i, lv in enumerate(info.levels):
            if lv.downsample <= scale * 1.001:
                level_read = i
        extra = scale / info.levels[level_read].downsample
        dct = _DCT_REACH if info.levels[level_read].compression == "jpeg" else 1  # the read checks the exact reach
        if extra > MAX_READ_FACTOR * dct * (1.0 + MPP_TOLERANCE):
            raise Unservable(
                f"{mpp} µm/px would decode {extra / dct:.1f}× the patch's size per side from slide "
                f"{record.slide_id}'s level {level_read}; the server decodes at most {MAX_READ_FACTOR:g}× "
                f"(MAX_READ_FACTOR), so this slide serves mpp up to {mpp_reach(record):.4g} µm/px", "mpp_too_coarse"
            )
        return SlideGeometry(level_read, mpp, scale, int(width0 / scale), int(height0 / scale))
    if level >= len(info.levels):
        if fallback_downsample is None:
            raise Unservable(f"level {level} does not exist in slide {record.slide_id} (it has {len(info.levels)} "
                             f"levels, 0..{len(info.levels) - 1})", "level_missing")
        if base_mpp:
            return slide_geometry(record, 0, base_mpp * fallback_downsample, fallback_downsample)
        level = len(info.levels) - 1  # no mpp: no resampling target but the nearest level itself
    lv = info.levels[level]
    return SlideGeometry(level, base_mpp * lv.downsample, lv.downsample, lv.width, lv.height)


def tissue_cells(record: SlideRecord, geometry: SlideGeometry, patch: tuple[int, int], stride: int,
                 threshold: float) -> np.ndarray:
    """Top-left corners of the grid cells (``patch`` = (height, width)) whose tissue fraction is >= threshold."""
    mask = record.tissue
    assert mask is not None
    ph, pw = patch
    if geometry.width < pw or geometry.height < ph:
        return np.zeros((0, 2), dtype=np.int64)
    xs = np.arange(0, geometry.width - pw + 1, stride, dtype=np.int64)
    ys = np.arange(0, geometry.height - ph + 1, stride, dtype=np.int64)
    m = mask.mask.astype(np.float64)
    integral = np.zeros((m.shape[0] + 1, m.shape[1] + 1))
    integral[1:, 1:] = m.cumsum(0).cumsum(1)
    per_mask_px = geometry.scale / mask.downsample  # mask pixels per sample pixel

    def bounds(starts: np.ndarray, size: int, limit: int) -> tuple[np.ndarray, np.ndarray]:
        lo = np.floor(starts * per_mask_px).astype(np.int64)
        hi = np.ceil((starts + size) * per_mask_px).astype(np.int64)
        lo = np.clip(lo, 0, limit)
        hi = np.clip(np.maximum(hi, lo + 1), 0, limit)
        return lo, hi

    x0, x1 = bounds(xs, pw, m.shape[1])
    y0, y1 = bounds(ys, ph, m.shape[0])
    total = (
        integral[y1][:, x1] - integral[y0][:, x1] - integral[y1][:, x0] + integral[y0][:, x0]
    )
    area = (y1 - y0)[:, None] * (x1 - x0)[None, :]
    fraction = np.where(area > 0, total / np.maximum(area, 1), 0.0)
    # threshold 0: every cell (no tissue filter); otherwise at least that fraction, and some tissue.
    iy, ix = np.nonzero(fraction >= threshold) if threshold <= 0 else np.nonzero(fraction >= max(threshold, 1e-9))
    return np.stack([xs[ix], ys[iy]], axis=1)


class CandidateCache:
    """Candidates per (slide, level/mpp, patch, stride, threshold), shared by the sessions of a dataset."""

    def __init__(self) -> None:
        self._cache: dict[tuple[object, ...], Candidates] = {}
        self._lock = threading.Lock()

    def get(self, record: SlideRecord, level: int, mpp: float, patch: tuple[int, int], stride: int,
            threshold: float, fallback_downsample: float | None = None) -> Candidates:
        key = (record.path, level, mpp, patch, stride, threshold, fallback_downsample)
        with self._lock:
            found = self._cache.get(key)
        if found is not None:
            return found
        geometry = slide_geometry(record, level, mpp, fallback_downsample)
        result = Candidates(geometry, tissue_cells(record, geometry, patch, stride, threshold))
        with self._lock:
            self._cache[key] = result
        return result
