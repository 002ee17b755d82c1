"""`trainer-client train` under torchrun: one data-parallel model (replicas bit-identical), rank-aware
checkpoints, and a resume on another number of ranks."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from trainer_client.decomposed.verify import free_port

ROOT = Path(__file__).resolve().parents[1]


def _train(server: Any, ranks: int, *args: str) -> list[dict[str, Any]]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    train = ["-m", "trainer_client.cli", "train", "--endpoint", f"127.0.0.1:{server.port}", "--dataset", "train",
             "--batch-size", "4", "--patch-size", "32", "--log-every", "1", "--samples-per-epoch", "48", *args]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--nnodes", "1",
                "--master-addr", "127.0.0.1", "--master-port", str(free_port())] if ranks > 1 else [sys.executable]
    proc = subprocess.run([*launcher, *train], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # the ranks share one stdout: their summary lines may run together
    summaries = [json.loads(m.group()) for m in re.finditer(r'\{"rank": .*?"weights": "[0-9a-f]{64}"\}', proc.stdout)]
    assert sorted(s["rank"] for s in summaries) == list(range(ranks)), proc.stdout
    return summaries


def test_ranks_train_one_model_and_resume_on_fewer(server: Any, tmp_path: Path) -> None:
    straight = _train(server, 2, "--steps", "3")
    assert all(s["world_size"] == 2 and s["steps"] == 3 and s["images"] == 12 for s in straight)
    assert straight[0]["weights"] == straight[1]["weights"]  # gradients all-reduced: replicas identical

    checkpoint = tmp_path / "ckpt.pt"
    _train(server, 2, "--steps", "2", "--checkpoint", str(checkpoint))
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["step"] == 2 and saved["world_size"] == 2
    assert saved["loader"]["resume"] == [[2, [8, 8]]]  # both ranks' cursors, merged by rank 0
    resumed = _train(server, 2, "--steps", "3", "--checkpoint", str(checkpoint), "--resume")
    assert resumed[0]["weights"] == resumed[1]["weights"] == straight[0]["weights"]  # same as never stopped

    # the 2-rank checkpoint on one rank: the 16 samples the two ranks had not read, re-sharded onto it
    _train(server, 2, "--steps", "2", "--checkpoint", str(checkpoint))
    alone = _train(server, 1, "--steps", "6", "--checkpoint", str(checkpoint), "--resume")
    assert alone[0]["steps"] == 6 and alone[0]["images"] == 16
