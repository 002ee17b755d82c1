"""Building one batch: region reads on the read pool, straight into the batch buffer, then augmentation.

Pixels are written once by the decoder into the batch buffer (pinned host memory when the service has a
GPU). Augmentation runs batch-wise on tensors, on the service's GPU when it has one.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from loader_service.augment import (AugmentConfig, AugmentParams, Rect, augment_batch, draw_params, render_piece,
                                    resample_rect, to_output)
from loader_service.dataset import SlideHandles
from loader_service.errors import SlideFailure
from loader_service.metrics import Metrics
from loader_service.sampling import Sample
from loader_service.slides import SlideError
from loader_service.views import PieceSpec

__all__ = ["OutputSpec", "BuiltBatch", "BatchBuilder", "resolve_device"]

_DTYPES = ("uint8", "float16", "float32")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available here; use --device cpu or auto")
    return device


@dataclass(frozen=True)
class OutputSpec:
    dtype: str = "uint8"
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    channels_last: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"output dtype must be one of {_DTYPES}, got {self.dtype!r}")
        if len(self.mean) != len(self.std) or len(self.mean) not in (0, 1, 3):
            raise ValueError("mean and std must both be empty, or both have 1 or 3 values (one per channel)")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std values must be > 0, got {self.std}")
        if self.dtype == "uint8" and self.mean:
            raise ValueError("normalisation (mean/std) needs a float output dtype: float16 or float32")


@dataclass
class BuiltBatch:
    images: torch.Tensor  # on the CPU, contiguous, in the requested dtype and layout
    labels: torch.Tensor  # int64
    samples: list[Sample]
    timings: dict[str, float] = field(default_factory=dict)
    piece: PieceSpec | None = None  # tiles/shard views: where these pixels lie in the augmented image


class BatchBuilder:
    """Reads, decodes and augments batches; shared by every session of the server."""

    def __init__(self, handles: SlideHandles, read_pool: ThreadPoolExecutor, device: torch.device, metrics: Metrics) -> None:
        self.handles = handles
        self.read_pool = read_pool
        self.device = device
        self.metrics = metrics

    def _read_one(self, sample: Sample, out: np.ndarray, rect: Rect | None = None) -> None:
        """Read the sample's region (or ``rect`` of it, in region coordinates) into ``out``."""
        x, y, w, h = sample.x, sample.y, sample.width, sample.height
        if rect is not None:
            x, y, w, h = x + rect.x, y + rect.y, rect.width, rect.height
        slide = self.handles.get(sample.record.path)
        try:
            if sample.record.info is not None and sample.mpp > 0 and sample.mpp != _level_mpp(sample):
                slide.read_region_mpp(sample.mpp, x, y, w, h, out=out)
            else:
                slide.read_region(sample.level, x, y, w, h, out=out)
        except SlideError as err:
            raise SlideFailure(f"slide {sample.record.slide_id} failed while reading: {err}") from err

    def read(self, samples: list[Sample]) -> torch.Tensor:
        """Decode the samples' regions into one uint8 NHWC tensor (pinned when the device is a GPU)."""
        first = samples[0]
        shape = (len(samples), first.height, first.width, 3)
        pin = self.device.type == "cuda"
        buffer = torch.empty(shape, dtype=torch.uint8, pin_memory=pin)
        array = buffer.numpy()
        futures = [self.read_pool.submit(self._read_one, s, array[i]) for i, s in enumerate(samples)]
        for future in futures:
            future.result()
        self.metrics.samples_decoded.inc(len(samples))
        return buffer

    def read_resampled(self, samples: list[Sample], params: list[AugmentParams]) -> torch.Tensor:
        """Like :meth:`read`, with each sample's image-level scale and crop applied (``augment.resample``)."""
        first = samples[0]
        buffer = torch.empty((len(samples), first.height, first.width, 3), dtype=torch.uint8,
                             pin_memory=self.device.type == "cuda")
        array = buffer.numpy()

        def one(i: int) -> None:
            sample, hw = samples[i], (samples[i].height, samples[i].width)
            if params[i].resample_is_identity:
                self._read_one(sample, array[i])
                return
            whole = Rect(0, 0, sample.height, sample.width)
            array[i] = resample_rect(params[i], hw, whole, lambda rect: self._read_rect(sample, rect)).numpy()

        futures = [self.read_pool.submit(one, i) for i in range(len(samples))]
        for future in futures:
            future.result()
        self.metrics.samples_decoded.inc(len(samples))
        return buffer

    def _read_rect(self, sample: Sample, rect: Rect) -> np.ndarray:
        """``rect`` in the sample's region coordinates (may reach outside the region; white outside the slide)."""
        out = np.empty((rect.height, rect.width, 3), dtype=np.uint8)
        self._read_one(sample, out, rect)
        return out

    def build(self, samples: list[Sample], labels: list[int], augment: AugmentConfig | None, seed: int, epoch: int,
              output: OutputSpec) -> BuiltBatch:
        t0 = time.perf_counter()
        params = [draw_params(augment, seed, epoch, s.global_index) for s in samples] if augment is not None else []
        if any(not p.resample_is_identity for p in params):
            pixels = self.read_resampled(samples, params)
        else:
            pixels = self.read(samples)
        t1 = time.perf_counter()
        batch = pixels.to(self.device, non_blocking=True)
        if augment is not None:
            images = augment_batch(batch, params)  # uint8 NCHW
        else:
            images = batch.permute(0, 3, 1, 2)
        images = to_output(images, output.dtype, output.mean or None, output.std or None)
        if output.channels_last:
            images = images.permute(0, 2, 3, 1)
        images = images.contiguous().cpu()
        t2 = time.perf_counter()
        self.metrics.stage_seconds.labels(stage="read").observe(t1 - t0)
        self.metrics.stage_seconds.labels(stage="augment").observe(t2 - t1)
        return BuiltBatch(images, torch.tensor(labels, dtype=torch.int64), samples, {"read": t1 - t0, "augment": t2 - t1})


    def build_piece(self, samples: list[Sample], labels: list[int], augment: AugmentConfig | None, seed: int,
                    epoch: int, output: OutputSpec, piece: PieceSpec) -> BuiltBatch:
        """One piece (tile or shard) of one sample's augmented image, reading only the raw pixels it needs."""
        sample = samples[0]
        t0 = time.perf_counter()
        params = draw_params(augment, seed, epoch, sample.global_index) if augment is not None else AugmentParams()

        chw = render_piece(params, (sample.height, sample.width), piece.rect,
                           lambda rect: self._read_rect(sample, rect), self.device)
        images = to_output(chw[None], output.dtype, output.mean or None, output.std or None)
        if output.channels_last:
            images = images.permute(0, 2, 3, 1)
        images = images.contiguous().cpu()
        self.metrics.samples_decoded.inc(1 if piece.index == 0 else 0)
        self.metrics.stage_seconds.labels(stage="read").observe(time.perf_counter() - t0)
        return BuiltBatch(images, torch.tensor(labels, dtype=torch.int64), samples, piece=piece)


def _level_mpp(sample: Sample) -> float:
    info = sample.record.info
    assert info is not None
    return (info.mpp or 0.0) * info.levels[sample.level].downsample
