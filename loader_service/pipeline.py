"""Building one batch: region reads on the read pool, straight into the batch buffer, then augmentation.

Pixels are written once by the decoder into the batch buffer (pinned host memory when the service has a
GPU). Augmentation runs batch-wise on tensors, on the service's GPU when it has one. The result comes back
to the CPU, except with ``on_device=True`` (CUDA IPC sessions: the batch stays on the service's device).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial

import numpy as np
import torch

from loader_service.augment import (AugmentConfig, AugmentParams, Rect, augment_batch, draw_params, render_piece,
                                    resample_rect, to_nchw, to_output)
from loader_service.dataset import SlideHandles
from loader_service.errors import OutOfRange, SlideFailure
from loader_service.metrics import Metrics
from loader_service.sampling import Sample
from loader_service.slides import MppOutOfRange, SlideError
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
    images: torch.Tensor  # contiguous, in the requested dtype and layout; on the CPU unless built on_device
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
        except MppOutOfRange as err:
            raise OutOfRange(f"slide {sample.record.slide_id}: {err}") from err
        except SlideError as err:
            raise SlideFailure(f"slide {sample.record.slide_id} failed while reading: {err}") from err

    def read(self, samples: list[Sample], params: list[AugmentParams] | None = None) -> torch.Tensor:
        """Decode the samples' regions into one uint8 NHWC tensor (pinned when the device is a GPU).

        Patches cut from one locality region (``Sample.region``) are read together: one read of their
        bounding box (inside the region), then cut, when that touches no more tiles than reading them one by one.
        Samples whose ``params`` set an image-level scale or crop are resampled from the slide around their
        region (``augment.resample``), each on its own.
        """
        first = samples[0]
        shape = (len(samples), first.height, first.width, 3)
        buffer = torch.empty(shape, dtype=torch.uint8, pin_memory=self.device.type == "cuda")
        array = buffer.numpy()
        params = params or [AugmentParams()] * len(samples)
        tasks: list[Callable[[], None]] = [partial(self._read_resampled, s, p, array[i])
                                           for i, (s, p) in enumerate(zip(samples, params)) if not p.resample_is_identity]
        plain = [i for i, p in enumerate(params) if p.resample_is_identity]
        for group in _region_groups([samples[i] for i in plain]):
            idx = [plain[g] for g in group]
            if len(idx) == 1:
                tasks.append(partial(self._read_one, samples[idx[0]], array[idx[0]]))
            else:
                tasks.append(partial(self._read_cut, [samples[i] for i in idx], [array[i] for i in idx]))
        for future in [self.read_pool.submit(task) for task in tasks]:
            future.result()
        self.metrics.samples_decoded.inc(len(samples))
        return buffer

    def _read_resampled(self, sample: Sample, params: AugmentParams, out: np.ndarray) -> None:
        whole = Rect(0, 0, sample.height, sample.width)
        out[...] = resample_rect(params, (sample.height, sample.width), whole,
                                 lambda rect: self._read_rect(sample, rect)).numpy()

    def _read_cut(self, samples: list[Sample], outs: list[np.ndarray]) -> None:
        """Patches of one region: read their bounding box once and cut them from it (pixels as read alone)."""
        x0, y0 = min(s.x for s in samples), min(s.y for s in samples)
        x1, y1 = max(s.x + s.width for s in samples), max(s.y + s.height for s in samples)
        if not (self._cuttable(samples[0]) and _box_pays(samples, (x0, y0, x1, y1))):
            for sample, out in zip(samples, outs):
                self._read_one(sample, out)
            return
        block = np.empty((y1 - y0, x1 - x0, 3), dtype=np.uint8)
        self._read_one(replace(samples[0], x=x0, y=y0, width=x1 - x0, height=y1 - y0), block)
        for sample, out in zip(samples, outs):
            out[...] = block[sample.y - y0:sample.y - y0 + sample.height, sample.x - x0:sample.x - x0 + sample.width]

    def _cuttable(self, sample: Sample) -> bool:
        """Whether a patch cut from a larger read equals the patch read alone (false when resampled to an mpp)."""
        if sample.record.info is None or sample.mpp <= 0 or sample.mpp == _level_mpp(sample):
            return True
        try:
            return self.handles.get(sample.record.path).level_for_mpp(sample.mpp)[1] == 1.0
        except (SlideError, ValueError):
            return False  # read one by one: each read reports the failure

    def _read_rect(self, sample: Sample, rect: Rect) -> np.ndarray:
        """``rect`` in the sample's region coordinates (may reach outside the region; white outside the slide)."""
        out = np.empty((rect.height, rect.width, 3), dtype=np.uint8)
        self._read_one(sample, out, rect)
        return out

    def build(self, samples: list[Sample], labels: list[int], augment: AugmentConfig | None, seed: int, epoch: int,
              output: OutputSpec, on_device: bool = False) -> BuiltBatch:
        """One batch of augmented images; on the service's device with ``on_device``, else on the CPU."""
        t0 = time.perf_counter()
        params = [draw_params(augment, seed, epoch, s.global_index) for s in samples] if augment is not None else []
        pixels = self.read(samples, params)
        t1 = time.perf_counter()
        batch = pixels.to(self.device, non_blocking=True)
        if augment is not None:
            images = augment_batch(batch, params)  # uint8 NCHW
        elif output.dtype == "uint8" and not output.channels_last:
            images = to_nchw(batch)  # the one copy this batch needs, without torch's slow 3-channel transpose
        else:
            images = batch.permute(0, 3, 1, 2)  # to_output / channels_last make the copy (or none)
        images = to_output(images, output.dtype, output.mean or None, output.std or None)
        if output.channels_last:
            images = images.permute(0, 2, 3, 1)
        images = _placed(images, on_device)
        t2 = time.perf_counter()
        self.metrics.stage_seconds.labels(stage="read").observe(t1 - t0)
        self.metrics.stage_seconds.labels(stage="augment").observe(t2 - t1)
        return BuiltBatch(images, torch.tensor(labels, dtype=torch.int64), samples, {"read": t1 - t0, "augment": t2 - t1})


    def build_piece(self, samples: list[Sample], labels: list[int], augment: AugmentConfig | None, seed: int,
                    epoch: int, output: OutputSpec, piece: PieceSpec, on_device: bool = False) -> BuiltBatch:
        """One piece (tile or shard) of one sample's augmented image, reading only the raw pixels it needs.

        On the service's device with ``on_device``, else on the CPU.
        """
        sample = samples[0]
        t0 = time.perf_counter()
        params = draw_params(augment, seed, epoch, sample.global_index) if augment is not None else AugmentParams()

        chw = render_piece(params, (sample.height, sample.width), piece.rect,
                           lambda rect: self._read_rect(sample, rect), self.device)
        images = to_output(chw[None], output.dtype, output.mean or None, output.std or None)
        if output.channels_last:
            images = images.permute(0, 2, 3, 1)
        images = _placed(images, on_device)
        self.metrics.samples_decoded.inc(1 if piece.index == 0 else 0)
        self.metrics.stage_seconds.labels(stage="read").observe(time.perf_counter() - t0)
        return BuiltBatch(images, torch.tensor(labels, dtype=torch.int64), samples, piece=piece)


