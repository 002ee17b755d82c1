"""Image-level random scale and crop (augment.resample): correct pixels, and pieces that stitch exactly."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from loader_service.augment import (AugmentConfig, AugmentParams, Rect, augment_image, draw_params, render_piece,
                                    resample_rect, source_window)


class Slide:
    """A synthetic 'slide' around a region: ``read(rect)`` takes region coordinates, white outside."""

    def __init__(self, height: int, width: int, origin: tuple[int, int], seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        yy, xx = np.mgrid[0:height, 0:width]
        smooth = np.stack([(yy * 3 + xx * 2) % 256, (xx * 5) % 256, (yy * 7) % 256], axis=-1)
        self.pixels = ((smooth + rng.integers(0, 40, (height, width, 3))) % 256).astype(np.uint8)
        self.origin = origin  # the region's top-left corner in the slide
        self.calls: list[Rect] = []

    def read(self, rect: Rect) -> np.ndarray:
        self.calls.append(rect)
        out = np.full((rect.height, rect.width, 3), 255, dtype=np.uint8)
        y0, x0 = rect.y + self.origin[0], rect.x + self.origin[1]
        sy0, sx0 = max(y0, 0), max(x0, 0)
        sy1 = min(y0 + rect.height, self.pixels.shape[0])
        sx1 = min(x0 + rect.width, self.pixels.shape[1])
        if sy1 > sy0 and sx1 > sx0:
            out[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = self.pixels[sy0:sy1, sx0:sx1]
        return out


def test_identity_is_the_region() -> None:
    slide = Slide(100, 120, (10, 20))
    params = AugmentParams(scale=1.0, crop_shift=(0.0, 0.0))
    out = resample_rect(params, (48, 60), Rect(0, 0, 48, 60), slide.read)
    assert torch.equal(out, torch.from_numpy(slide.pixels[10:58, 20:80]))


def test_integer_shift_is_a_translation() -> None:
    slide = Slide(100, 120, (30, 30))
    params = AugmentParams(crop_shift=(0.25, -0.125))  # 12 rows down, 8 columns left of 48 x 64
    out = resample_rect(params, (48, 64), Rect(0, 0, 48, 64), slide.read)
    assert torch.equal(out, torch.from_numpy(slide.pixels[42:90, 22:86]))


@pytest.mark.parametrize("scale", [1.5, 2.0, 0.5, 0.8])
def test_matches_torch_bilinear(scale: float) -> None:
    """Zooming in equals bilinear interpolation of the window (align_corners=False); zooming out equals
    torch's antialiased bilinear (the triangle widened to 1/scale). Interior pixels, within rounding."""
    h = w = 48
    n = round(h / scale)  # source window side
    slide = Slide(200, 200, (70, 70), seed=1)
    params = AugmentParams(scale=scale)
    out = resample_rect(params, (h, w), Rect(0, 0, h, w), slide.read).permute(2, 0, 1).float()
    top = 70 + h // 2 - n // 2
    window = torch.from_numpy(slide.pixels[top:top + n, top:top + n]).permute(2, 0, 1).float()[None]
    ref = F.interpolate(window, size=(h, w), mode="bilinear", align_corners=False, antialias=scale < 1)[0]
    ref = ref.round().clamp(0, 255)
    m = int(np.ceil(2 * max(1.0, 1 / scale) * scale)) + 1  # output pixels whose taps may leave the window
    diff = (out - ref)[:, m:-m, m:-m].abs()
    assert diff.max() <= 1.0 and (diff > 0).float().mean() < 0.05  # ties at .5 may round either way


def test_source_window_is_what_is_read() -> None:
    slide = Slide(300, 300, (100, 100))
    params = AugmentParams(scale=0.6, crop_shift=(-0.3, 0.2))
    rect = Rect(5, 7, 30, 21)
    resample_rect(params, (64, 80), rect, slide.read)
    assert slide.calls == [source_window(params, (64, 80), rect)]
    assert slide.calls[0].y < 0  # zoomed out and shifted up: context above the region is read


@pytest.mark.parametrize("scale, shift", [(1.37, (0.1, -0.2)), (0.63, (-0.05, 0.3)), (1.0, (0.013, 0.0)),
                                          (2.9, (0.0, 0.0))])
def test_pieces_stitch_to_the_whole_image(scale: float, shift: tuple[float, float]) -> None:
    """The whole augmented image (resampled, then flips/rotation/colour/blur) equals any tiling rendered
    piece by piece, bit for bit: every output pixel is the same arithmetic whatever the piece."""
    hw = (90, 130)
    slide = Slide(400, 400, (150, 130), seed=3)
    drawn = draw_params(AugmentConfig(blur_prob=1.0, blur_sigma=(0.5, 2.0), hue=0.1), 7, 0, 1)
    params = AugmentParams(**{**drawn.to_dict(), "scale": scale, "crop_shift": shift, "rot90_k": 1})
    raw = resample_rect(params, hw, Rect(0, 0, *hw), slide.read)
    whole = augment_image(raw, params)
    oh, ow = params.output_size(*hw)
    rng = random.Random(0)
    for tile in ((32, 32), (17, 50), (oh, 9)):
        canvas = torch.zeros_like(whole)
        for y in range(0, oh, tile[0]):
            for x in range(0, ow, tile[1]):
                piece = Rect(y, x, min(tile[0], oh - y), min(tile[1], ow - x))
                out = render_piece(params, hw, piece, slide.read, "cpu")
                canvas[:, piece.y:piece.y1, piece.x:piece.x1] = out
        assert torch.equal(canvas, whole), tile
    for _ in range(10):
        y, x = rng.randrange(oh), rng.randrange(ow)
        piece = Rect(y, x, rng.randint(1, oh - y), rng.randint(1, ow - x))
        assert torch.equal(render_piece(params, hw, piece, slide.read, "cpu"), whole[:, y:piece.y1, x:piece.x1])


def test_draws_and_validation() -> None:
    base = AugmentConfig()
    scaled = AugmentConfig(scale=0.25, crop=0.1)
    zooms = []
    for i in range(400):
        old, new = draw_params(base, 3, 1, i), draw_params(scaled, 3, 1, i)
        # adding scale and crop changes no other op's draw
        assert {**new.to_dict(), "scale": 1.0, "crop_shift": [0.0, 0.0]} == old.to_dict()
        assert old.resample_is_identity
        assert 1 / 1.25 <= new.scale <= 1.25 and all(abs(f) <= 0.1 for f in new.crop_shift)
        zooms.append(np.log(new.scale))
    assert abs(float(np.mean(zooms))) < 0.03 and min(zooms) < -0.18 and max(zooms) > 0.18  # log-uniform, symmetric
    assert AugmentParams.from_dict(new.to_dict()) == new
    with pytest.raises(ValueError, match="AugmentConfig.scale"):
        AugmentConfig(scale=1.5)
    with pytest.raises(ValueError, match="AugmentConfig.crop"):
        AugmentConfig(crop=0.7)
    with pytest.raises(ValueError, match="zoom factor"):
        AugmentParams(scale=8.0)
    with pytest.raises(ValueError, match="crop_shift"):
        AugmentParams(crop_shift=(0.0, 2.0))
