"""The slide-reading layer: open whole-slide images and read RGB regions fast.

``open_slide`` picks the TIFF fast path (tifffile-parsed structure, ``os.pread`` + multithreaded
decode, decoded-tile cache) for tiled TIFF / Aperio SVS / OME-TIFF files and OpenSlide for
everything else (DICOM, other vendors). See docs/slides.md.
"""

from __future__ import annotations

import os

from .bad_tiles import BadTiles
from .base import MAX_READ_FACTOR, MppOutOfRange, Slide
from .cache import CacheStats, TileCache
from .errors import SlideError, SlideOpenError, SlideReadError
from .info import LevelInfo, SlideInfo
from .pool import DecodePool, available_cores
from .openslide_backend import OpenSlideSlide
from .tiff import NotFastPathFile, TiffSlide, read_patches_of, warm_up_read_kernels

__all__ = [
    "BadTiles",
    "LevelInfo",
    "SlideInfo",
    "Slide",
    "MAX_READ_FACTOR",
    "MppOutOfRange",
    "open_slide",
    "SlideError",
    "SlideOpenError",
    "SlideReadError",
    "TileCache",
    "CacheStats",
    "DecodePool",
    "available_cores",
    "slide_identity",
    "TiffSlide",
    "OpenSlideSlide",
    "read_patches_of",
    "warm_up_read_kernels",
]

_BACKENDS = ("auto", "tiff", "openslide")


def slide_identity(path: str | os.PathLike[str]) -> tuple[str, int, int]:
    """(real path, mtime_ns, size): identifies one version of a slide file (cache keys)."""
    p = os.fspath(path)
    st = os.stat(p)
    return (os.path.realpath(p), st.st_mtime_ns, st.st_size)


def open_slide(
    path: str | os.PathLike[str],
    *,
    cache: TileCache | None = None,
    pool: DecodePool | None = None,
    backend: str = "auto",
    bad_tiles: BadTiles | None = None,
) -> Slide:
    """Open a whole-slide image.

    ``backend``: 'tiff' (fast path only), 'openslide', or 'auto' (fast path when the file is a
    tiled TIFF it supports, else OpenSlide). ``cache`` and ``pool`` are used by the fast path:
    without a pool tiles decode in the calling thread, without a cache nothing is kept. ``bad_tiles``
    (fast path) remembers damaged tiles so that later reads fail without touching their bytes.
    Raises :class:`SlideOpenError` (naming the file and the cause) when the file cannot be used.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    p = os.fspath(path)
    try:
        st = os.stat(p)
    except FileNotFoundError as err:
        raise SlideOpenError(p, "no such file", "check the path (relative paths are resolved from the manifest)") from err
    except OSError as err:
        raise SlideOpenError(p, f"cannot access the file: {err.strerror or err}") from err
    if not os.path.isfile(p):
        raise SlideOpenError(p, "not a regular file")
    if st.st_size == 0:
        raise SlideOpenError(p, "the file is empty (0 bytes)")
    fast_error: NotFastPathFile | None = None
    if backend in ("auto", "tiff"):
        try:
            return TiffSlide(p, cache=cache, pool=pool, bad_tiles=bad_tiles)
        except NotFastPathFile as err:
            if backend == "tiff":
                raise SlideOpenError(p, f"the TIFF fast path cannot read it: {err}") from err
            fast_error = err
        except PermissionError as err:
            raise SlideOpenError(p, f"permission denied: {err.strerror}") from err
    try:
        return OpenSlideSlide(p)
    except SlideOpenError as err:
        if fast_error is None:
            raise
        raise SlideOpenError(p, f"{err.reason}; the TIFF fast path also refused it: {fast_error}") from err
