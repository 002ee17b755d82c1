"""Run a model over a dataset's tissue grid and stitch its outputs into slide-level maps, resumably.

The service streams a GRID session (``grid_stride`` < ``patch_size`` gives overlap) without augmentation; each
patch's output, scores (C,) or a map (C, h, w) at any output stride, goes to its slide's :class:`SlideMerger` at
``output_level``. After every batch the maps are flushed and ``predict_state.json`` records the stream cursor, so
an interrupted run resumes exactly where the last recorded batch ended (see ``merger`` for the undo log that
makes that exact). At the end each slide gets ``<slide>.npy`` (H, W, C float32, NaN where no patch landed), a
pyramidal ``<slide>.tif`` when tifffile is importable and ``<slide>.overlay.png`` when Pillow is.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trainer_client.client import LoaderClient, WSIStream
from trainer_client.config import StreamConfig
from trainer_client.inference.export import write_overlay_png, write_pyramidal_tiff
from trainer_client.inference.merger import WINDOWS, SlideMerger

__all__ = ["PredictConfig", "predict", "STATE_FILE"]

STATE_FILE = "predict_state.json"
Model = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class PredictConfig:
    """``output_level``: pyramid level of the output maps (None = the grid's own resolution); ``window``:
    uniform | gaussian weights of overlapping outputs; ``max_batches``: stop (resumably) after that many
    batches in this call (None = the whole dataset); ``overlay``/``tiff``: also write those (when importable)."""

    output_level: int | None = None
    window: str = "uniform"
    device: str = "cpu"
    max_batches: int | None = None
    overlay: bool = True
    tiff: bool = True

    def __post_init__(self) -> None:
        if self.window not in WINDOWS:
            raise ValueError(f"window must be one of {WINDOWS}, got {self.window!r}")
        if self.output_level is not None and self.output_level < 0:
            raise ValueError(f"output_level must be >= 0 (or None for the grid's resolution), got {self.output_level}")
        if self.max_batches is not None and self.max_batches < 1:
            raise ValueError(f"max_batches must be >= 1 or None, got {self.max_batches}")


def _stem(slide_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", slide_id)


class _Run:
    def __init__(self, client: LoaderClient, stream_config: StreamConfig, config: PredictConfig, out: Path) -> None:
        self.client, self.stream_config, self.config, self.out = client, stream_config, config, out
        self.slides = {s.slide_id: s for s in client.describe(stream_config.dataset).slides}
        self.state_path = out / STATE_FILE
        self.identity = {"dataset": stream_config.dataset, "patch_size": stream_config.patch_size,
                         "level": stream_config.level, "mpp": stream_config.mpp, "grid_stride": stream_config.grid_stride,
                         "tissue_threshold": stream_config.tissue_threshold, "split": stream_config.split,
                         "output_level": config.output_level, "window": config.window}
        self.state: dict[str, Any] = {"identity": self.identity, "stream": None, "slides": [], "channels": 0,
                                      "done": False, "samples": 0}
        if self.state_path.exists():
            found = json.loads(self.state_path.read_text())
            if found["identity"] != self.identity:
                raise ValueError(f"{out} holds a prediction run of {found['identity']}, not {self.identity}; use "
                                 "another --out or delete it to start over")
            self.state = found
        self.mergers: dict[str, SlideMerger] = {}

    @property
    def recorded_cursor(self) -> int:
        return int(self.state["stream"]["cursor"]) if self.state["stream"] else 0

    def geometry(self, slide_id: str) -> tuple[tuple[int, int], float]:
        """(output map shape, output pixels per grid pixel) of a slide."""
        s = self.slides[slide_id]
        levels = s.levels
        grid_ds = self.stream_config.mpp / s.mpp if self.stream_config.mpp > 0 else levels[self.stream_config.level].downsample
        if self.config.output_level is None:
            out_ds = grid_ds
            shape = (int(levels[0].height / grid_ds), int(levels[0].width / grid_ds))
        else:
            if self.config.output_level >= len(levels):
                raise ValueError(f"output_level {self.config.output_level} does not exist in slide {slide_id} "
                                 f"({len(levels)} levels)")
            lv = levels[self.config.output_level]
            out_ds, shape = lv.downsample, (int(lv.height), int(lv.width))
        return shape, grid_ds / out_ds

    def merger(self, slide_id: str, channels: int) -> SlideMerger:
        found = self.mergers.get(slide_id)
        if found is None:
            shape, scale = self.geometry(slide_id)
            found = SlideMerger(self.out, _stem(slide_id), shape, channels, scale, self.config.window,
                                recorded_cursor=self.recorded_cursor)
            self.mergers[slide_id] = found
            if slide_id not in self.state["slides"]:
                self.state["slides"].append(slide_id)
        return found

    def save(self) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state))
        os.replace(tmp, self.state_path)

    def add_batch(self, batch: dict[str, Any], outputs: torch.Tensor, cursor_before: int) -> int:
        channels = int(outputs.shape[1])
        if self.state["channels"] and channels != self.state["channels"]:
            raise ValueError(f"the model gave {channels} channels, earlier batches {self.state['channels']}")
        self.state["channels"] = channels
        per_merger: dict[str, list[tuple[Any, torch.Tensor]]] = {}
        h, w = self.stream_config.patch_size, self.stream_config.patch_size
        for i, slide_id in enumerate(batch["slide_id"]):
            if bool(batch["padding"][i]):
                continue
            merger = self.merger(slide_id, channels)
            fp = merger.footprint(int(batch["x"][i]), int(batch["y"][i]), w, h)
            per_merger.setdefault(slide_id, []).append((fp, outputs[i]))
        for slide_id, items in per_merger.items():
            self.mergers[slide_id].begin([fp for fp, _ in items], cursor_before)
        for slide_id, items in per_merger.items():
            for fp, output in items:
                self.mergers[slide_id].add(fp, output)
            self.mergers[slide_id].flush()
        return sum(len(v) for v in per_merger.values())

    def finish(self) -> dict[str, dict[str, str]]:
        results: dict[str, dict[str, str]] = {}
        for slide_id in self.state["slides"]:
            merger = self.merger(slide_id, int(self.state["channels"]))
            result = merger.finish()
            files = {"npy": str(self.out / f"{merger.stem}.npy")}
            if self.config.tiff:
                tif = write_pyramidal_tiff(result, self.out / f"{merger.stem}.tif")
                if tif is not None:
                    files["tiff"] = str(tif)
            if self.config.overlay:
                png = self._overlay(slide_id, result, merger.stem)
                if png is not None:
                    files["overlay"] = str(png)
            results[slide_id] = files
        return results

    def _overlay(self, slide_id: str, result: Any, stem: str) -> Path | None:
        levels = self.slides[slide_id].levels
        last = len(levels) - 1
        thumb = self.client.read_region(self.stream_config.dataset, slide_id, 0, 0, int(levels[last].width),
                                        int(levels[last].height), level=last).numpy()
        return write_overlay_png(result, thumb, self.out / f"{stem}.overlay.png")


def _inputs(images: torch.Tensor, device: str) -> torch.Tensor:
    """The batch as the model's input: float32 in [0, 1] (uint8 streams) or as streamed (normalised floats)."""
    x = images.to(device)
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()


def predict(client: LoaderClient, stream_config: StreamConfig, model: Model, out: str | Path,
            config: PredictConfig = PredictConfig(),
            progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run ``model`` (NCHW float batch -> (N, C) scores or (N, C, h, w) maps) over the grid of ``stream_config``
    (mode must be grid, without augmentation) and merge into ``out``; resumes a run found there.

    Returns ``{"done": bool, "samples": n, "slides": {slide_id: {"npy": path, "tiff": ..., "overlay": ...}}}``
    (slides only once done)."""
    if stream_config.mode != "grid" or stream_config.augment or stream_config.view != "patches":
        raise ValueError("predict needs mode='grid', augment=False and view='patches' (got "
                         f"mode={stream_config.mode!r}, augment={stream_config.augment}, view={stream_config.view!r})")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    run = _Run(client, stream_config, config, out)
    if run.state["done"]:
        return {"done": True, "samples": run.state["samples"], "slides": run.finish()}
    stream = WSIStream(stream_config, client=client, rank=0, world_size=1)
    if run.state["stream"]:
        stream.load_state_dict(run.state["stream"])
    t0, batches = time.perf_counter(), 0
    finished = True
    with torch.inference_mode():
        for batch in stream:
            cursor_before = run.recorded_cursor
            outputs = model(_inputs(batch["images"], config.device))
            if outputs.ndim not in (2, 4) or outputs.shape[0] != batch["images"].shape[0]:
                raise ValueError(f"the model must return (N, C) or (N, C, h, w) for N={batch['images'].shape[0]} "
                                 f"inputs (got {tuple(outputs.shape)})")
            run.state["samples"] += run.add_batch(batch, outputs, cursor_before)
            run.state["stream"] = stream.state_dict()
            run.save()
            for merger in run.mergers.values():
                merger.drop_undo()
            batches += 1
            if progress is not None:
                elapsed = time.perf_counter() - t0
                progress({"cursor": stream.cursor, "total": stream.shard_length, "batches": batches,
                          "patches_per_s": round(stream.config.batch_size * batches / max(elapsed, 1e-9), 2)})
            if config.max_batches is not None and batches >= config.max_batches:
                finished = stream.cursor >= stream.shard_length
                break
    stream.close_stream()
    if not finished:
        return {"done": False, "samples": run.state["samples"], "slides": {}}
    run.state["done"] = True
    run.save()
    return {"done": True, "samples": run.state["samples"], "slides": run.finish()}
