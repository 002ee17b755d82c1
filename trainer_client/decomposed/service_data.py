"""Feeding a decomposed ResNet from the loader service's `shard` view.

Every rank of one spatial group opens the same stream (the data-parallel replica's rank and world size) with
its own grid cell, so each step the group's ranks receive the same sample, each only its own part of it. The
partition is the one ``decompose`` uses (``i * n // parts``), so a shard is exactly the block the rank owns.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from trainer_client.client import LoaderClient
from trainer_client.config import StreamConfig
from trainer_client.decomposed.groups import SpatialGroup

__all__ = ["ServiceShards"]


class ServiceShards:
    """Batches of this rank's shard from a service: ``batch(step)`` -> (shard NCHW float, labels)."""

    def __init__(self, endpoint: str, dataset: str, image_hw: tuple[int, int], batch_size: int, seed: int,
                 group: SpatialGroup, replica: int, replicas: int, samples_per_epoch: int, dtype: torch.dtype) -> None:
        self.batch_size, self.dtype = batch_size, dtype
        self.client = LoaderClient(endpoint)
        config = StreamConfig(dataset=dataset, batch_size=1, view="shard", region_height=image_hw[0],
                              region_width=image_hw[1], grid=(group.rows, group.cols), shard=(group.row, group.col),
                              samples_per_epoch=samples_per_epoch, seed=seed, dtype="float32",
                              mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), tissue_threshold=0.2,
                              augment_config={"rot90": image_hw[0] == image_hw[1]}, transport="auto")
        self.stream = self.client.stream(config, rank=replica, world_size=replicas)
        self._it: Iterator[dict[str, Any]] | None = None
        self.image_hw = image_hw

    def seek(self, step: int) -> None:
        """Resume at a global step: samples are a function of (seed, epoch, index), so the cursor is derived."""
        consumed = step * self.batch_size
        shard = max(1, self.stream.config.samples_per_epoch // max(1, self.stream.world_size))
        self.stream.load_state_dict({**self.stream.state_dict(), "epoch": consumed // shard, "cursor": consumed % shard})
        self._it = None

    def _next(self) -> dict[str, Any]:
        while True:
            if self._it is None:
                self._it = iter(self.stream)
            try:
                return next(self._it)
            except StopIteration:  # end of epoch: the stream moved to the next one
                self._it = None

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        pieces = [self._next() for _ in range(self.batch_size)]
        for piece in pieces:
            if tuple(piece["piece"]["image_hw"]) != self.image_hw:
                raise ValueError(f"the service sent a {piece['piece']['image_hw']} image for a {self.image_hw} model "
                                 "input; use a square --image-size or disable rot90")
        x = torch.cat([p["images"] for p in pieces]).to(self.dtype)
        y = torch.cat([p["labels"] for p in pieces])
        return x, y

    def close(self) -> None:
        self.stream.close()
        self.client.close()
