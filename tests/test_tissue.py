"""Tissue detection, the mask cache, overlays and inspect_slide."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from loader_service.slides import open_slide
from loader_service.synthetic import render_synthetic
from loader_service.tissue import (
    TissueMask,
    TissueMaskCache,
    TissueParams,
    compute_tissue_mask,
    inspect_slide,
    mask_overlay_png,
    otsu_threshold,
)
from tests.slide_fixtures import FixtureSlide


def test_synthetic_slide_tissue_fraction_is_plausible(tiff_jpeg_ycbcr: FixtureSlide) -> None:
    with open_slide(tiff_jpeg_ycbcr.path) as slide:
        mask = compute_tissue_mask(slide, max_size=1024)
    assert mask.mask.shape == (768, 1024)
    assert mask.downsample == pytest.approx(2000 / 1024, rel=1e-3)
    # ground truth: the synthetic picture is near-grey (saturation ~0) outside the tissue
    truth = render_synthetic(2000, 1500, seed=11)[::2, ::2]
    sat = (truth.max(axis=2).astype(int) - truth.min(axis=2)) > 40
    assert 0.05 < mask.tissue_fraction < 0.8
    assert abs(mask.tissue_fraction - sat.mean()) < 0.08
    assert 0.03 < mask.threshold < 0.6


def test_white_slide_has_no_tissue(white_slide: Path) -> None:
    with open_slide(white_slide) as slide:
        mask = compute_tissue_mask(slide)
    assert mask.tissue_fraction < 0.005


def test_region_fraction() -> None:
    m = np.zeros((100, 200), bool)
    m[:, 100:] = True
    mask = TissueMask(mask=m, downsample=4.0)
    assert mask.tissue_fraction == pytest.approx(0.5)
    assert mask.fraction(1.0, 0, 0, 400, 400) == pytest.approx(0.0)  # level 0: left half
    assert mask.fraction(1.0, 400, 0, 400, 400) == pytest.approx(1.0)
    assert mask.fraction(2.0, 100, 0, 200, 200) == pytest.approx(0.5)  # level ds 2, straddles
    assert mask.fraction(1.0, 790, 390, 20, 20) == pytest.approx(0.25)  # half outside both ways
    assert mask.fraction(1.0, 5000, 5000, 10, 10) == 0.0
    with pytest.raises(ValueError):
        TissueMask(mask=m.astype(np.uint8), downsample=1.0)


def test_otsu_separates_two_modes() -> None:
    values = np.concatenate([np.full(1000, 10, np.uint8), np.full(500, 120, np.uint8)])
    assert 10 <= otsu_threshold(values) < 120


def test_mask_cache_round_trip(svs_vips: FixtureSlide, tmp_path: Path) -> None:
    cache = TissueMaskCache(tmp_path / "masks")
    with open_slide(svs_vips.path) as slide:
        first = cache.get(slide, max_size=512)
        files = list((tmp_path / "masks").glob("*.npz"))
        assert len(files) == 1
        again = cache.get(slide, max_size=512)
        np.testing.assert_array_equal(first.mask, again.mask)
        assert again.downsample == first.downsample and again.threshold == pytest.approx(first.threshold)
        cache.get(slide, max_size=512, params=TissueParams(min_saturation=0.2))
        assert len(list((tmp_path / "masks").glob("*.npz"))) == 2  # parameters are part of the key


def test_overlay_png_and_inspect(svs_vips: FixtureSlide, tmp_path: Path) -> None:
    with open_slide(svs_vips.path) as slide:
        mask = compute_tissue_mask(slide, max_size=512)
        out = mask_overlay_png(slide, mask, tmp_path / "overlay.png", max_size=400)
    with Image.open(out) as im:
        assert im.size == (400, 300) and im.mode == "RGB"
    info = inspect_slide(svs_vips.path, tissue_max_size=512)
    json.dumps(info)
    assert info["vendor"] == "aperio" and info["backend"] == "tiff"
    assert info["width"] == 2000 and info["level_count"] == 4
    assert info["levels"][1]["tile_width"] == 256 and info["levels"][1]["mpp"] == pytest.approx(1.0)
    assert 0.05 < info["tissue_fraction"] < 0.8
