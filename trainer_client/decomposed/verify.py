"""Equivalence harness: run decomposed networks on real gloo processes and compare with one rank.

Used by ``tests/test_decomposed.py``; also runnable by hand::

    python -m trainer_client.decomposed.verify --launch 4 --out /tmp/verify

Each worker writes, per case, the replicated output, the loss, every reduced parameter gradient,
the gathered input gradient and the buffers; :func:`reference` computes the same on one process.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.resnet import Bottleneck, ResNet, resnet18, resnet50

from trainer_client.decomposed.data import gather_shards, shard_batch
from trainer_client.decomposed.geometry import plan_axis
from trainer_client.decomposed.groups import SpatialGroup, init_layout
from trainer_client.decomposed.halo import HaloSpec, HaloStash, Link, all_reduce_, halo_exchange, rebuild_from_stash
from trainer_client.decomposed.model import decompose

__all__ = ["Case", "CASES", "build_model", "launch", "make_batch", "reference", "run_worker"]

_LOG = logging.getLogger(__name__)


class _SlimBottleneck(Bottleneck):
    """ResNet-50's block structure (1x1, strided 3x3, 1x1, projection shortcut) at reduced width."""

    expansion = 2


@dataclass(frozen=True)
class Case:
    name: str
    arch: str
    image_hw: tuple[int, int]
    batch: int
    seed: int = 0

    def __post_init__(self) -> None:
        if self.arch not in ("resnet18", "resnet50", "resnet50_slim"):
            raise ValueError(f"unknown arch {self.arch}")


CASES: dict[str, Case] = {c.name: c for c in (
    Case("r18", "resnet18", (97, 123), 2, 1),
    Case("r50slim", "resnet50_slim", (97, 123), 2, 2),
    Case("r50", "resnet50", (67, 45), 1, 3),
    Case("dp_r18", "resnet18", (61, 70), 2, 4),
)}

# (phase, grid) -> cases; phase "A" uses all 4 ranks, "B" runs 1x2 on ranks 0-1 and 2x1 on ranks 2-3.
SUITE: dict[str, tuple[str, ...]] = {
    "2x2": ("r18", "r50slim", "r50"),
    "1x2": ("r18", "r50slim"),
    "2x1": ("r18", "r50slim"),
}


def build_model(arch: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    if arch == "resnet18":
        model: nn.Module = resnet18(weights=None, num_classes=10)
    elif arch == "resnet50":
        model = resnet50(weights=None, num_classes=10)
    else:
        model = ResNet(_SlimBottleneck, [3, 4, 6, 3], num_classes=10, width_per_group=16)
    model = model.double()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # non-trivial affine parameters and running stats
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=gen, dtype=torch.float64))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen, dtype=torch.float64))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=gen, dtype=torch.float64))
    return model


def make_batch(case: Case, replica: int = 0) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(1000 + case.seed * 10 + replica)
    images = torch.randn((case.batch, 3, *case.image_hw), generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 10, (case.batch,), generator=gen)
    return images, labels


def _result(model: nn.Module, out: Tensor, loss: Tensor, gx: Tensor, eval_out: Tensor) -> dict[str, Any]:
    return {
        "out": out.detach().clone(),
        "loss": loss.detach().clone(),
        "grads": {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None},
        "input_grad": gx.detach().clone(),
        "buffers": {n: b.detach().clone() for n, b in model.named_buffers()},
        "eval_out": eval_out.detach().clone(),
    }


def reference(case: Case, replica: int = 0) -> dict[str, Any]:
    """One-process result for a case (training-mode forward/backward, then an eval forward)."""
    model = build_model(case.arch, case.seed)
    images, labels = make_batch(case, replica)
    x = images.clone().requires_grad_()
    out = model(x)
    loss = F.cross_entropy(out, labels)
    loss.backward()
    assert x.grad is not None
    with torch.no_grad():
        eval_out = model.eval()(images)
    return _result(model, out, loss, x.grad, eval_out)


def _run_case(case: Case, spatial: SpatialGroup, replica: int = 0, dp: Any = None, replicas: int = 1) -> dict[str, Any]:
    model = build_model(case.arch, case.seed)
    images, labels = make_batch(case, replica)
    net = decompose(model, spatial)
    x = shard_batch(images, spatial).requires_grad_()
    out = net(x)  # global size found by all-gather
    loss = F.cross_entropy(out, labels)
    loss.backward()
    net.reduce_gradients(dp, replicas)
    assert x.grad is not None
    gx = gather_shards(x.grad, spatial, case.image_hw)
    with torch.no_grad():
        eval_out = net.eval()(x.detach(), image_size=case.image_hw)
    return _result(net.module, out, loss, gx, eval_out)


