"""The TIFF fast path: tifffile parses the structure once; tiles are read with ``os.pread`` and
decoded on a :class:`DecodePool`, with decoded tiles kept in a shared :class:`TileCache`.

Handles generic pyramidal tiled TIFF (levels in the main IFD chain), Aperio SVS (thumbnail,
label and macro images skipped) and OME-TIFF / libvips pyramids stored as SubIFDs.
"""

from __future__ import annotations

import logging
import math
import os
import re
import threading
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import tifffile

from .base import Slide
from .batched import BatchedJpegDecoder, batchable
from .bad_tiles import BadTiles
from .cache import TileCache, data_address
from .codecs import COMPRESSION_NAMES, JPEG_SCALES, TileDecoder, UnsupportedTileFormat, jpeg_complete
from .errors import SlideOpenError, SlideReadError
from .info import LevelInfo, SlideInfo
from .pool import DecodePool

__all__ = ["TiffSlide", "NotFastPathFile", "parse_mpp", "MPP_PLAUSIBLE", "read_patches_of", "warm_up_read_kernels"]

log = logging.getLogger(__name__)

#: microns-per-pixel values outside this range are treated as "unknown" (e.g. 72 dpi defaults)
MPP_PLAUSIBLE = (0.01, 100.0)
#: TIFF files from these vendors need OpenSlide's vendor drivers (overlaps, sparse tiles, ...)
_DEFER_TO_OPENSLIDE = frozenset({"ndpi", "scn", "philips", "bif"})
_OME_UNITS_TO_UM = {
    "pm": 1e-6, "Å": 1e-4, "nm": 1e-3, "µm": 1.0, "um": 1.0, "μm": 1.0, "micron": 1.0,
    "mm": 1e3, "cm": 1e4, "dm": 1e5, "m": 1e6, "in": 25400.0, "inch": 25400.0,
}  # fmt: skip


class NotFastPathFile(Exception):
    """The file is not something the fast path reads; ``open_slide(backend='auto')`` tries OpenSlide."""


@dataclass(frozen=True)
class _Level:
    info: LevelInfo
    decoder: TileDecoder
    offsets: np.ndarray
    counts: np.ndarray
    tiles_across: int
    tiles_down: int

    def __post_init__(self) -> None:
        n = self.tiles_across * self.tiles_down
        if self.offsets.shape != (n,) or self.counts.shape != (n,):
            raise UnsupportedTileFormat(f"expected {n} tile offsets, found {self.offsets.shape[0]}")


def _plausible(mpp: float | None) -> float | None:
    if mpp is None or not math.isfinite(mpp):
        return None
    lo, hi = MPP_PLAUSIBLE
    return mpp if lo <= mpp <= hi else None


def _ome_mpp(xml: str) -> tuple[float | None, float | None]:
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None, None
    for el in root.iter():
        if el.tag.endswith("}Pixels") or el.tag == "Pixels":
            values = []
            for axis in ("X", "Y"):
                v = el.get(f"PhysicalSize{axis}")
                unit = el.get(f"PhysicalSize{axis}Unit", "µm")
                factor = _OME_UNITS_TO_UM.get(unit)
                values.append(float(v) * factor if v is not None and factor is not None else None)
            return values[0], values[1]
    return None, None


def _resolution_mpp(page: tifffile.TiffPage) -> tuple[float | None, float | None]:
    unit_tag = page.tags.get("ResolutionUnit")
    unit = int(unit_tag.value) if unit_tag is not None else 2
    per_unit = {2: 25400.0, 3: 10000.0}.get(unit)  # µm per inch / per centimetre
    if per_unit is None:
        return None, None
    values = []
    for name in ("XResolution", "YResolution"):
        tag = page.tags.get(name)
        if tag is None:
            values.append(None)
            continue
        num, den = tag.value if isinstance(tag.value, tuple) else (tag.value, 1)
        values.append(per_unit * den / num if num and den else None)
    return values[0], values[1]


