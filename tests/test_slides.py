"""The slide-reading layer: fast path vs OpenSlide, regions, mpp, errors, threads, cache."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile

from loader_service.slides import (
    DecodePool,
    SlideError,
    SlideOpenError,
    SlideReadError,
    TileCache,
    open_slide,
)
from loader_service.synthetic import write_synthetic_slide
from tests.slide_fixtures import FixtureSlide

FORMATS = [
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
]
# JPEG decoders may round differently; J2K 33003 goes through a YCbCr->RGB conversion
TOLERANCE = {"jpeg": 3, "jpeg2000": 2, "lzw": 0, "deflate": 0, "none": 0, "zlib": 0, "zstd": 0}


def _openslide_level(path: Path, level: int) -> np.ndarray:
    with openslide.OpenSlide(path) as osr:
        w, h = osr.level_dimensions[level]
        return np.asarray(osr.read_region((0, 0), level, (w, h)))[..., :3]


def _tifffile_level(path: Path, level: int) -> np.ndarray:
    with tifffile.TiffFile(path) as tf:
        return tf.series[0].levels[level].asarray()


def _maxdiff(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape, (a.shape, b.shape)
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


@pytest.mark.parametrize("name", FORMATS)
def test_every_level_matches_reference(name: str, request: pytest.FixtureRequest) -> None:
    fx: FixtureSlide = request.getfixturevalue(name)
    tol = 0 if fx.lossless else TOLERANCE[fx.compression]
    with open_slide(fx.path, backend="tiff") as slide:
        assert slide.info.backend == "tiff"
        assert slide.info.vendor == fx.vendor
        assert slide.info.levels[0].compression == {"zlib": "deflate"}.get(fx.compression, fx.compression)
        assert slide.info.level_count >= max(fx.openslide_levels, len(fx.expected), 1)
        for level, lv in enumerate(slide.info.levels):
            ours = slide.read_region(level, 0, 0, lv.width, lv.height)
            assert ours.flags.c_contiguous and ours.dtype == np.uint8
            if level < fx.openslide_levels:
                assert _maxdiff(ours, _openslide_level(fx.path, level)) <= tol, f"level {level} vs OpenSlide"
            if level < len(fx.expected):
                src_tol = 2 if fx.compression == "jpeg2000" and not fx.lossless else 0
                assert _maxdiff(ours, fx.expected[level]) <= src_tol, f"level {level} vs source pixels"
            if level >= fx.openslide_levels and level >= len(fx.expected):
                assert _maxdiff(ours, _tifffile_level(fx.path, level)) <= max(tol, 3), f"level {level} vs tifffile"


@pytest.mark.parametrize("name", ["tiff_jpeg_ycbcr", "svs_jpeg", "tiff_lzw"])
def test_regions_straddling_tiles_and_edges(name: str, request: pytest.FixtureRequest) -> None:
    fx: FixtureSlide = request.getfixturevalue(name)
    tol = TOLERANCE[fx.compression]
    rng = np.random.default_rng(0)
    with open_slide(fx.path, backend="tiff") as slide, open_slide(fx.path, backend="openslide") as other:
        for level in range(min(slide.info.level_count, fx.openslide_levels)):
            lv = slide.info.levels[level]
            full = np.full((lv.height + 600, lv.width + 600, 3), 255, np.uint8)
            full[300 : 300 + lv.height, 300 : 300 + lv.width] = _openslide_level(fx.path, level)
            boxes = [
                (250, 250, 20, 20),  # straddling the 256-pixel tile borders
                (lv.width - 50, lv.height - 40, 120, 90),  # past the right/bottom edge
                (-30, -20, 100, 70),  # before the left/top edge
                (-10, -10, lv.width + 20, lv.height + 20),  # everything plus a border
                (lv.width + 5, 0, 10, 10),  # entirely outside
            ] + [
                (int(rng.integers(-100, lv.width)), int(rng.integers(-100, lv.height)), int(rng.integers(1, 280)), int(rng.integers(1, 280)))
                for _ in range(6)
            ]
            for x, y, w, h in boxes:
                ours = slide.read_region(level, x, y, w, h)
                ref = full[300 + y : 300 + y + h, 300 + x : 300 + x + w]
                assert _maxdiff(ours, ref) <= tol, (level, x, y, w, h)
                # the OpenSlide backend: level->level-0 coordinates, white outside via alpha (OpenSlide
                # resamples by a fraction of a pixel when the downsample is not an integer)
                if float(lv.downsample).is_integer():
                    assert _maxdiff(ours, other.read_region(level, x, y, w, h)) <= tol, ("openslide", level, x, y, w, h)


@pytest.mark.parametrize("name", ["tiff_jpeg_ycbcr", "tiff_jpeg_rgb", "svs_jpeg", "tiff_jpeg_tifffile"])
def test_jpeg_decoders_agree(name: str, request: pytest.FixtureRequest) -> None:
    """Every available JPEG decoder (and each DCT scale) gives the same pixels for the same tiles."""
    from dataclasses import replace

    from loader_service.slides.codecs import jpeg_decoders

    fx: FixtureSlide = request.getfixturevalue(name)
    with open_slide(fx.path, backend="tiff") as slide:
        layout = slide.tile_layout(0)  # type: ignore[attr-defined]
        for index in (0, 5, layout["tiles_across"] + 2):
            data = slide.raw_tile(0, index)  # type: ignore[attr-defined]
            results = {n: replace(layout["decoder"], jpeg_decoder=n).decode(data) for n in jpeg_decoders()}
            ref = results.pop("imagecodecs")
            for n, arr in results.items():
                assert _maxdiff(arr, ref) <= 1, (n, index)
            for scale in (2, 4, 8):
                small = layout["decoder"].decode(data, scale)
                assert small.shape == (256 // scale, 256 // scale, 3)
                box = ref.reshape(256 // scale, scale, 256 // scale, scale, 3).mean(axis=(1, 3))
                assert np.abs(small - box).mean() < 3, (scale, index)


def test_out_buffer_is_written_in_place(tiff_lzw: FixtureSlide) -> None:
    batch = np.zeros((4, 64, 80, 3), np.uint8)
    with open_slide(tiff_lzw.path) as slide:
        got = slide.read_region(0, 230, 240, 80, 64, out=batch[2])
        assert got is batch[2] or np.shares_memory(got, batch)
        np.testing.assert_array_equal(batch[2], tiff_lzw.expected[0][240:304, 230:310])
        assert not batch[1].any() and not batch[3].any()
        strided = np.zeros((64, 160, 3), np.uint8)[:, ::2]  # not contiguous
        slide.read_region(0, 230, 240, 80, 64, out=strided)
        np.testing.assert_array_equal(strided, batch[2])
        with pytest.raises(ValueError):
            slide.read_region(0, 0, 0, 80, 64, out=np.zeros((64, 80, 4), np.uint8))
        with pytest.raises(ValueError):
            slide.read_region(7, 0, 0, 8, 8)


def test_mpp_parsing(tiff_jpeg_ycbcr: FixtureSlide, svs_jpeg: FixtureSlide, ome_lzw: FixtureSlide, tiff_lzw: FixtureSlide) -> None:
    for fx in (tiff_jpeg_ycbcr, svs_jpeg, ome_lzw, tiff_lzw):
        with open_slide(fx.path) as slide:
            assert slide.info.mpp == pytest.approx(fx.mpp, rel=1e-6), fx.path
            assert slide.info.mpp_x == pytest.approx(fx.mpp) and slide.info.mpp_y == pytest.approx(fx.mpp)
            with open_slide(fx.path, backend="openslide") as other:
                if fx.vendor != "ome-tiff":  # OpenSlide does not read OME metadata
                    assert other.info.mpp == pytest.approx(fx.mpp, rel=1e-3)


def test_read_region_mpp_levels_and_scaling(tiff_lzw: FixtureSlide, tmp_path: Path) -> None:
    with open_slide(tiff_lzw.path) as slide:
        assert slide.level_for_mpp(0.5) == (0, 1.0)
        assert slide.level_for_mpp(1.0) == (1, 1.0)
        assert slide.level_for_mpp(1.5) == (1, pytest.approx(1.5))
        assert slide.level_for_mpp(10.0) == (2, pytest.approx(5.0))
        np.testing.assert_array_equal(slide.read_region_mpp(1.0, 100, 90, 300, 200), slide.read_region(1, 100, 90, 300, 200))
        with pytest.raises(SlideError, match="finer"):
            slide.level_for_mpp(0.2)
    # a single-level JPEG slide: reduced-scale DCT decode + area resize vs full decode + resize
    single = write_synthetic_slide(tmp_path / "single.tiff", 2048, 1536, seed=4, pyramid=False, quality=85)
    from PIL import Image

    with open_slide(single) as slide:
        assert slide.info.level_count == 1
        full = slide.read_region(0, 0, 0, 2048, 1536)
        for mpp in (1.0, 2.0, 4.0, 1.5, 3.0):
            f = mpp / 0.5
            x, y, w, h = 37, 21, 200, 150
            got = slide.read_region_mpp(mpp, x, y, w, h)
            box = (x * f, y * f, (x + w) * f, (y + h) * f)
            ref = np.asarray(Image.fromarray(full).resize((w, h), Image.Resampling.BOX, box=box))
            diff = np.abs(got.astype(int) - ref)
            assert diff.mean() < 2.5 and np.percentile(diff, 99) < 25, (mpp, diff.mean())


def test_no_mpp_and_thumbnail(shared_wsi: Path) -> None:
    with open_slide(shared_wsi / "boxes.tiff") as slide:
        assert slide.info.mpp is None  # 72 dpi is not a microscope resolution
        with pytest.raises(SlideError, match="microns-per-pixel"):
            slide.read_region_mpp(1.0, 0, 0, 10, 10)
        thumb = slide.thumbnail(100)
        assert thumb.shape == (83, 100, 3)


@pytest.mark.parametrize("kind", ["truncated", "empty", "text", "unsupported"])
def test_broken_files_raise_open_errors(kind: str, broken_files: dict[str, Path]) -> None:
    path = broken_files[kind]
    for backend in ("auto", "tiff"):
        with pytest.raises(SlideOpenError) as info:
            open_slide(path, backend=backend)
        assert str(path) in str(info.value) and info.value.path == str(path)
        assert info.value.reason
    with pytest.raises(SlideOpenError, match="no such file"):
        open_slide(path.with_name("missing.tiff"))


def test_corrupt_tile_raises_read_error(broken_files: dict[str, Path]) -> None:
    path = broken_files["corrupt_tile"]
    index = int(str(broken_files["corrupt_tile_index"]))
    with open_slide(path, backend="tiff") as slide:
        tw = slide.info.levels[0].tile_width
        across = -(-slide.info.levels[0].width // tw)
        ty, tx = divmod(index, across)
        slide.read_region(0, 0, 0, 64, 64)  # other tiles are fine
        with pytest.raises(SlideReadError) as info:
            slide.read_region(0, tx * tw + 10, ty * tw + 10, 32, 32)
        assert str(path) in str(info.value) and "tile 5" in str(info.value)
        assert info.value.__cause__ is not None


def test_concurrent_reads_match_serial(svs_jpeg: FixtureSlide) -> None:
    rng = np.random.default_rng(1)
    boxes = [(int(l), int(rng.integers(-50, 1900)), int(rng.integers(-50, 1400)), 256, 256) for l in rng.integers(0, 3, 96)]
    with open_slide(svs_jpeg.path) as slide:
        serial = [slide.read_region(*b) for b in boxes]
    with DecodePool(4) as pool:
        cache = TileCache(8 << 20)
        with open_slide(svs_jpeg.path, cache=cache, pool=pool) as slide:
            results: dict[int, np.ndarray] = {}
            errors: list[BaseException] = []

            def work(k: int) -> None:
                try:
                    for i in range(k, len(boxes), 8):
                        results[i] = slide.read_region(*boxes[i])
                except BaseException as err:  # noqa: BLE001
                    errors.append(err)

            threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert not errors
            for i, ref in enumerate(serial):
                np.testing.assert_array_equal(results[i], ref)
            # whole reads submitted to the pool decode inline in the worker (no nested deadlock)
            futs = [pool.submit(slide.read_region, *b) for b in boxes[:16]]
            for f, ref in zip(futs, serial):
                np.testing.assert_array_equal(f.result(timeout=30), ref)
        assert cache.stats().hits > 0


def test_cache_bounds_bytes_and_counts_hits(tiff_jpeg_ycbcr: FixtureSlide) -> None:
    tile_bytes = 256 * 256 * 3
    cache = TileCache(3 * tile_bytes)
    with open_slide(tiff_jpeg_ycbcr.path, cache=cache) as slide:
        a = slide.read_region(0, 200, 200, 100, 100)  # 4 tiles -> 1 evicted
        s = cache.stats()
        assert s.misses == 4 and s.hits == 0 and s.bytes == 3 * tile_bytes and s.evictions == 1
        assert s.bytes <= s.capacity
        b = slide.read_region(0, 260, 260, 20, 20)  # one tile, cached
        assert cache.stats().hits == 1
        np.testing.assert_array_equal(b, a[60:80, 60:80])
        for y in range(0, 1500, 256):
            slide.read_region(0, 0, y, 2000, 100)
        s = cache.stats()
        assert s.bytes <= s.capacity and s.evictions > 1
    other = TileCache(64 << 20)
    with open_slide(tiff_jpeg_ycbcr.path, cache=other) as s1, open_slide(tiff_jpeg_ycbcr.path, cache=other) as s2:
        s1.read_region(1, 0, 0, 512, 512)
        before = other.stats()
        s2.read_region(1, 0, 0, 512, 512)  # same file -> same identity -> all hits
        after = other.stats()
        assert after.hits - before.hits == 4 and after.misses == before.misses


def test_thumbnail_and_info(svs_vips: FixtureSlide) -> None:
    with open_slide(svs_vips.path) as slide:
        info = slide.info
        assert info.dimensions == (2000, 1500) and info.level_count == 4
        assert info.levels[1].downsample == pytest.approx(2.0)
        assert info.levels[0].tile_width == 256
        thumb = slide.thumbnail(400)
        assert thumb.shape == (300, 400, 3)
        ref = slide.read_region(2, 0, 0, 500, 375)
        assert abs(float(thumb.mean()) - float(ref.mean())) < 2.0
        assert "aperio" in repr(slide)


# --- the shared real slides ---------------------------------------------------------------------


def test_real_svs_fast_path_matches_openslide(shared_wsi: Path) -> None:
    path = shared_wsi / "cmu-1-small-region.svs"
    with open_slide(path, cache=TileCache(32 << 20)) as slide:
        assert slide.info.backend == "tiff" and slide.info.vendor == "aperio"
        assert slide.info.level_count == 1 and slide.info.dimensions == (2220, 2967)
        assert slide.info.levels[0].tile_width == 240
        assert slide.info.mpp == pytest.approx(0.499)
        ours = slide.read_region(0, 0, 0, 2220, 2967)
        assert _maxdiff(ours, _openslide_level(path, 0)) <= 2
        with open_slide(path, backend="openslide") as other:
            for box in [(230, 470, 300, 50), (2100, 2900, 256, 256), (-5, 7, 20, 20)]:
                assert _maxdiff(slide.read_region(0, *box), other.read_region(0, *box)) <= 2
    for name in ("small.svs",):
        with open_slide(shared_wsi / name) as slide:
            assert _maxdiff(slide.read_region(0, 0, 0, 16, 16), _openslide_level(shared_wsi / name, 0)) <= 2


def test_real_boxes_tiff_every_level(shared_wsi: Path) -> None:
    path = shared_wsi / "boxes.tiff"
    with open_slide(path) as slide:
        assert slide.info.backend == "tiff" and slide.info.level_count == 4
        for level, lv in enumerate(slide.info.levels):
            assert _maxdiff(slide.read_region(level, 0, 0, lv.width, lv.height), _openslide_level(path, level)) == 0


@pytest.mark.parametrize("name", ["boxes_0.dcm", "dicom_jpeg.dcm", "dicom_jpeg2000.dcm", "sm_image.dcm"])
def test_real_dicom_through_openslide(name: str, shared_wsi: Path) -> None:
    with open_slide(shared_wsi / name) as slide:
        assert slide.info.backend == "openslide" and slide.info.vendor == "dicom"
        w, h = slide.info.dimensions
        img = slide.read_region(0, -8, -8, w + 16, h + 16)
        assert img.shape == (h + 16, w + 16, 3)
        assert (img[:8] == 255).all() and (img[:, :8] == 255).all()
        assert _maxdiff(img[8 : 8 + h, 8 : 8 + w], _openslide_level(shared_wsi / name, 0)) == 0
        assert slide.thumbnail(64).shape[2] == 3


def test_real_broken_slides(shared_wsi: Path) -> None:
    with pytest.raises(SlideOpenError, match="unopenable.tiff") as info:
        open_slide(shared_wsi / "unopenable.tiff")
    assert "52479" in str(info.value)
    for backend in ("auto", "tiff", "openslide"):
        with open_slide(shared_wsi / "unreadable.svs", backend=backend) as slide:
            with pytest.raises(SlideReadError, match="unreadable.svs"):
                slide.read_region(0, 0, 0, 16, 16)


@pytest.mark.parametrize("name", ["tiff_jpeg_ycbcr", "tiff_lzw"])
def test_cached_reads_equal_uncached_reads(name: str, request: pytest.FixtureRequest) -> None:
    """Reads served from the tile cache equal reads without one: cold, warm, half-warm (only some of a
    region's tiles cached), at and past the slide's edges, and into an ``out`` that is not C-contiguous."""
    fx: FixtureSlide = request.getfixturevalue(name)
    rng = np.random.default_rng(3)
    cache = TileCache(256 * 1024**2)
    with open_slide(fx.path, backend="tiff") as plain, open_slide(fx.path, backend="tiff", cache=cache) as cached:
        lv = plain.info.levels[0]
        boxes = [(250, 250, 20, 20), (lv.width - 50, lv.height - 40, 120, 90), (-30, -20, 300, 270),
                 (-10, -10, lv.width + 20, lv.height + 20)] + [
            (int(rng.integers(-100, lv.width)), int(rng.integers(-100, lv.height)), int(rng.integers(1, 600)),
             int(rng.integers(1, 600))) for _ in range(12)]
        for x, y, w, h in boxes:
            want = plain.read_region(0, x, y, w, h)
            np.testing.assert_array_equal(cached.read_region(0, x, y, w, h), want)  # cold
            np.testing.assert_array_equal(cached.read_region(0, x, y, w, h), want)  # warm
            strided = np.zeros((h, 2 * w, 3), np.uint8)[:, ::2]
            cached.read_region(0, x, y, w, h, out=strided)
            np.testing.assert_array_equal(strided, want)
        for x, y, w, h in boxes:  # half-warm: only the top-left corner's tiles cached, then the whole box
            cache.clear()
            cached.read_region(0, x, y, max(1, w // 3), max(1, h // 3))
            np.testing.assert_array_equal(cached.read_region(0, x, y, w, h), plain.read_region(0, x, y, w, h))
        assert cache.stats().hits > 0


@pytest.mark.parametrize("name", ["tiff_jpeg_ycbcr", "tiff_lzw", "svs_jpeg"])
@pytest.mark.parametrize("setup", ["cold", "warm", "no-cache", "pool", "batched-cpu"])
def test_read_patches_equal_region_reads(name: str, setup: str, request: pytest.FixtureRequest) -> None:
    """One batch read of many patches (the compiled piece copy) equals reading each patch alone: inside,
    straddling tiles and edges, partly or wholly outside, every level, into chosen rows of a batch buffer."""
    fx: FixtureSlide = request.getfixturevalue(name)
    rng = np.random.default_rng(11)
    cache = None if setup == "no-cache" else TileCache(256 * 1024**2)
    pool = DecodePool(3, jpeg_backend="batched-cpu" if setup == "batched-cpu" else "cpu") \
        if setup in ("pool", "batched-cpu") else None
    try:
        with open_slide(fx.path, backend="tiff") as plain, \
                open_slide(fx.path, backend="tiff", cache=cache, pool=pool) as batched:
            for level in range(plain.info.level_count):
                lv = plain.info.levels[level]
                for size in (256, 100, 300):
                    n = 24
                    xs = rng.integers(-size // 2, lv.width, n)
                    ys = rng.integers(-size // 2, lv.height, n)
                    xs[:3], ys[:3] = (0, lv.width - size, -size - 5), (0, lv.height - size, 10)  # corners, outside
                    want = np.stack([plain.read_region(level, int(x), int(y), size, size) for x, y in zip(xs, ys)])
                    if setup == "warm":
                        batched.read_patches(level, xs, ys, size, size, np.empty((n, size, size, 3), np.uint8),
                                             np.arange(n))
                    out = np.zeros((n + 5, size, size, 3), np.uint8)
                    rows = rng.permutation(n + 5)[:n]
                    batched.read_patches(level, xs, ys, size, size, out, rows)
                    np.testing.assert_array_equal(out[rows], want)
                    assert not out[np.setdiff1d(np.arange(n + 5), rows)].any()  # other rows untouched
    finally:
        if pool is not None:
            pool.close()
    if cache is not None:
        assert cache.stats().misses > 0


def test_read_patches_of_several_slides_equals_region_reads(tiff_jpeg_ycbcr: FixtureSlide, tiff_lzw: FixtureSlide,
                                                             tiff_jpeg_rgb: FixtureSlide) -> None:
    """One read of patches from several slides and levels (one cache lookup, one copy) equals reading each patch
    alone, cold and warm, with a shared cache and without one."""
    from loader_service.slides import read_patches_of

    rng = np.random.default_rng(5)
    paths = [tiff_jpeg_ycbcr.path, tiff_lzw.path, tiff_jpeg_rgb.path]
    plain = [open_slide(p, backend="tiff") for p in paths]  # the reference reads: no cache, so the first read is cold
    for cache in (TileCache(256 * 1024**2), None):
        slides = [open_slide(p, backend="tiff", cache=cache) for p in paths]
        try:
            size, n = 128, 30
            reads, want, row = [], {}, 0
            rows_all = rng.permutation(n * 4)
            for s, level in [(0, 0), (1, 0), (0, 1), (2, 0)]:
                slide = slides[s]
                lv = slide.info.levels[level]
                xs = rng.integers(-size // 2, lv.width, n)
                ys = rng.integers(-size // 2, lv.height, n)
                rows = rows_all[row:row + n]
                row += n
                reads.append((slide, level, xs, ys, rows))
                for x, y, r in zip(xs.tolist(), ys.tolist(), rows.tolist()):
                    want[r] = plain[s].read_region(level, x, y, size, size)
            for _ in ("cold", "warm"):
                out = np.zeros((n * 4, size, size, 3), np.uint8)
                read_patches_of(reads, size, size, out)
                for r, expected in want.items():
                    np.testing.assert_array_equal(out[r], expected)
            if cache is not None:
                assert cache.stats().misses > 0 and cache.stats().hits > 0
        finally:
            for slide in slides:
                slide.close()
    for slide in plain:
        slide.close()


def test_read_patches_rejects_a_wrong_buffer(tiff_lzw: FixtureSlide) -> None:
    with open_slide(tiff_lzw.path, backend="tiff") as slide:
        xs = ys = np.zeros(2, np.int64)
        with pytest.raises(ValueError, match="C-contiguous uint8"):
            slide.read_patches(0, xs, ys, 64, 64, np.zeros((2, 64, 32, 3), np.uint8), np.arange(2))
        with pytest.raises(ValueError, match="C-contiguous uint8"):
            slide.read_patches(0, xs, ys, 64, 64, np.zeros((2, 64, 64, 3), np.float32), np.arange(2))
