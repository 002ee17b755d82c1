"""The README's first command: synthetic slides, the service, and a trainer pulling from it."""

from __future__ import annotations

import json
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
        import torch

        torch.set_num_threads(config.torch_threads)
        with LoaderServer(config) as server:
            assert server.metrics_endpoint is not None
            endpoint = f"127.0.0.1:{server.port}"
            print(f"service on {endpoint}; metrics at {server.metrics_endpoint.url}", flush=True)
            env = dict(os.environ, PYTHONUNBUFFERED="1")
            client = [sys.executable, "-m", "trainer_client.cli"]
            print(f"training a ResNet-18 for {steps} steps on 128² patches streamed from the service:", flush=True)
            train = subprocess.run([*client, "train", "--endpoint", endpoint, "--dataset", "demo", "--steps", str(steps),
                                    "--batch-size", "32", "--patch-size", "128", "--log-every", "5"], env=env, check=False)
            if train.returncode != 0:
                return train.returncode
            # `auto` takes shared memory when the service sees this process' /dev/shm; bench prints which
            # transport it got and why.
            print("loader throughput alone (no model), 5 s per transport (gRPC bytes, then auto):", flush=True)
            for transport in ("grpc", "auto"):
                bench = subprocess.run([*client, "bench", "--endpoint", endpoint, "--dataset", "demo", "--seconds", "5",
                                        "--batch-size", "64", "--patch-size", "256", "--transport", transport],
                                       env=env, check=False)
                if bench.returncode != 0:
                    return bench.returncode
            m = server.metrics
            served = sum(m.sample("wsi_loader_patches_total", {"dataset": "demo", "transport": t}) for t in ("grpc", "shm"))
            summary = {
                "patches_served": served,
                "bytes_served": sum(m.sample("wsi_loader_bytes_total", {"transport": t}) for t in ("grpc", "shm")),
                "tile_cache_hit_ratio": round(m.sample("wsi_loader_tile_cache_hit_ratio"), 3),
                "metrics": server.metrics_endpoint.url,
            }
            print("service: " + json.dumps(summary), flush=True)
            print(f"Prometheus metrics were served at {server.metrics_endpoint.url} while the demo ran "
                  "(run `loader-service serve` to keep a service up).", flush=True)
            return 0
