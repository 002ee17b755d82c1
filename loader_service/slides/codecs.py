"""Tile decoders for the TIFF fast path: JPEG, JPEG 2000, LZW, deflate and uncompressed.

All decoders return a C-contiguous ``uint8`` RGB array of the tile (or of the tile reduced by
``scale`` for JPEG DCT scaling). The heavy lifting happens in C libraries that release the GIL
(libjpeg-turbo, OpenJPEG, libdeflate, imagecodecs' LZW), so decoders run in parallel on threads.

JPEG colour handling follows OpenSlide/libtiff: the TIFF PhotometricInterpretation decides the
JPEG colour space, not the markers inside the stream. Aperio writes RGB-encoded JPEG tiles with
component ids 0,1,2 and no Adobe APP14 marker, which libjpeg's own guess would treat as YCbCr;
we force ``colorspace='RGB'`` for PhotometricInterpretation RGB (imagecodecs), or insert an Adobe
marker with transform 0 for decoders that take no colour-space argument (PIL, simplejpeg).
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass

import imagecodecs
import numpy as np
from PIL import Image

try:  # optional: fastest DCT-scaled decode, not a declared dependency
    import simplejpeg as _simplejpeg
except ImportError:  # pragma: no cover - depends on the environment
    _simplejpeg = None

__all__ = [
    "TileDecoder",
    "UnsupportedTileFormat",
    "COMPRESSION_NAMES",
    "splice_jpeg_tables",
    "jpeg_complete",
    "add_adobe_rgb_marker",
    "jpeg_decoders",
    "ycbcr_to_rgb",
    "JPEG_SCALES",
    "DEFAULT_JPEG_DECODER",
]

JPEG_SCALES = (1, 2, 4, 8)

#: TIFF Compression tag -> our name (what LevelInfo.compression says)
COMPRESSION_NAMES: dict[int, str] = {
    1: "none",
    5: "lzw",
    7: "jpeg",
    8: "deflate",
    32946: "deflate",
    33003: "jpeg2000",  # Aperio JPEG 2000, YCbCr
    33004: "jpeg2000",
    33005: "jpeg2000",  # Aperio JPEG 2000, RGB
    34712: "jpeg2000",
    50000: "zstd",
    50001: "webp",
}

_PHOTOMETRIC_MINISWHITE, _PHOTOMETRIC_MINISBLACK, _PHOTOMETRIC_RGB, _PHOTOMETRIC_YCBCR = 0, 1, 2, 6
_ADOBE_RGB = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"  # APP14, transform 0 (no conversion)


class UnsupportedTileFormat(ValueError):
    """The level's tile layout/encoding is not handled by the fast path (OpenSlide may read it)."""


def jpeg_complete(data: bytes) -> bool:
    """Whether a JPEG tile stream ends with its end-of-image marker (zero padding after it allowed).

    libjpeg decodes a truncated stream with a mere warning, filling the missing blocks with grey: without this
    check a cut-off tile would be served as silently wrong pixels.
    """
    return data.endswith(b"\xff\xd9") or data.rstrip(b"\0").endswith(b"\xff\xd9")


def splice_jpeg_tables(tables: bytes | None, tile: bytes) -> bytes:
    """Make an abbreviated JPEG tile stream self-contained by inserting the JPEGTables segments.

    ``tables`` is SOI + DQT/DHT segments + EOI; ``tile`` starts with SOI. Result: SOI + tables'
    segments + the tile's segments and entropy data.
    """
    if not tables or len(tables) <= 4:
        return tile
    if tables[-2:] == b"\xff\xd9":
        tables = tables[:-2]
    return tables + tile[2:]


def add_adobe_rgb_marker(stream: bytes) -> bytes:
    """Insert an Adobe APP14 marker (transform 0) after SOI so libjpeg decodes without YCbCr->RGB."""
    if b"\xff\xee" in stream[:64] and b"Adobe" in stream[:64]:
        return stream
    return stream[:2] + _ADOBE_RGB + stream[2:]


def ycbcr_to_rgb(ycc: np.ndarray) -> np.ndarray:
    """JFIF full-range YCbCr -> RGB (as libjpeg and OpenSlide's JPEG 2000 path), uint8."""
    y = ycc[..., 0].astype(np.float32)
    cb = ycc[..., 1].astype(np.float32) - 128.0
    cr = ycc[..., 2].astype(np.float32) - 128.0
    out = np.empty(ycc.shape[:-1] + (3,), np.float32)
    out[..., 0] = y + 1.402 * cr
    out[..., 1] = y - 0.344136 * cb - 0.714136 * cr
    out[..., 2] = y + 1.772 * cb
    np.rint(out, out=out)
    return np.clip(out, 0, 255).astype(np.uint8)


# --- raw JPEG decoders (self-contained streams), used by the fast path and the benchmark ---------


