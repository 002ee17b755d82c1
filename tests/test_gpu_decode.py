"""Batched JPEG tile decode (``torchvision.io.decode_jpeg``): the same code on CPU and CUDA.

CPU tests run the batched path with ``device='cpu'`` against the per-tile DecodePool path;
tests marked ``gpu`` run it with nvJPEG and skip without a CUDA device.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from loader_service.config import ServiceConfig
from loader_service.slides import DecodePool, SlideReadError, TileCache, open_slide
from loader_service.slides import batched as batched_mod
from loader_service.slides.batched import BatchedDecodeUnsupported, BatchedJpegDecoder, time_backends
from tests.slide_fixtures import FixtureSlide

JPEG_FIXTURES = ["tiff_jpeg_ycbcr", "tiff_jpeg_rgb", "tiff_jpeg_tifffile", "svs_jpeg", "svs_vips", "ome_jpeg"]
#: measured on this repository's fixtures: torchvision's CPU decode_jpeg (libjpeg-turbo, islow
#: IDCT, fancy upsampling) gives the same pixels as simplejpeg/imagecodecs: max abs diff 0
CPU_BOUND = 0
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities of TorchVision:DeprecationWarning")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    assert a.shape == b.shape, (a.shape, b.shape)
    return np.abs(a.astype(np.int16) - b.astype(np.int16))


def _spy(pool: DecodePool) -> list[int]:
    """Count the tiles each batched call decodes (the batched path is really taken)."""
    dec = pool.batched_jpeg
    assert dec is not None
    calls: list[int] = []
    real = dec.decode

    def counting(decoder: Any, payloads: Any) -> Any:
        calls.append(len(payloads))
        return real(decoder, payloads)

    dec.decode = counting  # type: ignore[method-assign]
    return calls


def _compare_every_level(path: Path, pool: DecodePool, cache: TileCache | None = None) -> tuple[float, int]:
    """Read every level (with a border: edge tiles, out-of-image strips) through ``pool`` and
    through the per-tile CPU pool; returns (worst mean abs diff, max abs diff)."""
    worst_mean, worst_max = 0.0, 0
    with DecodePool(2) as ref_pool, open_slide(path, pool=pool, cache=cache) as s, open_slide(path, pool=ref_pool) as r:
        for level, lv in enumerate(s.info.levels):
            box = (level, -7, -5, lv.width + 19, lv.height + 11)
            d = _diff(s.read_region(*box), r.read_region(*box))
            worst_mean, worst_max = max(worst_mean, float(d.mean())), max(worst_max, int(d.max()))
    return worst_mean, worst_max


@pytest.mark.parametrize("name", JPEG_FIXTURES)
def test_batched_cpu_equals_pool_every_level(name: str, request: pytest.FixtureRequest) -> None:
    fx: FixtureSlide = request.getfixturevalue(name)
    with DecodePool(2, jpeg_backend="batched-cpu") as pool:
        assert pool.jpeg_choice is not None and pool.jpeg_choice.backend == "batched-cpu"
        calls = _spy(pool)
        cache = TileCache(64 << 20)
        _, worst = _compare_every_level(fx.path, pool, cache)
        assert worst <= CPU_BOUND
        assert sum(calls) > 0 and max(calls) > 1  # whole-level reads: many tiles per call
        decoded = sum(calls)
        with open_slide(fx.path, pool=pool, cache=cache) as s:  # second pass: every tile cached
            lv = s.info.levels[0]
            s.read_region(0, 0, 0, lv.width, lv.height)
        assert sum(calls) == decoded


def test_regions_and_reduced_scale_stay_equal(svs_jpeg: FixtureSlide, tiff_jpeg_ycbcr: FixtureSlide) -> None:
    rng = np.random.default_rng(3)
    with DecodePool(2, jpeg_backend="batched-cpu") as pool, DecodePool(2) as ref_pool:
        calls = _spy(pool)
        for fx in (svs_jpeg, tiff_jpeg_ycbcr):
            with open_slide(fx.path, pool=pool) as s, open_slide(fx.path, pool=ref_pool) as r:
                for _ in range(12):
                    level = int(rng.integers(0, s.info.level_count))
                    lv = s.info.levels[level]
                    box = (level, int(rng.integers(-60, lv.width)), int(rng.integers(-60, lv.height)), 300, 200)
                    assert _diff(s.read_region(*box), r.read_region(*box)).max() <= CPU_BOUND
        n = len(calls)
        # decode_jpeg cannot DCT-scale: 1/2..1/8 reads stay on the per-tile CPU path
        with open_slide(tiff_jpeg_ycbcr.path, pool=pool) as s, open_slide(tiff_jpeg_ycbcr.path, pool=ref_pool) as r:
            assert s.level_for_mpp(16.0)[1] > 2.0  # beyond the coarsest level: DCT scale 2 + resize
            np.testing.assert_array_equal(s.read_region_mpp(16.0, 3, 5, 60, 40), r.read_region_mpp(16.0, 3, 5, 60, 40))
            assert len(calls) == n
            np.testing.assert_array_equal(s.thumbnail(150), r.thumbnail(150))  # level 3 at scale 1: batched


def test_sparse_tiles_are_white(tiff_jpeg_ycbcr: FixtureSlide) -> None:
    with DecodePool(2, jpeg_backend="batched-cpu") as pool, open_slide(tiff_jpeg_ycbcr.path, pool=pool) as s:
        s._levels[0].counts[1] = 0  # type: ignore[attr-defined]  # tile 1 becomes sparse
        out = s.read_region(0, 200, 0, 400, 300)
        assert (out[:256, 56:312] == 255).all()
        with open_slide(tiff_jpeg_ycbcr.path) as r:
            np.testing.assert_array_equal(out[:, :56], r.read_region(0, 200, 0, 56, 300))


def test_corrupt_tile_names_the_tile(broken_files: dict[str, Path]) -> None:
    path = broken_files["corrupt_tile"]
    index = int(str(broken_files["corrupt_tile_index"]))
    with DecodePool(2, jpeg_backend="batched-cpu") as pool, open_slide(path, pool=pool) as s:
        tw = s.info.levels[0].tile_width
        ty, tx = divmod(index, -(-s.info.levels[0].width // tw))
        with pytest.raises(SlideReadError, match=f"tile {index}"):
            s.read_region(0, tx * tw - 10, ty * tw + 10, 64, 32)  # the corrupt tile and a good one


def test_coalesced_batches_and_one_copy(svs_jpeg: FixtureSlide, tiff_jpeg_ycbcr: FixtureSlide) -> None:
    """The GPU-side mechanics on the CPU: concurrent callers merged into one decode call (tiles of
    different slides/levels), one host copy per batch, a bad tile failing only its own caller."""
    dec = BatchedJpegDecoder("cpu")
    dec.coalesce = dec.one_copy = True
    requests: list[tuple[Any, list[bytes]]] = []
    for fx in (svs_jpeg, tiff_jpeg_ycbcr):
        with open_slide(fx.path, backend="tiff") as s:
            for level in (0, 1):
                layout = s.tile_layout(level)  # type: ignore[attr-defined]
                for start in (0, 3):
                    requests.append((layout["decoder"], [s.raw_tile(level, i) for i in range(start, start + 3)]))  # type: ignore[attr-defined]
    requests.append((requests[0][0], [requests[0][1][0], b"\x00" * 64]))  # not a JPEG
    sizes: list[int] = []
    real = dec._decode_jpeg

    def counting(ts: Any, mode: Any, device: Any) -> Any:
        sizes.append(len(ts))
        return real(ts, mode=mode, device=device)

    dec._decode_jpeg = counting
    for decoder, payloads in requests[:2]:  # settle the colour checks first (one per kind)
        dec.decode(decoder, payloads)
    sizes.clear()
    results: dict[int, Any] = {}

    def work(i: int) -> None:
        try:
            results[i] = dec.decode(*requests[i])
        except Exception as err:  # noqa: BLE001
            results[i] = err

    dec._decode_lock.acquire()  # hold the decoder: every request queues behind it
    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    while len(dec._queue) < len(requests):
        time.sleep(0.01)
    dec._decode_lock.release()
    for t in threads:
        t.join(30)
    assert sizes[0] == sum(len(p) for _, p in requests)  # all merged into the first call
    for i, (decoder, payloads) in enumerate(requests[:-1]):
        assert isinstance(results[i], list)
        for got, raw in zip(results[i], payloads):
            np.testing.assert_array_equal(got, decoder.decode(raw))
            assert got.base is None or got.base.size == got.size  # own buffer, not a view of the batch
    assert isinstance(results[len(requests) - 1], RuntimeError)


def test_untrusted_decoder_falls_back_to_cpu(svs_jpeg: FixtureSlide, caplog: pytest.LogCaptureFixture) -> None:
    """A batched decoder with wrong colours (as one ignoring the Adobe RGB marker would be) is
    caught by the first-tile check; its tiles are then decoded on the CPU pool."""
    with DecodePool(2, jpeg_backend="batched-cpu") as pool, DecodePool(2) as ref_pool:
        dec = pool.batched_jpeg
        assert dec is not None
        real = dec._decode_jpeg
        dec._decode_jpeg = lambda ts, mode, device: [255 - t for t in real(ts, mode=mode, device=device)]
        with open_slide(svs_jpeg.path, pool=pool) as s, open_slide(svs_jpeg.path, pool=ref_pool) as r:
            np.testing.assert_array_equal(s.read_region(0, 100, 100, 400, 300), r.read_region(0, 100, 100, 400, 300))
            assert "differs from the CPU decoder" in caplog.text
            with pytest.raises(BatchedDecodeUnsupported):
                dec.decode(s.tile_layout(0)["decoder"], [s.raw_tile(0, 0)])  # type: ignore[attr-defined]
            np.testing.assert_array_equal(s.read_region(1, 0, 0, 300, 300), r.read_region(1, 0, 0, 300, 300))


def test_auto_probe_times_both_and_picks(monkeypatch: pytest.MonkeyPatch, tiff_lzw: FixtureSlide, svs_jpeg: FixtureSlide) -> None:
    """The auto selection logic, run on the CPU device (as if it were the GPU)."""
    monkeypatch.setattr(batched_mod, "cuda_device_for", lambda device: "cpu")
    with DecodePool(2, jpeg_backend="auto") as pool:
        assert pool.jpeg_choice is None and "pending" in repr(pool)
        with open_slide(tiff_lzw.path, pool=pool):
            assert pool.jpeg_choice is None  # no JPEG tiles to measure yet
        with open_slide(svs_jpeg.path, pool=pool):
            choice = pool.jpeg_choice
        assert choice is not None and choice.device == "cpu"
        assert choice.cpu_tiles_per_s and choice.batched_tiles_per_s
        faster = choice.batched_tiles_per_s > choice.cpu_tiles_per_s
        assert choice.backend == ("nvjpeg" if faster else "cpu")
        assert (pool.batched_jpeg is not None) == faster


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour")
def test_backends_without_cuda() -> None:
    with DecodePool(1, jpeg_backend="auto") as pool:
        assert pool.jpeg_choice is not None and pool.jpeg_choice.backend == "cpu" and pool.batched_jpeg is None
    with pytest.raises(ValueError, match="needs a CUDA device"):
        DecodePool(1, jpeg_backend="nvjpeg")
    with pytest.raises(ValueError, match="jpeg_backend must be one of"):
        DecodePool(1, jpeg_backend="gpu")


def test_config_validation() -> None:
    assert ServiceConfig(synthetic=True).jpeg_backend == "auto"
    with pytest.raises(ValueError, match="auto, cpu, nvjpeg"):
        ServiceConfig(synthetic=True, jpeg_backend="gpu")
    with pytest.raises(ValueError, match="device is 'cpu'"):
        ServiceConfig(synthetic=True, jpeg_backend="nvjpeg", device="cpu")


def test_time_backends_reports_rates(svs_vips: FixtureSlide) -> None:
    with open_slide(svs_vips.path, backend="tiff") as s:
        layout = s.tile_layout(0)  # type: ignore[attr-defined]
        tiles = [s.raw_tile(0, i) for i in range(8)]  # type: ignore[attr-defined]
    cpu, batched = time_backends(layout["decoder"], tiles, BatchedJpegDecoder("cpu"), 2, repeats=1)
    assert cpu > 0 and batched > 0


# --- CUDA (nvJPEG) ---------------------------------------------------------------------------


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("name", JPEG_FIXTURES)
def test_nvjpeg_close_to_cpu_every_level(name: str, request: pytest.FixtureRequest) -> None:
    fx: FixtureSlide = request.getfixturevalue(name)
    with DecodePool(2, jpeg_backend="nvjpeg", jpeg_device="cuda") as pool:
        assert pool.batched_jpeg is not None and pool.batched_jpeg.device.startswith("cuda")
        calls = _spy(pool)
        mean, worst = _compare_every_level(fx.path, pool)
        # torchvision's own nvJPEG test allows a mean difference < 2 (IDCT / chroma upsampling)
        assert mean < 2.0, (mean, worst)
        assert sum(calls) > 0


@pytest.mark.gpu
@needs_cuda
def test_auto_on_cuda_measures_and_logs(svs_vips: FixtureSlide, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    caplog.set_level(logging.INFO, logger="loader_service.slides.batched")
    with DecodePool(2, jpeg_backend="auto", jpeg_device="cuda") as pool:
        assert pool.jpeg_choice is None
        with open_slide(svs_vips.path, pool=pool):
            pass
        choice = pool.jpeg_choice
        assert choice is not None and choice.backend in ("cpu", "nvjpeg")
        assert choice.cpu_tiles_per_s and choice.batched_tiles_per_s
        assert "tiles/s" in caplog.text