def _adjoint(spatial: SpatialGroup) -> dict[str, float]:
    """<A x, y> vs <x, A^T y> for halo exchanges of a few layer shapes on a 2-D grid."""
    link = Link(spatial.group, spatial.size, spatial.timeout)
    res: dict[str, float] = {}
    gen = torch.Generator().manual_seed(7 + spatial.index)
    for k, s, p, d in ((3, 1, 1, 1), (7, 2, 3, 1), (3, 2, 2, 2), (1, 2, 0, 1)):
        hw = (23, 19)
        outs = [(n + 2 * p - d * (k - 1) - 1) // s + 1 for n in hw]
        rows = plan_axis("adj", "row", hw[0], outs[0], spatial.rows, k, s, p, d)[spatial.row]
        cols = plan_axis("adj", "col", hw[1], outs[1], spatial.cols, k, s, p, d)[spatial.col]
        sp = spatial
        spec = HaloSpec(rows, cols,
                        sp.rank_at(sp.row - 1, sp.col) if sp.row else None,
                        sp.rank_at(sp.row + 1, sp.col) if sp.row < sp.rows - 1 else None,
                        sp.rank_at(sp.row, sp.col - 1) if sp.col else None,
                        sp.rank_at(sp.row, sp.col + 1) if sp.col < sp.cols - 1 else None)
        x = torch.randn((2, 3, rows.size, cols.size), generator=gen, dtype=torch.float64, requires_grad=True)
        stash = HaloStash()
        ax = halo_exchange(x, spec, link, stash)
        y = torch.randn(ax.shape, generator=gen, dtype=torch.float64)
        ax.backward(y)
        assert x.grad is not None
        rebuilt = rebuild_from_stash(x.detach(), spec, stash)
        sums = torch.stack([(ax.detach() * y).sum(), (x.detach() * x.grad).sum(),
                            (rebuilt - ax.detach()).abs().max()])
        all_reduce_(sums, link)
        res[f"k{k}s{s}p{p}d{d}"] = abs(float(sums[0] - sums[1])) / abs(float(sums[0]))
        res[f"rebuild_k{k}s{s}p{p}d{d}"] = float(sums[2])
    return res


def run_worker(rank: int, world: int, port: int, out_dir: Path) -> None:
    """The 4-rank suite: 2x2, then 1x2 and 2x1 side by side, then 2 replicas x 1x2, adjoint and errors."""
    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=180)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timeout)
    try:
        results: dict[str, Any] = {}
        grid22 = SpatialGroup.from_process_group(2, 2, None, timeout)
        for name in SUITE["2x2"]:
            r = _run_case(CASES[name], grid22)
            if rank == 0:
                results[f"2x2/{name}"] = r
        results_adj = _adjoint(grid22)
        g01 = dist.new_group([0, 1], timeout=timeout)
        g23 = dist.new_group([2, 3], timeout=timeout)
        grid = "1x2" if rank < 2 else "2x1"
        spatial = SpatialGroup.from_process_group(*((1, 2) if rank < 2 else (2, 1)), g01 if rank < 2 else g23, timeout)
        for name in SUITE[grid]:
            r = _run_case(CASES[name], spatial)
            if spatial.index == 0:
                results[f"{grid}/{name}"] = r
        layout = init_layout(2, 1, 2, timeout)
        r = _run_case(CASES["dp_r18"], layout.spatial, layout.replica, layout.data_parallel, layout.replicas)
        if rank == 0:
            results["dp2x1x2/dp_r18"] = r
        errors: dict[str, str] = {}
        try:
            SpatialGroup.from_process_group(3, 1, None, timeout)
        except ValueError as e:
            errors["grid"] = str(e)
        if rank == 0:
            results["adjoint"] = results_adj
            results["errors"] = errors
        dist.barrier()
        torch.save(results, out_dir / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(world: int, out_dir: Path, timeout_s: float = 600.0) -> None:
    """Start ``world`` worker processes on loopback and wait for them (raises on failure)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    procs = [subprocess.Popen([sys.executable, "-m", "trainer_client.decomposed.verify", "--rank", str(r),
                               "--world", str(world), "--port", str(port), "--out", str(out_dir)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for r in range(world)]
    logs: list[str] = []
    failed = False
    for r, p in enumerate(procs):
        try:
            out, _ = p.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise RuntimeError(f"rank {r} timed out after {timeout_s}s") from None
        logs.append(f"--- rank {r} (rc={p.returncode}) ---\n{out.decode(errors='replace')[-4000:]}")
        failed |= p.returncode != 0
    if failed:
        raise RuntimeError("worker failure:\n" + "\n".join(logs))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rank", type=int)
    ap.add_argument("--world", type=int, default=4)
    ap.add_argument("--port", type=int)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--launch", type=int, help="start this many workers (must be 4)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    if a.launch:
        launch(a.launch, a.out)
    else:
        run_worker(a.rank, a.world, a.port, a.out)


if __name__ == "__main__":
    main()
