"""Stain normalisation on the CPU: the torch ops (the reference, ``cpu_kernels=False``) against the fused numba
kernels (``stain_kernels``, the default on CPUs), same batch, same run.

One batch of ``--batch`` H&E-like ``--size``² patches (Beer–Lambert mixtures of the Macenko reference stains with
random, spatially blocky concentrations, about a quarter background), both methods, targets fitted to another such
image. With T threads (``--threads 1 2``), T Python threads each normalise their own copy of the batch at once, as
the service's batch threads do (torch intra-op threads set to 1, so neither side gets parallelism the other lacks).
Each (method, path, T) is timed ``--repeats`` times, the paths alternating; medians of patches/s and the
kernel/torch ratio are printed, one JSON line per (method, T). The kernels are compiled (or loaded) first.

    python -m bench.bench_stain [--batch 32] [--size 256] [--repeats 7] [--threads 1 2]
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from bench.common import median
from loader_service.augment.stain import StainConfig, fit_target, normalise_batch
from loader_service.augment.stain_kernels import warm_up

_H = np.array([0.5626, 0.7201, 0.4062])
_E = np.array([0.2159, 0.8012, 0.5581])


def he_like(n: int, size: int, seed: int) -> torch.Tensor:
    """uint8 (n, size, size, 3): 240 exp(-(c_H h + c_E e)) + noise, concentrations constant over 8×8 blocks
    times per-pixel texture, blocks of background (no stain) about a quarter of the time."""
    rng = np.random.default_rng(seed)
    blocks = (n, size // 8, size // 8)
    conc = np.stack([rng.uniform(0, 1.2, blocks), rng.uniform(0, 0.8, blocks)], axis=-1)
    conc *= rng.random(blocks)[..., None] > 0.25
    conc = conc.repeat(8, axis=1).repeat(8, axis=2) * rng.uniform(0.6, 1.0, (n, size, size, 1))
    od = conc @ np.stack([_H / np.linalg.norm(_H), _E / np.linalg.norm(_E)])
    pixels = 240.0 * np.exp(-od) + rng.normal(0, 2.0, od.shape)
    return torch.from_numpy(np.clip(np.round(pixels), 0, 255).astype(np.uint8))


def patches_per_s(batch: torch.Tensor, config: StainConfig, kernels: bool, threads: int) -> float:
    with ThreadPoolExecutor(threads) as pool:
        start = time.perf_counter()
        list(pool.map(lambda b: normalise_batch(b, config, cpu_kernels=kernels), [batch] * threads))
        return threads * batch.shape[0] / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    torch.set_num_threads(1)
    warm_up()
    batch = he_like(args.batch, args.size, seed=1)
    for method in ("macenko", "reinhard"):
        config = fit_target(method, he_like(1, 512, seed=2))
        for threads in args.threads:
            torch_runs, kernel_runs = [], []
            for _ in range(args.repeats):
                torch_runs.append(patches_per_s(batch, config, False, threads))
                kernel_runs.append(patches_per_s(batch, config, True, threads))
            reference = normalise_batch(batch, config, cpu_kernels=False)
            diff = (reference.int() - normalise_batch(batch, config).int()).abs()
            t, k = median(torch_runs), median(kernel_runs)
            print(json.dumps({"method": method, "threads": threads, "batch": list(batch.shape),
                              "torch_patches_per_s": round(t, 1), "kernel_patches_per_s": round(k, 1),
                              "ratio": round(k / t, 2), "max_abs_diff": int(diff.max()),
                              "mean_abs_diff": float(diff.float().mean())}), flush=True)


if __name__ == "__main__":
    main()
