"""Recompute by layer groups sized from a working-set budget.

Each group of consecutive blocks runs under ``torch.utils.checkpoint`` (``use_reentrant=False``):
only the group's input is kept, and the group is re-run in backward.  Peak memory is about the
sum of group inputs plus the largest group's activations, so the budget trades memory for the
number of boundaries kept.  Buffers (batch-norm running statistics) are restored after the
re-run, so gradients *and* running statistics match plain training exactly.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from trainer_client.memory.blocks import BlockChain, activation_bytes, check_groups, plan_groups

__all__ = ["GroupedRecompute", "RecomputeConfig"]

_LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class RecomputeConfig:
    """``budget_bytes``: the activation working set allowed per group (measured per block on the meta
    device for the actual input shape).  ``groups``: explicit ``[start, stop)`` block ranges instead."""

    budget_bytes: int | None = None
    groups: tuple[tuple[int, int], ...] | None = None

    def __post_init__(self) -> None:
        if (self.budget_bytes is None) == (self.groups is None):
            raise ValueError("give exactly one of budget_bytes or groups")
        if self.budget_bytes is not None and self.budget_bytes <= 0:
            raise ValueError(f"budget_bytes must be positive, got {self.budget_bytes}")
        check_groups(self.groups)


@contextlib.contextmanager
def _restore_buffers(modules: Sequence[nn.Module]) -> Iterator[None]:
    buffers = [b for m in modules for b in m.buffers()]
    saved = [b.detach().clone() for b in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, s in zip(buffers, saved):
                b.copy_(s)


class GroupedRecompute(nn.Module):
    """Run ``blocks`` (e.g. ``sequential_blocks(resnet)``) in checkpointed groups."""

    def __init__(self, blocks: Sequence[nn.Module], config: RecomputeConfig) -> None:
        super().__init__()
        self.chain = BlockChain(blocks)
        self.config = config
        if config.groups is not None and config.groups[-1][1] != len(blocks):
            raise ValueError(f"groups cover {config.groups[-1][1]} blocks but there are {len(blocks)}")
        self._plans: dict[tuple[tuple[int, ...], torch.dtype], tuple[tuple[int, int], ...]] = {}

    def groups_for(self, x: Tensor) -> tuple[tuple[int, int], ...]:
        if self.config.groups is not None:
            return self.config.groups
        key = (tuple(x.shape), x.dtype)
        plan = self._plans.get(key)
        if plan is None:
            assert self.config.budget_bytes is not None
            sizes = activation_bytes(list(self.chain.blocks), x.shape, x.dtype)
            plan = plan_groups(sizes, self.config.budget_bytes)
            self._plans[key] = plan
            _LOG.info("recompute groups for %s: %s (block activations %s MiB, budget %.1f MiB)", tuple(x.shape),
                      plan, [round(s / 2**20, 1) for s in sizes], self.config.budget_bytes / 2**20)
        return plan

    def forward(self, x: Tensor) -> Tensor:
        if not torch.is_grad_enabled():
            return self.chain(x)
        for start, stop in self.groups_for(x):
            mods = list(self.chain.blocks[start:stop])

            def ctx_fn(mods: list[nn.Module] = mods) -> tuple[contextlib.AbstractContextManager[None],
                                                               contextlib.AbstractContextManager[None]]:
                return contextlib.nullcontext(), _restore_buffers(mods)

            x = checkpoint(self.chain.run, start, stop, x, use_reentrant=False, context_fn=ctx_fn)
        return x
