"""The backend-independent part of :class:`Slide`: argument checks, mpp-based reads, thumbnails."""

from __future__ import annotations

import abc
import math
from types import TracebackType

import numpy as np
from PIL import Image

from .errors import SlideError
from .info import SlideInfo

__all__ = ["Slide", "MPP_TOLERANCE", "MAX_READ_FACTOR", "MppOutOfRange"]

#: relative tolerance when matching a requested microns-per-pixel to a level's
MPP_TOLERANCE = 0.02
#: an mpp read takes at most this many source pixels per output pixel along each side (16× its pixels) from
#: the level it reads; coarser targets need a pyramid level close enough to them
MAX_READ_FACTOR = 4.0


class MppOutOfRange(ValueError):
    """The target mpp is coarser than the slide's pyramid serves within MAX_READ_FACTOR."""
_RESAMPLE = Image.Resampling.BOX  # area averaging: antialiased, exact for integer factors


def _dct_scale(scales: tuple[int, ...], extra: float) -> int:
    """The largest decode scale that leaves a whole-number factor (or none) for the area resize after it.

    PIL's BOX filter weighs each source pixel fully or not at all, so a fractional factor after a DCT-scaled
    decode (e.g. 1/2 then 1.5 for 3x) is not an area average of the full image: measured up to 96 levels off
    on a real scan (docs/slides.md). Decoding at 1/s is itself close to an s x s average (mean error < 0.7).
    "Whole" within MPP_TOLERANCE: pyramids whose downsamples are not exact powers of two (4.004) still use it.
    """
    whole = [s for s in scales
             if s <= extra * (1.0 + 1e-9) and abs(extra / s - round(extra / s)) <= MPP_TOLERANCE * extra / s]
    return max(whole, default=1)


def _check_out(out: np.ndarray, width: int, height: int) -> None:
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out must be a numpy array, got {type(out).__name__}")
    if out.dtype != np.uint8 or out.shape != (height, width, 3):
        raise ValueError(f"out must be uint8 of shape {(height, width, 3)}, got {out.dtype} {out.shape}")
    if not out.flags.writeable:
        raise ValueError("out must be writable")


