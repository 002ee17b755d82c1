"""`trainer-client train`: a ResNet-18 patch classifier, data-parallel under torchrun.

Under ``torchrun --nproc-per-node N`` every process joins the process group torchrun describes in its
environment (gloo on the CPU, NCCL on GPUs), wraps the model in DistributedDataParallel and reads its own
shard of the epoch (rank and world size from the group): N replicas of one model, kept identical by the
gradient all-reduce. Run directly, it is one rank. Checkpoints hold the model, the optimiser, the step and
every rank's loader state merged (rank 0 writes, every rank reads), so a job resumes on any number of
ranks: the samples its ranks had not read are re-sharded over the new ones (docs/architecture.md).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from trainer_client.client import LoaderClient
from trainer_client.config import StreamConfig
from trainer_client.elastic import merge_state_dicts

__all__ = ["add_arguments", "run", "weights_digest"]

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=30, help="optimiser steps of the whole run (resumed runs included)")
    p.add_argument("--batch-size", type=int, default=32, help="per rank")
    p.add_argument("--patch-size", type=int, default=224)
    p.add_argument("--level", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples-per-epoch", type=int, default=0,
                   help="epoch length (default: steps x batch size x ranks; a resumed run keeps its checkpoint's)")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="rank 0 saves here every --save-every steps and at the end")
    p.add_argument("--save-every", type=int, default=0, help="0 = at the end only")
    p.add_argument("--resume", action="store_true",
                   help="continue from --checkpoint when it exists (on any number of ranks)")


def _distributed() -> tuple[int, int, torch.device]:
    """Join torchrun's process group when there is one: (rank, world size, this rank's device)."""
    device = torch.device("cpu")
    if torch.cuda.is_available():  # each rank takes its own GPU
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=10))
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), device
    return 0, 1, device


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of the parameters: equal on bit-identical replicas. (Buffers are not: each rank's batch-norm
    statistics see its own batches; DDP broadcasts rank 0's at every forward, and checkpoints hold rank 0's.)"""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.named_parameters()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _gather(obj: Any, world: int) -> list[Any]:
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _save(path: Path, model: torch.nn.Module, optimiser: torch.optim.Optimizer, step: int, stream_states: list[Any],
          samples_per_epoch: int, rank: int, world: int) -> None:
    """Rank 0 writes (atomically) what every rank gathered; the others wait until it is on disk."""
    if rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save({"model": model.state_dict(), "optimiser": optimiser.state_dict(), "step": step,
                    "loader": merge_state_dicts(stream_states), "samples_per_epoch": samples_per_epoch,
                    "world_size": world}, tmp)
        os.replace(tmp, path)
    if world > 1:
        dist.barrier()


def _all_have(batch: dict[str, Any] | None, world: int, device: torch.device) -> bool:
    """Whether every rank has a batch for this step. After an elastic resume shards may differ by a sample,
    so a rank can run out one batch early: every rank then ends the epoch together (no DDP hang)."""
    if world == 1:
        return batch is not None
    flag = torch.tensor([0 if batch is None else 1], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def run(args: argparse.Namespace, client: LoaderClient, dataset: str, labels: list[str]) -> dict[str, Any]:
    import torchvision

    rank, world, device = _distributed()
    torch.manual_seed(args.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    core = torchvision.models.resnet18(weights=None, num_classes=max(2, len(labels))).to(device)
    model: torch.nn.Module = core
    if world > 1:
        device_ids = [device.index] if device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(core, device_ids=device_ids)
    optimiser = torch.optim.SGD(core.parameters(), lr=0.01, momentum=0.9)
    checkpoint: dict[str, Any] | None = None
    if args.resume and args.checkpoint is not None and args.checkpoint.exists():
        checkpoint = torch.load(args.checkpoint, map_location=device, weights_only=True)
    samples = ((checkpoint or {}).get("samples_per_epoch") or args.samples_per_epoch
               or args.steps * args.batch_size * world)
    config = StreamConfig(dataset=dataset, batch_size=args.batch_size, patch_size=args.patch_size, level=args.level,
                          dtype="float32", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                          samples_per_epoch=samples, seed=args.seed, pin_memory=device.type == "cuda")
    stream = client.stream(config, rank=rank, world_size=world)
    step = 0
    if checkpoint is not None:
        core.load_state_dict(checkpoint["model"])
        optimiser.load_state_dict(checkpoint["optimiser"])
        stream.load_state_dict(checkpoint["loader"])
        step = int(checkpoint["step"])
        if rank == 0:
            log.warning("resumed from %s at step %d (saved by %d ranks, now %d)", args.checkpoint, step,
                        checkpoint["world_size"], world)
    start = time.perf_counter()
    images_seen, wait, first_step = 0, 0.0, step
    batches = iter(stream)
    while step < args.steps:
        t_wait = time.perf_counter()
        batch = next(batches, None)
        wait += time.perf_counter() - t_wait
        if not _all_have(batch, world, device):
            log.warning("rank %d: the epoch ended at step %d, before --steps %d", rank, step, args.steps)
            break
        assert batch is not None
        x = batch["images"].to(device, non_blocking=True)
        y = batch["labels"].to(device, non_blocking=True)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        step += 1
        images_seen += x.shape[0]
        if rank == 0 and (step % args.log_every == 0 or step == first_step + 1):
            rate = images_seen * world / (time.perf_counter() - start)
            print(f"step {step:4d}  loss {loss.item():.4f}  {rate:7.1f} images/s", flush=True)
        if args.checkpoint is not None and args.save_every and step % args.save_every == 0 and step < args.steps:
            _save(args.checkpoint, core, optimiser, step, _gather(stream.state_dict(), world), samples, rank, world)
    if args.checkpoint is not None:
        _save(args.checkpoint, core, optimiser, step, _gather(stream.state_dict(), world), samples, rank, world)
    stream.close()
    elapsed = time.perf_counter() - start
    summary = {"rank": rank, "world_size": world, "steps": step, "images": images_seen,
               "images_per_s": images_seen / elapsed, "data_wait_fraction": wait / elapsed, "device": str(device),
               "reconnects": stream.stats.reconnects, "weights": weights_digest(core)}
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return summary
