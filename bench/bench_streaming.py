"""Peak memory and step time: streaming vs conventional training of a ResNet-34 front + small head.

Every (size, mode) runs in a fresh subprocess so that CPU peak memory can be read
honestly from ``getrusage(RUSAGE_SELF).ru_maxrss``. Figures per run:

* "step memory": that peak minus the RSS of the warmed-up torch runtime alone (no model,
  no input): weights, their gradients, the input and every activation, i.e. what
  ``torch.cuda.max_memory_allocated`` counts on a GPU (where it is reported instead);
* "peak RSS": the whole process, runtime included;
* "activation": the peak minus the RSS after model and input creation.

On the CPU each (size, mode) runs twice: the timed run with the normal allocator, then a one-step
memory run with glibc's ``MALLOC_MMAP_THRESHOLD_`` fixed (``--mmap-threshold``) so that freed
tensors go back to the system and RSS measures memory in use, not allocator slack (glibc otherwise
keeps freed tensors in its heap: +600 MiB for streaming at 4096²). The timed run's peak RSS is kept
as ``peak_bytes_default_malloc``.

Both modes run the front in eval mode (frozen batch-norm statistics), which is
what streaming computes, so the comparison is of the same mathematics.

Streaming chooses its stages and tiles itself (``plan_streaming``: the smallest estimated step
memory within 1.5x the estimated conventional time; ``--step-budget-mb`` / ``--max-time-factor``
change the goal; ``--split`` with ``--tile`` or ``--budget-mb`` hand-picks them instead).

    python3 bench/bench_streaming.py --device cpu --sizes 2048 4096
    python3 bench/bench_streaming.py --device cuda --amp --sizes 4096 8192
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

logger = logging.getLogger("bench_streaming")

MiB = 1 << 20


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _runtime_rss(device: "torch.device") -> int:
    """RSS of the warmed-up torch runtime alone: a tiny conv forward + backward ran, no model, no input."""
    import torch

    w = torch.randn(4, 3, 3, 3, device=device, requires_grad=True)
    torch.nn.functional.conv2d(torch.randn(1, 3, 16, 16, device=device), w).sum().backward()
    del w
    return _rss_now()


def _worker(args: argparse.Namespace) -> dict[str, object]:
    import torch
    import torchvision
    from torch import nn

    from trainer_client.streaming import StreamingModule, resnet_front, streaming_step

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    runtime = _runtime_rss(device)
    torch.manual_seed(0)
    model = torchvision.models.resnet34(weights=None)
    front = resnet_front(model, flatten_blocks=True).to(device).eval()
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 2)).to(device)
    loss_fn = nn.CrossEntropyLoss()
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    split = tuple(int(s) for s in args.split.split(",")) if args.split else ()
    if args.tile or args.budget_mb:  # hand-picked: fixed tile or per-tile budget, stages from --split
        streamer = StreamingModule(front, tile_size=args.tile or None,
                                   memory_budget_bytes=None if args.tile else args.budget_mb * MiB,
                                   split_at=split, amp=args.amp)
    else:  # automatic stages and tiles (the default)
        streamer = StreamingModule(front, split_at=split, amp=args.amp,
                                   step_memory_budget_bytes=args.step_budget_mb * MiB if args.step_budget_mb else None,
                                   max_time_factor=args.max_time_factor)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        front.zero_grad(set_to_none=True)
        head.zero_grad(set_to_none=True)
        if args.mode == "conventional":
            ctx = torch.autocast(device.type, dtype=amp_dtype) if args.amp else torch.autocast(device.type, enabled=False)
            with ctx:
                loss = loss_fn(head(front(x)), y)
            loss.backward()
        else:
            streaming_step(streamer, head, loss_fn, x, y)
        sync()

    y = torch.zeros(args.batch, dtype=torch.long, device=device)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        baseline = _rss_now()
    t0 = time.perf_counter()
    step(x, y)  # warm-up at the measured size (kernel selection, planning), not timed
    warmup_s = time.perf_counter() - t0
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step(x, y)
        times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "mode": args.mode,
        "size": args.size,
        "device": args.device,
        "amp": args.amp,
        "batch": args.batch,
        "threads": torch.get_num_threads(),
        "step_s": statistics.median(times),
        "step_times_s": [round(t, 3) for t in times],
        "peak_bytes": peak,
        "baseline_bytes": baseline,
        "runtime_bytes": runtime if device.type == "cpu" else 0,
        "step_bytes": peak - (runtime if device.type == "cpu" else 0),
        "activation_bytes": peak - baseline,
        "warmup_s": round(warmup_s, 2),
        "tile_sizes": streamer.tile_sizes if args.mode == "streaming" else None,
        "split_at": list(streamer.plan.split_at) if args.mode == "streaming" and streamer.plan else list(split),
        "plan": streamer.plan.describe() if args.mode == "streaming" and streamer.plan else None,
    }


def _run_child(args: argparse.Namespace, size: int, mode: str, memory_pass: bool) -> dict[str, object]:
    cmd = [
        sys.executable, __file__, "--worker", "--mode", mode, "--size", str(size), "--device", args.device,
        "--steps", str(1 if memory_pass else args.steps), "--batch", str(args.batch), "--budget-mb", str(args.budget_mb),
        "--tile", str(args.tile), "--split", args.split, "--threads", str(args.threads),
        "--step-budget-mb", str(args.step_budget_mb),
    ]  # fmt: skip
    if args.max_time_factor:
        cmd += ["--max-time-factor", str(args.max_time_factor)]
    if args.amp:
        cmd.append("--amp")
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    if memory_pass:
        # glibc otherwise raises its mmap threshold to 32 MiB after the first large free and keeps freed
        # tensors in its heap: RSS then counts allocator slack, not memory in use. Same policy for both modes.
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} at {size} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _measure(args: argparse.Namespace, size: int, mode: str) -> dict[str, object]:
    """Time with the normal allocator; on the CPU take memory from a second run whose freed tensors go
    back to the system (glibc keeps them otherwise, and RSS would count its slack, not memory in use)."""
    timed = _run_child(args, size, mode, memory_pass=False)
    if args.device != "cpu" or not args.mmap_threshold:
        return timed
    memory = _run_child(args, size, mode, memory_pass=True)
    keys = ("peak_bytes", "baseline_bytes", "runtime_bytes", "step_bytes", "activation_bytes")
    return {**timed, **{k: memory[k] for k in keys}, "peak_bytes_default_malloc": timed["peak_bytes"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--amp", action="store_true", help="autocast (float16 on CUDA, bfloat16 on CPU)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps; the median is reported")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--step-budget-mb", type=int, default=0,
                        help="automatic plan: fastest stages/tiles within this step memory (0: smallest within "
                             "--max-time-factor)")
    parser.add_argument("--max-time-factor", type=float, default=None, help="automatic plan: time limit (default 1.5)")
    parser.add_argument("--budget-mb", type=int, default=0, help="hand-picked: per-tile memory budget (with --split)")
    parser.add_argument("--tile", type=int, default=0, help="hand-picked: fixed tile size in image pixels")
    parser.add_argument("--split", default="", help="stage split indices into the flattened front (default: planned)")
    parser.add_argument("--modes", nargs="+", default=["conventional", "streaming"])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    parser.add_argument("--mmap-threshold", type=int, default=1 << 20,
                        help="glibc MALLOC_MMAP_THRESHOLD_ for the children (bytes; 0: glibc default)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="streaming", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_worker(args)))
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rows: list[dict[str, object]] = []
    for size in args.sizes:
        results = {}
        for mode in args.modes:
            results[mode] = _measure(args, size, mode)
            print(json.dumps(results[mode]), flush=True)  # as soon as measured
        if {"conventional", "streaming"} <= results.keys():
            conv, stream = results["conventional"], results["streaming"]
            ratio = {
                "size": size,
                "step_memory_ratio": stream["step_bytes"] / conv["step_bytes"],  # type: ignore[operator]
                "peak_ratio": stream["peak_bytes"] / conv["peak_bytes"],  # type: ignore[operator]
                "activation_ratio": stream["activation_bytes"] / conv["activation_bytes"],  # type: ignore[operator]
                "time_ratio": stream["step_s"] / conv["step_s"],  # type: ignore[operator]
            }
            print(json.dumps(ratio), flush=True)
            rows.append({**ratio, "conv": conv, "stream": stream})
    for row in rows:
        print(f"plan at {row['size']}: {row['stream']['plan']}")  # type: ignore[index]
    print("\n| size | mode | step s (median) | step memory MiB | peak RSS MiB | activation MiB | tiles |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        for key in ("conv", "stream"):
            r = row[key]
            print(
                f"| {r['size']} | {r['mode']} | {r['step_s']:.2f} | {r['step_bytes'] / MiB:.0f} | "  # type: ignore[index]
                f"{r['peak_bytes'] / MiB:.0f} | {r['activation_bytes'] / MiB:.0f} | {r['tile_sizes']} |"  # type: ignore[index]
            )
        print(
            f"| {row['size']} | streaming/conventional | x{row['time_ratio']:.2f} | x{row['step_memory_ratio']:.3f} | "
            f"x{row['peak_ratio']:.3f} | x{row['activation_ratio']:.3f} | |"
        )


if __name__ == "__main__":
    main()
