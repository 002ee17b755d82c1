"""Peak activation memory and step time of one training step, per memory strategy.

    python bench/bench_memory.py --device cpu --arch resnet18 --image-size 1024 --batch-size 1

Every configuration runs in fresh subprocess(es).  Memory is the peak above a baseline taken
after the model, its gradient buffers and the input exist (so it is activations + temporaries):
on CPU ``ru_maxrss`` (with ``MALLOC_MMAP_THRESHOLD_`` fixed so freed buffers go back to the OS),
on CUDA ``torch.cuda.max_memory_allocated``.  Decomposed rows report the largest rank.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ("plain", "recompute", "offload", "streaming", "decomposed2", "decomposed4")


def _rss_peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(a: argparse.Namespace) -> dict[str, Any]:
    import datetime

    import torch
    import torch.distributed as dist
    import torch.nn as nn
    import torch.nn.functional as F
    import torchvision

    from trainer_client.memory import ActivationOffload, GroupedRecompute, OffloadConfig, RecomputeConfig
    from trainer_client.memory import activation_bytes, sequential_blocks

    torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    hw = (a.image_size, a.image_size)
    torch.manual_seed(0)
    model: nn.Module = getattr(torchvision.models, a.arch)(weights=None, num_classes=10).to(dev)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn((a.batch_size, 3, *hw), generator=gen).to(dev)
    y = torch.randint(0, 10, (a.batch_size,), generator=gen).to(dev)
    wsz = (a.warmup_size, a.warmup_size)
    xw = torch.randn((a.batch_size, 3, *wsz), generator=gen).to(dev)
    info: dict[str, Any] = {}
    step: Any
    fwd_mem = [0]
    base_ref = [0]

    def mark() -> None:  # activation memory at the end of the forward pass
        now = torch.cuda.memory_allocated() if dev.type == "cuda" else _rss_now()
        fwd_mem[0] = max(fwd_mem[0], now - base_ref[0])

    if a.config.startswith("decomposed"):
        import trainer_client.decomposed.layers as layers
        from trainer_client.decomposed import decompose, init_layout, shard_batch

        backend = "gloo"
        if dev.type == "cuda":
            if torch.cuda.device_count() < a.world:
                raise SystemExit(f"needs {a.world} GPUs, found {torch.cuda.device_count()} (skipped)")
            backend, dev = "nccl", torch.device("cuda", a.rank)
            torch.cuda.set_device(dev)
            model, x, y, xw = model.to(dev), x.to(dev), y.to(dev), xw.to(dev)
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{a.port}", rank=a.rank, world_size=a.world,
                                timeout=datetime.timedelta(seconds=600))
        rows, cols = {2: (1, 2), 4: (2, 2)}[a.world]
        layout = init_layout(1, rows, cols)
        net = decompose(model, layout.spatial, inplace=True)
        net.plan_for(hw, 3)
        x = shard_batch(x, layout.spatial)
        xw = shard_batch(xw, layout.spatial)
        info["grid"] = f"{rows}x{cols}"
        halo = [0]
        orig = layers.halo_exchange

        def counting(t: Any, spec: Any, link: Any, stash: Any = None) -> Any:
            out = orig(t, spec, link, stash)
            if stash is not None and torch.is_grad_enabled():
                halo[0] += sum(s.numel() * s.element_size() for pair in stash.slabs for s in pair if s is not None)
            return out

        layers.halo_exchange = counting  # type: ignore[assignment]

        def step(x: Any = x, hw: tuple[int, int] = hw) -> None:
            halo[0] = 0
            loss = F.cross_entropy(net(x, image_size=hw), y)
            mark()
            loss.backward()
            net.reduce_gradients()
            info["halo_bytes"] = halo[0]
    elif a.config == "streaming":
        from trainer_client.streaming import StreamingModule, resnet_front  # optional colleague package

        streamer = StreamingModule(resnet_front(model), tile_size=a.tile)
        head = nn.Sequential(model.avgpool, nn.Flatten(1), model.fc)
        info["note"] = f"tile {a.tile}, BN frozen (eval)"

        def step(x: Any = x, hw: Any = None) -> None:
            fm = streamer(x)
            loss = F.cross_entropy(head(fm), y)
            mark()
            loss.backward()
            streamer.backward(x, fm.grad)
    else:
        blocks = sequential_blocks(model)
        sizes = activation_bytes(blocks, x.shape, x.dtype)
        info["estimated_activation_bytes"] = sum(sizes)
        if a.config == "recompute":
            budget = max(sizes)  # each group's working set within the largest single block
            net = GroupedRecompute(blocks, RecomputeConfig(budget_bytes=budget))
            info["groups"] = len(net.groups_for(x))
        elif a.config == "offload":
            net = ActivationOffload(blocks, OffloadConfig())
        else:
            net = model

        def step(x: Any = x, hw: Any = None) -> None:
            loss = F.cross_entropy(net(x), y)
            mark()
            loss.backward()

    for p in model.parameters():  # gradient buffers belong to the baseline, not to activations
        p.grad = torch.zeros_like(p)
    # One step on a small image first, so one-off allocations (thread pools, kernel caches, gloo
    # connections) land in the baseline rather than in the activation figure.
    step(xw, wsz)
    del xw
    if dev.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _rss_now()
    base_ref[0], fwd_mem[0] = base, 0
    times = []
    for i in range(a.steps + 1):
        t0 = time.perf_counter()
        step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if i:  # the first step warms up
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() - base if dev.type == "cuda" else _rss_peak() - base
    if a.config == "offload" and isinstance(net, ActivationOffload):
        info["offloaded_bytes"] = net.offloaded_bytes
    if dist.is_initialized():
        dist.destroy_process_group()
    return {"config": a.config, "rank": a.rank, "peak_bytes": peak, "forward_bytes": fwd_mem[0],
            "step_s": sum(times) / len(times), **info}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_config(a: argparse.Namespace, config: str) -> list[dict[str, Any]]:
    world = {"decomposed2": 2, "decomposed4": 4}.get(config, 1)
    port = _free_port()
    threads = a.threads if a.threads else max(1, (os.cpu_count() or 1) // world)
    path = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH", ""), str(ROOT)) if p)
    env = dict(os.environ, PYTHONPATH=path, MALLOC_MMAP_THRESHOLD_=str(a.mmap_threshold),
               OMP_NUM_THREADS=str(threads))
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", config, "--rank", str(r), "--world", str(world),
                               "--port", str(port), "--threads", str(threads), "--device", a.device,
                               "--arch", a.arch, "--image-size", str(a.image_size), "--batch-size",
                               str(a.batch_size), "--steps", str(a.steps), "--tile", str(a.tile),
                               "--warmup-size", str(a.warmup_size)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(world)]
    rows = []
    for p in procs:
        out, err = p.communicate(timeout=a.timeout)
        if p.returncode != 0:
            for q in procs:
                if q.poll() is None:
                    q.kill()
            return [{"config": config, "error": (err.strip().splitlines() or ["?"])[-1]}]
        rows.append(json.loads(out.strip().splitlines()[-1]))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--image-size", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    ap.add_argument("--tile", type=int, default=512, help="streaming tile size")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--json", type=Path, default=None, help="also write the raw rows here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads per process (0: cores / ranks); 1 keeps CPU timings comparable")
    ap.add_argument("--warmup-size", type=int, default=0, help="warm-up image size (default image-size/8, >= 64)")
    ap.add_argument("--mmap-threshold", type=int, default=1 << 20,
                    help="MALLOC_MMAP_THRESHOLD_ for workers: larger buffers are returned to the OS when freed")
    a = ap.parse_args(argv)
    if not a.warmup_size:
        a.warmup_size = max(64, a.image_size // 8)
    if a.worker:
        a.config = a.worker
        print(json.dumps(worker(a)))
        return 0
    results: dict[str, list[dict[str, Any]]] = {}
    for config in a.configs.split(","):
        if config == "streaming":
            probe = subprocess.run([sys.executable, "-c", "from trainer_client.streaming import StreamingModule"],
                                   env=dict(os.environ, PYTHONPATH=os.pathsep.join(
                                       p for p in (os.environ.get("PYTHONPATH", ""), str(ROOT)) if p)),
                                   capture_output=True)
            if probe.returncode != 0:
                results[config] = [{"config": config, "error": "trainer_client.streaming not available (skipped)"}]
                continue
        results[config] = run_config(a, config)
    if a.json:
        a.json.write_text(json.dumps(results, indent=2))
    mib = 2**20
    plain = results.get("plain", [{}])[0]
    print(f"# {a.arch}, {a.image_size}x{a.image_size}, batch {a.batch_size}, float32, device {a.device}, "
          f"{os.cpu_count()} cores, {a.threads or 'cores/ranks'} thread(s) per process, "
          f"mean of {a.steps} steps after 1 warm-up")
    print("| config | ranks | peak MiB (max rank) | peak vs plain/N | end-of-forward MiB | fwd vs plain/N "
          "| halo MiB | step s | notes |")
    print("|---|---|---|---|---|---|---|---|---|")
    goals = []
    for config, rows in results.items():
        if "error" in rows[0]:
            print(f"| {config} | - | - | - | - | - | - | - | {rows[0]['error']} |")
            continue
        n = len(rows)
        peak = max(r["peak_bytes"] for r in rows)
        fwd = max(r["forward_bytes"] for r in rows)
        halo = max(r.get("halo_bytes", 0) for r in rows)
        step = max(r["step_s"] for r in rows)
        ratio_p = f"{peak / (plain['peak_bytes'] / n):.3f}" if "peak_bytes" in plain else "-"
        ratio_f = f"{fwd / (plain['forward_bytes'] / n):.3f}" if plain.get("forward_bytes") else "-"
        notes = ", ".join(f"{k}={v}" for k, v in rows[0].items()
                          if k in ("grid", "groups", "note", "offloaded_bytes", "estimated_activation_bytes"))
        print(f"| {config} | {n} | {peak / mib:.1f} | {ratio_p} | {fwd / mib:.1f} | {ratio_f} | {halo / mib:.1f} "
              f"| {step:.2f} | {notes} |")
        if n > 1 and "peak_bytes" in plain:
            for label, got, ref in (("peak", peak, plain["peak_bytes"]), ("end-of-forward", fwd, plain["forward_bytes"])):
                target = 1.1 * ref / n + halo
                goals.append(f"{config} {label}: {got / mib:.1f} MiB per rank vs goal 1.1*plain/N + halo = "
                             f"{target / mib:.1f} MiB -> {'met' if got <= target else 'NOT met'}")
    for g in goals:
        print(g)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
