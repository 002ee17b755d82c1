"""Training loop for spatially decomposed ResNets (``python -m trainer_client.train_decomposed``).

    torchrun --nproc-per-node 4 -m trainer_client.train_decomposed --grid 2x2 --synthetic \\
        --arch resnet50 --image-size 1024 --batch-size 2 --steps 100 --checkpoint-dir /tmp/ckpt

``world_size = replicas * rows * cols``; ``--replicas`` defaults to ``world_size / (rows*cols)``.
Without torchrun's environment it runs as a single process (``--grid 1x1``).
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from trainer_client.decomposed.data import SyntheticImages, shard_batch
from trainer_client.decomposed.groups import init_layout, parse_grid
from trainer_client.client import LoaderClient
from trainer_client.decomposed.model import decompose

__all__ = ["TrainConfig", "main", "parse_args", "train"]

_LOG = logging.getLogger("trainer_client.train_decomposed")
_ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101")
_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class TrainConfig:
    grid: tuple[int, int]
    replicas: int | None
    arch: str
    image_hw: tuple[int, int]
    batch_size: int
    steps: int
    lr: float
    momentum: float
    seed: int
    num_classes: int
    dtype: str
    checkpoint_dir: Path | None
    checkpoint_every: int
    resume: bool
    log_every: int
    timeout_s: float
    endpoint: str | None = None
    dataset: str | None = None
    samples_per_epoch: int = 1024

    def __post_init__(self) -> None:
        if self.arch not in _ARCHS:
            raise ValueError(f"--arch must be one of {_ARCHS}, got {self.arch!r}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"--dtype must be one of {tuple(_DTYPES)}, got {self.dtype!r}")
        if min(self.image_hw) < 1 or self.batch_size < 1 or self.steps < 0 or self.num_classes < 2:
            raise ValueError("image size, batch size and classes must be positive, steps >= 0")
        if self.replicas is not None and self.replicas < 1:
            raise ValueError("--replicas must be >= 1")
        if self.lr <= 0 or self.timeout_s <= 0 or self.log_every < 1 or self.checkpoint_every < 0:
            raise ValueError("lr, timeout, log-every must be positive; checkpoint-every >= 0")
        if self.resume and self.checkpoint_dir is None:
            raise ValueError("--resume needs --checkpoint-dir")


def _image_size(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    try:
        vals = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"image size must be N or HxW, got {text!r}") from None
    if len(vals) == 1:
        return vals[0], vals[0]
    if len(vals) == 2:
        return vals[0], vals[1]
    raise argparse.ArgumentTypeError(f"image size must be N or HxW, got {text!r}")


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    ap = argparse.ArgumentParser(prog="python -m trainer_client.train_decomposed", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grid", default="1x1", help="spatial grid RxC (rows x cols of ranks per image)")
    ap.add_argument("--replicas", type=int, default=None, help="data-parallel replicas (default: world/(R*C))")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--synthetic", action="store_true", help="deterministic random images and labels")
    src.add_argument("--endpoint", metavar="HOST:PORT", help="loader service: each rank reads its `shard` view")
    ap.add_argument("--dataset", default=None, help="dataset of the service (default: its first)")
    ap.add_argument("--samples-per-epoch", type=int, default=1024)
    ap.add_argument("--arch", default="resnet18", choices=_ARCHS)
    ap.add_argument("--image-size", type=_image_size, default=(256, 256), help="N or HxW")
    ap.add_argument("--batch-size", type=int, default=2, help="images per replica per step")
    ap.add_argument("--steps", type=int, default=10, help="train until this global step")
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-classes", type=int, default=10)
    ap.add_argument("--dtype", default="float32", choices=tuple(_DTYPES))
    ap.add_argument("--checkpoint-dir", type=Path, default=None)
    ap.add_argument("--checkpoint-every", type=int, default=0, help="steps between checkpoints (0: only at end)")
    ap.add_argument("--resume", action="store_true", help="continue from --checkpoint-dir/checkpoint.pt if present")
    ap.add_argument("--log-every", type=int, default=1)
    ap.add_argument("--timeout-s", type=float, default=300.0, help="bound on every collective wait")
    a = ap.parse_args(argv)
    if not a.synthetic and a.endpoint is None:
        ap.error("choose a data source: --endpoint HOST:PORT (the service's shard view) or --synthetic")
    try:
        return TrainConfig(parse_grid(a.grid), a.replicas, a.arch, a.image_size, a.batch_size, a.steps, a.lr,
                           a.momentum, a.seed, a.num_classes, a.dtype, a.checkpoint_dir, a.checkpoint_every,
                           a.resume, a.log_every, a.timeout_s, a.endpoint, a.dataset, a.samples_per_epoch)
    except ValueError as e:
        ap.error(str(e))
    raise AssertionError("unreachable")


def _init_dist(timeout: datetime.timedelta) -> torch.device:
    use_cuda = torch.cuda.is_available()
    backend = "nccl" if use_cuda else "gloo"
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend, timeout=timeout)
    else:  # single process without torchrun
        from trainer_client.decomposed.verify import free_port

        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                                timeout=timeout)
    if use_cuda:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
        return dev
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    return torch.device("cpu")


def _peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _save(path: Path, model: nn.Module, opt: torch.optim.Optimizer, step: int, cfg: TrainConfig) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                "arch": cfg.arch, "grid": cfg.grid}, tmp)
    os.replace(tmp, path)


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run the loop on an initialised process group; returns a summary (same on every rank)."""
    timeout = datetime.timedelta(seconds=cfg.timeout_s)
    device = _init_dist(timeout)
    try:
        rows, cols = cfg.grid
        world = dist.get_world_size()
        replicas = cfg.replicas if cfg.replicas is not None else max(1, world // (rows * cols))
        layout = init_layout(replicas, rows, cols, timeout)
        dtype = _DTYPES[cfg.dtype]
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        base = getattr(torchvision.models, cfg.arch)(weights=None, num_classes=cfg.num_classes)
        net = decompose(base.to(device=device, dtype=dtype), layout.spatial, inplace=True)
        opt = torch.optim.SGD(net.module.parameters(), lr=cfg.lr, momentum=cfg.momentum)
        ckpt = cfg.checkpoint_dir / "checkpoint.pt" if cfg.checkpoint_dir is not None else None
        step = 0
        if cfg.resume and ckpt is not None and ckpt.exists():
            state = torch.load(ckpt, map_location=device, weights_only=True)
            net.module.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            step = int(state["step"])
            _LOG.info("resumed from %s at step %d", ckpt, step)
        data: Any
        if cfg.endpoint is not None:
            from trainer_client.decomposed.service_data import ServiceShards

            dataset = cfg.dataset or LoaderClient(cfg.endpoint).datasets()[0].name
            data = ServiceShards(cfg.endpoint, dataset, cfg.image_hw, cfg.batch_size, cfg.seed, layout.spatial,
                                 layout.replica, layout.replicas, cfg.samples_per_epoch, dtype)
            data.seek(step)
        else:
            data = SyntheticImages(cfg.seed, cfg.batch_size, cfg.image_hw, 3, cfg.num_classes, dtype)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        loss_val, seen, t_start = float("nan"), 0, time.perf_counter()
        t_log = t_start
        while step < cfg.steps:
            if cfg.endpoint is not None:  # the service sent only this rank's shard
                x, labels = data.batch(step)
                x = x.to(device)
            else:
                images, labels = data.batch(step, layout.replica)
                x = shard_batch(images, layout.spatial).to(device)
                del images
            out = net(x, image_size=cfg.image_hw)
            loss = F.cross_entropy(out, labels.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            net.reduce_gradients(layout.data_parallel, layout.replicas)
            opt.step()
            step += 1
            seen += cfg.batch_size * layout.replicas
            loss_val = float(loss.detach())
            if step % cfg.log_every == 0 or step == cfg.steps:
                now = time.perf_counter()
                _LOG.info("step %d loss %.5f images/s %.2f peak_mem %.1f MiB", step, loss_val,
                          cfg.batch_size * layout.replicas * cfg.log_every / max(now - t_log, 1e-9),
                          _peak_mib(device))
                t_log = now
            if ckpt is not None and (step == cfg.steps or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0)):
                if layout.rank == 0:
                    _save(ckpt, net.module, opt, step, cfg)
                    _LOG.info("saved %s at step %d", ckpt, step)
                dist.barrier()
        if cfg.endpoint is not None:
            data.close()
        elapsed = time.perf_counter() - t_start
        peak = torch.tensor([_peak_mib(device)], dtype=torch.float64, device=device)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        return {"step": step, "loss": loss_val, "images_per_s": seen / elapsed if elapsed > 0 else 0.0,
                "max_rank_peak_mib": float(peak.item()), "world": world, "replicas": layout.replicas,
                "grid": f"{rows}x{cols}"}
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank{rank} %(name)s: %(message)s")
    summary = train(cfg)
    if rank == "0":
        print("train_decomposed summary: " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                       for k, v in summary.items()), file=sys.stdout, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