def parse_mpp(tf: tifffile.TiffFile, page0: tifffile.TiffPage) -> tuple[float | None, float | None]:
    """Microns per pixel at level 0 from Aperio ``MPP =``, OME PhysicalSize or X/YResolution."""
    desc = page0.description or ""
    if desc.startswith("Aperio"):
        m = re.search(r"\|\s*MPP\s*=\s*([0-9.eE+-]+)", desc)
        if m:
            v = _plausible(float(m.group(1)))
            if v is not None:
                return v, v
    if tf.is_ome and tf.ome_metadata:
        mx, my = _ome_mpp(tf.ome_metadata)
        mx, my = _plausible(mx), _plausible(my)
        if mx is not None or my is not None:
            return mx, my
    mx, my = _resolution_mpp(page0)
    mx, my = _plausible(mx), _plausible(my)
    if mx is None or my is None:
        return None, None
    return mx, my


def _level_pages(tf: tifffile.TiffFile) -> list[tifffile.TiffPage]:
    """The pages that make up the pyramid, finest first."""
    page0 = tf.pages.first
    if page0.subifds:
        pages = [page0]
        for lvl in tf.series[0].levels[1:]:
            kf = lvl.keyframe
            if isinstance(kf, tifffile.TiffPage):
                pages.append(kf)
        return pages
    pages: list[tifffile.TiffPage] = []
    for page in tf.pages:
        if not isinstance(page, tifffile.TiffPage) or not page.is_tiled:
            continue  # Aperio thumbnail/label/macro are stripped images
        desc = page.description or ""
        if "\nlabel " in desc or "\nmacro " in desc:
            continue
        if pages:
            prev, first = pages[-1], pages[0]
            if page.imagewidth >= prev.imagewidth or page.imagelength >= prev.imagelength:
                continue
            rx, ry = first.imagewidth / page.imagewidth, first.imagelength / page.imagelength
            if abs(rx - ry) > 0.1 * max(rx, ry) + 2.0 / min(page.imagewidth, page.imagelength) * max(rx, ry):
                continue  # not the same picture (different aspect): some associated image
        pages.append(page)
    return pages


def _make_level(path: str, page: tifffile.TiffPage, w0: int, h0: int, file_size: int) -> _Level:
    if not page.is_tiled:
        raise UnsupportedTileFormat(f"page {page.index} is not tiled")
    if page.imagedepth > 1 or page.tiledepth > 1:
        raise UnsupportedTileFormat("volumetric tiles are not supported")
    if page.bitspersample != 8 or page.sampleformat != 1:
        raise UnsupportedTileFormat(f"{page.bitspersample}-bit samples are not supported")
    if page.planarconfig != 1 and page.samplesperpixel > 1:
        raise UnsupportedTileFormat("separate colour planes are not supported")
    compression = int(page.compression)
    if compression not in COMPRESSION_NAMES:
        raise UnsupportedTileFormat(f"compression {compression} ({page.compression.name}) is not supported")
    decoder = TileDecoder(
        compression=compression,
        photometric=int(page.photometric),
        samples_per_pixel=int(page.samplesperpixel),
        tile_width=int(page.tilewidth),
        tile_height=int(page.tilelength),
        predictor=int(page.predictor),
        jpeg_tables=bytes(page.jpegtables) if page.jpegtables else None,
        extra_samples=tuple(int(e) for e in page.extrasamples),
    )
    w, h = int(page.imagewidth), int(page.imagelength)
    offsets = np.asarray(page.dataoffsets, np.int64)
    counts = np.asarray(page.databytecounts, np.int64)
    if offsets.size and int((offsets + counts).max()) > file_size:
        raise SlideOpenError(
            path,
            f"the file is truncated: tile data of the image at page {page.index} ends at byte "
            f"{int((offsets + counts).max())} but the file has {file_size} bytes",
        )
    info = LevelInfo(
        width=w,
        height=h,
        downsample=1.0 if (w, h) == (w0, h0) else (w0 / w + h0 / h) / 2.0,
        tile_width=decoder.tile_width,
        tile_height=decoder.tile_height,
        compression=decoder.name,
    )
    return _Level(info, decoder, offsets, counts, math.ceil(w / decoder.tile_width), math.ceil(h / decoder.tile_height))


