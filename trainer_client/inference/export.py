"""Slide-level maps out: a pyramidal TIFF (when tifffile is importable) and a PNG overlay (when Pillow is)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

__all__ = ["write_pyramidal_tiff", "write_overlay_png", "have_tifffile", "have_pillow"]

_PALETTE = np.array([[230, 25, 75], [60, 180, 75], [0, 130, 200], [245, 130, 48], [145, 30, 180], [70, 240, 240],
                     [240, 50, 230], [210, 245, 60], [250, 190, 212], [0, 128, 128]], dtype=np.float32)


def have_tifffile() -> bool:
    return importlib.util.find_spec("tifffile") is not None


def have_pillow() -> bool:
    return importlib.util.find_spec("PIL") is not None


def write_pyramidal_tiff(result: np.ndarray, path: Path, tile: int = 256) -> Path | None:
    """``result`` (H, W, C) float32 as a tiled BigTIFF, full resolution first, then SubIFDs halving it (nearest)
    down to one tile. None when tifffile is not installed (the ``.npy`` map is the result then)."""
    if not have_tifffile():
        return None
    import tifffile

    levels = 1
    while max(result.shape[0], result.shape[1]) >> (levels - 1) > tile:  # until a level fits in one tile
        levels += 1
    options = dict(tile=(tile, tile), photometric="minisblack", planarconfig="contig", compression="zlib")
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        tw.write(result, subifds=levels - 1, **options)
        for i in range(1, levels):
            step = 1 << i
            tw.write(np.ascontiguousarray(result[::step, ::step]), subfiletype=1, **options)
    return path


def write_overlay_png(result: np.ndarray, thumbnail: np.ndarray, path: Path, alpha: float = 0.45) -> Path | None:
    """The map over a uint8 RGB thumbnail: a colour per argmax class (several channels) or a red heat map (one
    channel, scaled to its range); uncovered pixels show the thumbnail. None when Pillow is not installed."""
    if not have_pillow():
        return None
    from PIL import Image

    th, tw = thumbnail.shape[:2]
    step_y, step_x = max(1, result.shape[0] // th), max(1, result.shape[1] // tw)
    small = np.asarray(result[::step_y, ::step_x], dtype=np.float32)
    covered = np.isfinite(small).all(axis=-1)
    small = np.nan_to_num(small)
    if small.shape[-1] == 1:
        v = small[..., 0]
        lo, hi = float(v[covered].min(initial=0.0)), float(v[covered].max(initial=1.0))
        v = (v - lo) / (hi - lo if hi > lo else 1.0)
        colour = np.stack([255 * v, 40 * (1 - v), 40 * (1 - v)], axis=-1)
    else:
        colour = _PALETTE[np.argmax(small, axis=-1) % len(_PALETTE)]
    colour = np.asarray(Image.fromarray(colour.astype(np.uint8)).resize((tw, th), Image.NEAREST), dtype=np.float32)
    mask = np.asarray(Image.fromarray(covered.astype(np.uint8) * 255).resize((tw, th), Image.NEAREST)) > 0
    out = thumbnail.astype(np.float32)
    out[mask] = (1 - alpha) * out[mask] + alpha * colour[mask]
    Image.fromarray(out.round().clip(0, 255).astype(np.uint8)).save(path)
    return path
