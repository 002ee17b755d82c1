"""Tile size from a memory budget.

The estimate is deliberately simple and conservative. One probe forward (no
gradient) at the smallest legal tile size records, through forward hooks, the
bytes of every leaf layer's output. Dividing by the probe's input pixel count
gives ``A`` = activation bytes per input pixel, and ``M`` = bytes per input pixel
of the largest single activation. The working memory of one tile of side ``T``
during the gradient-enabled recompute is estimated as::

    T*T * (A + 2*M + c*input_bytes_per_pixel)

``A`` over-counts what autograd really saves (an in-place ReLU output is counted
twice, eval-mode batch norm saves only its input), the ``2*M`` term covers the
gradient buffers alive while back-propagating through the largest layer, and the
input term covers the tile and its gradient (``c = 2``), plus the tile's copy
(``c = 3``) when the module may write into its input (:mod:`.inplace`). Memory that does not scale with the
tile (weights, their gradients, the full input, the stitched feature map and
stage-boundary maps) is NOT part of the budget.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from .geometry import geometry_of, min_tile_size
from .inplace import mutates_input

__all__ = ["TileMemoryEstimate", "estimate_tile_memory", "choose_tile_size", "frozen_eval", "probe_forward"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TileMemoryEstimate:
    """Bytes per input pixel of a module, measured by a probe forward."""

    activation_bytes_per_pixel: float
    largest_bytes_per_pixel: float
    input_bytes_per_pixel: float
    min_tile: int
    input_copies: int = 2

    def tile_bytes(self, tile: int) -> float:
        """Estimated working memory (bytes) of one square tile of side ``tile``."""
        per_pixel = (self.activation_bytes_per_pixel + 2 * self.largest_bytes_per_pixel
                     + self.input_copies * self.input_bytes_per_pixel)
        return tile * tile * per_pixel


@contextlib.contextmanager
def frozen_eval(module: nn.Module) -> Iterator[None]:
    """Run ``module`` in eval mode (running batch-norm statistics, no dropout), then restore every flag."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def probe_forward(module: nn.Module, handles: list[torch.utils.hooks.RemovableHandle], channels: int, side: int,
                  dtype: torch.dtype, device: torch.device, autocast_dtype: torch.dtype | None) -> torch.Tensor:
    """One forward of a zero ``side``² probe through ``module`` (eval mode, no grad, autocast when asked) for the
    forward hooks in ``handles`` to measure; the hooks are removed afterwards. Returns the probe."""
    probe = torch.zeros(1, channels, side, side, dtype=dtype, device=device)
    amp = (torch.autocast(device_type=device.type, dtype=autocast_dtype) if autocast_dtype is not None
           else contextlib.nullcontext())
    try:
        with torch.no_grad(), frozen_eval(module), amp:
            module(probe)
    finally:
        for handle in handles:
            handle.remove()
    return probe


def estimate_tile_memory(
    module: nn.Module,
    in_channels: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> TileMemoryEstimate:
    """Probe ``module`` once at its smallest legal tile and return per-pixel byte counts."""
    if device is None:
        first = next(module.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    device = torch.device(device)
    side = max(min_tile_size(geometry_of(module, 0)), min_tile_size(geometry_of(module, 1)))
    totals = {"sum": 0, "max": 0}

    def hook(_m: nn.Module, _i: object, out: object) -> None:
        if isinstance(out, torch.Tensor):
            totals["sum"] += out.nbytes
            totals["max"] = max(totals["max"], out.nbytes)

    leaves = [m for m in module.modules() if next(m.children(), None) is None]
    handles = [m.register_forward_hook(hook) for m in leaves]
    probe = probe_forward(module, handles, in_channels, side, dtype, device, autocast_dtype)
    pixels = float(side * side)
    return TileMemoryEstimate(
        activation_bytes_per_pixel=totals["sum"] / pixels,
        largest_bytes_per_pixel=totals["max"] / pixels,
        input_bytes_per_pixel=in_channels * probe.element_size(),
        min_tile=side,
        input_copies=3 if mutates_input(module) else 2,
    )


def choose_tile_size(
    module: nn.Module,
    budget_bytes: int,
    in_channels: int = 3,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
    batch_size: int = 1,
) -> int:
    """Largest square tile side (input pixels) whose estimated working memory fits ``budget_bytes``.

    The estimate scales linearly with ``batch_size``. Raises ``ValueError`` when even the
    smallest legal tile does not fit, saying how much budget it needs.
    """
    if budget_bytes <= 0:
        raise ValueError(f"budget_bytes must be positive, got {budget_bytes}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    est = estimate_tile_memory(module, in_channels, dtype, device, autocast_dtype)
    per_pixel = est.tile_bytes(1) * batch_size
    tile = int((budget_bytes / per_pixel) ** 0.5)
    if tile < est.min_tile:
        need = int(est.tile_bytes(est.min_tile) * batch_size)
        raise ValueError(
            f"memory budget {budget_bytes} B is too small: the smallest legal tile ({est.min_tile} px) "
            f"needs about {need} B; raise the budget or split the front into more stages"
        )
    logger.info("tile size %d px for a budget of %d B (%.0f B per pixel)", tile, budget_bytes, per_pixel)
    return tile
