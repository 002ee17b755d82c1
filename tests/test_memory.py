"""Memory strategies give exactly the gradients (and running statistics) of plain training."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from trainer_client.memory import (
    ENV_VAR,
    ActivationOffload,
    AllocatorConfig,
    GroupedRecompute,
    OffloadConfig,
    RecomputeConfig,
    activation_bytes,
    apply_allocator_config,
    plan_groups,
    sequential_blocks,
)

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()


def _base(dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None, num_classes=10).to(dtype)


def _run(base: nn.Module, make: Callable[[nn.Module], nn.Module], device: str = "cpu",
         dtype: torch.dtype = torch.float64, steps: int = 2) -> dict[str, Any]:
    model = copy.deepcopy(base).to(device)
    net = make(model)
    gen = torch.Generator().manual_seed(1)
    out: dict[str, Any] = {}
    for step in range(steps):  # two steps: the second uses updated running stats / weights
        x = torch.randn((2, 3, 64, 72), generator=gen, dtype=dtype).to(device).requires_grad_()
        y = torch.randint(0, 10, (2,), generator=gen).to(device)
        model.zero_grad(set_to_none=True)
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.01 * p.grad
        out = {"loss": loss.detach().cpu(), "x": x.grad.detach().cpu(),
               "grads": {n: p.grad.detach().cpu() for n, p in model.named_parameters()},
               "buffers": {n: b.detach().cpu() for n, b in model.named_buffers()}}
    return out


def _assert_identical(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert torch.equal(a["loss"], b["loss"])
    assert torch.equal(a["x"], b["x"])
    for n, g in b["grads"].items():
        assert torch.equal(a["grads"][n], g), n
    for n, v in b["buffers"].items():
        assert torch.equal(a["buffers"][n], v), n


@pytest.fixture(scope="module")
def base() -> nn.Module:
    return _base()


@pytest.fixture(scope="module")
def plain(base: nn.Module) -> dict[str, Any]:
    return _run(base, lambda m: m)


@pytest.mark.parametrize("budget", [1, 600_000, 10**12])
def test_grouped_recompute_identical(base: nn.Module, plain: dict[str, Any], budget: int) -> None:
    _assert_identical(_run(base, lambda m: GroupedRecompute(sequential_blocks(m), RecomputeConfig(budget))), plain)


def test_recompute_explicit_groups(base: nn.Module, plain: dict[str, Any]) -> None:
    cfg = RecomputeConfig(groups=((0, 3), (3, 9), (9, 10)))
    _assert_identical(_run(base, lambda m: GroupedRecompute(sequential_blocks(m), cfg)), plain)


@pytest.mark.parametrize("cfg", [OffloadConfig(offload_on_cpu=True, min_bytes=0),
                                 OffloadConfig(offload_on_cpu=True, keep_last_group=False, prefetch=False,
                                               groups=((0, 4), (4, 10))),
                                 OffloadConfig()], ids=["copy-per-block", "copy-two-groups", "cpu-noop"])
def test_offload_identical(base: nn.Module, plain: dict[str, Any], cfg: OffloadConfig) -> None:
    holder: list[ActivationOffload] = []

    def make(m: nn.Module) -> nn.Module:
        holder.append(ActivationOffload(sequential_blocks(m), cfg))
        return holder[0]

    _assert_identical(_run(base, make), plain)
    if cfg.offload_on_cpu:
        assert holder[0].offloaded_bytes > 0
    else:
        assert holder[0].offloaded_bytes == 0  # CPU: nothing to offload to


def test_plan_groups_respects_budget() -> None:
    assert plan_groups([5, 5, 5, 5], 10) == ((0, 2), (2, 4))
    assert plan_groups([20, 1, 1], 10) == ((0, 1), (1, 3))
    assert plan_groups([1, 1, 1], 100) == ((0, 3),)
    with pytest.raises(ValueError):
        plan_groups([1], 0)


def test_activation_bytes_estimate(base: nn.Module) -> None:
    blocks = sequential_blocks(base)
    sizes = activation_bytes(blocks, (1, 3, 128, 128), torch.float32)
    assert len(sizes) == len(blocks) and all(s > 0 for s in sizes)
    assert sizes[0] > sizes[-1]  # the stem at full resolution dominates the head
    # doubling the image area about doubles the convolutional blocks
    big = activation_bytes(blocks, (1, 3, 256, 128), torch.float32)
    assert 1.8 < big[1] / sizes[1] < 2.2


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        RecomputeConfig()
    with pytest.raises(ValueError, match="contiguous"):
        RecomputeConfig(groups=((0, 2), (3, 4)))
    with pytest.raises(ValueError, match="> 20"):
        AllocatorConfig(max_split_size_mb=8)
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        AllocatorConfig(garbage_collection_threshold=1.5)


def test_allocator_config_string_and_apply(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = AllocatorConfig(expandable_segments=True, max_split_size_mb=256, garbage_collection_threshold=0.8)
    assert cfg.to_env() == "expandable_segments:True,max_split_size_mb:256,garbage_collection_threshold:0.8"
    env: dict[str, str] = {}
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    assert apply_allocator_config(cfg, env) == cfg.to_env() and env[ENV_VAR] == cfg.to_env()
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    with pytest.raises(RuntimeError, match="already initialised"):
        apply_allocator_config(cfg, env)


_ALLOC_SCRIPT = """
import copy, os, sys, torch, torch.nn.functional as F, torchvision
from trainer_client.memory import AllocatorConfig, apply_allocator_config
value = apply_allocator_config(AllocatorConfig(expandable_segments=True, garbage_collection_threshold=0.6))
assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == value
dev = "cuda" if torch.cuda.is_available() else "cpu"
torch.manual_seed(0)
m = torchvision.models.resnet18(weights=None, num_classes=10).double().to(dev)
x = torch.randn(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(3)).to(dev)
F.cross_entropy(m(x), torch.tensor([1, 2], device=dev)).backward()
torch.save({n: p.grad.cpu() for n, p in m.named_parameters()}, sys.argv[1])
if dev == "cuda":
    try:
        apply_allocator_config(AllocatorConfig(max_split_size_mb=64))
    except RuntimeError:
        print("late-apply-rejected")
