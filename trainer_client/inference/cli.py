"""`trainer-client predict`: a checkpoint over a dataset's tissue grid, merged into slide maps (resumable)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from trainer_client.client import LoaderClient
from trainer_client.config import StreamConfig
from trainer_client.inference.merger import WINDOWS
from trainer_client.inference.predict import PredictConfig, predict

__all__ = ["add_arguments", "run", "load_checkpoint"]


def load_checkpoint(path: Path, device: str) -> torch.nn.Module:
    """A TorchScript file, else a whole pickled ``nn.Module`` (``torch.save(model)``; trusted files only)."""
    try:
        model = torch.jit.load(str(path), map_location=device)
    except RuntimeError:
        model = torch.load(path, map_location=device, weights_only=False)
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"{path} holds a {type(model).__name__}, not a model; save a TorchScript module "
                         "(torch.jit.script(model).save(path)) or the whole module (torch.save(model, path))")
    return model.eval()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", type=Path, required=True, help="TorchScript (or torch.save'd) model")
    p.add_argument("--out", type=Path, required=True, help="output directory (an unfinished run there resumes)")
    p.add_argument("--patch-size", type=int, default=256)
    p.add_argument("--grid-stride", type=int, default=0, help="grid step; < patch size overlaps (0 = patch size)")
    p.add_argument("--level", type=int, default=0)
    p.add_argument("--mpp", type=float, default=0.0, help="> 0: read at this µm/px instead of a level")
    p.add_argument("--output-level", type=int, default=None, help="pyramid level of the maps (default: the grid's)")
    p.add_argument("--window", choices=WINDOWS, default="gaussian", help="weights of overlapping outputs")
    p.add_argument("--tissue-threshold", type=float, default=0.5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--stain", choices=("", "macenko", "reinhard"), default="",
                   help="stain-normalise patches on the service (fitted to the dataset's tissue)")
    p.add_argument("--max-batches", type=int, default=None, help="stop (resumably) after this many batches")


def run(args: argparse.Namespace, client: LoaderClient, dataset: str) -> int:
    stream = StreamConfig(dataset=dataset, patch_size=args.patch_size, grid_stride=args.grid_stride, level=args.level,
                          mpp=args.mpp, mode="grid", augment=False, tissue_threshold=args.tissue_threshold,
                          batch_size=args.batch_size, transport="grpc", stain=args.stain)
    config = PredictConfig(output_level=args.output_level, window=args.window, device=args.device,
                           max_batches=args.max_batches)
    model = load_checkpoint(args.checkpoint, args.device)

    def progress(p: dict[str, Any]) -> None:
        print(json.dumps({"progress": p}), file=sys.stderr, flush=True)

    result = predict(client, stream, model, args.out, config, progress)
    print(json.dumps(result))
    return 0
