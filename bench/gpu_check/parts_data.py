"""The data-path parts: JPEG tile decode, augmentation, and end-to-end patches/s to one trainer.

Each runs its CPU side everywhere and its GPU side only with a CUDA device (else ``SkipPart`` after the CPU
side, so the summary says ``skipped: <reason>`` and still holds the CPU numbers).
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from .part import PartContext, SkipPart

__all__ = ["jpeg_decode", "augment", "end_to_end"]

log = logging.getLogger("gpu_check")


def _cores() -> int:
    return len(os.sched_getaffinity(0))


def _diff_stats(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return {"max_abs": int(d.max()) if d.size else 0, "mean_abs": round(float(d.mean()), 4) if d.size else 0.0,
            "fraction_differing": round(float((d > 0).mean()), 6) if d.size else 0.0}


# --- part 2 -------------------------------------------------------------------------------------------------
def jpeg_decode(ctx: PartContext) -> None:
    """nvJPEG batched vs the per-tile CPU decoder on the same level-0 tiles: pixels compared, tiles/s of each."""
    from bench.bench_decode import _tile_payloads, make_bench_slide
    from loader_service.slides.batched import BatchedJpegDecoder

    size, max_tiles = (1024, 64) if ctx.quick else (4096, 256)
    path = make_bench_slide(ctx.workdir, size, quality=80)
    tiles, decoder = _tile_payloads(path, max_tiles)
    threads = _cores()
    ctx.record("tiles", {"count": len(tiles), "size": [decoder.tile_height, decoder.tile_width],
                         "slide": f"synthetic {size}² JPEG q80", "cpu_threads": threads})
    reference = [decoder.decode(t) for t in tiles]

    def rate(fn: Any, repeats: int = 3) -> float:
        fn()  # warm-up (nvJPEG initialisation, first allocations)
        best = min(_timed(fn) for _ in range(repeats))
        return round(len(tiles) / best, 1)

    with ThreadPoolExecutor(threads) as pool:
        cpu_rate = rate(lambda: list(pool.map(decoder.decode, tiles)))
    ctx.record("cpu_per_tile", {"decoder": decoder.name, "threads": threads, "tiles_per_s": cpu_rate})
    batched_cpu = BatchedJpegDecoder("cpu")
    got = batched_cpu.decode(decoder, tiles)
    ctx.record("batched_cpu_vs_cpu", {**_diff_stats(np.stack(got), np.stack(reference)),
                                      "tiles_per_s": rate(lambda: batched_cpu.decode(decoder, tiles))})
    if ctx.gpu_reason:
        raise SkipPart(f"{ctx.gpu_reason}; the CPU decoders ran")
    nvjpeg = BatchedJpegDecoder("cuda")
    got = nvjpeg.decode(decoder, tiles)
    stats = _diff_stats(np.stack(got), np.stack(reference))
    ctx.record("nvjpeg_vs_cpu", {**stats, "tiles_per_s_one_call": rate(lambda: nvjpeg.decode(decoder, tiles)),
                                 "note": "equal only where both decoders use the same IDCT and upsampling"})
    chunked = [tiles[i:i + 64] for i in range(0, len(tiles), 64)]
    with ThreadPoolExecutor(threads) as pool:
        chunk_rate = rate(lambda: list(pool.map(lambda c: nvjpeg.decode(decoder, c), chunked)))
    ctx.record("nvjpeg_chunks_of_64", {"threads": threads, "tiles_per_s": chunk_rate,
                                       "ratio_vs_cpu_per_tile": round(chunk_rate / cpu_rate, 2)})


def _timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# --- part 3 -------------------------------------------------------------------------------------------------
def _image(h: int, w: int, seed: int) -> Any:
    import torch

    g = torch.Generator().manual_seed(seed)
    noise = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.int32)
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    ramp = torch.stack([yy * 255 // max(h - 1, 1), xx * 255 // max(w - 1, 1), (yy + xx) % 256], -1)
    return ((noise + ramp) // 2).clamp(0, 255).to(torch.uint8)


def _stitching(device: str, count: int) -> dict[str, Any]:
    """Tiles (64², ragged edges) and 2x3 shards rendered with render_piece equal the whole augmented image."""
    import torch

    from loader_service.augment import AugmentConfig, AugmentParams, Rect, augment_batch, draw_params, render_piece

    checked, unequal = 0, []
    config = AugmentConfig(blur_prob=1.0, blur_sigma=(0.2, 2.0), hue=0.1)
    for i in range(count):
        raw = _image(220, 300, seed=i)
        drawn = draw_params(config, 4, 0, i)
        params = AugmentParams(**{**drawn.to_dict(), "flip_h": bool(i & 1), "flip_v": bool(i & 2), "rot90_k": i % 4})
        hw = (raw.shape[0], raw.shape[1])
        whole = augment_batch(raw[None].to(device), [params])[0]
        oh, ow = params.output_size(*hw)
        pieces = [Rect(y, x, min(64, oh - y), min(64, ow - x)) for y in range(0, oh, 64) for x in range(0, ow, 64)]
        pieces += [Rect(r * oh // 2, c * ow // 3, (r + 1) * oh // 2 - r * oh // 2, (c + 1) * ow // 3 - c * ow // 3)
                   for r in range(2) for c in range(3)]
        canvas = torch.zeros_like(whole)
        for piece in pieces:
            out = render_piece(params, hw, piece, lambda r: raw[r.y:r.y1, r.x:r.x1], device)
            if not torch.equal(out, whole[:, piece.y:piece.y1, piece.x:piece.x1]):
                unequal.append([i, piece.y, piece.x, piece.height, piece.width])
            canvas[:, piece.y:piece.y1, piece.x:piece.x1] = out
            checked += 1
        if not torch.equal(canvas, whole):
            unequal.append([i, "canvas"])
    return {"device": device, "images": count, "pieces": checked, "equal": not unequal, "unequal": unequal[:10]}


def augment(ctx: PartContext) -> None:
    """CPU kernels vs GPU on the same batch and parameters; images/s of each; stitching re-checked on the GPU."""
    import torch

    from loader_service.augment import AugmentConfig, augment_batch, draw_params
    from loader_service.augment.bench import measure_throughput

    batch, size = (8, 64) if ctx.quick else (64, 256)
    config = AugmentConfig.preset("pathology")
    images = torch.stack([_image(size, size, seed=i) for i in range(batch)])
    params = [draw_params(config, 7, 0, i) for i in range(batch)]
    cpu = augment_batch(images, params)
    repeats = 1 if ctx.quick else 3
    ctx.record("batch", {"shape": list(images.shape), "preset": "pathology", "seed": 7})
    ctx.record("cpu_images_per_s", round(measure_throughput(batch, size, "cpu", repeats, config, callers=1), 1))
    ctx.record("stitching_cpu", _stitching("cpu", 2 if ctx.quick else 4))
    if ctx.gpu_reason:
        raise SkipPart(f"{ctx.gpu_reason}; the CPU kernels ran")
    gpu = augment_batch(images.cuda(), params).cpu()
    ctx.record("gpu_vs_cpu", {**_diff_stats(gpu.numpy(), cpu.numpy()),
                              "note": "the CPU kernels and the torch ops round the same maths; 1 level apart at most"})
    ctx.record("gpu_images_per_s", round(measure_throughput(batch, size, "cuda", repeats, config), 1))
    ctx.record("stitching_gpu", _stitching("cuda", 8))


# --- part 5 -------------------------------------------------------------------------------------------------
def _leg(manifest: Path, cache: Path, workers: int, gpu: bool, seconds: float, batch: int,
         patch: int) -> dict[str, Any]:
    from bench.common import python_cmd, run_json, service

    args = ["--manifest", f"bench={manifest}", "--metrics-port", "-1", "--workers", str(workers),
            "--tissue-cache-dir", str(cache), "--device", "cuda" if gpu else "cpu",
            "--jpeg-backend", "nvjpeg" if gpu else "cpu"]
    transport = "cuda_ipc" if gpu else "shm"
    with service(*args) as (port, _):
        cmd = python_cmd("trainer_client.cli", "bench", "--endpoint", f"127.0.0.1:{port}", "--dataset", "bench",
                         "--transport", transport, "--batch-size", str(batch), "--patch-size", str(patch),
                         "--seconds", str(seconds), "--credits", "8")
        r = run_json(cmd, timeout=seconds + 90)
    row = {"workers": workers, "path": "gpu-aug+nvjpeg+cuda_ipc" if gpu else "cpu-aug+shm",
           "patches_per_s": round(float(r["tiles_per_s"]), 1), "transport_used": r.get("transport_used"),
           "batches": r.get("batches")}
    if r.get("transport_used") != transport:
        row["warning"] = f"asked for {transport}, the service answered {r.get('transport_used')}"
    return row


def end_to_end(ctx: PartContext) -> None:
    """Patches/s to one trainer on this node: CPU aug + shm vs GPU aug + nvJPEG + CUDA IPC, per worker count."""
    from loader_service.synthetic import write_synthetic_dataset

    slides, size = (1, 2048) if ctx.quick else (2, 8192)
    seconds = 2.0 if ctx.quick else 4.0
    batch, patch = (16, 128) if ctx.quick else (64, 256)
    t0 = time.perf_counter()
    manifest = write_synthetic_dataset(ctx.workdir / "slides", n_slides=slides, size=size, seed=0)
    ctx.record("dataset", {"slides": slides, "size": size, "written_s": round(time.perf_counter() - t0, 1),
                           "batch": batch, "patch": patch, "preset": "pathology", "seconds_per_leg": seconds})
    cores = _cores()
    counts = [1] if ctx.quick else [1, 16, 4, 8]  # the extremes first, in case the cap cuts the last legs
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    gpu_reason = ctx.gpu_reason
    for workers in counts:
        if workers > cores:
            skipped.append(f"{workers} workers: only {cores} cores")
            continue
        for gpu in (False, True):
            if gpu and gpu_reason:
                continue
            if ctx.left() < seconds + 25:
                skipped.append(f"{workers} workers {'gpu' if gpu else 'cpu'}: no time left in the cap")
                continue
            try:
                rows.append(_leg(Path(manifest), ctx.workdir / "tissue", workers, gpu, seconds, batch, patch))
            except Exception as err:  # noqa: BLE001 - one failed leg is a row, the others still run
                rows.append({"workers": workers, "path": "gpu" if gpu else "cpu", "error": str(err)[-800:]})
            ctx.record("rows", rows)
    by = {(r["workers"], r["path"]): r.get("patches_per_s") for r in rows}
    cpu_gpu = {w: (by.get((w, "cpu-aug+shm")), by.get((w, "gpu-aug+nvjpeg+cuda_ipc"))) for w in counts}
    ctx.record("gpu_over_cpu", {w: round(g / c, 2) for w, (c, g) in cpu_gpu.items() if c and g})
    ctx.record("not_run", skipped)
    if gpu_reason:
        raise SkipPart(f"{gpu_reason}; the CPU aug + shared memory legs ran")

