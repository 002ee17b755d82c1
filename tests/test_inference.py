"""Inference stitched back to the slide: identity models reproduce the slide, resume is exact, CLI runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trainer_client import StreamConfig
from trainer_client.inference import PredictConfig, SlideMerger, predict

LEVEL = 2  # 512² of the 2048² synthetic slides: a few hundred patches per run


def grid(stride: int, **kw: Any) -> StreamConfig:
    kw = {"level": LEVEL, "tissue_threshold": 0.0, **kw}
    return StreamConfig(dataset="train", patch_size=64, grid_stride=stride, mode="grid", augment=False,
                        batch_size=16, transport="grpc", **kw)


def whole_level(client: Any, slide_id: str, level: int) -> np.ndarray:
    info = {s.slide_id: s for s in client.describe("train").slides}[slide_id]
    lv = info.levels[level]
    return client.read_region("train", slide_id, 0, 0, int(lv.width), int(lv.height), level=level).numpy()


class Identity(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 255.0


class Stride4(torch.nn.Module):
    """A 'segmentation network' of output stride 4: the mean of each 4×4 block."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x * 255.0, 4)


@pytest.mark.parametrize("stride,window", [(64, "uniform"), (32, "gaussian"), (48, "uniform")])
def test_identity_model_reproduces_the_slide_at_its_level(client: Any, tmp_path: Path, stride: int,
                                                          window: str) -> None:
    result = predict(client, grid(stride), Identity(), tmp_path, PredictConfig(window=window))
    assert result["done"] and len(result["slides"]) == 4
    for slide_id, files in result["slides"].items():
        merged = np.load(files["npy"])
        want = whole_level(client, slide_id, LEVEL).astype(np.float32)
        covered = np.isfinite(merged).all(axis=-1)
        if stride != 48:
            assert covered.all()  # 512 - 64 is a multiple of the stride: the grid covers the level
        else:
            assert covered[:448, :448].all() and not covered[-8:].any()  # the grid's last cell ends at 496
        np.testing.assert_allclose(merged[covered], want[covered], atol=1e-3)
        assert Path(files["overlay"]).exists()
        import tifffile

        with tifffile.TiffFile(files["tiff"]) as tif:
            page = tif.pages[0]
            assert np.array_equal(page.asarray(), merged, equal_nan=True)
            assert len(page.subifds or ()) == 1  # 512² -> 256²: one tile
            assert tif.series[0].levels[1].shape == (256, 256, 3)


def test_output_stride_and_coarser_output_level(client: Any, tmp_path: Path) -> None:
    # Grid at level 1 (1024²) over tissue, maps at level 3 (256²): 4× coarser, as the network's stride.
    result = predict(client, grid(32, level=1, tissue_threshold=0.5), Stride4(), tmp_path,
                     PredictConfig(output_level=3, tiff=False))
    for slide_id, files in result["slides"].items():
        merged = np.load(files["npy"])
        level = whole_level(client, slide_id, 1).astype(np.float32)
        want = level.reshape(256, 4, 256, 4, 3).mean(axis=(1, 3))
        assert merged.shape == want.shape
        covered = np.isfinite(merged).all(axis=-1)
        assert 0.05 < covered.mean() < 1.0
        np.testing.assert_allclose(merged[covered], want[covered], atol=1e-3)


def test_class_scores_fill_their_footprint(client: Any, tmp_path: Path) -> None:
    def mean_colour(x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))  # (N, 3) "scores"

    result = predict(client, grid(64), mean_colour, tmp_path, PredictConfig(overlay=False, tiff=False))
    slide_id, files = next(iter(result["slides"].items()))
    merged = np.load(files["npy"])
    level = whole_level(client, slide_id, LEVEL).astype(np.float32) / 255
    np.testing.assert_allclose(merged[64:128, 128:192], np.broadcast_to(level[64:128, 128:192].mean((0, 1)),
                                                                        (64, 64, 3)), atol=1e-4)


def test_interrupted_predict_resumes_to_the_same_maps(client: Any, tmp_path: Path) -> None:
    config = grid(32)
    whole = predict(client, config, Identity(), tmp_path / "whole", PredictConfig(window="gaussian", tiff=False,
                                                                                  overlay=False))
    calls = {"n": 0}

    def crashing(x: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 9:
            raise RuntimeError("out of memory (simulated)")
        return x * 255.0

    out = tmp_path / "resumed"
    part = predict(client, config, Identity(), out, PredictConfig(window="gaussian", max_batches=5, tiff=False,
                                                                  overlay=False))
    assert not part["done"] and part["samples"] == 5 * 16
    with pytest.raises(RuntimeError, match="simulated"):
        predict(client, config, crashing, out, PredictConfig(window="gaussian", tiff=False, overlay=False))
    state = json.loads((out / "predict_state.json").read_text())
    assert state["stream"]["cursor"] == 13 * 16
    seen: list[dict[str, Any]] = []
    done = predict(client, config, Identity(), out, PredictConfig(window="gaussian", tiff=False, overlay=False),
                   progress=seen.append)
    assert done["done"] and done["samples"] == whole["samples"]
    assert seen and seen[-1]["cursor"] == seen[-1]["total"]
    for slide_id, files in whole["slides"].items():
        assert np.array_equal(np.load(files["npy"]), np.load(done["slides"][slide_id]["npy"]), equal_nan=True)


def test_undo_log_restores_a_batch_that_was_not_recorded(tmp_path: Path) -> None:
    merger = SlideMerger(tmp_path, "s", (32, 32), 2, 1.0, "gaussian")
    first = merger.footprint(0, 0, 16, 16)
    merger.begin([first], cursor=0)
    merger.add(first, torch.ones(2, 16, 16))
    merger.flush()
    merger.drop_undo()
    before = (np.array(merger.sum), np.array(merger.weight))
    fps = [merger.footprint(8, 8, 16, 16), merger.footprint(16, 16, 16, 16)]
    merger.begin(fps, cursor=4)
    for fp in fps:
        merger.add(fp, torch.full((2, 16, 16), 3.0))
    merger.flush()  # ... and the process dies before the cursor after this batch is recorded
    del merger
    reopened = SlideMerger(tmp_path, "s", (32, 32), 2, 1.0, "gaussian", recorded_cursor=4)
    assert np.array_equal(reopened.sum, before[0]) and np.array_equal(reopened.weight, before[1])
    with pytest.raises(ValueError, match="written for"):
        SlideMerger(tmp_path, "s", (32, 32), 3, 1.0, "gaussian")


def test_predict_cli_runs_a_checkpoint_and_resumes(server: Any, tmp_path: Path) -> None:
    from trainer_client.cli import main

    checkpoint = tmp_path / "identity.pt"
    torch.jit.script(Identity()).save(str(checkpoint))
    args = ["predict", "--endpoint", f"127.0.0.1:{server.port}", "--dataset", "train", "--checkpoint",
            str(checkpoint), "--out", str(tmp_path / "out"), "--patch-size", "64", "--grid-stride", "64", "--level",
            str(LEVEL), "--tissue-threshold", "0", "--batch-size", "32", "--max-batches", "2"]
    assert main(args) == 0
    state = json.loads((tmp_path / "out" / "predict_state.json").read_text())
    assert not state["done"] and state["stream"]["cursor"] == 64
    assert main(args[:-2]) == 0
    state = json.loads((tmp_path / "out" / "predict_state.json").read_text())
    assert state["done"] and state["samples"] == 4 * 64
