"""Accuracy of reduced-resolution JPEG reads (DCT scaling + area resize) against an exact area average.

For each factor f, ``read_region_mpp`` at f × the slide's mpp (decoded at the largest DCT scale <= f, then a BOX
resize for the rest) is compared with the full-resolution decode area-averaged by PIL's BOX filter over the same
box. Prints mean, 99th percentile and max absolute difference (0..255 scale) per slide and factor.

    python -m bench.bench_dct [--slide PATH ...]

Without ``--slide`` it writes two synthetic single-level JPEG slides (quality 85 and 95) to a temporary folder;
``/work/shared/wsi/cmu-1-small-region.svs`` (a real Aperio scan) is added when present. Not a timing.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from loader_service.slides import open_slide
from loader_service.synthetic import write_synthetic_slide

FACTORS = (1.5, 2.0, 3.0, 4.0, 6.0, 8.0)
REAL = Path("/work/shared/wsi/cmu-1-small-region.svs")


def measure(path: Path, factors: tuple[float, ...] = FACTORS, regions: int = 6) -> list[tuple[float, float, float, float]]:
    """(factor, mean, p99, max) absolute differences over ``regions`` random regions of level 0."""
    rows = []
    with open_slide(path) as slide:
        base = slide.info.mpp or 0.5
        w0, h0 = slide.info.dimensions
        full = slide.read_region(0, 0, 0, w0, h0)
        if slide.info.mpp is None:
            raise SystemExit(f"{path}: no mpp metadata, cannot read by mpp")
        rng = np.random.default_rng(0)
        for f in factors:
            diffs = []
            w, h = 160, 120
            for _ in range(regions):
                x = int(rng.integers(0, max(1, int(w0 / f) - w)))
                y = int(rng.integers(0, max(1, int(h0 / f) - h)))
                got = slide.read_region_mpp(base * f, x, y, w, h)
                box = (x * f, y * f, (x + w) * f, (y + h) * f)
                ref = np.asarray(Image.fromarray(full).resize((w, h), Image.Resampling.BOX, box=box))
                diffs.append(np.abs(got.astype(np.int16) - ref.astype(np.int16)).ravel())
            d = np.concatenate(diffs)
            rows.append((f, float(d.mean()), float(np.percentile(d, 99)), float(d.max())))
    return rows


def timing(path: Path, factor: float = 3.0, repeats: int = 7) -> tuple[float, float]:
    """Median seconds of a 512x512 read at ``factor``: decoded at 1/2 then resized by factor/2 (the old rule,
    fractional) vs the chosen scale (whole-number remainder). No tile cache, so every read decodes."""
    import statistics
    import time

    with open_slide(path) as slide:
        w0, h0 = slide.info.dimensions
        out = np.empty((512, 512, 3), np.uint8)
        times: dict[int, list[float]] = {2: [], 1: []}
        for r in range(repeats):
            x, y = (r * 37) % max(1, int(w0 / factor) - 512), (r * 53) % max(1, int(h0 / factor) - 512)
            for scale in (2, 1):
                f = factor / scale
                t0 = time.perf_counter()
                slide._read_resampled(0, scale, (x * f, y * f, (x + 512) * f, (y + 512) * f), out)
                times[scale].append(time.perf_counter() - t0)
    return statistics.median(times[2]), statistics.median(times[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slide", action="append", type=Path, default=[])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        slides = list(args.slide)
        if not slides:
            for q in (85, 95):
                slides.append(write_synthetic_slide(Path(tmp) / f"single_q{q}.tiff", 2048, 1536, seed=4,
                                                    pyramid=False, quality=q))
            if REAL.exists():
                slides.append(REAL)
        print(f"{'slide':28} {'factor':>6} {'mean':>6} {'p99':>5} {'max':>5}")
        for path in slides:
            for f, mean, p99, mx in measure(Path(path)):
                print(f"{Path(path).name:28} {f:6.1f} {mean:6.2f} {p99:5.0f} {mx:5.0f}")
        for path in slides:
            old, new = timing(Path(path))
            print(f"{Path(path).name}: 512² at 3x, median of 7: 1/2 decode + 1.5 BOX {old * 1e3:.1f} ms, "
                  f"full decode + 3 BOX {new * 1e3:.1f} ms (ratio {new / old:.2f})")


if __name__ == "__main__":
    main()
