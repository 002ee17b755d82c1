"""Tissue detection on a low-resolution view of a slide, an on-disk mask cache, overlays, inspect.

The mask is Otsu's threshold on HSV saturation (stained tissue is saturated, glass background
is near-grey); on a greyscale slide (no colour at all, so no saturation) it is Otsu's threshold on
darkness instead (tissue is darker than glass). Either has a floor so that an empty slide is not split in two by noise, followed by
morphological clean-up whose sizes are physical (µm) and converted to mask pixels with the
slide's resolution: specks smaller than ``min_object_um`` across are removed, holes smaller than
``max_hole_um`` across are filled.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

from .slides import Slide, open_slide, slide_identity

__all__ = [
    "TissueMask",
    "TissueParams",
    "compute_tissue_mask",
    "TissueMaskCache",
    "mask_overlay_png",
    "inspect_slide",
    "otsu_threshold",
    "otsu_threshold_hist",
]

log = logging.getLogger(__name__)
_ASSUMED_MPP = 0.5  # for sizing the morphology when a slide has no resolution metadata
_MASK_VERSION = 2  # bump when the algorithm changes: invalidates cached masks


@dataclass(frozen=True)
class TissueParams:
    """Tunables of :func:`compute_tissue_mask` (part of the cache key)."""

    min_saturation: float = 0.07  # threshold floor (0..1): below this nothing is tissue
    max_value_black: float = 0.12  # pixels darker than this (0..1) are pen/black borders, not tissue
    min_object_um: float = 60.0  # remove specks smaller than this across
    max_hole_um: float = 120.0  # fill holes smaller than this across
    smooth_um: float = 20.0  # closing then opening with a square this wide
    min_darkness: float = 0.2  # greyscale slides: threshold floor on 1 - value (tissue darker than this is kept)
    grey_fraction: float = 0.999  # a thumbnail is greyscale when this share of its pixels has no colour

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_saturation < 1.0:
            raise ValueError("min_saturation must be in [0, 1)")
        if not 0.0 <= self.max_value_black < 1.0:
            raise ValueError("max_value_black must be in [0, 1)")
        if not 0.0 <= self.min_darkness < 1.0:
            raise ValueError("min_darkness must be in [0, 1)")
        if not 0.0 < self.grey_fraction <= 1.0:
            raise ValueError("grey_fraction must be in (0, 1]")
        for name in ("min_object_um", "max_hole_um", "smooth_um"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")

    def key(self) -> str:
        return (
            f"v{_MASK_VERSION}-{self.min_saturation:g}-{self.max_value_black:g}-{self.min_object_um:g}"
            f"-{self.max_hole_um:g}-{self.smooth_um:g}-{self.min_darkness:g}-{self.grey_fraction:g}"
        )


@dataclass(frozen=True, eq=False)
class TissueMask:
    """A boolean tissue mask; ``downsample`` is level-0 pixels per mask pixel."""

    mask: np.ndarray
    downsample: float
    threshold: float = float("nan")  # saturation threshold used (0..1)
    _integral: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.mask, np.ndarray) or self.mask.dtype != np.bool_ or self.mask.ndim != 2:
            raise ValueError("mask must be a 2-D bool array")
        if not self.downsample > 0:
            raise ValueError(f"downsample must be positive, got {self.downsample}")
        integral = np.zeros((self.mask.shape[0] + 1, self.mask.shape[1] + 1), np.int32)
        inner = integral[1:, 1:]
        np.cumsum(self.mask, axis=0, dtype=np.int32, out=inner)
        np.cumsum(inner, axis=1, out=inner)
        object.__setattr__(self, "_integral", integral)
        self.mask.flags.writeable = False

    @property
    def tissue_fraction(self) -> float:
        """Fraction of the whole slide that is tissue."""
        return float(self._integral[-1, -1]) / max(1, self.mask.size)

    def fraction(self, level_downsample: float, x: float, y: float, w: float, h: float) -> float:
        """Tissue fraction of a region given in a level's pixel grid (``level_downsample`` of it).

        Outside the slide counts as background. Computed in O(1) from a summed-area table; the
        region is snapped outwards to whole mask pixels.
        """
        if w <= 0 or h <= 0:
            return 0.0
        f = level_downsample / self.downsample
        mh, mw = self.mask.shape
        x0, y0 = math.floor(x * f), math.floor(y * f)
        x1, y1 = max(x0 + 1, math.ceil((x + w) * f)), max(y0 + 1, math.ceil((y + h) * f))
        area = (x1 - x0) * (y1 - y0)
        cx0, cy0, cx1, cy1 = min(max(x0, 0), mw), min(max(y0, 0), mh), min(max(x1, 0), mw), min(max(y1, 0), mh)
        s = self._integral
        total = s[cy1, cx1] - s[cy0, cx1] - s[cy1, cx0] + s[cy0, cx0]
        return float(total) / area


def otsu_threshold(values: np.ndarray) -> float:
    """Otsu's threshold of uint8 ``values`` (returns a value in 0..255; > threshold is foreground)."""
    return otsu_threshold_hist(np.bincount(values.ravel(), minlength=256))


