"""``trainer_client.train_decomposed`` under torchrun (2 gloo ranks on loopback): train, checkpoint,
resume; a resumed run ends in exactly the state of an uninterrupted one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainer_client.decomposed.train import parse_args
from trainer_client.decomposed.verify import free_port

ROOT = Path(__file__).resolve().parents[1]


def _torchrun(*args: str, source: tuple[str, ...] = ("--synthetic", "--dtype", "float64",
                                                      "--image-size", "61x70")) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--nnodes", "1",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           "-m", "trainer_client.train_decomposed", "--grid", "1x2", "--arch", "resnet18", "--batch-size", "2",
           *source, *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def test_train_checkpoint_resume(tmp_path: Path) -> None:
    straight, split = tmp_path / "straight", tmp_path / "split"
    log = _torchrun("--steps", "3", "--checkpoint-dir", str(straight))
    assert "train_decomposed summary: step=3" in log
    assert "images/s" in log and "peak_mem" in log
    _torchrun("--steps", "2", "--checkpoint-dir", str(split))
    log = _torchrun("--steps", "3", "--checkpoint-dir", str(split), "--resume")
    assert "resumed from" in log and "at step 2" in log
    a = torch.load(straight / "checkpoint.pt", weights_only=True)
    b = torch.load(split / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 3
    for k, v in a["model"].items():
        assert torch.allclose(v.double(), b["model"][k].double(), rtol=1e-12, atol=1e-14), k


def test_trains_from_the_services_shard_view(server: object, tmp_path: Path) -> None:
    """Each rank receives only its shard of each sample from the service (grid 1x2), and training runs."""
    endpoint = f"127.0.0.1:{server.port}"  # type: ignore[attr-defined]
    log = _torchrun("--steps", "2", "--checkpoint-dir", str(tmp_path),
                    source=("--endpoint", endpoint, "--dataset", "train", "--image-size", "96x96",
                            "--samples-per-epoch", "8"))
    assert "train_decomposed summary: step=2" in log
    log = _torchrun("--steps", "3", "--checkpoint-dir", str(tmp_path), "--resume",
                    source=("--endpoint", endpoint, "--dataset", "train", "--image-size", "96x96",
                            "--samples-per-epoch", "8"))
    assert "at step 2" in log and "train_decomposed summary: step=3" in log


def test_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--synthetic", "--grid", "2by2"])
    assert "RxC" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args([])
    assert "--synthetic" in capsys.readouterr().err
    cfg = parse_args(["--synthetic", "--grid", "2x3", "--image-size", "97x123"])
    assert cfg.grid == (2, 3) and cfg.image_hw == (97, 123)
