"""Grid inference stitched to the slide: this project against MONAI's PatchInferer, same slide, model and cores.

On one synthetic pyramidal JPEG TIFF (``--size``² at level 0), a small fully convolutional model (3→8→2 channels,
output stride 1) runs over every ``--patch``² window with ``--overlap`` pixels of overlap, outputs averaged into
a full-resolution 2-channel map:

  - ours: a GRID session of a fresh ``loader-service`` (``--workers`` decode threads, gRPC on loopback, tissue
    threshold 0 so that every window is read, as MONAI does) and ``trainer_client.inference.predict`` merging into
    the on-disk (memmap) accumulator, ``.npy`` result written; no TIFF, no overlay;
  - MONAI: ``PatchInferer(WSISlidingWindowSplitter(reader=OpenSlide), AvgMerger)`` in its own virtualenv
    (``--monai-python``; MONAI, torch, openslide-python and openslide-bin installed there), in-memory merger.

Both use ``torch.set_num_threads(--threads)``; runs alternate, ``--repeats`` times; medians of patches/s and the
ratio are printed as one JSON line.

    python -m bench.bench_pathology [--size 4096] [--patch 256] [--overlap 64] [--repeats 3]
                                    [--monai-python /tmp/monai/bin/python] [--workdir DIR]

``--mode annotated``: patches/s of sampling restricted to annotated regions, on one synthetic ``--size``² slide
with a GeoJSON of ``--shapes`` star polygons (each with a hole), no augmentation on either side:

  - ours: ``annotation_region="annotated"`` (tissue threshold 0), ``--samples`` patches of ``--patch``², batches of
    32 over gRPC from a fresh service with ``--workers`` decode threads; once with the default decoded-tile cache
    and once with it off (``--tile-cache-mb 0``: every patch decoded, as MONAI's reads are);
  - MONAI: ``PatchWSIDataset(reader="OpenSlide")`` over ``--samples`` patch-sized grid cells drawn uniformly (with
    replacement, seeded) from the cells whose centre lies in the same polygons (rasterised here with Pillow, holes
    cleared: the same region our sampler uses), through a ``torch.utils.data.DataLoader(batch_size=32,
    num_workers=--workers)``.

    python -m bench.bench_pathology --mode annotated [--size 4096] [--samples 1024] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import median, serve

_MONAI = r"""
import json, sys, time, torch
from monai.inferers import AvgMerger, PatchInferer, WSISlidingWindowSplitter
path, patch, overlap, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 2, 1)).eval()
calls = [0]
def model(x):
    calls[0] += x.shape[0]
    return net(x.float() / 255)
inferer = PatchInferer(splitter=WSISlidingWindowSplitter(patch_size=patch, overlap=overlap, reader="OpenSlide", level=0),
                       merger_cls=AvgMerger, batch_size=32)
t0 = time.perf_counter()
with torch.inference_mode():
    out = inferer(path, model)