def _parse(path: str, file_size: int) -> tuple[SlideInfo, list[_Level]]:
    try:
        tf = tifffile.TiffFile(path)
    except Exception as err:  # tifffile raises TiffFileError, ValueError, struct.error, ...
        raise NotFastPathFile(f"not a readable TIFF file: {err}") from err
    with tf:
        try:
            flags = tf.flags
            deferred = flags & _DEFER_TO_OPENSLIDE
            if deferred:
                raise NotFastPathFile(f"{'/'.join(sorted(deferred))} TIFF files are read through OpenSlide")
            page0 = tf.pages.first
            if not isinstance(page0, tifffile.TiffPage) or not page0.is_tiled:
                raise NotFastPathFile("the first image of the TIFF file is not tiled")
            pages = _level_pages(tf)
            w0, h0 = int(page0.imagewidth), int(page0.imagelength)
            try:
                levels = [_make_level(path, p, w0, h0, file_size) for p in pages]
            except UnsupportedTileFormat as err:
                raise NotFastPathFile(str(err)) from err
            desc = page0.description or ""
            vendor = "aperio" if desc.startswith("Aperio") else ("ome-tiff" if tf.is_ome else "generic-tiff")
            mpp_x, mpp_y = parse_mpp(tf, page0)
        except (NotFastPathFile, SlideOpenError):
            raise
        except Exception as err:  # malformed tags, unreadable IFDs
            raise NotFastPathFile(f"the TIFF structure could not be parsed: {err}") from err
    info = SlideInfo(
        path=path,
        vendor=vendor,
        backend="tiff",
        levels=tuple(lv.info for lv in levels),
        mpp_x=mpp_x,
        mpp_y=mpp_y,
    )
    return info, levels


def read_patches_of(reads: list[tuple[TiffSlide, int, np.ndarray, np.ndarray, np.ndarray]], width: int, height: int,
                    out: np.ndarray) -> None:
    """:meth:`TiffSlide.read_patches` of several reads ``(slide, level, xs, ys, rows)`` into one batch buffer, as one.

    Each read's tile lists are worked out as arrays (a compiled call per read); the tile cache is asked once for
    the tiles of all of them (per cache: the service's slides share one); the missing tiles are decoded as
    :meth:`TiffSlide.read_region` decodes them, slide by slide; and one compiled call without the GIL copies
    every piece of every patch. The same pixels as ``read_region`` per patch; patches reaching outside their
    level are read one by one. The fixed Python cost is per batch, not per slide: a batch of random patches
    from a large archive touches as many slides as it has patches.
    """
    if out.dtype != np.uint8 or out.ndim != 4 or out.shape[1:] != (height, width, 3) or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous uint8 (n, {height}, {width}, 3) array, got {out.dtype} {out.shape}")
    if not (width and height):
        return
    from ._piece_kernels import copy_pieces, plan_pieces  # numba: imported on first use

    planned: list[tuple[TiffSlide, int, np.ndarray, np.ndarray, np.ndarray]] = []  # slide, level, unique, which, pieces
    for slide, level, xs, ys, rows in reads:
        slide._check_level(level)
        if slide._fd < 0:
            raise SlideReadError(slide.path, "the slide is closed", "open it again")
        lv = slide._levels[level]
        pieces, unique, which, outside = plan_pieces(xs, ys, rows, width, height, lv.decoder.scaled_shape(1),
                                                     lv.tiles_across, (lv.info.width, lv.info.height))
        for k in outside.tolist():
            slide._read_into(level, 1, int(xs[k]), int(ys[k]), width, height, out[int(rows[k])])
        if unique.size:
            planned.append((slide, level, unique, which, pieces))
    if not planned:
        return
    starts = np.cumsum([0] + [len(p[2]) for p in planned]).tolist()  # each read's first tile in the addresses
    pinned: list[tuple[TileCache, np.ndarray]] = []  # (cache, slots) acquired: released once copied
    try:
        addresses, held = _tile_addresses(planned, starts, pinned)
        pieces = planned[0][4] if len(planned) == 1 else np.concatenate([p[4] for p in planned])
        which = planned[0][3] if len(planned) == 1 else np.concatenate([p[3] + s for p, s in zip(planned, starts)])
        copy_pieces(out, addresses[which], pieces)
        del held  # referenced until the copy has read them
    finally:
        for cache, slots in pinned:
            cache.release(slots)


