"""Synthetic H&E-like pyramidal whole-slide images for demos and tests.

The slides look enough like H&E for the pipeline to be exercised end to end: pink/purple
tissue blobs with dark nuclei-like dots on a near-white background, so Otsu thresholding on
saturation finds the tissue. Everything is deterministic given the seed.

Generation is fast: the picture is drawn with numpy at 1/8 resolution, then libvips upsamples
it, adds a replicated noise texture and streams the pyramid to disk (a 4096² JPEG slide takes
well under a second).
"""

from __future__ import annotations

import csv
import logging
import math
import os
from pathlib import Path
from typing import Literal

import numpy as np
import pyvips

__all__ = ["write_synthetic_slide", "write_synthetic_dataset", "render_synthetic", "SYNTHETIC_LABELS"]

log = logging.getLogger(__name__)

SlideFormat = Literal["tiff", "ome", "svs"]
_COMPRESSIONS = ("jpeg", "lzw", "deflate", "none")
_SCALE = 8  # the picture is drawn at 1/_SCALE of the full resolution
SYNTHETIC_LABELS = ("normal", "tumor")


def _tissue_field(rng: np.random.Generator, lh: int, lw: int) -> np.ndarray:
    """A smooth field in [0, 1]; > 0.5 is tissue. A few Gaussian blobs of random size and shape."""
    yy = np.linspace(0.0, 1.0, lh, dtype=np.float32)[:, None] * (lh / max(lh, lw))
    xx = np.linspace(0.0, 1.0, lw, dtype=np.float32)[None, :] * (lw / max(lh, lw))
    field = np.zeros((lh, lw), np.float32)
    n_blobs = int(rng.integers(3, 7))
    ymax, xmax = lh / max(lh, lw), lw / max(lh, lw)
    for _ in range(n_blobs):
        cy, cx = rng.uniform(0.2, 0.8) * ymax, rng.uniform(0.2, 0.8) * xmax
        sy, sx = rng.uniform(0.06, 0.16, size=2)
        theta = rng.uniform(0, math.pi)
        c, s = math.cos(theta), math.sin(theta)
        dy, dx = yy - cy, xx - cx
        u, v = c * dx + s * dy, -s * dx + c * dy
        field += np.exp(-0.5 * ((u / sx) ** 2 + (v / sy) ** 2)).astype(np.float32)
    # low-frequency wobble so the borders are irregular
    gh, gw = max(2, lh // 32), max(2, lw // 32)
    coarse = rng.uniform(-0.25, 0.25, size=(gh, gw)).astype(np.float32)
    wobble = np.asarray(
        pyvips.Image.new_from_array(coarse).resize(lw / gw, vscale=lh / gh, kernel="linear")
    )
    field += wobble[:lh, :lw] if wobble.shape[0] >= lh and wobble.shape[1] >= lw else 0.0
    return field


def _draw_low_res(
    rng: np.random.Generator, lh: int, lw: int, *, tissue: bool, nuclei_density: float
) -> np.ndarray:
    """The slide at 1/_SCALE resolution, uint8 RGB."""
    img = np.full((lh, lw, 3), 244, np.uint8)
    if not tissue:
        return img
    field = _tissue_field(rng, lh, lw)
    mask = field > 0.5
    # eosin: pink, with smooth intensity variation
    shade = np.clip((field - 0.5) * 0.6, 0.0, 0.35)[..., None]
    eosin = np.array([236, 156, 196], np.float32)
    dark_eosin = np.array([200, 100, 160], np.float32)
    tissue_rgb = eosin * (1.0 - shade) + dark_eosin * shade
    img[mask] = tissue_rgb[mask].astype(np.uint8)
    # nuclei: purple/dark-blue discs of radius 1-2 low-res pixels (8-16 px at full resolution)
    ys, xs = np.nonzero(mask)
    if ys.size:
        n = int(ys.size * nuclei_density)
        pick = rng.integers(0, ys.size, size=n)
        cy, cx = ys[pick], xs[pick]
        radius = rng.integers(1, 3, size=n)
        colour = np.array([90, 50, 140], np.int16) + rng.integers(-25, 25, size=(n, 3)).astype(np.int16)
        for r in (1, 2):
            sel = radius == r
            offs = [(dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1) if dy * dy + dx * dx <= r * r]
            for dy, dx in offs:
                py = np.clip(cy[sel] + dy, 0, lh - 1)
                px = np.clip(cx[sel] + dx, 0, lw - 1)
                img[py, px] = colour[sel].clip(0, 255).astype(np.uint8)
    return img


def _noise_texture(rng: np.random.Generator, size: int = 512) -> pyvips.Image:
    noise = rng.normal(0.0, 5.0, size=(size, size, 1)).astype(np.float32)
    return pyvips.Image.new_from_array(noise)


def _ome_xml(width: int, height: int, mpp: float) -> str:
    return (
        '<?xml version="1.0" encoding="UTF-8"?>'
        '<OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06">'
        '<Image ID="Image:0" Name="synthetic"><Pixels ID="Pixels:0" DimensionOrder="XYCZT" '
        f'Type="uint8" SizeX="{width}" SizeY="{height}" SizeC="3" SizeZ="1" SizeT="1" '
        f'PhysicalSizeX="{mpp}" PhysicalSizeXUnit="µm" PhysicalSizeY="{mpp}" PhysicalSizeYUnit="µm" '
        'Interleaved="true"><Channel ID="Channel:0:0" SamplesPerPixel="3"/>'
        '<TiffData IFD="0" PlaneCount="1"/></Pixels></Image></OME>'
    )


def _aperio_description(width: int, height: int, tile: int, quality: int, mpp: float) -> str:
    return (
        "Aperio Image Library v12.0.0 \r\n"
        f"{width}x{height} [0,0 {width}x{height}] ({tile}x{tile}) JPEG/RGB Q={quality}"
        f"|AppMag = {round(10.0 / mpp)}|MPP = {mpp}|Filename = synthetic"
    )


def _synthetic_vips(width: int, height: int, *, seed: int, tissue: bool, nuclei_density: float) -> pyvips.Image:
    """The full-resolution synthetic picture as a lazy libvips image (uint8 sRGB)."""
    rng = np.random.default_rng(seed)
    lh, lw = math.ceil(height / _SCALE), math.ceil(width / _SCALE)
    low = _draw_low_res(rng, lh, lw, tissue=tissue, nuclei_density=nuclei_density)
    image = pyvips.Image.new_from_array(low, interpretation="srgb")
    image = image.resize(_SCALE, kernel="linear").crop(0, 0, width, height)
    noise = _noise_texture(rng)
    reps_x, reps_y = math.ceil(width / noise.width), math.ceil(height / noise.height)
    noise = noise.replicate(reps_x, reps_y).crop(0, 0, width, height)
    image = (image + noise).cast("uchar")  # cast clamps to 0..255
    return image.copy(interpretation="srgb")


def render_synthetic(
    width: int, height: int, *, seed: int, tissue: bool = True, nuclei_density: float = 0.04
) -> np.ndarray:
    """The synthetic picture that :func:`write_synthetic_slide` would write, as uint8 (h, w, 3)."""
    if width <= 0 or height <= 0:
        raise ValueError(f"size must be positive, got {width}x{height}")
    return np.ascontiguousarray(
        _synthetic_vips(width, height, seed=seed, tissue=tissue, nuclei_density=nuclei_density).numpy()
    )


def write_synthetic_slide(
    path: str | os.PathLike[str],
    width: int,
    height: int,
    *,
    seed: int,
    tile_size: int = 256,
    compression: str = "jpeg",
    quality: int = 90,
    mpp: float = 0.5,
    pyramid: bool = True,
    format: SlideFormat = "tiff",
    tissue: bool = True,
    nuclei_density: float = 0.04,
) -> Path:
    """Write a synthetic pyramidal tiled TIFF and return its path.

    ``format``: 'tiff' (generic pyramidal TIFF, levels in the main IFD chain), 'ome' (OME-TIFF
    with the reduced levels as SubIFDs) or 'svs' (Aperio-style ImageDescription that OpenSlide's
    aperio driver accepts). ``compression``: jpeg, lzw, deflate or none (libvips' JPEG: YCbCr 4:2:0
    below quality 90, RGB without chroma subsampling from 90 up; JPEGTables in both cases). ``tissue=False`` writes an empty (white) slide;
    ``nuclei_density`` is the fraction of tissue pixels (at 1/8 scale) that seed a nucleus.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"slide size must be positive, got {width}x{height}")
    if tile_size <= 0 or tile_size % 16:
        raise ValueError(f"tile_size must be a positive multiple of 16, got {tile_size}")
    if compression not in _COMPRESSIONS:
        raise ValueError(f"compression must be one of {_COMPRESSIONS}, got {compression!r}")
    if format not in ("tiff", "ome", "svs"):
        raise ValueError(f"format must be 'tiff', 'ome' or 'svs', got {format!r}")
    if not 0 < mpp < 1000:
        raise ValueError(f"mpp must be positive, got {mpp}")
    path = Path(path)
    image = _synthetic_vips(width, height, seed=seed, tissue=tissue, nuclei_density=nuclei_density)

    pixels_per_mm = 1000.0 / mpp
    kwargs: dict[str, object] = dict(
        tile=True,
        tile_width=tile_size,
        tile_height=tile_size,
        pyramid=pyramid,
        compression=compression,
        xres=pixels_per_mm,
        yres=pixels_per_mm,
        resunit="cm",
    )
    if compression == "jpeg":
        kwargs["Q"] = quality
    if compression in ("lzw", "deflate"):
        kwargs["predictor"] = "horizontal"
    if format == "ome":
        kwargs["subifd"] = True
        image = image.copy()
        image.set_type(pyvips.GValue.gstr_type, "image-description", _ome_xml(width, height, mpp))
    elif format == "svs":
        image = image.copy()
        image.set_type(
            pyvips.GValue.gstr_type,
            "image-description",
            _aperio_description(width, height, tile_size, quality, mpp),
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    image.tiffsave(str(path), **kwargs)
    log.debug("wrote synthetic slide %s (%dx%d, %s, %s)", path, width, height, compression, format)
    return path


def write_synthetic_dataset(
    directory: str | os.PathLike[str],
    n_slides: int,
    size: int | tuple[int, int],
    seed: int,
    *,
    tile_size: int = 256,
    compression: str = "jpeg",
    format: SlideFormat = "tiff",
    splits: tuple[float, float, float] = (0.7, 0.15, 0.15),
) -> Path:
    """Write ``n_slides`` synthetic slides and ``manifest.csv``; return the manifest's path.

    The manifest has columns ``path,label,split``; paths are relative to the manifest. Labels
    alternate between ``normal`` and ``tumor`` (balanced); 'tumor' slides have a denser nuclei
    pattern, so a model can learn the difference. Splits are assigned in proportion to
    ``splits`` (train/val/test), balanced per label as far as the counts allow.
    """
    if n_slides <= 0:
        raise ValueError(f"n_slides must be positive, got {n_slides}")
    if len(splits) != 3 or any(s < 0 for s in splits) or sum(splits) <= 0:
        raise ValueError(f"splits must be three non-negative fractions, got {splits}")
    width, height = (size, size) if isinstance(size, int) else size
    directory = Path(directory)
    (directory / "slides").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    suffix = ".svs" if format == "svs" else (".ome.tiff" if format == "ome" else ".tiff")
    total = sum(splits)
    rows: list[tuple[str, str, str]] = []
    per_label_index = [0, 0]
    per_label_count = [(n_slides + 1) // 2, n_slides // 2]
    for i in range(n_slides):
        label_idx = i % 2
        label = SYNTHETIC_LABELS[label_idx]
        k, n = per_label_index[label_idx], per_label_count[label_idx]
        per_label_index[label_idx] += 1
        pos = (k + 0.5) / n * total
        split = "train" if pos < splits[0] else ("val" if pos < splits[0] + splits[1] else "test")
        slide_seed = int(rng.integers(0, 2**31 - 1))
        rel = Path("slides") / f"slide_{i:04d}_{label}{suffix}"
        write_synthetic_slide(
            directory / rel,
            width,
            height,
            seed=slide_seed,
            tile_size=tile_size,
            compression=compression,
            format=format,
            nuclei_density=0.08 if label == "tumor" else 0.03,
        )
        rows.append((rel.as_posix(), label, split))
    manifest = directory / "manifest.csv"
    with manifest.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "split"])
        writer.writerows(rows)
    log.info("wrote %d synthetic slides and %s", n_slides, manifest)
    return manifest
