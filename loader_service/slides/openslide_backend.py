"""The OpenSlide backend: DICOM, vendor formats, and whatever the TIFF fast path cannot parse."""

from __future__ import annotations

import threading

import numpy as np
import openslide

from .base import Slide
from .errors import SlideOpenError, SlideReadError
from .info import LevelInfo, SlideInfo
from .tiff import _plausible

__all__ = ["OpenSlideSlide", "composite_on_white"]


def composite_on_white(rgba: np.ndarray, out: np.ndarray) -> None:
    """Write RGBA (non-premultiplied, as openslide-python returns) over white into ``out`` RGB."""
    alpha = rgba[..., 3]
    if alpha.min() == 255:
        out[...] = rgba[..., :3]
        return
    a = alpha[..., None].astype(np.uint16)
    out[...] = (rgba[..., :3].astype(np.uint16) * a + 255 * (255 - a) + 127) // 255


def _float_prop(props: openslide._PropertyMap, key: str) -> float | None:  # type: ignore[name-defined]
    value = props.get(key)
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


class OpenSlideSlide(Slide):
    """A slide read through OpenSlide. Create through :func:`open_slide`.

    ``read_region`` converts level coordinates to level 0 as ``round(x * downsample)``; for
    levels whose downsample is not an integer OpenSlide may then resample by a fraction of a
    pixel, so it can differ slightly from the fast path there. The TileCache and DecodePool are
    not used (OpenSlide decodes in the calling thread and keeps its own tile cache).
    """

    def __init__(self, path: str) -> None:
        try:
            osr = openslide.OpenSlide(path)
        except openslide.OpenSlideUnsupportedFormatError as err:
            raise SlideOpenError(path, "OpenSlide does not recognise the file format") from err
        except (openslide.OpenSlideError, OSError, ValueError) as err:
            raise SlideOpenError(path, f"OpenSlide could not open it: {err}") from err
        props = osr.properties
        levels = []
        for i, ((w, h), ds) in enumerate(zip(osr.level_dimensions, osr.level_downsamples)):
            tw = int(props.get(f"openslide.level[{i}].tile-width", 256) or 256)
            th = int(props.get(f"openslide.level[{i}].tile-height", 256) or 256)
            levels.append(LevelInfo(int(w), int(h), 1.0 if i == 0 else float(ds), tw, th, "unknown"))
        mpp_x = _plausible(_float_prop(props, openslide.PROPERTY_NAME_MPP_X))
        mpp_y = _plausible(_float_prop(props, openslide.PROPERTY_NAME_MPP_Y))
        info = SlideInfo(
            path=path,
            vendor=props.get(openslide.PROPERTY_NAME_VENDOR) or "unknown",
            backend="openslide",
            levels=tuple(levels),
            mpp_x=mpp_x,
            mpp_y=mpp_y,
        )
        super().__init__(info)
        self._osr: openslide.OpenSlide | None = osr
        self._lock = threading.Lock()

    @property
    def properties(self) -> dict[str, str]:
        osr = self._osr
        return dict(osr.properties) if osr is not None else {}

    def close(self) -> None:
        with self._lock:
            if self._osr is not None:
                self._osr.close()
                self._osr = None

    def _read_into(self, level: int, scale: int, x: int, y: int, width: int, height: int, out: np.ndarray) -> None:
        if scale != 1:
            raise ValueError("the OpenSlide backend decodes at full scale only")
        osr = self._osr
        if osr is None:
            raise SlideReadError(self.path, "the slide is closed", "open it again")
        ds = self.info.levels[level].downsample
        try:
            img = osr.read_region((int(round(x * ds)), int(round(y * ds))), level, (width, height))
        except openslide.OpenSlideError as err:
            raise SlideReadError(self.path, f"OpenSlide failed to read level {level} at ({x}, {y}): {err}") from err
        composite_on_white(np.asarray(img), out)
