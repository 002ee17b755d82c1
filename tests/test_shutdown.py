"""SIGTERM drains: in-flight batches are delivered, then the client is told where to resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from trainer_client import LoaderClient, ReconnectPolicy, StreamConfig, UnavailableError


def test_sigterm_finishes_in_flight_batches(dataset_dir: Path) -> None:
    cmd = [sys.executable, "-m", "loader_service.cli", "serve", "--manifest", f"train={dataset_dir / 'manifest.csv'}",
           "--listen", "127.0.0.1:0", "--metrics-port", "-1", "--workers", "2", "--device", "cpu",
           "--tissue-cache-dir", str(dataset_dir / ".tissue-cache")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, proc.stderr.read() if proc.stderr else ""
        port = json.loads(line)["port"]
        # an epoch far longer than the drain, however slow the signal is handled on a loaded machine
        cfg = StreamConfig(dataset="train", batch_size=8, patch_size=64, samples_per_epoch=10**6, credits=3,
                           timeout_s=60, reconnect=ReconnectPolicy(attempts=0))  # the drain's own answer
        received = 0
        with LoaderClient(f"127.0.0.1:{port}") as client, client.stream(cfg) as stream:
            it = iter(stream)
            next(it)
            received = 1
            proc.send_signal(signal.SIGTERM)
            with pytest.raises(UnavailableError, match="resume from cursor"):
                for _ in it:
                    received += 1
            assert stream.state_dict()["cursor"] == received * 8
        assert received < 10**6 // 8
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
