"""The GPU check (scripts/gpu_check.sh) dry-run on the CPU: every part reported, GPU parts skipped with the
reason, the CPU sides measured, and a failing part recorded as data while the next one still runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.gpu_check import driver

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["gpu_tests", "jpeg_decode", "augment", "cuda_ipc", "end_to_end", "streaming", "memory"]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("gpucheck")
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(out), "--quick", "--skip-gpu"],
                          capture_output=True, text=True, timeout=240, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    summary["_log"] = (out / "gpu_check.log").read_text()
    summary["_stdout"] = proc.stdout
    return summary


def test_dry_run_reports_every_part_and_the_machine(dry_run: dict) -> None:
    assert list(dry_run["parts"]) == NAMES == [p.name for p in driver.PARTS]
    env = dry_run["environment"]
    for key in ("gpu", "cpu_count", "cores_available", "torch", "torch_cuda", "cuda_available", "cuda_ipc_backend"):
        assert key in env, key
    assert env["cpu_count"] >= 1 and env["torch"]
    assert dry_run["gpu_missing"] == "--skip-gpu given"
    for name in NAMES:
        assert dry_run["parts"][name]["status"].startswith("skipped: --skip-gpu given"), (name, dry_run["parts"][name])
        assert f"{name} " in dry_run["_stdout"]
    assert sum(p.cap_s for p in driver.PARTS) <= 470  # the whole check fits 8 minutes
    assert dry_run["wall_s"] < 240


def test_dry_run_measures_the_cpu_sides(dry_run: dict) -> None:
    decode = dry_run["parts"]["jpeg_decode"]
    assert decode["tiles"]["count"] > 0 and decode["cpu_per_tile"]["tiles_per_s"] > 0
    assert decode["batched_cpu_vs_cpu"]["max_abs"] == 0  # torchvision's CPU decode_jpeg = the tile decoder
    assert "nvjpeg_vs_cpu" not in decode
    aug = dry_run["parts"]["augment"]
    assert aug["cpu_images_per_s"] > 0 and aug["stitching_cpu"]["equal"] and aug["stitching_cpu"]["pieces"] > 10
    assert "gpu_vs_cpu" not in aug
    rows = dry_run["parts"]["end_to_end"]["rows"]
    assert rows and all(r["path"] == "cpu-aug+shm" and r["patches_per_s"] > 0 for r in rows), rows
    assert rows[0]["transport_used"] == "shm"
    assert "===== end_to_end" in dry_run["_log"]


def test_a_failing_part_is_data_and_the_next_one_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    broken = driver.Part("no_such_part", 30, 30, "a part whose process cannot start", False)
    gpu_only = next(p for p in driver.PARTS if p.name == "memory")
    monkeypatch.setattr(driver, "PARTS", (broken, gpu_only))
    summary = driver.run_check(tmp_path, quick=True, skip_gpu=True, budget_s=100)
    assert summary["parts"]["no_such_part"]["status"].startswith("failed: part process exited with 2")
    assert summary["parts"]["memory"]["status"].startswith("skipped: ")
    assert json.loads((tmp_path / "summary.json").read_text())["parts"].keys() == {"no_such_part", "memory"}
    assert "invalid choice: 'no_such_part'" in (tmp_path / "gpu_check.log").read_text()
    tiny = driver.run_check(tmp_path / "tiny", quick=True, budget_s=10, only=["no_such_part"])
    assert tiny["parts"]["no_such_part"]["status"].startswith("skipped: no time left")
