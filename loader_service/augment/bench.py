"""Rough throughput of :func:`augment_batch`.

    PYTHONPATH=. python3 -m loader_service.augment.bench --batch 64 --size 256 --device cpu
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

from .config import AugmentConfig
from .params import draw_params
from .pipeline import augment_batch

__all__ = ["measure_throughput", "main"]

logger = logging.getLogger(__name__)


def measure_throughput(batch: int = 64, size: int = 256, device: str = "cpu", repeats: int = 3,
                       config: AugmentConfig | None = None, seed: int = 0) -> float:
    """Best-of-``repeats`` images/s of ``augment_batch`` on a random uint8 NHWC batch."""
    cfg = config if config is not None else AugmentConfig()
    dev = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, generator=gen).to(dev)
    best = float("inf")
    for rep in range(repeats + 1):  # the first run warms up
        params = [draw_params(cfg, seed, rep, i) for i in range(batch)]
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        start = time.perf_counter()
        augment_batch(images, params)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        if rep:
            best = min(best, time.perf_counter() - start)
    return batch / best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--preset", default="pathology", choices=AugmentConfig.PRESETS)
    parser.add_argument("--blur-prob", type=float, default=None, help="override the preset's blur_prob")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = AugmentConfig.preset(args.preset)
    if args.blur_prob is not None:
        cfg = AugmentConfig.from_dict({**cfg.to_dict(), "blur_prob": args.blur_prob})
    rate = measure_throughput(args.batch, args.size, args.device, args.repeats, cfg)
    logger.info("augment_batch %s: %d x %dx%d, preset=%s blur_prob=%g, torch threads=%d: %.1f images/s",
                args.device, args.batch, args.size, args.size, args.preset, cfg.blur_prob,
                torch.get_num_threads(), rate)


if __name__ == "__main__":
    main()
