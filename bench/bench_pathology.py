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
    args = parser.parse_args()
    from loader_service.synthetic import write_synthetic_dataset

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-pathology-"))
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