def _tile_addresses(planned: list[tuple[TiffSlide, int, np.ndarray, np.ndarray, np.ndarray]], starts: list[int],
                    pinned: list[tuple[TileCache, np.ndarray]]) -> tuple[np.ndarray, list[np.ndarray]]:
    """The data addresses of the tiles of every read (read n's ``unique`` from ``starts[n]`` on), and the tiles
    decoded now.

    Each tile cache is asked once for the tiles of all the reads that use it (``TileCache.acquire``: one
    compiled call; the tiles it found stay pinned until the caller releases ``pinned``). Only the missing
    tiles cost Python work: they are decoded as a region read decodes them, read by read."""
    sizes = [len(p[2]) for p in planned]
    addresses = np.zeros(starts[-1], np.int64)
    missing = np.ones(starts[-1], np.bool_)
    caches: dict[int, tuple[TileCache, list[int]]] = {}  # id(cache) -> (cache, the reads using it)
    for n, (slide, _, _, _, _) in enumerate(planned):
        if slide._cache is not None:
            caches.setdefault(id(slide._cache), (slide._cache, []))[1].append(n)
    for cache, reads in caches.values():
        keys = [planned[n][0]._keys(planned[n][1], planned[n][2]) for n in reads]
        slots, at, nbytes = cache.acquire(keys[0] if len(keys) == 1 else np.concatenate(keys))
        pinned.append((cache, slots))
        want = np.repeat([planned[n][0]._tile_nbytes(planned[n][1]) for n in reads], [sizes[n] for n in reads])
        usable = (at != 0) & (nbytes == want)  # the copy kernel reads raw memory: only tiles of the read's shape
        if len(reads) == 1 and starts[reads[0]] == 0 and sizes[reads[0]] == starts[-1]:
            addresses[:] = at
            missing[:] = ~usable
        else:
            position = np.concatenate([np.arange(starts[n], starts[n] + sizes[n]) for n in reads])
            addresses[position] = at
            missing[position] = ~usable
    held: list[np.ndarray] = []
    if not missing.any():
        return addresses, held
    for n, (slide, level, unique, _, _) in enumerate(planned):
        lacking = np.flatnonzero(missing[starts[n]:starts[n + 1]])
        if lacking.size:
            tiles = slide._decode_many(level, unique[lacking].tolist(), 1)
            for j, tile in zip(lacking.tolist(), tiles):
                tile = np.ascontiguousarray(tile, np.uint8)
                addresses[starts[n] + j] = data_address(tile)
                held.append(tile)
    return addresses, held


def warm_up_read_kernels() -> None:
    """Compile (or load from numba's cache) the batch-read kernels now rather than on the first batch read."""
    from . import _piece_kernels  # noqa: F401 - its kernels are compiled when it is imported


def _white_outside(out: np.ndarray, x: int, y: int, width: int, height: int, ix0: int, iy0: int, ix1: int,
                   iy1: int) -> None:
    """White where the region ``(x, y, width, height)`` lies outside the image (inside: ``ix0..ix1, iy0..iy1``)."""
    if iy0 > y:
        out[: iy0 - y] = 255
    if iy1 < y + height:
        out[iy1 - y :] = 255
    if ix0 > x:
        out[iy0 - y : iy1 - y, : ix0 - x] = 255
    if ix1 < x + width:
        out[iy0 - y : iy1 - y, ix1 - x :] = 255