print(json.dumps({"seconds": time.perf_counter() - t0, "patches": calls[0], "shape": list(out.shape)}))
"""


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 2, 1)).eval()


def ours(manifest: Path, args: argparse.Namespace, out: Path) -> dict[str, float]:
    from trainer_client import LoaderClient, StreamConfig
    from trainer_client.inference import PredictConfig, predict

    torch.set_num_threads(args.threads)
    serve_args = ("--manifest", f"bench={manifest}", "--metrics-port", "0", "--device", "cpu", "--workers",
                  str(args.workers), "--tissue-cache-dir", str(manifest.parent / ".tissue"))
    with serve(*serve_args) as (info, _):
        with LoaderClient(f"127.0.0.1:{info['port']}", timeout_s=120) as client:
            client.wait_ready()
            config = StreamConfig(dataset="bench", patch_size=args.patch, grid_stride=args.patch - args.overlap,
                                  mode="grid", augment=False, tissue_threshold=0.0, batch_size=32, transport="grpc")
            t0 = time.perf_counter()
            result = predict(client, config, _net(), out, PredictConfig(tiff=False, overlay=False))
            seconds = time.perf_counter() - t0
    return {"seconds": seconds, "patches": float(result["samples"])}


def monai(slide: Path, args: argparse.Namespace) -> dict[str, float]:
    cmd = [args.monai_python, "-c", _MONAI, str(slide), str(args.patch), str(args.overlap), str(args.threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"MONAI run failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])



_MONAI_ANNOTATED = r"""
import json, sys, time, torch
from monai.data import PatchWSIDataset
path, cells_file, patch, workers, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
torch.set_num_threads(threads)
cells = json.load(open(cells_file))
data = [{"image": path, "location": [y, x], "label": 0} for x, y in cells]  # (row, col) of the top-left, level 0
dataset = PatchWSIDataset(data, patch_size=patch, patch_level=0, center_location=False, reader="OpenSlide")
t0 = time.perf_counter()
loader = torch.utils.data.DataLoader(dataset, batch_size=32, num_workers=workers, shuffle=False)
n = 0
for batch in loader:
    n += batch["image"].shape[0]
print(json.dumps({"seconds": time.perf_counter() - t0, "patches": n, "shape": list(batch["image"].shape[1:])}))
"""


def write_annotated(root: Path, size: int, shapes: int, patch: int) -> tuple[Path, Path, int]:
    """A slide, its GeoJSON of star polygons with holes, a manifest; returns (manifest, slide, cells in region)."""
    import csv

    import numpy as np
    from PIL import Image, ImageDraw

    from bench.bench_annotations import _star
    from loader_service.synthetic import write_synthetic_slide

    root.mkdir(parents=True, exist_ok=True)
    write_synthetic_slide(root / "s.tiff", size, size, seed=5, quality=85, mpp=0.5)
    rng = np.random.default_rng(0)
    features, mask = [], Image.new("1", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    for i in range(shapes):
        cx, cy = rng.uniform(size * 0.15, size * 0.85, 2).tolist()
        r = float(rng.uniform(size * 0.05, size * 0.15))
        rings = [_star(cx, cy, r, 64, rng), _star(cx, cy, r / 3, 16, rng)]
        draw.polygon([tuple(p) for p in rings[0]], fill=1)
        draw.polygon([tuple(p) for p in rings[1]], fill=0)
        features.append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": rings},
                         "properties": {"classification": {"name": f"class{i % 3}"}}})
    (root / "s.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    with open(root / "m.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([["path", "label", "annotation"], ["s.tiff", "x", "s.geojson"]])
    inside = np.asarray(mask, dtype=bool)
    cells = [(x, y) for y in range(0, size - patch + 1, patch) for x in range(0, size - patch + 1, patch)
             if inside[y + patch // 2, x + patch // 2]]
    (root / "cells.json").write_text(json.dumps(cells))
    return root / "m.csv", root / "s.tiff", len(cells)


def ours_annotated(manifest: Path, args: argparse.Namespace, seed: int, tile_cache: bool) -> dict[str, float]:
    """Our stream; ``tile_cache=False`` serves with ``--tile-cache-mb 0`` (every patch decoded, as MONAI does).
    ``in_region``: the fraction of patches whose top-left is one of the region's cells (1.0 expected)."""
    from trainer_client import LoaderClient, StreamConfig

    cells = {tuple(c) for c in json.loads((manifest.parent / "cells.json").read_text())}
    serve_args = ("--manifest", f"bench={manifest}", "--metrics-port", "0", "--device", "cpu", "--workers",
                  str(args.workers), "--tissue-cache-dir", str(manifest.parent / ".tissue"),
                  *(() if tile_cache else ("--tile-cache-mb", "0")))
    with serve(*serve_args) as (info, _):
        with LoaderClient(f"127.0.0.1:{info['port']}", timeout_s=120) as client:
            client.wait_ready()
            config = StreamConfig(dataset="bench", patch_size=args.patch, annotation_region="annotated",
                                  tissue_threshold=0.0, augment=False, batch_size=32, samples_per_epoch=args.samples,
                                  seed=seed, transport="grpc")
            t0 = time.perf_counter()
            n = inside = 0
            for batch in client.stream(config):
                n += int(batch["images"].shape[0])
                inside += sum((x, y) in cells for x, y in zip(batch["x"].tolist(), batch["y"].tolist()))
            return {"seconds": time.perf_counter() - t0, "patches": float(n), "in_region": inside / max(n, 1)}


