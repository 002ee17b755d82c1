"""Putting pieces back together: tiles of one sample into its image, on the trainer's side."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from trainer_client.streaming.feed import RowFeed

__all__ = ["stitch_tiles", "crop_core", "ArrivingImage", "TileFeeder"]


def crop_core(batch: dict[str, Any], key: str = "images") -> torch.Tensor:
    """The part of a piece (tile or shard) that it owns, without overlap or halo: (N, C, h, w) images, or
    (N, h, w) masks with ``key="masks"``."""
    piece = batch["piece"]
    y, x, _, _ = piece["rect"]
    cy, cx, ch, cw = piece["core"]
    return batch[key][..., cy - y: cy - y + ch, cx - x: cx - x + cw]


def stitch_tiles(batches: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Assemble the `tiles` view into whole images: yields one dict per sample with ``images`` (1, C, H, W).

    Each tile's core is written once into a buffer of the image's size, so the result equals the `image`
    view of the same sample (pixels never depend on how the image was cut).
    """
    image: torch.Tensor | None = None
    mask: torch.Tensor | None = None  # annotation masks, stitched the same way when the batches carry them
    first: dict[str, Any] | None = None
    for batch in batches:
        piece = batch["piece"]
        if piece is None:
            raise ValueError("stitch_tiles needs the tiles view (StreamConfig(view='tiles', ...))")
        if piece["index"] == 0:
            h, w = piece["image_hw"]
            tile = batch["images"]
            image = torch.empty((tile.shape[0], tile.shape[1], h, w), dtype=tile.dtype)
            if batch.get("masks") is not None:
                mask = torch.empty((tile.shape[0], h, w), dtype=batch["masks"].dtype)
            first = batch
        assert image is not None and first is not None
        cy, cx, ch, cw = piece["core"]
        image[..., cy: cy + ch, cx: cx + cw] = crop_core(batch)
        if mask is not None:
            mask[..., cy: cy + ch, cx: cx + cw] = crop_core(batch, "masks")
        if piece["index"] == piece["count"] - 1:
            yield {**first, "images": image, "piece": None, **({"masks": mask} if mask is not None else {})}
            image = mask = first = None


@dataclass
class ArrivingImage:
    """One sample of the `tiles` view while its tiles are still being written into ``images``.

    ``feed`` says how many leading rows are final (pass it to ``streaming_step``); ``sample`` is the first
    tile's batch without pixels (labels, slide id, ...); ``loader_state`` is the stream's ``state_dict()``
    right after the sample's last tile, set before the last rows are marked final.
    """

    images: torch.Tensor
    feed: RowFeed
    sample: dict[str, Any]
    loader_state: dict[str, Any] | None = None
    masks: torch.Tensor | None = None  # (N, H, W) annotation masks, filled with the same tiles (masks=True)
    _bands: dict[int, list[int]] = field(default_factory=dict)  # band start row -> [height, columns filled]

    def _write(self, batch: dict[str, Any]) -> None:
        cy, cx, ch, cw = batch["piece"]["core"]
        self.images[..., cy: cy + ch, cx: cx + cw] = crop_core(batch).to(self.images.device)
        if self.masks is not None:
            self.masks[..., cy: cy + ch, cx: cx + cw] = crop_core(batch, "masks").to(self.masks.device)
        band = self._bands.setdefault(cy, [ch, 0])
        band[1] += cw

    def _final_rows(self) -> int:
        rows, width = 0, self.images.shape[-1]
        while rows in self._bands and self._bands[rows][1] >= width:
            rows += self._bands[rows][0]
        return rows


_END = object()


class TileFeeder:
    """Fills each sample's image from the `tiles` view on a background thread, so that training on an
    image starts while its later tiles are still being decoded and sent.

    Iterating yields an :class:`ArrivingImage` as soon as its first tile is in; asking for the next one
    means the previous one is done. At most ``ahead + 1`` images are alive (the one being trained on and
    ``ahead`` being filled). With row-major tiles (the default) row bands become final as they complete.
    Errors on the thread are raised by the iterator (``from`` the cause); every wait has ``timeout_s``.
    """

    def __init__(self, stream: Iterable[dict[str, Any]], device: torch.device | str = "cpu", *,
                 ahead: int = 1, timeout_s: float = 300.0,
                 state: Callable[[], dict[str, Any]] | None = None) -> None:
        if ahead < 1:
            raise ValueError(f"ahead must be >= 1 (images filled while one trains), got {ahead}")
        self._stream, self._device, self._timeout = stream, torch.device(device), timeout_s
        self._state = state
        self._slots = threading.Semaphore(ahead + 1)
        self._items: queue.Queue[object] = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, name="tile-feeder", daemon=True)
        self._started = False

    def _take_slot(self) -> bool:
        while not self._slots.acquire(timeout=0.5):  # re-check stop while the trainer is busy
            if self._stop.is_set():
                return False
        return not self._stop.is_set()

    def _fill(self) -> None:
        current: ArrivingImage | None = None
        try:
            for batch in self._stream:
                piece = batch.get("piece")
                if piece is None:
                    raise ValueError("TileFeeder needs the tiles view (StreamConfig(view='tiles', ...))")
                if piece["index"] == 0:
                    if not self._take_slot():
                        return
                    h, w = piece["image_hw"]
                    tile = batch["images"]
                    images = torch.empty((tile.shape[0], tile.shape[1], h, w), dtype=tile.dtype, device=self._device)
                    meta = {k: v for k, v in batch.items() if k not in ("images", "piece", "masks")}
                    masks = None if batch.get("masks") is None else torch.empty(
                        (tile.shape[0], h, w), dtype=batch["masks"].dtype, device=self._device)
                    current = ArrivingImage(images, RowFeed(h, self._timeout), meta, masks=masks)
                    self._items.put(current)
                if current is None:
                    raise ValueError(f"tile {piece['index']} arrived before tile 0 of its sample")
                current._write(batch)
                if piece["index"] == piece["count"] - 1:
                    current.loader_state = self._state() if self._state is not None else None
                    current.feed.mark(current.feed.height)
                    current = None
                else:
                    current.feed.mark(current._final_rows())
                if self._stop.is_set():
                    return
        except BaseException as err:  # handed to the consumer, never lost
            if current is not None:
                current.feed.fail(err)
            self._items.put(err)
        finally:
            self._items.put(_END)

    def __iter__(self) -> Iterator[ArrivingImage]:
        if self._started:
            raise RuntimeError("a TileFeeder is iterated once")
        self._started = True
        self._thread.start()
        try:
            while True:
                try:
                    item = self._items.get(timeout=self._timeout)
                except queue.Empty:
                    raise TimeoutError(f"no image started within {self._timeout:g} s: the tile stream stalled") from None
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise RuntimeError("reading the tiles view failed") from item
                assert isinstance(item, ArrivingImage)
                yield item
                self._slots.release()  # the trainer is done with it
        finally:
            self._stop.set()
            self._slots.release()

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop filling and join the thread; close the stream first if it may be waiting for data."""
        self._stop.set()
        self._slots.release()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)
