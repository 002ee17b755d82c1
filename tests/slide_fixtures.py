"""Test slides: writers (plain functions) and session-scoped pytest fixtures.

Every fixture writes a real pyramidal file into a session temp directory. Pixel content comes
from :func:`loader_service.synthetic.render_synthetic`, so for lossless files the expected
pixels of every level are known exactly (``*.expected`` holds them).

Use: ``from tests.slide_fixtures import *`` in a conftest, or import the writers directly.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import imagecodecs
import numpy as np
import pytest
import tifffile

from loader_service.synthetic import render_synthetic, write_synthetic_slide

__all__ = [
    "FixtureSlide",
    "WSI_DIR",
    "pyramid_levels",
    "write_tifffile_pyramid",
    "write_aperio_jpeg_svs",
    "write_aperio_j2k_svs",
    "write_ome_subifd",
    "write_broken_files",
    "damage_tiles",
    "aperio_style_jpeg_tiles",
    "ycbcr_from_rgb",
    "shared_wsi",
    "fixture_dir",
    "base_image",
    "tiff_jpeg_ycbcr",
    "tiff_jpeg_rgb",
    "tiff_jpeg_tifffile",
    "tiff_lzw",
    "tiff_deflate",
    "tiff_none",
    "tiff_zstd",
    "tiff_j2k",
    "svs_jpeg",
    "svs_vips",
    "svs_j2k_ycbcr",
    "svs_j2k_rgb",
    "ome_jpeg",
    "ome_lzw",
    "white_slide",
    "broken_files",
]

#: the shared real test slides, beside the checkout (absent in a fresh clone)
WSI_DIR = Path(__file__).resolve().parents[2] / "shared" / "wsi"
FIXTURE_SIZE = (2000, 1500)  # not a multiple of the tile size: edge tiles are partial
TILE = 256


@dataclass(frozen=True)
class FixtureSlide:
    """A written test slide: where it is and what should be in it."""

    path: Path
    compression: str
    lossless: bool
    openslide_levels: int  # how many levels OpenSlide sees (0 when it cannot read the file)
    mpp: float | None
    expected: tuple[np.ndarray, ...] = field(default=(), repr=False)  # exact level pixels if known
    vendor: str = "generic-tiff"


def pyramid_levels(base: np.ndarray, count: int) -> list[np.ndarray]:
    """``count`` levels: ``base`` and successive 2x box-filtered reductions (odd edges dropped)."""
    levels = [base]
    for _ in range(count - 1):
        a = levels[-1]
        h, w = a.shape[0] // 2 * 2, a.shape[1] // 2 * 2
        a = a[:h, :w].astype(np.uint16)
        a = (a[0::2, 0::2] + a[1::2, 0::2] + a[0::2, 1::2] + a[1::2, 1::2] + 2) // 4
        levels.append(a.astype(np.uint8))
    return levels


def ycbcr_from_rgb(rgb: np.ndarray) -> np.ndarray:
    """JFIF full-range RGB -> YCbCr, uint8."""
    f = rgb.astype(np.float32)
    r, g, b = f[..., 0], f[..., 1], f[..., 2]
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = 128.0 - 0.168736 * r - 0.331264 * g + 0.5 * b
    cr = 128.0 + 0.5 * r - 0.418688 * g - 0.081312 * b
    return np.clip(np.rint(np.stack([y, cb, cr], axis=-1)), 0, 255).astype(np.uint8)


def _resolution(mpp: float | None) -> dict[str, object]:
    if mpp is None:
        return {}
    return {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}


def write_tifffile_pyramid(
    path: Path,
    levels: list[np.ndarray],
    compression: str | int,
    *,
    mpp: float | None = 0.5,
    description: str | None = None,
    predictor: bool = False,
    tile: int = TILE,
    compressionargs: dict[str, object] | None = None,
    photometric: str = "rgb",
) -> Path:
    """Generic pyramidal TIFF with the levels in the main IFD chain (OpenSlide's generic-tiff)."""
    with tifffile.TiffWriter(path) as tw:
        for i, arr in enumerate(levels):
            tw.write(
                arr,
                tile=(tile, tile),
                compression=compression,
                compressionargs=compressionargs,
                predictor=predictor or None,
                photometric=photometric,
                subfiletype=0 if i == 0 else 1,
                description=description if i == 0 else None,
                metadata=None,
                **_resolution(mpp),
            )
    return path


def _jpeg_segments(stream: bytes) -> Iterator[tuple[int, bytes]]:
    """(marker, bytes) for each segment up to and including SOS; then (0, entropy data + EOI)."""
    assert stream[:2] == b"\xff\xd8"
    i = 2
    while i < len(stream):
        marker = stream[i + 1]
        (length,) = struct.unpack(">H", stream[i + 2 : i + 4])
        yield marker, stream[i : i + 2 + length]
        i += 2 + length
        if marker == 0xDA:
            yield 0, stream[i:]
            return


def aperio_style_jpeg_tiles(level: np.ndarray, tile: int, quality: int) -> tuple[bytes, list[bytes]]:
    """Encode a level as Aperio does: RGB (not YCbCr) JPEG, no Adobe/JFIF marker, component ids
    0,1,2, tables split out into one shared JPEGTables blob, abbreviated tile streams."""
    h, w = level.shape[:2]
    tables: bytes | None = None
    tiles: list[bytes] = []
    for ty in range(0, h, tile):
        for tx in range(0, w, tile):
            block = np.full((tile, tile, 3), 255, np.uint8)
            part = level[ty : ty + tile, tx : tx + tile]
            block[: part.shape[0], : part.shape[1]] = part
            full = imagecodecs.jpeg8_encode(
                block, level=quality, colorspace="RGB", outcolorspace="RGB", subsampling=(1, 1)
            )
            tab, body = [b"\xff\xd8"], [b"\xff\xd8"]
            for marker, seg in _jpeg_segments(bytes(full)):
                if marker in (0xDB, 0xC4):  # DQT, DHT
                    tab.append(seg)
                elif marker == 0xC0:  # SOF0: component ids 'R','G','B' -> 0,1,2
                    seg = bytearray(seg)
                    for c in range(seg[9]):
                        seg[10 + 3 * c] = c
                    body.append(bytes(seg))
                elif marker == 0xDA:  # SOS: component selectors likewise
                    seg = bytearray(seg)
                    for c in range(seg[4]):
                        seg[5 + 2 * c] = c
                    body.append(bytes(seg))
                elif marker == 0:
                    body.append(seg)
                # APP0 (JFIF) / APP14 (Adobe) dropped: Aperio writes neither
            this_tables = b"".join(tab) + b"\xff\xd9"
            if tables is None:
                tables = this_tables
            assert tables == this_tables, "libjpeg used different tables for different tiles"
            tiles.append(b"".join(body))
    assert tables is not None
    return tables, tiles


def _aperio_description(w: int, h: int, kind: str, quality: int, mpp: float) -> str:
    return (
        f"Aperio Image Library v12.0.15 \r\n{w}x{h} [0,0 {w}x{h}] ({TILE}x{TILE}) {kind} Q={quality}"
        f"|AppMag = 20|StripeWidth = 1000|ScanScope ID = FIXTURE|MPP = {mpp}"
    )


def _write_aperio_extras(tw: tifffile.TiffWriter, kind: str, base: np.ndarray) -> None:
    if kind == "thumbnail":
        thumb = pyramid_levels(base, 4)[-1]
        tw.write(thumb, photometric="rgb", compression="jpeg", description="Aperio Image Library v12.0.15 \nthumb", metadata=None)
    else:
        label = np.full((120, 100, 3), 230, np.uint8)
        tw.write(label, photometric="rgb", compression="lzw", subfiletype=1, rowsperstrip=16,
                 description="Aperio Image Library v12.0.15 \nlabel 100x120", metadata=None)
        macro = np.ascontiguousarray(pyramid_levels(base, 3)[-1][:150, :300])
        tw.write(macro, photometric="rgb", compression="jpeg", subfiletype=9, rowsperstrip=16,
                 description="Aperio Image Library v12.0.15 \nmacro 300x150", metadata=None)


def write_aperio_jpeg_svs(path: Path, levels: list[np.ndarray], *, quality: int = 80, mpp: float = 0.25) -> Path:
    """SVS as Aperio writes it: level 0, stripped thumbnail, levels 1.., label, macro;
    RGB JPEG tiles with shared JPEGTables."""
    with tifffile.TiffWriter(path) as tw:
        for i, arr in enumerate(levels):
            tables, tiles = aperio_style_jpeg_tiles(arr, TILE, quality)
            h, w = arr.shape[:2]
            tw.write(
                iter(tiles),
                shape=arr.shape,
                dtype=np.uint8,
                tile=(TILE, TILE),
                compression="jpeg",
                compressionargs={"outcolorspace": "RGB"},
                subsampling=(1, 1),
                photometric="rgb",
                jpegtables=tables,
                description=_aperio_description(w, h, "JPEG/RGB", quality, mpp) if i == 0 else f"Aperio Image Library v12.0.15 \r\n{w}x{h} -> level {i}",
                subfiletype=0,
                metadata=None,
            )
            if i == 0:
                _write_aperio_extras(tw, "thumbnail", arr)
        _write_aperio_extras(tw, "label+macro", levels[0])
    return path


def write_aperio_j2k_svs(path: Path, levels: list[np.ndarray], *, ycbcr: bool, mpp: float = 0.25) -> Path:
    """SVS with Aperio's JPEG 2000 compression: 33003 (components are YCbCr) or 33005 (RGB); lossless."""
    code = 33003 if ycbcr else 33005
    with tifffile.TiffWriter(path) as tw:
        for i, arr in enumerate(levels):
            data = ycbcr_from_rgb(arr) if ycbcr else arr
            h, w = arr.shape[:2]
            tw.write(
                data,
                tile=(TILE, TILE),
                compression=code,
                photometric="rgb",
                description=_aperio_description(w, h, "J2K/YUV16" if ycbcr else "J2K/RGB", 70, mpp) if i == 0 else None,
                metadata=None,
            )
            if i == 0:
                _write_aperio_extras(tw, "thumbnail", arr)
    return path


def write_ome_subifd(path: Path, levels: list[np.ndarray], compression: str, *, mpp_nm: float = 500.0) -> Path:
    """OME-TIFF with the reduced levels as SubIFDs of the first page; PhysicalSize in nm."""
    with tifffile.TiffWriter(path, ome=True) as tw:
        tw.write(
            levels[0],
            subifds=len(levels) - 1,
            tile=(TILE, TILE),
            compression=compression,
            photometric="rgb",
            metadata={"axes": "YXS", "PhysicalSizeX": mpp_nm, "PhysicalSizeXUnit": "nm",
                      "PhysicalSizeY": mpp_nm, "PhysicalSizeYUnit": "nm"},
        )
        for arr in levels[1:]:
            tw.write(arr, tile=(TILE, TILE), compression=compression, photometric="rgb", subfiletype=1)
    return path


def write_broken_files(directory: Path, good_jpeg_tiff: Path) -> dict[str, Path]:
    """truncated, empty, text-named-.tiff, unsupported-compression, corrupt-tile files."""
    directory.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    data = good_jpeg_tiff.read_bytes()
    out["truncated"] = directory / "truncated.tiff"
    out["truncated"].write_bytes(data[: len(data) // 2])
    out["empty"] = directory / "empty.tiff"
    out["empty"].write_bytes(b"")
    out["text"] = directory / "notes.tiff"
    out["text"].write_text("this is not an image\n" * 20)
    out["unsupported"] = directory / "jpegxr.tiff"  # JPEG XR tiles: neither path decodes them
    write_tifffile_pyramid(out["unsupported"], pyramid_levels(render_synthetic(512, 512, seed=5), 2), "jpegxr")
    # corrupt tile: overwrite the entropy-coded data of level 0, tile 5 with garbage
    corrupt = bytearray(data)
    with tifffile.TiffFile(good_jpeg_tiff) as tf:
        page = tf.pages.first
        off, n = page.dataoffsets[5], page.databytecounts[5]
    corrupt[off : off + n] = b"\xff\x00\x13\x37" * (n // 4) + b"\x00" * (n % 4)
    out["corrupt_tile"] = directory / "corrupt_tile.tiff"
    out["corrupt_tile"].write_bytes(bytes(corrupt))
    out["corrupt_tile_index"] = Path("5")  # which tile of level 0 is broken (as a Path for one dict type)
    return out


def damage_tiles(src: Path, dst: Path, damage: dict[int, str], level: int = 0) -> Path:
    """Copy ``src`` to ``dst`` with tiles of ``level`` damaged, the pyramid otherwise valid (it still indexes).

    ``damage`` maps tile index -> "zero" (the tile's bytes zeroed) or "truncate" (its byte count halved in the
    IFD: the stream is cut off mid-scan, as a short copy of the tile would be).
    """
    data = bytearray(src.read_bytes())
    with tifffile.TiffFile(src) as tf:
        page = tf.pages[level]
        offsets, counts = page.dataoffsets, page.databytecounts
        tag = page.tags["TileByteCounts"]
        fmt = {3: "<H", 4: "<I", 16: "<Q"}[int(tag.dtype)]
        value_offset = tag.valueoffset
    for index, how in damage.items():
        off, n = offsets[index], counts[index]
        if how == "zero":
            data[off : off + n] = b"\x00" * n
        elif how == "truncate":
            struct.pack_into(fmt, data, value_offset + struct.calcsize(fmt) * index, n // 2)
        else:
            raise ValueError(f"damage must be 'zero' or 'truncate', got {how!r}")
    dst.write_bytes(bytes(data))
    return dst


# --- pytest fixtures (session scope) -----------------------------------------------------------


@pytest.fixture(scope="session")
def shared_wsi() -> Path:
    """The shared real slides directory; skips the test when it is absent."""
    if not WSI_DIR.is_dir():
        pytest.skip(f"shared real test slides not found at {WSI_DIR} (only present beside the dev checkout)")
    return WSI_DIR


@pytest.fixture(scope="session")
def fixture_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("slides")


@pytest.fixture(scope="session")
def base_image() -> np.ndarray:
    return render_synthetic(*FIXTURE_SIZE, seed=1234)


@pytest.fixture(scope="session")
def tiff_jpeg_ycbcr(fixture_dir: Path) -> FixtureSlide:
    """libvips generic TIFF, JPEG Q80: YCbCr 4:2:0, JPEGTables + abbreviated tiles."""
    p = write_synthetic_slide(fixture_dir / "vips_jpeg_q80.tiff", *FIXTURE_SIZE, seed=11, quality=80, mpp=0.5)
    return FixtureSlide(p, "jpeg", False, 4, 0.5)


@pytest.fixture(scope="session")
def tiff_jpeg_rgb(fixture_dir: Path) -> FixtureSlide:
    """libvips generic TIFF, JPEG Q90: photometric RGB, Adobe marker, JPEGTables."""
    p = write_synthetic_slide(fixture_dir / "vips_jpeg_q90.tiff", *FIXTURE_SIZE, seed=12, quality=90, mpp=0.5)
    return FixtureSlide(p, "jpeg", False, 4, 0.5)


def _tifffile_fixture(fixture_dir: Path, base: np.ndarray, compression: str, name: str, **kw: object) -> FixtureSlide:
    levels = pyramid_levels(base, 3)
    p = write_tifffile_pyramid(fixture_dir / name, levels, compression, mpp=0.5, **kw)  # type: ignore[arg-type]
    lossless = compression != "jpeg"
    return FixtureSlide(p, compression, lossless, 3, 0.5, tuple(levels) if lossless else ())


@pytest.fixture(scope="session")
def tiff_jpeg_tifffile(fixture_dir: Path, base_image: np.ndarray) -> FixtureSlide:
    """tifffile generic TIFF: complete JFIF stream per tile (no JPEGTables), YCbCr 4:2:0."""
    return _tifffile_fixture(fixture_dir, base_image, "jpeg", "tf_jpeg.tiff")


@pytest.fixture(scope="session")
def tiff_lzw(fixture_dir: Path, base_image: np.ndarray) -> FixtureSlide:
    return _tifffile_fixture(fixture_dir, base_image, "lzw", "tf_lzw.tiff", predictor=True)


@pytest.fixture(scope="session")
def tiff_deflate(fixture_dir: Path, base_image: np.ndarray) -> FixtureSlide:
    return _tifffile_fixture(fixture_dir, base_image, "zlib", "tf_deflate.tiff", predictor=True)


@pytest.fixture(scope="session")
def tiff_zstd(fixture_dir: Path, base_image: np.ndarray) -> FixtureSlide:
    return _tifffile_fixture(fixture_dir, base_image, "zstd", "tf_zstd.tiff")


@pytest.fixture(scope="session")
def tiff_none(fixture_dir: Path, base_image: np.ndarray) -> FixtureSlide:
    return _tifffile_fixture(fixture_dir, base_image, "none", "tf_none.tiff")


@pytest.fixture(scope="session")
def tiff_j2k(fixture_dir: Path, base_image: np.ndarray) -> FixtureSlide:
    """Standard TIFF JPEG 2000 (34712), lossless; OpenSlide cannot read it (compare to source)."""
    levels = pyramid_levels(base_image[:768, :1024], 3)
    p = write_tifffile_pyramid(fixture_dir / "tf_j2k.tiff", levels, "jpeg2000", compressionargs={"level": 0}, mpp=0.5)
    return FixtureSlide(p, "jpeg2000", True, 0, 0.5, tuple(levels))


@pytest.fixture(scope="session")
def svs_jpeg(fixture_dir: Path, base_image: np.ndarray) -> FixtureSlide:
    """Aperio-style SVS: RGB JPEG without Adobe marker, JPEGTables, thumbnail/label/macro pages."""
    p = write_aperio_jpeg_svs(fixture_dir / "aperio_jpeg.svs", pyramid_levels(base_image, 3), mpp=0.25)
    return FixtureSlide(p, "jpeg", False, 3, 0.25, vendor="aperio")


@pytest.fixture(scope="session")
def svs_vips(fixture_dir: Path) -> FixtureSlide:
    p = write_synthetic_slide(fixture_dir / "vips.svs", *FIXTURE_SIZE, seed=13, quality=85, mpp=0.5, format="svs")
    return FixtureSlide(p, "jpeg", False, 4, 0.5, vendor="aperio")


@pytest.fixture(scope="session")
def svs_j2k_ycbcr(fixture_dir: Path, base_image: np.ndarray) -> FixtureSlide:
    levels = pyramid_levels(base_image[:768, :1024], 3)
    p = write_aperio_j2k_svs(fixture_dir / "aperio_j2k_33003.svs", levels, ycbcr=True)
    return FixtureSlide(p, "jpeg2000", False, 3, 0.25, tuple(levels), vendor="aperio")


@pytest.fixture(scope="session")
def svs_j2k_rgb(fixture_dir: Path, base_image: np.ndarray) -> FixtureSlide:
    levels = pyramid_levels(base_image[:768, :1024], 3)
    p = write_aperio_j2k_svs(fixture_dir / "aperio_j2k_33005.svs", levels, ycbcr=False)
    return FixtureSlide(p, "jpeg2000", True, 3, 0.25, tuple(levels), vendor="aperio")


@pytest.fixture(scope="session")
def ome_jpeg(fixture_dir: Path) -> FixtureSlide:
    """libvips OME-TIFF: levels as SubIFDs (OpenSlide sees level 0 only)."""
    p = write_synthetic_slide(fixture_dir / "vips.ome.tiff", *FIXTURE_SIZE, seed=14, quality=85, format="ome")
    return FixtureSlide(p, "jpeg", False, 1, 0.5, vendor="ome-tiff")


@pytest.fixture(scope="session")
def ome_lzw(fixture_dir: Path, base_image: np.ndarray) -> FixtureSlide:
    """tifffile OME-TIFF, LZW, SubIFD pyramid, PhysicalSize given in nm (500 nm = 0.5 µm)."""
    levels = pyramid_levels(base_image, 3)
    p = write_ome_subifd(fixture_dir / "tf_lzw.ome.tiff", levels, "lzw", mpp_nm=500.0)
    return FixtureSlide(p, "lzw", True, 1, 0.5, tuple(levels), vendor="ome-tiff")


@pytest.fixture(scope="session")
def white_slide(fixture_dir: Path) -> Path:
    return write_synthetic_slide(fixture_dir / "white.tiff", 1024, 768, seed=3, tissue=False)


@pytest.fixture(scope="session")
def broken_files(fixture_dir: Path, tiff_jpeg_ycbcr: FixtureSlide) -> dict[str, Path]:
    return write_broken_files(fixture_dir / "broken", tiff_jpeg_ycbcr.path)
