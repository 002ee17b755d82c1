"""Per-patch outputs stitched back into a slide-level map: weighted averaging of overlaps on disk.

A :class:`SlideMerger` owns two ``np.memmap`` accumulators for one slide at one output resolution: the weighted
sum (H, W, C) float32 and the weight (H, W) float32. Memory is bounded by the pages the OS keeps of those files,
never by the number of patches. A patch's output, class scores (C,) or a map (C, h, w) at any output stride, is
resized to its footprint in the output map (bilinear; scores are constant over the footprint), multiplied by the
weight window (uniform, or a Gaussian as MONAI's ``sigma_scale=0.125``) and added.

Exact resume: before a batch is added, :meth:`begin` saves the accumulators' old values under every footprint of
the batch (an undo log next to the maps, tagged with the stream cursor before the batch); :meth:`flush` writes the
maps; the caller then records the cursor after the batch and calls :meth:`drop_undo`. A merger re-opened with the
last recorded cursor restores the logged values when the log's batch was not recorded (tag >= that cursor), so the
maps are exactly those of the last recorded batch, and drops the log otherwise.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["SlideMerger", "Footprint", "weight_window", "WINDOWS"]

WINDOWS = ("uniform", "gaussian")
GAUSSIAN_SIGMA_SCALE = 0.125
_MIN_WEIGHT = 1e-3  # Gaussian tails are clamped here so that every covered pixel has weight


@dataclass(frozen=True)
class Footprint:
    """Where a patch lands in the output map: rows [y, y + h), columns [x, x + w) (clipped to the map)."""

    y: int
    x: int
    h: int
    w: int


def weight_window(kind: str, h: int, w: int) -> np.ndarray:
    """(h, w) float32 weights: ones, or a separable Gaussian (sigma = 0.125 × side) peaking at 1 in the centre."""
    if kind == "uniform":
        return np.ones((h, w), dtype=np.float32)
    if kind != "gaussian":
        raise ValueError(f"window must be one of {WINDOWS} (got {kind!r})")

    def axis(n: int) -> np.ndarray:
        centre = (n - 1) / 2.0
        sigma = max(GAUSSIAN_SIGMA_SCALE * n, 1e-3)
        return np.exp(-0.5 * ((np.arange(n) - centre) / sigma) ** 2)

    return np.maximum(np.outer(axis(h), axis(w)), _MIN_WEIGHT).astype(np.float32)


class SlideMerger:
    """The output map of one slide: ``add`` patch outputs, ``finish`` to the averaged map.

    ``shape``: (height, width) of the output map; ``channels``: C; ``scale``: output-map pixels per pixel of the
    session's sampling grid (1 = same resolution, 0.25 = a 4× coarser map or a network of output stride 4).
    Files ``<stem>.sum.npy``, ``<stem>.weight.npy`` (accumulators) and ``<stem>.npy`` (the result) in ``directory``.
    """

    def __init__(self, directory: str | Path, stem: str, shape: tuple[int, int], channels: int, scale: float,
                 window: str = "uniform", recorded_cursor: int = 0) -> None:
        if window not in WINDOWS:
            raise ValueError(f"window must be one of {WINDOWS} (got {window!r})")
        if not (shape[0] > 0 and shape[1] > 0 and channels > 0 and scale > 0):
            raise ValueError(f"shape {shape}, channels {channels} and scale {scale} must be positive")
        self.directory, self.stem = Path(directory), stem
        self.shape, self.channels, self.scale, self.window = (int(shape[0]), int(shape[1])), channels, scale, window
        self.directory.mkdir(parents=True, exist_ok=True)
        self.sum_path = self.directory / f"{stem}.sum.npy"
        self.weight_path = self.directory / f"{stem}.weight.npy"
        self.undo_path = self.directory / f"{stem}.undo.npz"
        self.meta_path = self.directory / f"{stem}.merger.json"
        meta = {"shape": list(self.shape), "channels": channels, "scale": scale, "window": window}
        if self.sum_path.exists() and self.weight_path.exists() and self.meta_path.exists():
            found = json.loads(self.meta_path.read_text())
            if found != meta:
                raise ValueError(f"{self.meta_path} was written for {found}, not {meta}; use another output "
                                 "directory or delete it to start over")
            self.sum = np.load(self.sum_path, mmap_mode="r+")
            self.weight = np.load(self.weight_path, mmap_mode="r+")
            self._recover(recorded_cursor)
        else:
            self.sum = np.lib.format.open_memmap(self.sum_path, mode="w+", dtype=np.float32,
                                                 shape=(*self.shape, channels))
            self.weight = np.lib.format.open_memmap(self.weight_path, mode="w+", dtype=np.float32, shape=self.shape)
            self.meta_path.write_text(json.dumps(meta))
        self._windows: dict[tuple[int, int], np.ndarray] = {}

    # ------------------------------------------------------------------ geometry
    def footprint(self, x: int, y: int, width: int, height: int) -> Footprint:
        """The output-map rectangle of a (width × height) patch at (x, y) of the sampling grid."""
        fx, fy = x * self.scale, y * self.scale
        fw, fh = width * self.scale, height * self.scale
        if not all(abs(v - round(v)) < 1e-6 for v in (fx, fy, fw, fh)):
            raise ValueError(f"a {width}×{height} patch at ({x}, {y}) lands at ({fx}, {fy}) size {fw}×{fh} in the "
                             f"output map (scale {self.scale}); choose a patch size and grid stride that are multiples "
                             "of 1/scale")
        return Footprint(round(fy), round(fx), max(1, round(fh)), max(1, round(fw)))

    def _clip(self, fp: Footprint) -> tuple[slice, slice, slice, slice]:
        """(map rows, map cols, patch rows, patch cols) of the footprint's part inside the map."""
        y0, x0 = max(fp.y, 0), max(fp.x, 0)
        y1, x1 = min(fp.y + fp.h, self.shape[0]), min(fp.x + fp.w, self.shape[1])
        return slice(y0, y1), slice(x0, x1), slice(y0 - fp.y, y1 - fp.y), slice(x0 - fp.x, x1 - fp.x)

    def _resized(self, output: torch.Tensor | np.ndarray, fp: Footprint) -> np.ndarray:
        out = torch.as_tensor(output).detach().to("cpu", torch.float32)
        if out.ndim == 1:
            if out.shape[0] != self.channels:
                raise ValueError(f"got {out.shape[0]} scores per patch; this merger has {self.channels} channels")
            return np.broadcast_to(out.numpy()[None, None, :], (fp.h, fp.w, self.channels))
        if out.ndim != 3 or out.shape[0] != self.channels:
            raise ValueError(f"a patch output must be (C,) scores or a (C, h, w) map with C={self.channels} "
                             f"(got shape {tuple(out.shape)})")
        if tuple(out.shape[1:]) != (fp.h, fp.w):
            out = F.interpolate(out[None], size=(fp.h, fp.w), mode="bilinear", align_corners=False)[0]
        return out.permute(1, 2, 0).numpy()

    def _window(self, h: int, w: int) -> np.ndarray:
        found = self._windows.get((h, w))
        if found is None:
            found = self._windows[(h, w)] = weight_window(self.window, h, w)
        return found

    # ------------------------------------------------------------------ accumulation
    def begin(self, footprints: list[Footprint], cursor: int) -> None:
        """Save the accumulators under ``footprints`` (the undo log of the batch starting at stream ``cursor``)
        before they are added to."""
        saved: dict[str, np.ndarray] = {"tag": np.array(cursor)}
        for i, fp in enumerate(footprints):
            rows, cols, _, _ = self._clip(fp)
            saved[f"sum{i}"] = np.array(self.sum[rows, cols])
            saved[f"weight{i}"] = np.array(self.weight[rows, cols])
            saved[f"box{i}"] = np.array([rows.start, rows.stop, cols.start, cols.stop])
        tmp = self.undo_path.with_suffix(".tmp.npz")
        np.savez(tmp, count=np.array(len(footprints)), **saved)
        os.replace(tmp, self.undo_path)

    def add(self, fp: Footprint, output: torch.Tensor | np.ndarray) -> None:
        """Add one patch output at its footprint, weighted by the window."""
        rows, cols, prow, pcol = self._clip(fp)
        if rows.start >= rows.stop or cols.start >= cols.stop:
            return
        values = self._resized(output, fp)[prow, pcol]
        w = self._window(fp.h, fp.w)[prow, pcol]
        self.sum[rows, cols] += values * w[..., None]
        self.weight[rows, cols] += w

    def flush(self) -> None:
        self.sum.flush()
        self.weight.flush()

    def drop_undo(self) -> None:
        """The batch since :meth:`begin` is flushed and its cursor recorded: its undo log is not needed."""
        self.undo_path.unlink(missing_ok=True)

    def _recover(self, recorded_cursor: int) -> None:
        if not self.undo_path.exists():
            return
        with np.load(self.undo_path) as saved:
            if int(saved["tag"]) >= recorded_cursor:  # that batch was not recorded: undo it
                for i in range(int(saved["count"])):
                    y0, y1, x0, x1 = (int(v) for v in saved[f"box{i}"])
                    self.sum[y0:y1, x0:x1] = saved[f"sum{i}"]
                    self.weight[y0:y1, x0:x1] = saved[f"weight{i}"]
        self.flush()
        self.drop_undo()

    # ------------------------------------------------------------------ result
    def finish(self, rows_per_chunk: int = 512) -> np.ndarray:
        """The averaged map (H, W, C) float32 as ``<stem>.npy`` (a memmap; NaN where no patch landed), written in
        row chunks so memory stays bounded by a chunk."""
        result = np.lib.format.open_memmap(self.directory / f"{self.stem}.npy", mode="w+", dtype=np.float32,
                                           shape=(*self.shape, self.channels))
        for y in range(0, self.shape[0], rows_per_chunk):
            s, w = self.sum[y:y + rows_per_chunk], self.weight[y:y + rows_per_chunk, :, None]
            with np.errstate(invalid="ignore", divide="ignore"):
                result[y:y + rows_per_chunk] = np.where(w > 0, s / np.where(w > 0, w, 1), np.nan)
        result.flush()
        return result

    def state(self) -> dict[str, Any]:
        return {"stem": self.stem, "shape": list(self.shape), "channels": self.channels, "scale": self.scale,
                "window": self.window}

