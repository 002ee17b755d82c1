"""`serve --synthetic`: batches of random pixels of the requested shape, with no slide read or decoded.

It shows what a transport delivers apart from the decode. The plan has the same interface as EpochPlan
(shards, cursor, labels), so sessions, credits and transports behave exactly as with real data.
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch

from loader_service.dataset import ManifestEntry, SlideRecord
from loader_service.errors import InvalidRequest
from loader_service.pipeline import BuiltBatch, OutputSpec
from loader_service.sampling.elastic import ResumeStages, ShardMap
from loader_service.sampling.plan import Sample
from loader_service.sampling.spec import SamplingSpec

__all__ = ["SYNTHETIC_DATASET", "SyntheticPlan", "SyntheticSource"]

SYNTHETIC_DATASET = "synthetic"
_RECORD = SlideRecord(ManifestEntry("synthetic", Path("synthetic"), "synthetic"), Path("synthetic"), None, None)


class SyntheticPlan:
    def __init__(self, spec: SamplingSpec, epoch: int, rank: int, world_size: int,
                 resume: ResumeStages | None = None) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise InvalidRequest(f"rank {rank} must be in 0..world_size-1 (world_size {world_size})")
        self.spec, self.epoch, self.rank, self.world_size = spec, epoch, rank, world_size
        self.labels = ["synthetic"]
        layout_world = (resume.base_world if resume else None) or world_size
        self.epoch_length = spec.samples_per_epoch - spec.samples_per_epoch % layout_world
        self._shards = ShardMap(self.epoch_length, rank, world_size, resume)
        self.shard_length = self._shards.shard_length

    def sample(self, shard_index: int) -> Sample:
        size = self.spec.patch_size
        return Sample(shard_index, self._shards.global_index(shard_index), _RECORD, 0, 0.0, 0, 0, size, size)

    def samples(self, start: int, stop: int) -> list[Sample]:
        return [self.sample(i) for i in range(start, stop)]

    def label_index(self, record: SlideRecord) -> int:
        return 0


class SyntheticSource:
    """Random pixels made once per (batch, shape, dtype) and reused: the cost left is the transport's."""

    def __init__(self) -> None:
        self._cache: dict[tuple[int, int, str, bool], torch.Tensor] = {}
        self._lock = threading.Lock()

    def build(self, samples: list[Sample], labels: list[int], output: OutputSpec, on_device: bool = False) -> BuiltBatch:
        """Cached random pixels, always on the CPU (``on_device`` is accepted like the real builder's: a CUDA slot
        pool copies them up)."""
        size = samples[0].height
        key = (len(samples), size, output.dtype, output.channels_last)
        with self._lock:
            images = self._cache.get(key)
            if images is None:
                generator = torch.Generator().manual_seed(0)
                shape = (len(samples), size, size, 3) if output.channels_last else (len(samples), 3, size, size)
                images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
                if output.dtype != "uint8":
                    images = images.to(getattr(torch, output.dtype)) / 255
                self._cache[key] = images
        return BuiltBatch(images, torch.tensor(labels, dtype=torch.int64), samples)