def _decode_imagecodecs(stream: bytes, rgb_source: bool) -> np.ndarray:
    return imagecodecs.jpeg8_decode(stream, colorspace="RGB" if rgb_source else None, outcolorspace="RGB")


def _decode_pil(stream: bytes, rgb_source: bool, scale: int = 1) -> np.ndarray:
    if rgb_source:
        stream = add_adobe_rgb_marker(stream)
    with Image.open(io.BytesIO(stream)) as im:
        if scale > 1:
            im.draft(im.mode, (math.ceil(im.width / scale), math.ceil(im.height / scale)))
        im.load()
        return np.asarray(im)


def _decode_simplejpeg(stream: bytes, rgb_source: bool, scale: int = 1) -> np.ndarray:
    assert _simplejpeg is not None
    if rgb_source:
        stream = add_adobe_rgb_marker(stream)
    if scale == 1:
        return _simplejpeg.decode_jpeg(stream, colorspace="RGB", strict=True)
    # min_height/min_width select the smallest DCT scale whose output is at least that big
    h, w = _simplejpeg.decode_jpeg_header(stream)[:2]
    return _simplejpeg.decode_jpeg(
        stream, colorspace="RGB", strict=True, min_height=math.ceil(h / scale), min_width=math.ceil(w / scale)
    )


def jpeg_decoders() -> dict[str, Callable[[bytes, bool], np.ndarray]]:
    """The available full-resolution JPEG decoders, by name: ``fn(stream, rgb_source) -> RGB``."""
    found: dict[str, Callable[[bytes, bool], np.ndarray]] = {
        "imagecodecs": _decode_imagecodecs,
        "pil": lambda s, rgb: _decode_pil(s, rgb),
    }
    if _simplejpeg is not None:
        found["simplejpeg"] = lambda s, rgb: _decode_simplejpeg(s, rgb)
    return found


#: decoder used at full resolution: simplejpeg scales best across threads when it is installed,
#: else imagecodecs (see docs/slides.md for the measurements behind the choice)
DEFAULT_JPEG_DECODER = "simplejpeg" if _simplejpeg is not None else "imagecodecs"


