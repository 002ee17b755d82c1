"""One part of the GPU check, run in its own process: ``python -m bench.gpu_check.run_part NAME RESULT [options]``.

The part writes its result to the JSON file RESULT after every step (so a part killed at its time cap still
leaves what it measured), and catches its own exceptions: they become ``status: "failed: ..."`` with the
traceback. The driver (:mod:`.driver`) reads the file whatever happened.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["PartContext", "SkipPart", "gpu_missing", "run_part"]

log = logging.getLogger("gpu_check")


class SkipPart(Exception):
    """Raised by a part whose GPU side cannot run here; its message is the reason."""


def gpu_missing(skip: bool = False) -> str | None:
    """Why this process cannot use a CUDA device (None when it can); ``skip``: as if it had none."""
    if skip or os.environ.get("GPU_CHECK_SKIP_GPU") == "1":
        return "--skip-gpu given"
    import torch

    if not torch.cuda.is_available():
        return f"no CUDA device visible to torch {torch.__version__} (torch.version.cuda={torch.version.cuda})"
    return None


@dataclass
class PartContext:
    """What a part gets: its sizes (``quick``), its deadline, and ``record`` to save results as it goes."""

    name: str
    result_path: Path
    workdir: Path
    quick: bool
    cap_s: float
    started: float = field(default_factory=time.monotonic)
    result: dict[str, Any] = field(default_factory=dict)

    @property
    def gpu_reason(self) -> str | None:
        return gpu_missing()

    def left(self) -> float:
        """Seconds left before this part's cap."""
        return self.cap_s - (time.monotonic() - self.started)

    def record(self, key: str, value: Any) -> None:
        self.result[key] = value
        self.save()

    def save(self) -> None:
        tmp = self.result_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.result, indent=1, default=str))
        tmp.replace(self.result_path)


def run_part(name: str, fn: Callable[[PartContext], None], ctx: PartContext) -> int:
    """Run one part; status ``ok`` unless it skips (GPU side absent) or raises."""
    ctx.record("status", "running")
    try:
        fn(ctx)
        ctx.result["status"] = "ok"
    except SkipPart as why:
        ctx.result["status"] = f"skipped: {why}"
    except BaseException as err:  # noqa: BLE001 - every failure is data for the summary
        ctx.result["status"] = f"failed: {type(err).__name__}: {str(err)[:500]}"
        ctx.result["traceback"] = traceback.format_exc()[-4000:]
        log.exception("part %s failed", name)
    ctx.result["seconds"] = round(time.monotonic() - ctx.started, 1)
    ctx.save()
    return 0


def main(argv: list[str] | None = None) -> int:
    from .parts import PART_FUNCTIONS

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("name", choices=sorted(PART_FUNCTIONS))
    ap.add_argument("result", type=Path)
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--cap", type=float, required=True, help="this part's time cap in seconds")
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"[{a.name}] %(message)s", stream=sys.stdout)
    logging.getLogger("pyvips").setLevel(logging.WARNING)
    a.workdir.mkdir(parents=True, exist_ok=True)
    ctx = PartContext(a.name, a.result, a.workdir, a.quick, a.cap)
    return run_part(a.name, PART_FUNCTIONS[a.name], ctx)

