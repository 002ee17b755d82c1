"""Masks and centre classes of built batches: the annotations seen through each sample's augmentation.

A mask pixel is the class at the continuous slide position its image pixel shows (nearest neighbour, never
blended): pixel i of an axis of n pixels shows region position ``i + 0.5`` (no scale/crop) or
``n/2 + f*n + (i + 0.5 - n/2) / s`` (image-level scale s, crop shift f: ``augment.resample``), then flips and
rot90 permute pixels exactly as the image's. Colour, stain and blur ops do not touch masks. A piece (tile or
shard) is the same function on its rectangle, so stitched pieces equal the whole mask.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any

import numpy as np
import torch

from loader_service.annotations.sampling import SessionAnnotations
from loader_service.augment import AugmentConfig, AugmentParams, Rect, draw_params
from loader_service.augment.geometry import apply_geometry, aug_rect_to_raw
from loader_service.errors import InvalidRequest
from loader_service.pipeline import BuiltBatch
from loader_service.sampling import Sample, sample_scale

__all__ = ["sample_scale", "raw_positions", "sample_mask", "sample_class", "Labeller"]


def raw_positions(params: AugmentParams, start: int, stop: int, size: int, axis: int) -> np.ndarray:
    """Region positions (sample pixels, edges at integers) shown by raw-image pixels start..stop-1 of an axis."""
    i = np.arange(start, stop, dtype=np.float64) + 0.5
    if params.resample_is_identity:
        return i
    return size / 2.0 + params.crop_shift[axis] * size + (i - size / 2.0) / params.scale


def sample_mask(annotations: SessionAnnotations, sample: Sample, params: AugmentParams, piece: Rect | None = None
                ) -> torch.Tensor:
    """uint8 (h, w) class indices of ``piece`` of the sample's augmented image (the whole image when None)."""
    hw = (sample.height, sample.width)
    oh, ow = params.output_size(*hw)
    piece = piece or Rect(0, 0, oh, ow)
    found = annotations.annotations(sample.record)
    if found is None:
        return torch.zeros((piece.height, piece.width), dtype=torch.uint8)
    raw = aug_rect_to_raw(params, hw, piece)
    scale = sample_scale(sample)
    ys = (sample.y + raw_positions(params, raw.y, raw.y1, hw[0], 0)) * scale
    xs = (sample.x + raw_positions(params, raw.x, raw.x1, hw[1], 1)) * scale
    grid = found.classify_grid(xs, ys, annotations.index).astype(np.uint8)
    return apply_geometry(torch.from_numpy(grid), *params.geometry_key).contiguous()


def sample_class(annotations: SessionAnnotations, sample: Sample, params: AugmentParams) -> int:
    """Class index at the centre of the sample's (raw, scaled and cropped) image."""
    found = annotations.annotations(sample.record)
    if found is None:
        return 0
    scale = sample_scale(sample)
    cy, cx = (n / 2.0 + (params.crop_shift[a] * n if not params.resample_is_identity else 0.0)
              for a, n in enumerate((sample.height, sample.width)))
    return int(found.classify_points(np.array([(sample.x + cx) * scale]), np.array([(sample.y + cy) * scale]),
                                     annotations.index)[0])


class Labeller:
    """Wraps a session's batch builders: every built batch gets ``classes`` (and ``masks`` when asked).

    With ``pool``, the masks of a batch's samples are rasterised on it in parallel (the service's read pool:
    the batch thread already waits on it for reads, so this adds no new kind of wait)."""

    def __init__(self, annotations: SessionAnnotations, augment: AugmentConfig | None, seed: int, epoch: int,
                 pool: Executor | None = None) -> None:
        if annotations.options.masks and len(annotations.classes) > 256:
            raise InvalidRequest(f"{len(annotations.classes) - 1} annotation classes do not fit uint8 masks (at most "
                                 "255); merge classes in the annotation files, or ask for classes without masks")
        self.annotations, self.augment, self.seed, self.epoch = annotations, augment, seed, epoch
        self.pool = pool

    def params(self, sample: Sample) -> AugmentParams:
        if self.augment is None:
            return AugmentParams()
        return draw_params(self.augment, self.seed, self.epoch, sample.global_index)

    def label(self, built: BuiltBatch) -> BuiltBatch:
        params = [self.params(s) for s in built.samples]
        built.classes = torch.tensor([sample_class(self.annotations, s, p) for s, p in zip(built.samples, params)],
                                     dtype=torch.int64)
        if self.annotations.options.masks:
            rect = built.piece.rect if built.piece is not None else None
            def one(i: int) -> torch.Tensor:
                return sample_mask(self.annotations, built.samples[i], params[i], rect)

            indices = range(len(params))
            masks = list(self.pool.map(one, indices)) if self.pool is not None and len(params) > 1 else \
                [one(i) for i in indices]
            built.masks = torch.stack(masks)
        return built

    def wrap(self, build: Callable[..., BuiltBatch]) -> Callable[..., BuiltBatch]:
        def labelled(*args: Any, **kwargs: Any) -> BuiltBatch:
            return self.label(build(*args, **kwargs))
        return labelled