def otsu_threshold_hist(counts: np.ndarray) -> float:
    """Otsu's threshold from a 256-bin histogram."""
    hist = np.asarray(counts, np.float64)
    total = hist.sum()
    if total == 0:
        return 0.0
    bins = np.arange(256, dtype=np.float64)
    w0 = np.cumsum(hist)
    w1 = total - w0
    m0 = np.cumsum(hist * bins)
    mean0 = np.divide(m0, w0, out=np.zeros(256), where=w0 > 0)
    mean1 = np.divide(m0[-1] - m0, w1, out=np.zeros(256), where=w1 > 0)
    between = w0 * w1 * (mean0 - mean1) ** 2
    return float(np.argmax(between))


def _saturation(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """HSV saturation (0..255) and value (max channel) of uint8 RGB."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    mx = np.maximum(np.maximum(r, g), b)
    mn = np.minimum(np.minimum(r, g), b)
    num = (mx.astype(np.uint16) - mn) * 255
    sat = (num // np.maximum(mx, 1)).astype(np.uint8)
    return sat, mx


def _close_open(mask: np.ndarray, size: int) -> np.ndarray:
    """Closing then opening with a ``size`` x ``size`` square (separable min/max filters: fast)."""
    m = mask.view(np.uint8)
    m = ndimage.minimum_filter(ndimage.maximum_filter(m, size=size, mode="constant", cval=0), size=size, mode="constant", cval=0)
    m = ndimage.maximum_filter(ndimage.minimum_filter(m, size=size, mode="nearest"), size=size, mode="constant", cval=0)
    return m.astype(bool)


def _is_greyscale(sat: np.ndarray, params: TissueParams) -> bool:
    """No colour anywhere (R = G = B but for compression noise): a greyscale scan, not an empty colour one."""
    return float(np.count_nonzero(sat <= 8)) >= params.grey_fraction * sat.size


def _mask_from_rgb(rgb: np.ndarray, um_per_px: float, params: TissueParams) -> tuple[np.ndarray, float]:
    sat, value = _saturation(rgb)
    not_black = value >= params.max_value_black * 255
    feature, floor = sat, params.min_saturation
    if _is_greyscale(sat, params):
        feature, floor = 255 - value, params.min_darkness  # darkness: tissue absorbs, glass does not
    hist = np.bincount(feature.ravel(), minlength=256) - np.bincount(feature[~not_black], minlength=256)
    thr = max(otsu_threshold_hist(hist) if hist.any() else 255.0, floor * 255)
    mask = (feature > thr) & not_black
    size = int(round(params.smooth_um / um_per_px))
    if size >= 2:
        mask = _close_open(mask, size)
    min_area = (params.min_object_um / um_per_px) ** 2
    if min_area >= 1 and mask.any():
        labels, n = ndimage.label(mask)
        sizes = np.bincount(labels.ravel(), minlength=n + 1)
        keep = sizes >= min_area
        keep[0] = False
        mask = keep[labels]
    max_hole = (params.max_hole_um / um_per_px) ** 2
    if max_hole >= 1 and mask.any():
        labels, n = ndimage.label(~mask)
        if n:
            sizes = np.bincount(labels.ravel(), minlength=n + 1)
            border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
            small = sizes < max_hole
            small[0] = False
            small[border] = False
            mask = mask | small[labels]
    return mask, thr / 255.0


def compute_tissue_mask(slide: Slide, max_size: int = 2048, params: TissueParams | None = None) -> TissueMask:
    """Tissue mask of ``slide`` computed on a thumbnail whose longer side is at most ``max_size``."""
    params = params or TissueParams()
    rgb = slide.thumbnail(max_size)
    w0, h0 = slide.info.dimensions
    downsample = (w0 / rgb.shape[1] + h0 / rgb.shape[0]) / 2.0
    um_per_px = (slide.info.mpp or _ASSUMED_MPP) * downsample
    mask, thr = _mask_from_rgb(rgb, um_per_px, params)
    return TissueMask(mask=mask, downsample=downsample, threshold=thr)


class TissueMaskCache:
    """Tissue masks cached on disk as ``.npz``, keyed by slide identity (path, mtime, size) and
    the parameters. Safe for concurrent use (writes are atomic renames)."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def path_for(self, slide_path: str | os.PathLike[str], max_size: int, params: TissueParams) -> Path:
        ident = slide_identity(slide_path)
        key = f"{ident[0]}|{ident[1]}|{ident[2]}|{max_size}|{params.key()}"
        digest = hashlib.sha256(key.encode()).hexdigest()[:32]
        return self.directory / f"{Path(ident[0]).stem[:40]}-{digest}.npz"

    def get(self, slide: Slide, max_size: int = 2048, params: TissueParams | None = None) -> TissueMask:
        """The cached mask, or compute, store and return it."""
        params = params or TissueParams()
        path = self.path_for(slide.path, max_size, params)
        if path.exists():
            try:
                with np.load(path) as data:
                    shape = tuple(int(v) for v in data["shape"])
                    bits = np.unpackbits(data["bits"], count=shape[0] * shape[1])
                    return TissueMask(
                        mask=bits.reshape(shape).astype(bool),
                        downsample=float(data["downsample"]),
                        threshold=float(data["threshold"]),
                    )
            except (OSError, KeyError, ValueError) as err:
                log.warning("ignoring unreadable tissue-mask cache file %s: %s", path, err)
        mask = compute_tissue_mask(slide, max_size, params)
        fd, tmp = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez_compressed(
                    f,
                    bits=np.packbits(mask.mask.ravel()),
                    shape=np.asarray(mask.mask.shape),
                    downsample=mask.downsample,
                    threshold=mask.threshold,
                )
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return mask


def mask_overlay_png(
    slide: Slide,
    mask: TissueMask,
    path: str | os.PathLike[str],
    *,
    max_size: int = 1024,
    colour: tuple[int, int, int] = (0, 170, 80),
    alpha: float = 0.35,
) -> Path:
    """Write a thumbnail PNG with the tissue mask drawn semi-transparently, plus its contour."""
    thumb = slide.thumbnail(max_size)
    h, w = thumb.shape[:2]
    m = np.asarray(Image.fromarray(mask.mask.astype(np.uint8) * 255).resize((w, h), Image.Resampling.NEAREST)) > 0
    out = thumb.astype(np.float32)
    out[m] = out[m] * (1.0 - alpha) + np.asarray(colour, np.float32) * alpha
    contour = m & ~ndimage.binary_erosion(m, border_value=0)
    contour = ndimage.binary_dilation(contour) if max(h, w) > 512 else contour
    out[contour] = np.asarray(colour, np.float32) * 0.6
    path = Path(path)
    Image.fromarray(out.astype(np.uint8)).save(path, format="PNG")
    return path


def inspect_slide(path: str | os.PathLike[str], *, tissue: bool = True, tissue_max_size: int = 1024) -> dict[str, Any]:
    """Facts about a slide as a JSON-serialisable dict (for ``loader-service inspect``)."""
    with open_slide(path) as slide:
        info = slide.info
        result: dict[str, Any] = {
            "path": info.path,
            "file_size": os.path.getsize(info.path),
            "vendor": info.vendor,
            "backend": info.backend,
            "width": info.dimensions[0],
            "height": info.dimensions[1],
            "level_count": info.level_count,
            "levels": [
                {
                    "level": i,
                    "width": lv.width,
                    "height": lv.height,
                    "downsample": round(lv.downsample, 4),
                    "tile_width": lv.tile_width,
                    "tile_height": lv.tile_height,
                    "compression": lv.compression,
                    "mpp": None if info.mpp is None else round(info.mpp * lv.downsample, 5),
                }
                for i, lv in enumerate(info.levels)
            ],
            "mpp_x": info.mpp_x,
            "mpp_y": info.mpp_y,
            "mpp": info.mpp,
        }
        if tissue:
            mask = compute_tissue_mask(slide, tissue_max_size)
            result["tissue_fraction"] = round(mask.tissue_fraction, 4)
            result["tissue_threshold"] = round(mask.threshold, 4)
        return result
