"""`trainer-client train-streaming`: a streaming ResNet trained on whole regions with slide-level labels.

The service delivers each region as tiles (the `tiles` view, row-major); a background thread writes them
into the input as they arrive (``TileFeeder``) and the ResNet's convolutional front runs tile by tile
(``trainer_client.streaming``), starting on the first row bands while later tiles are still being decoded,
so activation memory is that of one tile while gradients equal full-image backprop. Logs loss, images/s and peak memory; saves
and resumes checkpoints holding the model, the optimiser and the loader's cursor.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainer_client.client import LoaderClient
from trainer_client.config import StreamConfig
from trainer_client.streaming import StreamingConfig, StreamingModule, StreamingPlan, resnet_front, streaming_step
from trainer_client.views import TileFeeder

__all__ = ["add_arguments", "run"]

log = logging.getLogger(__name__)
ARCHS = ("resnet18", "resnet34", "resnet50")  # torchvision models (the `models` extra), imported when training


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", choices=sorted(ARCHS), default="resnet34")
    p.add_argument("--region", type=int, default=2048, help="side of the square region at --level (pixels)")
    p.add_argument("--level", type=int, default=0)
    p.add_argument("--tile-size", type=int, default=None,
                   help="fixed streaming tile side, one stage (default: stages and tiles chosen automatically)")
    p.add_argument("--memory-budget-mb", type=float, default=None,
                   help="automatic plan: the fastest stages and tiles whose estimated step memory fits this budget")
    p.add_argument("--max-time-factor", type=float, default=None,
                   help="automatic plan: at most this times conventional step time (estimated); without "
                        "--memory-budget-mb the smallest plan within it (default 1.5)")
    p.add_argument("--tile-budget-mb", type=float, default=None,
                   help="instead of a plan: one stage, tile chosen from this per-tile working-memory budget")
    p.add_argument("--service-tile", type=int, default=512, help="tile side the service sends (tiles view)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--samples-per-epoch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--amp", action="store_true", help="mixed precision on the GPU")
    p.add_argument("--checkpoint", type=Path, default=None, help="save here every --save-every steps and at the end")
    p.add_argument("--save-every", type=int, default=50)
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint (model, optimiser, cursor)")
    p.add_argument("--log-every", type=int, default=1)


def _peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _streaming_config(args: argparse.Namespace, amp: bool) -> StreamingConfig:
    mib = 2**20
    fixed = args.tile_size is not None or args.tile_budget_mb is not None
    if fixed and (args.memory_budget_mb is not None or args.max_time_factor is not None):
        raise ValueError("--tile-size/--tile-budget-mb fix the tiles; --memory-budget-mb/--max-time-factor plan "
                         "them: give one kind")
    return StreamingConfig(
        tile_size=args.tile_size,
        memory_budget_bytes=int(args.tile_budget_mb * mib) if args.tile_budget_mb else None,
        amp=amp,
        step_memory_budget_bytes=int(args.memory_budget_mb * mib) if args.memory_budget_mb else None,
        max_time_factor=args.max_time_factor,
    )


def run(args: argparse.Namespace, client: LoaderClient, dataset: str, labels: list[str]) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    import torchvision  # here, not at import: `trainer-client bench` runs without it (client-only install)

    model = getattr(torchvision.models, args.arch)(weights=None, num_classes=max(2, len(labels))).to(device)
    front = resnet_front(model, flatten_blocks=True)  # every block a child: the plan may split anywhere
    head = nn.Sequential(model.avgpool, nn.Flatten(1), model.fc)
    streamer = StreamingModule(front, config=_streaming_config(args, amp=args.amp and device.type == "cuda"))
    optimiser = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    config = StreamConfig(dataset=dataset, batch_size=1, view="tiles", region_width=args.region,
                          region_height=args.region, tile_size=args.service_tile, level=args.level,
                          samples_per_epoch=args.samples_per_epoch, seed=args.seed, dtype="float32",
                          mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), tissue_threshold=0.2)
    stream = client.stream(config)
    step = 0
    if args.resume:
        if args.checkpoint is None or not args.checkpoint.exists():
            raise ValueError("--resume needs an existing --checkpoint file")
        state = torch.load(args.checkpoint, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimizer"])
        stream.load_state_dict(state["loader"])
        step = int(state["step"])
        log.info("resumed from %s at step %d (epoch %d, cursor %d)", args.checkpoint, step, stream.epoch, stream.cursor)

    loader_state = stream.state_dict()  # after the last trained sample (the feeder reads ahead)

    def save() -> None:
        if args.checkpoint is not None:
            tmp = args.checkpoint.with_suffix(".tmp")
            torch.save({"model": model.state_dict(), "optimizer": optimiser.state_dict(),
                        "loader": loader_state, "step": step, "arch": args.arch}, tmp)
            tmp.replace(args.checkpoint)

    model.train()
    start, images, last_loss = time.perf_counter(), 0, float("nan")
    target = step + args.steps
    feeder: TileFeeder | None = None
    shown: StreamingPlan | None = None
    try:
        while step < target:
            feeder = TileFeeder(stream, device, state=stream.state_dict)
            for arriving in feeder:
                y = arriving.sample["labels"].to(device)
                optimiser.zero_grad(set_to_none=True)
                result = streaming_step(streamer, head, nn.functional.cross_entropy, arriving.images, y,
                                        feed=arriving.feed)
                optimiser.step()
                if streamer.plan is not None and streamer.plan != shown:
                    shown = streamer.plan
                    print(f"plan for {tuple(arriving.images.shape)}: {shown.describe()}", flush=True)
                assert arriving.loader_state is not None  # the whole image was read
                loader_state = arriving.loader_state
                step += 1
                images += 1
                last_loss = float(result.loss)
                if step % args.log_every == 0:
                    rate = images / (time.perf_counter() - start)
                    print(f"step {step:5d}  loss {last_loss:.4f}  {rate:6.2f} images/s  "
                          f"peak {_peak_memory_mib(device):8.0f} MiB", flush=True)
                if args.checkpoint is not None and step % args.save_every == 0:
                    save()
                if step >= target:
                    break
    finally:
        save()
        stream.close()
        if feeder is not None:
            feeder.close()
    elapsed = time.perf_counter() - start
    return {"steps": step, "images": images, "images_per_s": images / elapsed, "loss": last_loss,
            "peak_memory_mib": _peak_memory_mib(device), "device": str(device),
            "split_at": list(streamer.plan.split_at) if streamer.plan else [], "tile_sizes": streamer.tile_sizes,
            "epoch": loader_state["epoch"], "cursor": loader_state["cursor"]}


def summary_line(result: dict[str, Any]) -> str:
    return json.dumps(result)
