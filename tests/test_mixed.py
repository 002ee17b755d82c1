"""Mixed datasets (#13): slides that cannot serve a level or mpp are skipped (counted) or read at the nearest
resolution, as the request asks; a manifest `mpp` column fixes missing metadata; error texts suggest only what
every slide serves. Plus the smaller defects: manifests with a BOM or empty labels, greyscale slides, error texts
without server paths, `loader-service inspect` on an unreadable file."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from loader_service.config import DatasetConfig
from loader_service.dataset import ManifestError, read_manifest
from loader_service.server import LoaderServer
from loader_service.slides import open_slide
from loader_service.synthetic import render_synthetic, write_synthetic_slide
from loader_service.tissue import compute_tissue_mask
from tests.conftest import make_config
from tests.slide_fixtures import pyramid_levels, write_tifffile_pyramid
from trainer_client import LoaderClient, StreamConfig
from trainer_client.errors import InvalidRequestError


def _manifest(path: Path, rows: list[dict[str, str]]) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "label", "mpp"])
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def mixed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoaderServer]:
    """big: 4 levels at 0.5 µm/px; small: 2 levels; nompp: 3 levels, no resolution metadata (fixed by the
    manifest `mpp` column in dataset `fixed`, not in `raw`)."""
    root = tmp_path_factory.mktemp("mixed")
    write_synthetic_slide(root / "big.tiff", 2048, 2048, seed=61, quality=80, mpp=0.5)
    write_synthetic_slide(root / "small.tiff", 512, 512, seed=62, quality=80, mpp=0.5)
    write_tifffile_pyramid(root / "nompp.tiff", pyramid_levels(render_synthetic(1024, 1024, seed=63), 3), "jpeg",
                           mpp=None)
    rows = [{"path": "big.tiff", "label": "a", "mpp": ""}, {"path": "small.tiff", "label": "b", "mpp": ""}]
    _manifest(root / "raw.csv", rows + [{"path": "nompp.tiff", "label": "a", "mpp": ""}])
    _manifest(root / "fixed.csv", rows + [{"path": "nompp.tiff", "label": "a", "mpp": "0.5"}])
    # shallow: a one-level (zlib) slide next to big: it serves mpp up to 4× its full resolution only
    flat = pyramid_levels(render_synthetic(1024, 1024, seed=63), 1)
    write_tifffile_pyramid(root / "flat.tiff", flat, "zlib", mpp=0.5)
    _manifest(root / "shallow.csv", [rows[0], {"path": "flat.tiff", "label": "b", "mpp": ""}])
    datasets = (DatasetConfig("raw", root / "raw.csv"), DatasetConfig("fixed", root / "fixed.csv"),
                DatasetConfig("shallow", root / "shallow.csv"))
    config = make_config(root, datasets=datasets,
                         tissue_cache_dir=None, tissue_max_size=256)
    with LoaderServer(config) as server:
        yield server


def _stream(server: LoaderServer, **kw: Any) -> tuple[set[str], list[str], int]:
    """(slides sampled, slides skipped, samples) of one epoch."""
    values: dict[str, Any] = dict(dataset="raw", batch_size=8, patch_size=64, samples_per_epoch=96, seed=1,
                                  balance="slide", augment=False, transport="grpc", tissue_threshold=0.05)
    values.update(kw)
    with LoaderClient(f"127.0.0.1:{server.port}", timeout_s=60) as client:
        stream = client.stream(StreamConfig(**values))
        slides: set[str] = set()
        count = 0
        for batch in stream:
            slides.update(batch["slide_id"])
            count += batch["images"].shape[0]
        return slides, stream.skipped_slides, count


def test_levels_some_slides_lack_are_skipped_or_resampled(mixed_server: LoaderServer) -> None:
    levels = {r.slide_id: len(r.info.levels) for r in mixed_server.datasets["raw"].records if r.info}
    assert levels["big.tiff"] == 4 and levels["small.tiff"] == 2
    slides, skipped, count = _stream(mixed_server, level=2)
    assert count == 96 and "small.tiff" not in slides and "big.tiff" in slides
    assert any(s.startswith("small.tiff:") and "level 2 does not exist" in s for s in skipped)
    assert mixed_server.metrics.sample("wsi_loader_slides_skipped_total", {"reason": "level_missing"}) >= 1
    slides, skipped, count = _stream(mixed_server, level=2, unservable="fallback")
    assert count == 96 and "small.tiff" in slides and not skipped


def test_no_level_anywhere_suggests_only_what_every_slide_serves(mixed_server: LoaderServer) -> None:
    with pytest.raises(InvalidRequestError) as info:
        _stream(mixed_server, level=9)
    found = re.search(r"levels 0\.\.(\d+) exist in every slide", str(info.value))
    assert found, str(info.value)
    slides, skipped, count = _stream(mixed_server, level=int(found.group(1)))  # what it suggests works for all
    assert count == 96 and not skipped and slides == {"big.tiff", "small.tiff", "nompp.tiff"}


def test_a_shallow_pyramid_is_skipped_not_the_session(mixed_server: LoaderServer) -> None:
    before = mixed_server.metrics.sample("wsi_loader_slides_skipped_total", {"reason": "mpp_too_coarse"}) or 0
    slides, skipped, count = _stream(mixed_server, dataset="shallow", mpp=4.0, tissue_threshold=0.0)
    assert count == 96 and slides == {"big.tiff"}
    assert any(s.startswith("flat.tiff:") and "MAX_READ_FACTOR" in s for s in skipped)
    assert mixed_server.metrics.sample("wsi_loader_slides_skipped_total", {"reason": "mpp_too_coarse"}) == before + 1


def test_an_mpp_no_slide_reaches_is_out_of_range_and_suggests_what_works(mixed_server: LoaderServer) -> None:
    with pytest.raises(InvalidRequestError) as info:  # OUT_OF_RANGE: the client's InvalidRequestError family
        _stream(mixed_server, dataset="shallow", mpp=500.0)
    assert "OUT_OF_RANGE" in str(info.value), str(info.value)
    found = re.search(r"mpp from ([\d.]+) to ([\d.]+) µm/px is served by every slide", str(info.value))
    assert found, str(info.value)
    for mpp in map(float, found.groups()):  # both ends of what it suggests work for every slide
        slides, skipped, count = _stream(mixed_server, dataset="shallow", mpp=mpp, tissue_threshold=0.0)
        assert count == 96 and not skipped and slides == {"big.tiff", "flat.tiff"}


def test_mpp_needs_metadata_or_the_manifest_column(mixed_server: LoaderServer) -> None:
    slides, skipped, _ = _stream(mixed_server, mpp=1.0)
    assert "nompp.tiff" not in slides and any(s.startswith("nompp.tiff:") for s in skipped)
    assert mixed_server.metrics.sample("wsi_loader_slides_skipped_total", {"reason": "no_mpp"}) >= 1
    slides, skipped, _ = _stream(mixed_server, dataset="fixed", mpp=1.0)
    assert "nompp.tiff" in slides and not skipped
    describe = {s.slide_id: s.mpp for s in LoaderClient(f"127.0.0.1:{mixed_server.port}").describe("fixed").slides}
    assert describe["nompp.tiff"] == pytest.approx(0.5)


def test_too_fine_mpp_suggests_what_works_and_fallback_upsamples(mixed_server: LoaderServer) -> None:
    with pytest.raises(InvalidRequestError) as info:
        _stream(mixed_server, mpp=0.25)
    found = re.search(r"mpp from ([0-9.]+) to", str(info.value))
    assert found, str(info.value)
    slides, _, count = _stream(mixed_server, mpp=float(found.group(1)))
    assert count == 96 and {"big.tiff", "small.tiff"} <= slides
    slides, _, count = _stream(mixed_server, mpp=0.25, unservable="fallback")
    assert count == 96 and {"big.tiff", "small.tiff"} <= slides


def test_upsampled_fallback_pixels_match_a_plain_upsampling(mixed_server: LoaderServer) -> None:
    from PIL import Image

    from loader_service.pipeline import _read_upsampled

    with open_slide(Path(mixed_server.datasets["raw"].by_id["big.tiff"].path)) as slide:
        out = np.empty((64, 64, 3), np.uint8)
        _read_upsampled(slide, 0.5, 200, 300, 64, 64, out)  # 0.25 µm/px from 0.5
        source = slide.read_region(0, 100, 150, 32, 32)
    ref = np.asarray(Image.fromarray(source).resize((64, 64), Image.Resampling.BILINEAR))
    assert np.abs(out.astype(int) - ref).mean() < 3.0


# --- the smaller defects ------------------------------------------------------------------------------------------

def test_manifest_with_a_byte_order_mark(tmp_path: Path) -> None:
    path = tmp_path / "bom.csv"
    path.write_bytes("\ufeffpath,label\nslide.tiff,tumor\n".encode("utf-8"))
    (entry,) = read_manifest(path)
    assert entry.label == "tumor" and entry.path == tmp_path / "slide.tiff"
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_bytes('\ufeff{"path": "a.tiff", "label": "x"}\n'.encode("utf-8"))
    assert read_manifest(jsonl)[0].label == "x"


@pytest.mark.parametrize("text", ["path,label\na.tiff,\n", "path,label\na.tiff,   \n"])
def test_manifest_empty_label_is_refused(tmp_path: Path, text: str) -> None:
    path = tmp_path / "m.csv"
    path.write_text(text)
    with pytest.raises(ManifestError, match=r"m\.csv:2: empty `label`"):
        read_manifest(path)


@pytest.mark.parametrize("value", ["abc", "-1", "0", "nan", "inf"])
def test_manifest_bad_mpp_is_refused(tmp_path: Path, value: str) -> None:
    path = tmp_path / "m.csv"
    path.write_text(f"path,label,mpp\na.tiff,x,{value}\n")
    with pytest.raises(ManifestError, match="`mpp`"):
        read_manifest(path)


@pytest.mark.parametrize("channels", [3, 1])
def test_greyscale_slide_has_tissue(tmp_path: Path, channels: int) -> None:
    rgb = render_synthetic(1024, 768, seed=8)
    grey = rgb.mean(axis=2).astype(np.uint8)
    image = np.repeat(grey[..., None], 3, axis=2) if channels == 3 else grey
    path = write_tifffile_pyramid(tmp_path / "grey.tiff", pyramid_levels(image, 2), "zlib",
                                  photometric="rgb" if channels == 3 else "minisblack")
    with open_slide(path) as slide:
        grey_mask = compute_tissue_mask(slide)
    colour_path = write_tifffile_pyramid(tmp_path / "colour.tiff", pyramid_levels(rgb, 2), "zlib")
    with open_slide(colour_path) as slide:
        colour_mask = compute_tissue_mask(slide)
    assert grey_mask.tissue_fraction > 0.5 * colour_mask.tissue_fraction > 0
    overlap = (grey_mask.mask & colour_mask.mask).sum() / colour_mask.mask.sum()
    assert overlap > 0.8  # the same tissue, found by darkness instead of colour


def test_error_texts_name_slides_not_server_paths(server: LoaderServer, client: Any, dataset_dir: Path) -> None:
    errors = [s.error for s in client.describe("mixed").slides if s.error]
    assert len(errors) >= 3
    assert not any(str(dataset_dir) in e or "/tmp" in e for e in errors), errors
    with pytest.raises(Exception) as info:
        client.read_region("mixed", "corrupt.tiff", 0, 0, 8, 8)
    assert str(dataset_dir) not in str(info.value)


def test_inspect_unreadable_file_is_one_line_and_exit_code_2(tmp_path: Path) -> None:
    bad = tmp_path / "broken.svs"
    bad.write_bytes(b"II*\x00" + b"\x00" * 64)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    for target in (bad, tmp_path / "missing.svs"):
        done = subprocess.run([sys.executable, "-m", "loader_service.cli", "inspect", str(target)],
                              capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == 2, done.stderr
        assert "Traceback" not in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1 and target.name in done.stderr


@pytest.mark.parametrize("mpp", [1.5, 3.0])  # 3x and 6x: factors a DCT scale cannot reach alone
def test_reduced_resolution_reads_are_area_averages(tmp_path: Path, mpp: float) -> None:
    """docs/slides.md's accuracy claim: a DCT-scaled read leaves only whole-number factors to the area resize."""
    from PIL import Image

    single = write_synthetic_slide(tmp_path / "single.tiff", 2048, 1536, seed=4, pyramid=False, quality=85)
    with open_slide(single) as slide:
        full = slide.read_region(0, 0, 0, 2048, 1536)
        f = mpp / 0.5
        x, y, w, h = 37, 21, 200, 150
        got = slide.read_region_mpp(mpp, x, y, w, h)
    box = (x * f, y * f, (x + w) * f, (y + h) * f)
    ref = np.asarray(Image.fromarray(full).resize((w, h), Image.Resampling.BOX, box=box))
    diff = np.abs(got.astype(int) - ref)
    assert diff.mean() < 0.7 and diff.max() <= 8, (diff.mean(), diff.max())