class Slide(abc.ABC):
    """An open whole-slide image. Thread-safe: many threads may call the read methods at once.

    Coordinates passed to :meth:`read_region` are in the pixel grid of the level read, not of
    level 0. Pixels outside the image are white (255). Use :func:`open_slide` to get one.
    """

    info: SlideInfo

    def __init__(self, info: SlideInfo) -> None:
        self.info = info

    # --- what backends implement -------------------------------------------------------------

    @abc.abstractmethod
    def _read_into(self, level: int, scale: int, x: int, y: int, width: int, height: int, out: np.ndarray) -> None:
        """Write the region of ``level`` decoded at 1/``scale`` into ``out`` (h, w, 3), white outside."""

    def _scales(self, level: int) -> tuple[int, ...]:
        """Reduced scales at which ``level`` can be decoded directly (JPEG DCT scaling)."""
        return (1,)

    @abc.abstractmethod
    def close(self) -> None:
        """Release the file. Reads after close raise :class:`SlideReadError`."""

    # --- public API --------------------------------------------------------------------------

    @property
    def path(self) -> str:
        return self.info.path

    def _check_level(self, level: int) -> None:
        if not isinstance(level, (int, np.integer)) or not 0 <= level < self.info.level_count:
            raise ValueError(f"level must be in 0..{self.info.level_count - 1}, got {level!r}")

    def read_region(
        self, level: int, x: int, y: int, width: int, height: int, out: np.ndarray | None = None
    ) -> np.ndarray:
        """Read a ``width`` x ``height`` RGB region at ``(x, y)`` of ``level`` (level coordinates).

        Returns uint8 (height, width, 3), C-contiguous unless ``out`` (a writable uint8
        (height, width, 3) array or view, e.g. a slice of a batch buffer) is given, in which case
        the pixels are written there once and ``out`` is returned.
        """
        self._check_level(level)
        x, y, width, height = int(x), int(y), int(width), int(height)
        if width < 0 or height < 0:
            raise ValueError(f"region size must be >= 0, got {width}x{height}")
        if out is None:
            out = np.empty((height, width, 3), np.uint8)
        else:
            _check_out(out, width, height)
        if width and height:
            self._read_into(level, 1, x, y, width, height, out)
        return out

    def read_patches(self, level: int, xs: np.ndarray, ys: np.ndarray, width: int, height: int, out: np.ndarray,
                     rows: np.ndarray) -> None:
        """Patches of one size: patch k at ``(xs[k], ys[k])`` of ``level`` into ``out[rows[k]]`` (``out``: uint8
        (n, height, width, 3)). The same pixels as :meth:`read_region` per patch; backends may read them as one
        batch (the TIFF fast path does)."""
        for x, y, row in zip(np.asarray(xs).tolist(), np.asarray(ys).tolist(), np.asarray(rows).tolist()):
            self.read_region(level, x, y, width, height, out=out[row])

    def level_for_mpp(self, mpp: float) -> tuple[int, float]:
        """The level to read for a target microns-per-pixel, and the extra downsample (>= 1).

        The chosen level is the coarsest one whose resolution is at least the target (so only
        downsampling is ever needed); a level within 2% of the target counts as exact
        (factor 1.0). Raises SlideError when the slide has no mpp or the target is finer than
        level 0.
        """
        base = self.info.mpp
        if base is None:
            raise SlideError(
                self.path,
                "the slide has no microns-per-pixel metadata",
                "read by level with read_region instead, or fix the file's resolution metadata",
            )
        if not mpp > 0 or not math.isfinite(mpp):
            raise ValueError(f"mpp must be a positive number, got {mpp!r}")
        if mpp < base * (1.0 - MPP_TOLERANCE):
            raise SlideError(
                self.path,
                f"requested {mpp:g} µm/px is finer than the slide's finest level ({base:.4g} µm/px)",
                "request an mpp >= the slide's, or exclude this slide",
            )
        best = 0
        for i, lv in enumerate(self.info.levels):
            if base * lv.downsample <= mpp * (1.0 + MPP_TOLERANCE):
                best = i
        extra = mpp / (base * self.info.levels[best].downsample)
        if abs(extra - 1.0) <= MPP_TOLERANCE or extra < 1.0:
            extra = 1.0
        return best, extra

    def read_plan(self, mpp: float) -> tuple[int, int, float]:
        """How a read at ``mpp`` is done: (level, JPEG DCT scale, area-resize factor per side).

        Raises MppOutOfRange when the resize would take more than MAX_READ_FACTOR decoded pixels per output
        pixel along a side (the pyramid has no level close enough to the target), before anything is read.
        """
        level, extra = self.level_for_mpp(mpp)
        scale = _dct_scale(self._scales(level), extra)  # accurate: a whole-number resize after the DCT decode
        if extra / scale > MAX_READ_FACTOR * (1.0 + MPP_TOLERANCE):  # bounded first: the coarsest decode there is
            scale = max(s for s in self._scales(level) if s <= extra * (1.0 + 1e-9))
        factor = extra / scale
        if factor > MAX_READ_FACTOR * (1.0 + MPP_TOLERANCE):
            last = len(self.info.levels) - 1
            reach = (self.info.mpp or 0.0) * self.info.levels[last].downsample * max(self._scales(last))
            raise MppOutOfRange(
                f"{mpp:g} µm/px would decode {factor:.1f}× the output's size per side from level {level}; the "
                f"server decodes at most {MAX_READ_FACTOR:g}× (MAX_READ_FACTOR), so this slide serves mpp up to "
                f"{reach * MAX_READ_FACTOR:.4g} µm/px"
            )
        return level, scale, factor

    def read_region_mpp(
        self, mpp: float, x: int, y: int, width: int, height: int, out: np.ndarray | None = None
    ) -> np.ndarray:
        """Like :meth:`read_region` but in the pixel grid of the target microns-per-pixel.

        Reads the best level; when no level matches, JPEG tiles are decoded at 1/2, 1/4 or 1/8
        scale where that is not coarser than needed, and the rest of the way is an area resize.
        """
        level, scale, f = self.read_plan(mpp)
        if scale == 1 and f == 1.0:
            return self.read_region(level, x, y, width, height, out)
        x, y, width, height = int(x), int(y), int(width), int(height)
        if width < 0 or height < 0:
            raise ValueError(f"region size must be >= 0, got {width}x{height}")
        if out is None:
            out = np.empty((height, width, 3), np.uint8)
        else:
            _check_out(out, width, height)
        if not (width and height):
            return out
        if abs(f - 1.0) < 1e-9:
            self._read_into(level, scale, x, y, width, height, out)
            return out
        box = (x * f, y * f, (x + width) * f, (y + height) * f)
        self._read_resampled(level, scale, box, out)
        return out

    def thumbnail(self, max_size: int) -> np.ndarray:
        """The whole slide, its longer side ``max_size`` pixels (never enlarged), uint8 RGB."""
        if max_size < 1:
            raise ValueError(f"max_size must be >= 1, got {max_size}")
        w0, h0 = self.info.dimensions
        d = max(1.0, max(w0, h0) / max_size)
        tw, th = max(1, round(w0 / d)), max(1, round(h0 / d))
        level = 0
        for i, lv in enumerate(self.info.levels):
            if lv.downsample <= d * (1.0 + 1e-6):
                level = i
        lv = self.info.levels[level]
        extra = d / lv.downsample
        scale = max(s for s in self._scales(level) if s <= max(1.0, extra) * (1.0 + 1e-9))
        out = np.empty((th, tw, 3), np.uint8)
        if scale == 1 and (tw, th) == (lv.width, lv.height):
            self._read_into(level, 1, 0, 0, tw, th, out)
            return out
        self._read_resampled(level, scale, (0.0, 0.0, lv.width / scale, lv.height / scale), out)
        return out

    def _read_resampled(
        self, level: int, scale: int, box: tuple[float, float, float, float], out: np.ndarray
    ) -> None:
        """Area-resample ``box`` (float coordinates in the level's grid at 1/scale) into ``out``."""
        bx0, by0, bx1, by1 = box
        height, width = out.shape[:2]
        margin = int(math.ceil(max((bx1 - bx0) / width, (by1 - by0) / height))) + 1
        ix0, iy0 = math.floor(bx0) - margin, math.floor(by0) - margin
        ix1, iy1 = math.ceil(bx1) + margin, math.ceil(by1) + margin
        src = np.empty((iy1 - iy0, ix1 - ix0, 3), np.uint8)
        self._read_into(level, scale, ix0, iy0, ix1 - ix0, iy1 - iy0, src)
        resized = Image.fromarray(src).resize(
            (width, height), _RESAMPLE, box=(bx0 - ix0, by0 - iy0, bx1 - ix0, by1 - iy0)
        )
        np.copyto(out, np.asarray(resized))

    def __enter__(self) -> Slide:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        w, h = self.info.dimensions
        return (
            f"{type(self).__name__}({self.info.path!r}, {w}x{h}, levels={self.info.level_count}, "
            f"vendor={self.info.vendor!r}, mpp={self.info.mpp})"
        )
