"""Throughput of :func:`augment_batch`; on the CPU, the fused kernels against the torch ops, side by side.

    python -m loader_service.augment.bench --batch 64 --size 256 --device cpu --callers 1 2
    python -m loader_service.augment.bench --device cuda

``--callers N`` runs N threads calling ``augment_batch`` at once (as the service's batch threads
do), each with one torch intra-op thread; images/s is their sum. Medians of ``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch

from .config import AugmentConfig
from .params import draw_params
from .pipeline import _augment_batch_torch, augment_batch

__all__ = ["measure_throughput", "main"]

logger = logging.getLogger(__name__)


def _torch_ops(images: torch.Tensor, params: list) -> torch.Tensor:  # type: ignore[type-arg]
    x = images.permute(0, 3, 1, 2)
    return _augment_batch_torch(x, params, params[0].output_size(x.shape[2], x.shape[3]))


def measure_throughput(batch: int = 64, size: int = 256, device: str = "cpu", repeats: int = 3,
                       config: AugmentConfig | None = None, seed: int = 0, callers: int = 1,
                       torch_ops: bool = False) -> float:
    """Median images/s of ``augment_batch`` (or its torch-ops path) on random uint8 NHWC batches,
    summed over ``callers`` concurrent threads."""
    cfg = config if config is not None else AugmentConfig()
    dev = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, generator=gen).to(dev)
    fn: Callable[[torch.Tensor, list], torch.Tensor] = _torch_ops if torch_ops else augment_batch  # type: ignore[type-arg]
    params = [[draw_params(cfg, seed, rep, i) for i in range(batch)] for rep in range(repeats + 1)]

    def one(rep: int) -> None:
        fn(images, params[rep])
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    rates = []
    with ThreadPoolExecutor(callers) as pool:
        for rep in range(repeats + 1):  # the first run warms up (and compiles the CPU kernels)
            start = time.perf_counter()
            list(pool.map(one, [rep] * callers))
            if rep:
                rates.append(batch * callers / (time.perf_counter() - start))
    return statistics.median(rates)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--callers", type=int, nargs="+", default=[1])
    parser.add_argument("--preset", default="pathology", choices=AugmentConfig.PRESETS)
    parser.add_argument("--blur-prob", type=float, default=None, help="override the preset's blur_prob")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)  # one intra-op thread per caller, as in the service's batch threads
    cfg = AugmentConfig.preset(args.preset)
    if args.blur_prob is not None:
        cfg = AugmentConfig.from_dict({**cfg.to_dict(), "blur_prob": args.blur_prob})
    for callers in args.callers:
        rate = measure_throughput(args.batch, args.size, args.device, args.repeats, cfg, callers=callers)
        line = (f"augment_batch {args.device}: {args.batch} x {args.size}², preset={args.preset} "
                f"blur_prob={cfg.blur_prob:g}, {callers} caller(s): {rate:.0f} images/s")
        if args.device == "cpu":
            ops = measure_throughput(args.batch, args.size, args.device, args.repeats, cfg, callers=callers,
                                     torch_ops=True)
            line += f"; torch ops {ops:.0f} images/s; fused / torch ops = {rate / ops:.2f}"
        logger.info("%s", line)


if __name__ == "__main__":
    main()