"""


def test_allocator_config_gives_identical_gradients(tmp_path: Path) -> None:
    """Fresh interpreter (the setting only takes effect before CUDA initialises)."""
    path = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH", ""), str(ROOT)) if p)
    env = dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1")
    env.pop(ENV_VAR, None)
    proc = subprocess.run([sys.executable, "-c", _ALLOC_SCRIPT, str(tmp_path / "g.pt")], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if CUDA:
        assert "late-apply-rejected" in proc.stdout
    got = torch.load(tmp_path / "g.pt", weights_only=True)
    torch.manual_seed(0)
    dev = "cuda" if CUDA else "cpu"
    m = torchvision.models.resnet18(weights=None, num_classes=10).double().to(dev)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(3)).to(dev)
    F.cross_entropy(m(x), torch.tensor([1, 2], device=dev)).backward()
    for n, p in m.named_parameters():
        assert p.grad is not None
        torch.testing.assert_close(got[n], p.grad.cpu(), rtol=1e-12, atol=1e-14)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("strategy", ["recompute", "offload", "offload-no-prefetch"])
def test_cuda_strategies_identical(strategy: str) -> None:
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    base = _base()
    plain = _run(base, lambda m: m, "cuda")
    makers: dict[str, Callable[[nn.Module], nn.Module]] = {
        "recompute": lambda m: GroupedRecompute(sequential_blocks(m), RecomputeConfig(600_000)),
        "offload": lambda m: ActivationOffload(sequential_blocks(m), OffloadConfig(min_bytes=0)),
        "offload-no-prefetch": lambda m: ActivationOffload(sequential_blocks(m), OffloadConfig(prefetch=False)),
    }
    _assert_identical(_run(base, makers[strategy], "cuda"), plain)