def _placed(images: torch.Tensor, on_device: bool) -> torch.Tensor:
    """The finished batch, contiguous: where it was built (the service's device) or copied to the CPU."""
    images = images.contiguous()
    return images if on_device else images.cpu()


def _region_groups(samples: list[Sample]) -> list[list[int]]:
    """Indices of the samples grouped by locality region (slide, level, mpp, region), in first-seen order."""
    groups: dict[object, list[int]] = {}
    for i, s in enumerate(samples):
        key = (s.record.path, s.level, s.mpp, s.region) if s.region is not None else i
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def _box_pays(samples: list[Sample], box: tuple[int, int, int, int]) -> bool:
    """Reading ``box`` (x0, y0, x1, y1) once decodes no more tiles than reading the patches one by one looks up."""
    info = samples[0].record.info
    if info is None:
        return True
    level = info.levels[samples[0].level]
    tw, th = level.tile_width, level.tile_height

    def tiles(x0: int, y0: int, x1: int, y1: int) -> int:
        return ((x1 - 1) // tw - x0 // tw + 1) * ((y1 - 1) // th - y0 // th + 1)

    return tiles(*box) <= sum(tiles(s.x, s.y, s.x + s.width, s.y + s.height) for s in samples)


def _level_mpp(sample: Sample) -> float:
    info = sample.record.info
    assert info is not None
    return (info.mpp or 0.0) * info.levels[sample.level].downsample
