"""The soak's 60-second version (bench/soak.py; docs/reliability.md records a 10-minute run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.soak
@pytest.mark.timeout(420)
def test_soak_60s_no_growth_no_unexpected_error_shm_clean(tmp_path: Path) -> None:
    out = tmp_path / "soak"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "soak.py"), "--duration", "60", "--clients", "3",
                           "--kill-every", "10", "--out", str(out)], capture_output=True, text=True, timeout=400,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    report = json.loads((out / "soak.json").read_text())
    failed = [name for name, ok in report["checks"].items() if not ok]
    assert proc.returncode == 0 and not failed, (failed, report["faults"], proc.stderr[-2000:])
    assert report["faults"]["kill -9 (client process)"]["killed"] >= 3
    assert report["sessions_ended"]["client_closed"] > 0 and report["sessions_ended"]["client_gone"] > 0
    assert (out / "soak.png").stat().st_size > 0
