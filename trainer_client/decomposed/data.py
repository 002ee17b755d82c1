"""Cutting batches into spatial shards, and a deterministic synthetic data source.

``shard_batch`` is the seam with the loader service: when the service's ``shard`` view is ready,
it returns exactly what ``shard_batch`` returns (this rank's block of every image, cut with
:func:`~trainer_client.decomposed.groups.partition`) without the full image ever reaching the rank.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from trainer_client.decomposed.groups import SpatialGroup, partition

__all__ = ["SyntheticImages", "gather_shards", "shard_batch"]


def shard_batch(images: Tensor, group: SpatialGroup) -> Tensor:
    """This rank's block ``[..., r0:r1, c0:c1]`` of an NCHW (or CHW) batch, as a new contiguous tensor."""
    if images.dim() < 2:
        raise ValueError(f"expected at least 2 dims (H, W), got shape {tuple(images.shape)}")
    h, w = images.shape[-2], images.shape[-1]
    r0, r1 = partition(h, group.rows)[group.row]
    c0, c1 = partition(w, group.cols)[group.col]
    if r1 <= r0 or c1 <= c0:
        raise ValueError(f"a {h}x{w} image is too small for a {group.rows}x{group.cols} grid")
    return images[..., r0:r1, c0:c1].clone()


def gather_shards(local: Tensor, group: SpatialGroup, image_hw: tuple[int, int]) -> Tensor:
    """Inverse of ``shard_batch`` on every rank (all-gather; for tests, checks and small outputs)."""
    rows = partition(image_hw[0], group.rows)
    cols = partition(image_hw[1], group.cols)
    parts = []
    for i in range(group.size):
        r0, r1 = rows[i // group.cols]
        c0, c1 = cols[i % group.cols]
        parts.append(torch.empty((*local.shape[:-2], r1 - r0, c1 - c0), dtype=local.dtype, device=local.device))
    if group.size == 1:
        parts[0].copy_(local)
    else:
        # all_gather needs equal sizes: gather padded blocks, then crop.
        hmax = max(b - a for a, b in rows)
        wmax = max(b - a for a, b in cols)
        padded = local.new_zeros((*local.shape[:-2], hmax, wmax))
        padded[..., : local.shape[-2], : local.shape[-1]] = local
        bufs = [torch.empty_like(padded) for _ in range(group.size)]
        work = dist.all_gather(bufs, padded.contiguous(), group=group.group, async_op=True)
        assert work is not None
        work.wait(group.timeout)
        for p, b in zip(parts, bufs):
            p.copy_(b[..., : p.shape[-2], : p.shape[-1]])
    full = local.new_empty((*local.shape[:-2], *image_hw))
    for i, p in enumerate(parts):
        r0, r1 = rows[i // group.cols]
        c0, c1 = cols[i % group.cols]
        full[..., r0:r1, c0:c1] = p
    return full


@dataclass(frozen=True)
class SyntheticImages:
    """Deterministic random images and labels: batch ``step`` of replica ``replica`` depends only on
    ``(seed, replica, step)``, so every rank of a spatial group draws the same images and cuts its shard."""

    seed: int
    batch_size: int
    image_hw: tuple[int, int]
    channels: int = 3
    num_classes: int = 1000
    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        if self.batch_size < 1 or min(self.image_hw) < 1 or self.channels < 1 or self.num_classes < 2:
            raise ValueError(f"invalid synthetic data settings: {self}")

    def batch(self, step: int, replica: int = 0) -> tuple[Tensor, Tensor]:
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + replica) * 1_000_003 + step)
        images = torch.randn((self.batch_size, self.channels, *self.image_hw), generator=gen, dtype=self.dtype)
        labels = torch.randint(0, self.num_classes, (self.batch_size,), generator=gen)
        return images, labels

    def shards(self, group: SpatialGroup, replica: int = 0, start: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        step = start
        while True:
            images, labels = self.batch(step, replica)
            yield shard_batch(images, group), labels
            step += 1
