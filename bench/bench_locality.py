"""Locality sampling: throughput against randomness, k = 1 and a few (k, W) settings side by side in one run.

On one synthetic pyramidal JPEG slide, for each setting (``patches_per_region`` k, ``locality_window`` W):
  - patches/s of a fresh service (``--workers``, a small tile cache by default so that the slide behaves like
    a dataset much larger than the cache) streamed by `trainer-client bench` over gRPC, with augmentation
    and with ``--no-augment`` (CPU augmentation is the ceiling otherwise), and the ratio to k = 1;
  - the decoded-tile cache hit ratio over each run (from the service's metrics);
  - randomness of the batches the trainer sees, from the epoch plan itself: mean distinct regions per batch,
    and the mean pairwise distance of patch centres within a batch, as a fraction of the k = 1 value.

Settings run interleaved, ``--repeats`` times; the table gives medians. ``--read-stage`` measures instead
the read stage alone, in process: ``BatchBuilder.read`` of the same batches, no tile cache, no transport.

    python -m bench.bench_locality [--size 16384] [--seconds 4] [--repeats 2] [--settings 4x16,4x64,16x4,16x16]
                                   [--tile-cache-mb 64] [--workers 2] [--workdir DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import urllib.request
from pathlib import Path

import numpy as np

from bench.common import median, python_cmd, run_json, serve

BATCH, PATCH = 64, 256


def _cache_counts(url: str) -> tuple[float, float]:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    found = {name: float(value) for name, value in
             re.findall(r"^(wsi_loader_tile_cache_(?:hits|misses)_total) ([0-9.e+]+)$", text, re.M)}
    return found.get("wsi_loader_tile_cache_hits_total", 0.0), found.get("wsi_loader_tile_cache_misses_total", 0.0)


def throughput(manifest: Path, k: int, window: int, augment: bool, args: argparse.Namespace) -> dict[str, float]:
    serve_args = ("--manifest", f"bench={manifest}", "--metrics-port", "0", "--device", "cpu", "--workers",
             str(args.workers), "--tile-cache-mb", str(args.tile_cache_mb), "--tissue-cache-dir",
             str(manifest.parent / ".tissue"))
    with serve(*serve_args) as (info, _):
        cmd = python_cmd("trainer_client.cli", "bench", "--endpoint", f"127.0.0.1:{info['port']}", "--dataset", "bench",
                         "--seconds", str(args.seconds), "--batch-size", str(BATCH), "--patch-size", str(PATCH),
                         "--tissue-threshold", "0", "--transport", "grpc", "--patches-per-region", str(k),
                         "--locality-window", str(window), *([] if augment else ["--no-augment"]))
        hits0, misses0 = _cache_counts(info["metrics"])
        rate = float(run_json(cmd)["tiles_per_s"])
        hits1, misses1 = _cache_counts(info["metrics"])
    lookups = (hits1 - hits0) + (misses1 - misses0)
    return {"patches_per_s": rate, "hit_ratio": (hits1 - hits0) / lookups if lookups else float("nan")}


def randomness(manifest: Path, settings: list[tuple[int, int]], batches: int) -> dict[tuple[int, int], dict[str, float]]:
    """Distinct regions per batch and mean pairwise patch distance within a batch, from the epoch plans."""
    from loader_service.config import DatasetConfig, ServiceConfig
    from loader_service.sampling import CandidateCache, EpochPlan, SamplingSpec
    from loader_service.server import LoaderServer

    config = ServiceConfig(datasets=(DatasetConfig("bench", manifest),), data_roots=(manifest.parent,),
                           listen="127.0.0.1:0", metrics_port=-1, workers=1, device="cpu",
                           tissue_cache_dir=manifest.parent / ".tissue")
    out = {}
    with LoaderServer(config) as server:
        ds = server.datasets["bench"]
        for k, window in settings:
            spec = SamplingSpec(patch_size=PATCH, samples_per_epoch=BATCH * batches, tissue_threshold=0.0,
                                patches_per_region=k, locality_window=window)
            plan = EpochPlan(ds, spec, 0, 0, 1, CandidateCache())
            distinct, distance = [], []
            for b in range(batches):
                samples = [plan.sample(i) for i in range(b * BATCH, (b + 1) * BATCH)]
                distinct.append(len({s.region or (s.x, s.y) for s in samples}))
                centres = np.array([(s.x + s.width / 2, s.y + s.height / 2) for s in samples])
                pair = np.sqrt(((centres[:, None] - centres[None]) ** 2).sum(-1))
                distance.append(pair.sum() / (len(samples) * (len(samples) - 1)))
            out[(k, window)] = {"regions_per_batch": float(np.mean(distinct)), "pair_distance": float(np.mean(distance))}
    return out


def read_stage(manifest: Path, settings: list[tuple[int, int]], workers: int, batches: int,
               repeats: int) -> dict[tuple[int, int], float]:
    """Patches/s of ``BatchBuilder.read`` alone (no tile cache), median of ``repeats`` interleaved passes."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from loader_service.config import DatasetConfig, ServiceConfig
    from loader_service.dataset import SlideHandles
    from loader_service.metrics import Metrics
    from loader_service.pipeline import BatchBuilder
    from loader_service.sampling import CandidateCache, EpochPlan, SamplingSpec
    from loader_service.server import LoaderServer

    config = ServiceConfig(datasets=(DatasetConfig("bench", manifest),), data_roots=(manifest.parent,),
                           listen="127.0.0.1:0", metrics_port=-1, workers=workers, device="cpu",
                           tissue_cache_dir=manifest.parent / ".tissue")
    rates: dict[tuple[int, int], list[float]] = {}
    with LoaderServer(config) as server, ThreadPoolExecutor(2 * workers) as pool:
        ds = server.datasets["bench"]
        for repeat in range(repeats):
            for k, window in settings:
                spec = SamplingSpec(patch_size=PATCH, samples_per_epoch=BATCH * (batches + 1), tissue_threshold=0.0,
                                    patches_per_region=k, locality_window=window, seed=repeat + 1)
                plan = EpochPlan(ds, spec, 0, 0, 1, CandidateCache())
                builder = BatchBuilder(SlideHandles(4, None, server.decode_pool), pool, torch.device("cpu"), Metrics())
                todo = [[plan.sample(i) for i in range(b * BATCH, (b + 1) * BATCH)] for b in range(batches + 1)]
                builder.read(todo[0])  # opens the slide
                start = time.perf_counter()
                for batch in todo[1:]:
                    builder.read(batch)
                rates.setdefault((k, window), []).append(batches * BATCH / (time.perf_counter() - start))
    return {key: median(values) for key, values in rates.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=16384)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--settings", default="4x16,4x64,16x4,16x16", help="comma-separated KxW (k=1 always runs)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--tile-cache-mb", type=float, default=64.0)
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--batches", type=int, default=50, help="batches of the plan the randomness is measured on")
    parser.add_argument("--workdir", type=Path, default=None, help="where the slide is written (and reused)")
    parser.add_argument("--read-stage", action="store_true", help="measure BatchBuilder.read alone (see above)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    settings = [(1, 1)] + [(int(k), int(w)) for k, w in (s.split("x") for s in args.settings.split(","))]
    from bench.bench_decode import make_bench_slide

    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        slide = make_bench_slide(workdir, args.size)
        manifest = workdir / "manifest.csv"
        manifest.write_text(f"path,label\n{slide.name},x\n")
        if args.read_stage:
            stage = read_stage(manifest, settings, args.workers, 12, max(args.repeats, 1))
            for k, window in settings:
                print(f"k {k:>3} W {'-' if k == 1 else window:>3} | read stage {stage[(k, window)]:7.0f} patches/s "
                      f"{stage[(k, window)] / stage[settings[0]]:5.2f}x k=1", flush=True)
            return
        shape = randomness(manifest, settings, args.batches)
        runs: dict[tuple[int, int, bool], list[dict[str, float]]] = {}
        for _ in range(args.repeats):  # interleaved: every setting, with and without augmentation, per repeat
            for k, window in settings:
                for augment in (True, False):
                    runs.setdefault((k, window, augment), []).append(throughput(manifest, k, window, augment, args))

        def med(k: int, window: int, augment: bool) -> dict[str, float]:
            found = runs[(k, window, augment)]
            return {name: median([r[name] for r in found]) for name in ("patches_per_s", "hit_ratio")}

        rows = [{"k": k, "window": window, "aug": med(k, window, True), "no_aug": med(k, window, False),
                 **shape[(k, window)]} for k, window in settings]
    base = rows[0]
    print(f"{'k':>3} {'W':>3} | {'aug p/s':>8} {'x k=1':>6} {'hit':>5} | {'no-aug p/s':>10} {'x k=1':>6} {'hit':>5} | "
          f"{'regions/batch':>13} {'pair dist':>9} {'x k=1':>6}")
    for row in rows:
        row["aug_ratio"] = row["aug"]["patches_per_s"] / base["aug"]["patches_per_s"]
        row["no_aug_ratio"] = row["no_aug"]["patches_per_s"] / base["no_aug"]["patches_per_s"]
        row["distance_ratio"] = row["pair_distance"] / base["pair_distance"]
        window = "-" if row["k"] == 1 else str(row["window"])
        print(f"{row['k']:>3} {window:>3} | {row['aug']['patches_per_s']:8.0f} {row['aug_ratio']:6.2f} "
              f"{row['aug']['hit_ratio']:5.2f} | {row['no_aug']['patches_per_s']:10.0f} {row['no_aug_ratio']:6.2f} "
              f"{row['no_aug']['hit_ratio']:5.2f} | {row['regions_per_batch']:13.1f} {row['pair_distance']:9.0f} "
              f"{row['distance_ratio']:6.2f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    sys.exit(main())