def test_context_of_a_fallback_sample_is_centred_in_its_resampled_grid(mixed_server: LoaderServer) -> None:
    """small.tiff has no level 2: its samples are read at 4× (resampled); a 2× context is then 8× below level 0."""
    with LoaderClient(f"127.0.0.1:{mixed_server.port}", timeout_s=60) as client:
        stream = client.stream(StreamConfig(dataset="fixed", batch_size=8, patch_size=32, samples_per_epoch=48, seed=3,
                                            balance="slide", augment=False, transport="grpc", tissue_threshold=0.0,
                                            level=2, unservable="fallback", context=((2.0, 32),)))
        checked = 0
        for batch in stream:
            for j, slide_id in enumerate(batch["slide_id"]):
                if slide_id != "small.tiff":
                    continue
                level, mpp, x, y, size = batch["context_place"][0][j]
                assert mpp == pytest.approx(0.5 * 4 * 2)  # the sample's 4× grid, times the factor
                centre = int(batch["x"][j]) + 16
                assert abs((x + size / 2) * 2.0 - centre) < 2.0
                again = client.read_region("fixed", slide_id, x, y, size, size, level=level, mpp=mpp).permute(2, 0, 1)
                assert torch.equal(batch["context"][0][j], again)
                checked += 1
        assert checked > 0


def test_context_past_a_slides_read_reach_is_refused_at_open(mixed_server: LoaderServer) -> None:
    """flat.tiff has one level: an 8× context would be read 8× below it, past MAX_READ_FACTOR."""
    with LoaderClient(f"127.0.0.1:{mixed_server.port}", timeout_s=60) as client:
        stream = client.stream(StreamConfig(dataset="shallow", batch_size=4, patch_size=64, samples_per_epoch=8,
                                            context=((8.0, 64),), augment=False, transport="grpc",
                                            tissue_threshold=0.0))
        with pytest.raises(InvalidRequestError, match="MAX_READ_FACTOR") as info:  # before SessionOpened
            next(iter(stream))
        assert "OUT_OF_RANGE" in str(info.value) and "flat.tiff" in str(info.value) and stream.shard_length == 0
        ok = client.stream(StreamConfig(dataset="shallow", batch_size=4, patch_size=64, samples_per_epoch=8,
                                        context=((2.0, 64),), augment=False, transport="grpc", tissue_threshold=0.0))
        assert sum(b["context"][0].shape[0] for b in ok) == 8
