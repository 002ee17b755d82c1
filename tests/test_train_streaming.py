"""`trainer-client train-streaming` against the real service: trains, checkpoints, resumes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from loader_service.server import LoaderServer

ROOT = Path(__file__).resolve().parents[1]


def train(server: LoaderServer, checkpoint: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "trainer_client.cli", "train-streaming", "--endpoint", f"127.0.0.1:{server.port}",
           "--dataset", "train", "--arch", "resnet18", "--region", "448", "--tile-size", "448", "--service-tile", "160",
           "--samples-per-epoch", "3", "--checkpoint", str(checkpoint), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_train_streaming_saves_and_resumes(server: LoaderServer, tmp_path: Path) -> None:
    ckpt = tmp_path / "streaming.pt"
    first = train(server, ckpt, "--steps", "2")
    assert first.returncode == 0, first.stderr
    assert "images/s" in first.stdout and "peak" in first.stdout
    summary = json.loads(first.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 2 and summary["cursor"] == 2
    state = torch.load(ckpt, weights_only=False)
    assert state["step"] == 2 and state["loader"]["cursor"] == 2
    second = train(server, ckpt, "--steps", "2", "--resume")
    assert second.returncode == 0, second.stderr
    summary = json.loads(second.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 4
    assert (summary["epoch"], summary["cursor"]) == (1, 1)  # 3 samples per epoch: the 4th step is epoch 1's first
