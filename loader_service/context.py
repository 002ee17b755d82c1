"""Multi-scale context: per sample, patches at coarser resolutions centred on the same point, augmented alike.

A :class:`ContextScale` ``(factor, size)`` asks for a ``size``² patch at ``factor`` times the session grid's
downsample (a pyramid level within 1% of it, else a read at the matching µm/px), whose centre is the sample's
centre: top-left ``floor(centre / factor - size / 2)`` in that grid. Every scale of a sample gets the sample's
own :class:`AugmentParams` (flips, rot90, colour, HED, blur), so geometry is consistent across scales: flips and
rotations turn each patch about the shared centre. Image-level scale/crop are refused with context (they
resample one scale's window only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import torch

from loader_service.augment import AugmentParams, augment_batch, to_nchw, to_output
from loader_service.augment.stain import StainConfig, normalise_batch
from loader_service.errors import InvalidRequest, OutOfRange
from loader_service.sampling import Sample, sample_scale

__all__ = ["ContextScale", "context_sample", "check_context", "build_context", "resampled_mpp", "MAX_CONTEXT_SCALES"]

MAX_CONTEXT_SCALES = 4
_LEVEL_TOLERANCE = 0.01


@dataclass(frozen=True)
class ContextScale:
    factor: float  # times coarser than the session's grid
    size: int  # patch side at that resolution

    def __post_init__(self) -> None:
        if not (isinstance(self.factor, (int, float)) and math.isfinite(self.factor) and 1.0 <= self.factor <= 256.0):
            raise ValueError(f"context factor must be 1..256 (times coarser than the session's level), got {self.factor}")
        if not 8 <= self.size <= 4096:
            raise ValueError(f"context size must be 8..4096 pixels, got {self.size}")


def context_sample(sample: Sample, scale: ContextScale, by_mpp: bool) -> Sample:
    """The context patch of ``sample`` at ``scale`` as a Sample (its level/mpp/x/y say where it is read).
    ``by_mpp`` is unused: the grid is the sample's own (:func:`sample_scale`). Raises InvalidRequest when the
    slide has neither a level nor mpp metadata for that resolution."""
    info = sample.record.info
    assert info is not None
    grid_ds = sample_scale(sample)  # the sample's own grid: resampled for fallback samples, as the Labeller's
    want = grid_ds * scale.factor
    x = math.floor((2 * sample.x + sample.width) / (2 * scale.factor) - scale.size / 2)
    y = math.floor((2 * sample.y + sample.height) / (2 * scale.factor) - scale.size / 2)
    common = dict(x=x, y=y, width=scale.size, height=scale.size, region=None)
    for level, lv in enumerate(info.levels):
        if abs(lv.downsample / want - 1.0) < _LEVEL_TOLERANCE:
            return replace(sample, level=level, mpp=(info.mpp or 0.0) * lv.downsample, **common)  # type: ignore[arg-type]
    if not info.mpp:
        raise InvalidRequest(f"slide {sample.record.slide_id} has no pyramid level {want:g}× below full resolution "
                             f"and no microns-per-pixel metadata to resample to it; choose a context factor that is a "
                             f"level's downsample ({[round(lv.downsample, 3) for lv in info.levels]})")
    return replace(sample, level=0, mpp=info.mpp * want, **common)  # type: ignore[arg-type]


def resampled_mpp(context: Sample) -> float:
    """0 when a context patch is read at its pyramid level, else the µm/px it is resampled to."""
    info = context.record.info
    assert info is not None
    return 0.0 if context.mpp == (info.mpp or 0.0) * info.levels[context.level].downsample else context.mpp


def check_context(samples: Sequence[Sample], scales: Sequence[ContextScale], by_mpp: bool,
                  plan_read: Callable[[Sample], object] | None = None) -> None:
    """Fail at session open (not mid-stream) when a slide cannot serve a scale: one probe sample per slide.
    ``plan_read`` (``Slide.read_plan`` of the sample's slide at its mpp) raises ValueError (MppOutOfRange) when
    a resampled context read would reach past MAX_READ_FACTOR: OUT_OF_RANGE at open."""
    for sample in samples:
        for scale in scales:
            ctx = context_sample(sample, scale, by_mpp)
            if plan_read is None or not resampled_mpp(ctx):
                continue
            try:
                plan_read(ctx)
            except ValueError as err:
                raise OutOfRange(f"context scale {scale.factor:g}× of slide {sample.record.slide_id}: {err}; choose "
                                 "a smaller context factor (or one that is a pyramid level's downsample)") from err


def build_context(samples: Sequence[Sample], params: Sequence[AugmentParams], scales: Sequence[ContextScale],
                  by_mpp: bool, read: Callable[[list[Sample]], torch.Tensor], device: torch.device,
                  stain: StainConfig | None, output: object) -> tuple[list[torch.Tensor], list[list[Sample]]]:
    """One output tensor per scale (as the batch's images: stain, the samples' params, the output dtype and
    layout; on the CPU), and the context samples read."""
    tensors: list[torch.Tensor] = []
    places: list[list[Sample]] = []
    for scale in scales:
        ctx = [context_sample(s, scale, by_mpp) for s in samples]
        batch = read(ctx).to(device)
        if stain is not None:
            batch = normalise_batch(batch, stain)
        images = augment_batch(batch, list(params)) if params else to_nchw(batch)
        images = to_output(images, output.dtype, output.mean or None, output.std or None)  # type: ignore[attr-defined]
        if output.channels_last:  # type: ignore[attr-defined]
            images = images.permute(0, 2, 3, 1)
        tensors.append(images.contiguous().cpu())
        places.append(ctx)
    return tensors, places
