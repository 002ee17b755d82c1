"""The CLI contract other tools drive, and the README's Python example, run for real."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import yaml

from loader_service.cli import _parser, build_config
from loader_service.server import LoaderServer

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_bench_prints_one_json_line(server: LoaderServer) -> None:
    out = run("-m", "trainer_client.cli", "bench", "--endpoint", f"127.0.0.1:{server.port}", "--dataset", "train",
              "--seconds", "1", "--batch-size", "8", "--patch-size", "64", "--transport", "grpc")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    for key in ("tiles_per_s", "mpix_per_s", "bytes_per_s", "batches"):
        assert key in result
    assert result["batches"] > 0 and result["tiles_per_s"] > 0


def test_inspect_prints_levels_and_writes_a_thumbnail(dataset_dir: Path, tmp_path: Path) -> None:
    slide = next((dataset_dir / "slides").glob("*.tif*"))
    png = tmp_path / "thumb.png"
    out = run("-m", "loader_service.cli", "inspect", str(slide), "--thumbnail", str(png), "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert len(report["levels"]) >= 2 and 0 < report["tissue_fraction"] < 1
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = run("-m", "loader_service.cli", "inspect", str(slide))
    assert "levels:" in text.stdout and "mpp" in text.stdout


def test_print_defaults_round_trips_into_a_config(tmp_path: Path, dataset_dir: Path) -> None:
    out = run("-m", "loader_service.cli", "config", "--print-defaults")
    assert out.returncode == 0, out.stderr
    data = yaml.safe_load(out.stdout)
    data["datasets"] = [{"name": "train", "manifest": str(dataset_dir / "manifest.csv")}]
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    config = build_config(_parser().parse_args(["serve", "--config", str(path), "--workers", "3"]))
    assert config.workers == 3 and config.datasets[0].name == "train"


def test_bad_flags_say_what_to_fix(tmp_path: Path) -> None:
    out = run("-m", "loader_service.cli", "serve", "--manifest", "x.txt")
    assert out.returncode == 2 and ".csv" in out.stderr
    bad = tmp_path / "c.yaml"
    bad.write_text("workerz: 3\n")
    out = run("-m", "loader_service.cli", "serve", "--config", str(bad), "--synthetic")
    assert out.returncode == 2 and "unknown configuration keys ['workerz']" in out.stderr


def test_readme_python_example_runs(server: LoaderServer) -> None:
    readme = (ROOT / "README.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", readme, re.S)
    assert snippet is not None
    code = snippet.group(1).replace("127.0.0.1:50051", f"127.0.0.1:{server.port}")
    out = run("-c", code, timeout=300)
    assert out.returncode == 0, out.stderr