class TiffSlide(Slide):
    """A slide read by the fast path. Create through :func:`open_slide`."""

    def __init__(self, path: str, *, cache: TileCache | None = None, pool: DecodePool | None = None,
                 bad_tiles: BadTiles | None = None) -> None:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            st = os.fstat(fd)
            if st.st_size == 0:
                raise SlideOpenError(path, "the file is empty")
            info, levels = _parse(path, st.st_size)
            if len(levels) > 64 or any(lv.tiles_across * lv.tiles_down > 1 << 30 for lv in levels):
                raise SlideOpenError(path, f"{len(levels)} levels of up to "
                                     f"{max(lv.tiles_across * lv.tiles_down for lv in levels)} tiles: the fast path "
                                     "keys tiles by 6 bits of level and 30 of tile index")
        except BaseException:
            os.close(fd)
            raise
        super().__init__(info)
        self._fd = fd
        self._levels = levels
        self._cache = cache
        self._pool = pool
        self._bad_tiles = bad_tiles
        self._identity: tuple[str, int, int] = (os.path.realpath(path), st.st_mtime_ns, st.st_size)
        self._key_base = cache.key_base(self._identity) if cache is not None else 0  # see _key
        self._close_lock = threading.Lock()
        self._grids: dict[tuple[int, int], tuple[int, int, int, int, int]] = {}  # (level, scale) -> tile grid
        if pool is not None and pool.jpeg_choice is None:
            self._probe_jpeg_backend(pool)

    def _probe_jpeg_backend(self, pool: DecodePool, n: int = 32) -> None:
        """``jpeg_backend='auto'`` on a CUDA machine: time CPU vs nvJPEG on this slide's largest
        (tissue-rich) level-0 tiles, once per pool."""
        lv = self._levels[0]
        if not batchable(lv.decoder, 1):
            return  # decided on the first JPEG slide instead
        order = np.argsort(lv.counts)[::-1][:n]
        try:
            tiles = [t for t in (self._tile_bytes(0, int(i)) for i in order) if t is not None]
        except SlideReadError as err:  # the reads themselves will report it
            log.debug("%s: no tiles to choose the JPEG backend with: %s", self.path, err)
            return
        if tiles:
            pool.choose_jpeg_backend(lv.decoder, tiles)

    @property
    def identity(self) -> tuple[str, int, int]:
        """(real path, mtime_ns, size): what the tile cache keys on."""
        return self._identity

    def _scales(self, level: int) -> tuple[int, ...]:
        return JPEG_SCALES if self._levels[level].decoder.supports_scale else (1,)

    def close(self) -> None:
        with self._close_lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def raw_tile(self, level: int, index: int) -> bytes | None:
        """The compressed bytes of one tile as stored (None for a sparse tile)."""
        self._check_level(level)
        return self._tile_bytes(level, index)

    def _tile_bytes(self, level: int, index: int) -> bytes | None:
        lv = self._levels[level]
        offset, count = int(lv.offsets[index]), int(lv.counts[index])
        if count == 0 or offset == 0:
            return None  # sparse tile: background
        fd = self._fd
        if fd < 0:
            raise SlideReadError(self.path, "the slide is closed", "open it again")
        known = self._bad_tiles.get((self._identity, level, index)) if self._bad_tiles is not None else None
        if known is not None:
            raise SlideReadError(self.path, f"tile {index} of level {level} is known to be damaged, not read again "
                                 f"({known})", level=level, tile=index, known=True)
        try:
            data = os.pread(fd, count, offset)
        except OSError as err:
            raise self._damaged(level, index, f"reading tile {index} of level {level} failed: {err}") from err
        if len(data) != count:
            raise self._damaged(
                level, index, f"the file is truncated: tile {index} of level {level} needs bytes {offset}..{offset + count}"
            )
        return data

    def _damaged(self, level: int, index: int, reason: str) -> SlideReadError:
        """The error for a damaged tile, remembered so that no later read touches its bytes."""
        if self._bad_tiles is not None:
            self._bad_tiles.add((self._identity, level, index), reason)
        return SlideReadError(self.path, reason, level=level, tile=index)

    def _key(self, level: int, index: int, scale: int) -> int:
        """The tile's key in the shared cache (``TileCache.key_base``): one int, unique to this file version."""
        return self._key_base | (level << 34) | (scale << 30) | index

    def decode_tile(self, level: int, index: int, scale: int = 1) -> np.ndarray:
        """One tile as RGB (cached when the slide has a cache). Mainly for tools and tests."""
        key = self._key(level, index, scale)
        if self._cache is not None:
            tile = self._cache.get(key)
            if tile is not None:
                return tile
        tile = self._decode_uncached(level, index, scale)
        if self._cache is not None:
            self._cache.put(key, tile)
        return tile

    def _decode_uncached(self, level: int, index: int, scale: int) -> np.ndarray:
        lv = self._levels[level]
        data = self._tile_bytes(level, index)
        if data is None:
            return np.full(lv.decoder.scaled_shape(scale) + (3,), 255, np.uint8)
        try:
            return lv.decoder.decode(data, scale)
        except Exception as err:
            raise self._damaged(
                level, index,
                f"tile {index} of level {level} ({lv.decoder.name}, {len(data)} bytes at offset "
                f"{int(lv.offsets[index])}) could not be decoded: {err}",
            ) from err

    def _read_into(self, level: int, scale: int, x: int, y: int, width: int, height: int, out: np.ndarray) -> None:
        if self._fd < 0:
            raise SlideReadError(self.path, "the slide is closed", "open it again")
        lv = self._levels[level]
        grid = self._grids.get((level, scale))
        if grid is None:
            th, tw = lv.decoder.scaled_shape(scale)
            grid = self._grids[(level, scale)] = (th, tw, math.ceil(lv.info.width / scale),
                                                  math.ceil(lv.info.height / scale), lv.tiles_across)
        th, tw, W, H, across = grid
        ix0, iy0, ix1, iy1 = max(x, 0), max(y, 0), min(x + width, W), min(y + height, H)
        if ix0 >= ix1 or iy0 >= iy1:
            out[...] = 255
            return
        if iy0 > y or iy1 < y + height or ix0 > x or ix1 < x + width:
            _white_outside(out, x, y, width, height, ix0, iy0, ix1, iy1)
        first = self._key(level, 0, scale)
        rows = [(ty, ty * th, max(iy0, ty * th), min(iy1, ty * th + th)) for ty in range(iy0 // th, (iy1 - 1) // th + 1)]
        cols = [(tx, tx * tw, max(ix0, tx * tw), min(ix1, tx * tw + tw)) for tx in range(ix0 // tw, (ix1 - 1) // tw + 1)]
        keys = [first + ty * across + tx for ty, _, _, _ in rows for tx, _, _, _ in cols]
        cache = self._cache
        tiles = cache.get_many(keys) if cache is not None else [None] * len(keys)
        misses: list[tuple[int, np.ndarray, tuple[slice, slice]]] = []
        k = 0
        for ty, py, sy0, sy1 in rows:
            dst_rows, src_rows = slice(sy0 - y, sy1 - y), slice(sy0 - py, sy1 - py)
            for tx, px, sx0, sx1 in cols:
                tile = tiles[k]
                k += 1
                if tile is not None:
                    out[dst_rows, sx0 - x : sx1 - x] = tile[src_rows, sx0 - px : sx1 - px]
                else:
                    misses.append((ty * across + tx, out[dst_rows, sx0 - x : sx1 - x],
                                   (src_rows, slice(sx0 - px, sx1 - px))))
        if not misses:
            return
        for (_, dst, src), tile in zip(misses, self._decode_many(level, [i for i, _, _ in misses], scale)):
            dst[...] = tile[src]

    def read_patches(self, level: int, xs: np.ndarray, ys: np.ndarray, width: int, height: int, out: np.ndarray,
                     rows: np.ndarray) -> None:
        """Patches of one size: patch k at ``(xs[k], ys[k])`` of ``level`` into ``out[rows[k]]``, one batch
        (:func:`read_patches_of`, the same for several slides at once)."""
        read_patches_of([(self, level, xs, ys, rows)], width, height, out)

    def tile_keys(self, level: int, xs: np.ndarray, ys: np.ndarray, width: int, height: int
                  ) -> tuple[np.ndarray, int]:
        """The tile-cache keys :meth:`read_patches` of these patches would look up (each once; patches reaching
        outside the level are left out), and the decoded size of one tile: what a forecast announces."""
        self._check_level(level)
        from ._piece_kernels import plan_pieces  # numba: imported on first use

        lv = self._levels[level]
        tile = lv.decoder.scaled_shape(1)
        unique = plan_pieces(xs, ys, np.zeros(len(xs), np.int64), width, height, tile, lv.tiles_across,
                             (lv.info.width, lv.info.height))[1]
        return self._keys(level, unique), tile[0] * tile[1] * 3

    def _keys(self, level: int, indices: np.ndarray) -> np.ndarray:
        """:meth:`_key` of full-scale tiles of one level, from an int64 array of their indices (one numpy call)."""
        return indices + self._key(level, 0, 1)

    def _tile_nbytes(self, level: int) -> int:
        """The decoded size of one full-scale tile of ``level``."""
        th, tw = self._levels[level].decoder.scaled_shape(1)
        return th * tw * 3

    def _decode_many(self, level: int, indices: list[int], scale: int) -> list[np.ndarray]:
        """Decode (and cache) tiles of a read at 1/``scale``: batched JPEG when chosen, else on the pool (several
        tiles, not already on a pool thread) or this thread. The one decode path of region and batch reads."""
        lv = self._levels[level]
        batched = self._pool.batched_jpeg if self._pool is not None else None
        tiles: list[np.ndarray] | None = None
        if batched is not None and batchable(lv.decoder, scale):
            tiles = self._decode_batched(batched, level, indices)
        if tiles is None:
            if self._pool is not None and len(indices) > 1 and not DecodePool.in_worker():
                tiles = self._pool.run_all([partial(self._decode_uncached, level, i, scale) for i in indices])
            else:
                tiles = [self._decode_uncached(level, i, scale) for i in indices]
        shape = lv.decoder.scaled_shape(scale) + (3,)
        for i, tile in zip(indices, tiles):
            if tile.shape != shape:  # batch reads copy from raw memory: never cache a tile of another shape
                raise self._damaged(level, i, f"tile {i} of level {level} decoded to {tile.shape}, expected {shape}")
        if self._cache is not None:
            self._cache.put_many(np.asarray(indices, np.int64) + self._key(level, 0, scale), tiles)
        return tiles

    def _decode_batched(self, batched: BatchedJpegDecoder, level: int, indices: list[int]) -> list[np.ndarray] | None:
        """The tiles decoded in one batched call, or None (use the per-tile path, which names a corrupt tile)."""
        lv = self._levels[level]
        payloads = [self._tile_bytes(level, index) for index in indices]
        present = [p for p in payloads if p is not None]
        if lv.decoder.compression == 7 and not all(jpeg_complete(p) for p in present):
            return None
        try:
            decoded = iter(batched.decode(lv.decoder, present))
        except Exception as err:  # noqa: BLE001 - corrupt tile, unsupported stream: per-tile path decides
            log.debug("%s: batched decode of %d tiles of level %d failed (%s); decoding per tile", self.path, len(present), level, err)
            return None
        return [np.full(lv.decoder.scaled_shape(1) + (3,), 255, np.uint8) if p is None else next(decoded) for p in payloads]

    def tile_layout(self, level: int) -> dict[str, Any]:
        """Tile grid facts for tools/benchmarks: counts, offsets and byte counts arrays."""
        lv = self._levels[level]
        return {
            "tiles_across": lv.tiles_across,
            "tiles_down": lv.tiles_down,
            "offsets": lv.offsets,
            "counts": lv.counts,
            "decoder": lv.decoder,
        }
