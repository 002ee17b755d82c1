"""bench/gil_serial.py, the one-thread GIL measurement of #12, runs the service's real session code: a short run
proves it still does (without py-spy, which needs ptrace: only its throughput columns are checked here)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(240)
def test_serial_harness_builds_batches_on_one_thread() -> None:
    proc = subprocess.run([sys.executable, "-m", "bench.gil_serial", "--augment", "pathology", "none", "--seconds", "1",
                           "--slide-size", "2048", "--warmup", "0.5", "--batch-size", "16"],
                          capture_output=True, text=True, timeout=220, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split() for line in proc.stdout.splitlines() if line.startswith("serial")]
    assert [r[1] for r in rows] == ["pathology", "none"], proc.stdout
    for r in rows:
        assert float(r[3]) > 0 and r[4] == "patches/s" and "py-spy not given" in " ".join(r), proc.stdout
