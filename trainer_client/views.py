"""Putting pieces back together: tiles of one sample into its image, on the trainer's side."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch

__all__ = ["stitch_tiles", "crop_core"]


def crop_core(batch: dict[str, Any]) -> torch.Tensor:
    """The part of a piece (tile or shard) that it owns, without overlap or halo: (N, C, h, w)."""
    piece = batch["piece"]
    y, x, _, _ = piece["rect"]
    cy, cx, ch, cw = piece["core"]
    return batch["images"][..., cy - y: cy - y + ch, cx - x: cx - x + cw]


def stitch_tiles(batches: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Assemble the `tiles` view into whole images: yields one dict per sample with ``images`` (1, C, H, W).

    Each tile's core is written once into a buffer of the image's size, so the result equals the `image`
    view of the same sample (pixels never depend on how the image was cut).
    """
    image: torch.Tensor | None = None
    first: dict[str, Any] | None = None
    for batch in batches:
        piece = batch["piece"]
        if piece is None:
            raise ValueError("stitch_tiles needs the tiles view (StreamConfig(view='tiles', ...))")
        if piece["index"] == 0:
            h, w = piece["image_hw"]
            tile = batch["images"]
            image = torch.empty((tile.shape[0], tile.shape[1], h, w), dtype=tile.dtype)
            first = batch
        assert image is not None and first is not None
        cy, cx, ch, cw = piece["core"]
        image[..., cy: cy + ch, cx: cx + cw] = crop_core(batch)
        if piece["index"] == piece["count"] - 1:
            yield {**first, "images": image, "piece": None}
            image = first = None