@dataclass(frozen=True)
class TileDecoder:
    """How to turn one level's compressed tile bytes into an RGB tile."""

    compression: int
    photometric: int
    samples_per_pixel: int
    tile_width: int
    tile_height: int
    predictor: int = 1
    jpeg_tables: bytes | None = None
    extra_samples: tuple[int, ...] = ()
    jpeg_decoder: str = DEFAULT_JPEG_DECODER

    def __post_init__(self) -> None:
        if self.compression not in COMPRESSION_NAMES:
            raise UnsupportedTileFormat(f"compression {self.compression} is not supported by the fast path")
        if self.tile_width <= 0 or self.tile_height <= 0:
            raise UnsupportedTileFormat(f"invalid tile size {self.tile_width}x{self.tile_height}")
        if self.samples_per_pixel not in (1, 2, 3, 4):
            raise UnsupportedTileFormat(f"{self.samples_per_pixel} samples per pixel are not supported")
        colour = self.samples_per_pixel - len(self.extra_samples)
        if colour == 3 and self.photometric not in (_PHOTOMETRIC_RGB, _PHOTOMETRIC_YCBCR):
            raise UnsupportedTileFormat(f"photometric {self.photometric} with 3 samples is not supported")
        if colour == 1 and self.photometric not in (_PHOTOMETRIC_MINISBLACK, _PHOTOMETRIC_MINISWHITE):
            raise UnsupportedTileFormat(f"photometric {self.photometric} with 1 sample is not supported")
        if colour not in (1, 3):
            raise UnsupportedTileFormat(f"{colour} colour samples are not supported")
        if self.compression == 50001 and (colour != 3 or self.predictor != 1):
            raise UnsupportedTileFormat("WebP tiles must be RGB(A) without predictor")
        if self.photometric == _PHOTOMETRIC_YCBCR and self.compression != 7:
            raise UnsupportedTileFormat("YCbCr without JPEG compression is not supported")
        if self.predictor not in (1, 2):
            raise UnsupportedTileFormat(f"predictor {self.predictor} is not supported")
        if self.jpeg_decoder not in ("imagecodecs", "pil", "simplejpeg"):
            raise ValueError(f"unknown JPEG decoder {self.jpeg_decoder!r}")
        if self.jpeg_decoder == "simplejpeg" and _simplejpeg is None:
            raise ValueError("the simplejpeg decoder is not installed")

    @property
    def name(self) -> str:
        return COMPRESSION_NAMES[self.compression]

    @property
    def supports_scale(self) -> bool:
        """True when tiles can be decoded directly at 1/2, 1/4, 1/8 (JPEG DCT scaling)."""
        return self.compression == 7

    def scaled_shape(self, scale: int) -> tuple[int, int]:
        """(height, width) of a tile decoded at 1/scale."""
        return (math.ceil(self.tile_height / scale), math.ceil(self.tile_width / scale))

    def decode(self, data: bytes, scale: int = 1) -> np.ndarray:
        """Decode one tile to uint8 RGB of shape ``scaled_shape(scale) + (3,)``.

        Raises the codec's exception on corrupt data (the caller wraps it in SlideReadError).
        """
        if scale not in JPEG_SCALES or (scale > 1 and not self.supports_scale):
            raise ValueError(f"scale {scale} is not available for {self.name} tiles")
        if self.compression == 7:
            if not jpeg_complete(data):
                raise ValueError("the tile's bytes are all zero" if data.count(0) == len(data) else
                                 "truncated JPEG tile: no end-of-image marker (libjpeg would fill the rest with grey)")
            arr = self._decode_jpeg(data, scale)
        elif self.compression == 50001:
            arr = imagecodecs.webp_decode(data)
        elif self.name == "jpeg2000":
            arr = imagecodecs.jpeg2k_decode(data)
            if self.compression == 33003 and arr.ndim == 3 and arr.shape[2] >= 3:
                arr = ycbcr_to_rgb(arr[..., :3])
        else:
            arr = self._decode_raster(data)
        return self._to_rgb(arr, self.scaled_shape(scale))

    def _decode_jpeg(self, data: bytes, scale: int) -> np.ndarray:
        rgb_source = self.photometric == _PHOTOMETRIC_RGB
        if scale == 1 and (self.jpeg_decoder == "imagecodecs" or self.samples_per_pixel < 3):
            return imagecodecs.jpeg8_decode(
                data,
                tables=self.jpeg_tables or None,
                colorspace="RGB" if rgb_source else None,
                outcolorspace="RGB" if self.samples_per_pixel >= 3 else None,
            )
        stream = splice_jpeg_tables(self.jpeg_tables, data)
        if _simplejpeg is not None and self.samples_per_pixel >= 3 and (
            scale > 1 or self.jpeg_decoder == "simplejpeg"
        ):
            return _decode_simplejpeg(stream, rgb_source, scale)
        return _decode_pil(stream, rgb_source, scale)

    def to_rgb(self, arr: np.ndarray, scale: int = 1) -> np.ndarray:
        """A decoded (h, w[, c]) uint8 tile -> RGB of ``scaled_shape(scale)`` (grey expanded, alpha
        composited over white, short edge tiles padded with white); for decoders outside this class."""
        return self._to_rgb(arr, self.scaled_shape(scale))

    def _decode_raster(self, data: bytes) -> np.ndarray:
        nbytes = self.tile_width * self.tile_height * self.samples_per_pixel
        if self.compression == 1:
            raw: bytes | np.ndarray = data
        elif self.compression == 5:
            raw = imagecodecs.lzw_decode(data)
        elif self.compression == 50000:
            raw = imagecodecs.zstd_decode(data)
        else:  # deflate
            raw = imagecodecs.deflate_decode(data, out=nbytes)
        buf = np.frombuffer(raw, np.uint8)
        if buf.size < nbytes:
            raise ValueError(f"tile data decodes to {buf.size} bytes, expected {nbytes}")
        arr = buf[:nbytes].reshape(self.tile_height, self.tile_width, self.samples_per_pixel)
        if self.predictor == 2:
            arr = imagecodecs.delta_decode(arr, axis=1)
        return arr

    def _to_rgb(self, arr: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        if arr.ndim == 2:
            arr = arr[..., None]
        if arr.dtype != np.uint8:
            raise ValueError(f"tile decoded to {arr.dtype}, expected uint8")
        n = arr.shape[2]
        if n == 1 or n == 2:  # grey (+ alpha)
            grey = arr[..., 0]
            if self.photometric == _PHOTOMETRIC_MINISWHITE:
                grey = 255 - grey
            colour = np.repeat(grey[..., None], 3, axis=2)
            alpha = arr[..., 1] if n == 2 else None
        else:
            colour = arr[..., :3]
            alpha = arr[..., 3] if n >= 4 and self.extra_samples else None
        if alpha is not None:
            a = alpha[..., None].astype(np.uint16)
            if self.extra_samples and self.extra_samples[0] == 1:  # associated (premultiplied)
                colour = np.minimum(colour.astype(np.uint16) + (255 - a), 255).astype(np.uint8)
            else:
                colour = ((colour.astype(np.uint16) * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)
        h, w = shape
        if colour.shape[0] > h or colour.shape[1] > w:
            raise ValueError(f"tile decoded to {colour.shape[1]}x{colour.shape[0]}, expected {w}x{h}")
        if colour.shape[0] != h or colour.shape[1] != w:  # short edge tiles: pad with white
            padded = np.full((h, w, 3), 255, np.uint8)
            hh, ww = min(h, colour.shape[0]), min(w, colour.shape[1])
            padded[:hh, :ww] = colour[:hh, :ww]
            colour = padded
        return np.ascontiguousarray(colour)
