"""The README's first command: synthetic slides, the service, and a trainer pulling from it."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from loader_service.config import DatasetConfig, ServiceConfig, default_workers
from loader_service.server import LoaderServer
from loader_service.synthetic import write_synthetic_dataset

__all__ = ["run_demo"]

log = logging.getLogger(__name__)


def run_demo(workdir: str | None, slides: int, steps: int, workers: int | None) -> int:
    with tempfile.TemporaryDirectory(prefix="wsi-demo-") as tmp:
        root = Path(workdir or tmp)
        t0 = time.perf_counter()
        manifest = write_synthetic_dataset(root / "slides", n_slides=slides, size=4096, seed=0)
        print(f"wrote {slides} synthetic pyramidal slides in {time.perf_counter() - t0:.1f}s: {manifest}", flush=True)
        config = ServiceConfig(
            datasets=(DatasetConfig("demo", manifest),), listen="127.0.0.1:0", metrics_port=0,
            workers=workers or default_workers(), tissue_cache_dir=root / "tissue-cache",
        )
        with LoaderServer(config) as server:
            assert server.metrics_endpoint is not None
            endpoint = f"127.0.0.1:{server.port}"
            print(f"service on {endpoint}; metrics at {server.metrics_endpoint.url}", flush=True)
            cmd = [sys.executable, "-m", "trainer_client.cli", "train", "--endpoint", endpoint, "--dataset", "demo",
                   "--steps", str(steps), "--batch-size", "32", "--patch-size", "224"]
            env = dict(os.environ, PYTHONUNBUFFERED="1")
            result = subprocess.run(cmd, env=env, check=False)
            m = server.metrics
            summary = {
                "patches_served": m.sample("wsi_loader_patches_total", {"dataset": "demo", "transport": "grpc"}),
                "bytes_served": m.sample("wsi_loader_bytes_total", {"transport": "grpc"}),
                "tile_cache_hit_ratio": m.sample("wsi_loader_tile_cache_hit_ratio"),
                "metrics": server.metrics_endpoint.url,
            }
            print("service: " + json.dumps(summary), flush=True)
            return result.returncode