def monai_annotated(slide: Path, cells: Path, args: argparse.Namespace, seed: int) -> dict[str, float]:
    import numpy as np

    region = json.loads(cells.read_text())
    rng = np.random.default_rng(seed)
    drawn = [region[i] for i in rng.integers(0, len(region), args.samples)]
    sample_file = cells.with_name(f"drawn{seed}.json")
    sample_file.write_text(json.dumps(drawn))
    cmd = [args.monai_python, "-c", _MONAI_ANNOTATED, str(slide), str(sample_file), str(args.patch),
           str(args.workers), str(args.threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"MONAI run failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main_annotated(args: argparse.Namespace, work: Path) -> dict[str, object]:
    root = work / "annotated"
    manifest, slide, n_cells = write_annotated(root, args.size, args.shapes, args.patch)
    rates: dict[str, list[float]] = {"ours": [], "ours_no_tile_cache": [], "monai": []}
    for r in range(args.repeats):
        runs = {"ours": ours_annotated(manifest, args, seed=r, tile_cache=True),
                "ours_no_tile_cache": ours_annotated(manifest, args, seed=r, tile_cache=False),
                "monai": monai_annotated(slide, root / "cells.json", args, seed=r)}
        for name, run in runs.items():
            rates[name].append(run["patches"] / run["seconds"])
        print(json.dumps({"repeat": r, **runs}), file=sys.stderr, flush=True)
    base = median(rates["monai"])
    return {"mode": "annotated", "size": args.size, "patch": args.patch, "shapes": args.shapes,
            "cells_in_region": n_cells, "samples": args.samples, "workers": args.workers,
            **{f"{name}_patches_per_s": median(values) for name, values in rates.items()},
            "ratio": median(rates["ours"]) / base, "ratio_no_tile_cache": median(rates["ours_no_tile_cache"]) / base}

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--patch", type=int, default=256)
    parser.add_argument("--overlap", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--monai-python", default="/tmp/monai/bin/python")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--mode", choices=("grid", "annotated"), default="grid")
    parser.add_argument("--shapes", type=int, default=6, help="annotated mode: star polygons in the GeoJSON")
    parser.add_argument("--samples", type=int, default=1024, help="annotated mode: patches per run")
    args = parser.parse_args()
    from loader_service.synthetic import write_synthetic_dataset

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-pathology-"))
    if args.mode == "annotated":
        print(json.dumps(main_annotated(args, work)))
        return 0
    manifest = work / "ds" / "manifest.csv"
    if not manifest.exists():
        write_synthetic_dataset(work / "ds", n_slides=1, size=args.size, seed=3)
    slide = next((work / "ds").rglob("*.tiff"))
    rates: dict[str, list[float]] = {"ours": [], "monai": []}
    counts: dict[str, float] = {}
    for r in range(args.repeats):
        mine = ours(manifest, args, work / f"out{r}")
        theirs = monai(slide, args)
        for name, run in (("ours", mine), ("monai", theirs)):
            rates[name].append(run["patches"] / run["seconds"])
            counts[name] = run["patches"]
        print(json.dumps({"repeat": r, "ours": mine, "monai": theirs}), file=sys.stderr, flush=True)
    result = {"size": args.size, "patch": args.patch, "overlap": args.overlap, "threads": args.threads,
              "patches": counts, "ours_patches_per_s": median(rates["ours"]),
              "monai_patches_per_s": median(rates["monai"]),
              "ratio": median(rates["ours"]) / median(rates["monai"])}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
