"""Split a network into a chain of blocks (the unit of recompute and offload groups) and measure them."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor
from torchvision.models.resnet import ResNet

__all__ = ["BlockChain", "activation_bytes", "check_groups", "meta_copy", "plan_groups", "sequential_blocks"]


def sequential_blocks(model: nn.Module) -> list[nn.Module]:
    """The chain of blocks of a torchvision ResNet (stem, every residual block, head) or of an
    ``nn.Sequential``.  Modules are shared with ``model`` (no copy)."""
    if isinstance(model, ResNet):
        stem = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)
        head = nn.Sequential(model.avgpool, nn.Flatten(1), model.fc)
        body = [blk for layer in (model.layer1, model.layer2, model.layer3, model.layer4) for blk in layer]
        return [stem, *body, head]
    if isinstance(model, nn.Sequential):
        return list(model)
    raise ValueError(f"cannot split {type(model).__name__} into blocks; pass a torchvision ResNet, an "
                     "nn.Sequential or an explicit list of blocks")


class BlockChain(nn.Module):
    """``blocks[-1](...blocks[1](blocks[0](x)))``, run group by group (``groups`` partitions the blocks)."""

    def __init__(self, blocks: Sequence[nn.Module]) -> None:
        super().__init__()
        if not blocks:
            raise ValueError("need at least one block")
        self.blocks = nn.ModuleList(blocks)

    def run(self, start: int, stop: int, x: Tensor) -> Tensor:
        for blk in self.blocks[start:stop]:
            x = blk(x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        return self.run(0, len(self.blocks), x)


def check_groups(groups: tuple[tuple[int, int], ...] | None) -> None:
    """Block groups must be contiguous, non-empty ``[start, stop)`` ranges from 0."""
    prev = 0
    for a, b in groups or ():
        if a != prev or b <= a:
            raise ValueError(f"groups must be contiguous non-empty [start, stop) ranges from 0: {groups}")
        prev = b


def meta_copy(module: nn.Module) -> nn.Module:
    """Deep copy with every parameter and buffer on the meta device (no data copied)."""
    memo: dict[int, Any] = {}
    for t in itertools.chain(module.parameters(), module.buffers()):
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(meta, t.requires_grad) if isinstance(t, nn.Parameter) else meta
    return copy.deepcopy(module, memo)


def activation_bytes(blocks: Sequence[nn.Module], sample_shape: Sequence[int], dtype: torch.dtype) -> list[int]:
    """Bytes each block saves for backward in training mode (parameters excluded), for an input of
    ``sample_shape``: estimated on the meta device, so it costs no memory and no compute."""
    chain = meta_copy(nn.ModuleList(blocks))
    chain.train()
    sizes: list[int] = []
    keep: list[Tensor] = []
    x = torch.empty(tuple(sample_shape), device="meta", dtype=dtype, requires_grad=True)
    for blk in chain:
        seen: set[int] = set()
        total = [0]

        def pack(t: Tensor) -> Tensor:
            if not isinstance(t, nn.Parameter) and id(t) not in seen:
                seen.add(id(t))
                keep.append(t)  # keep ids unique while measuring
                total[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            x = blk(x)
        sizes.append(total[0])
    return sizes


def plan_groups(sizes: Sequence[int], budget_bytes: int) -> tuple[tuple[int, int], ...]:
    """Contiguous ``[start, stop)`` groups whose summed sizes stay within ``budget_bytes`` (a block
    larger than the budget gets a group of its own)."""
    if budget_bytes <= 0:
        raise ValueError(f"budget_bytes must be positive, got {budget_bytes}")
    groups: list[tuple[int, int]] = []
    start, acc = 0, 0
    for i, s in enumerate(sizes):
        if i > start and acc + s > budget_bytes:
            groups.append((start, i))
            start, acc = i, 0
        acc += s
    if sizes:
        groups.append((start, len(sizes)))
    return tuple(groups)
