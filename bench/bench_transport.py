"""Shared memory against gRPC bytes, side by side in one run.

1. Against `serve --synthetic` (no decode): bytes/s of each transport for batches from 1 to 100 MiB.
2. On real (synthetic pyramidal JPEG) slides: the end-to-end patch rate over each transport.

    python -m bench.bench_transport [--seconds 5] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from bench.common import median, python_cmd, run_json, service

SHAPES = [  # (batch, patch, dtype) -> batch bytes
    (16, 128, "uint8"),  # 0.75 MiB
    (32, 256, "uint8"),  # 6 MiB
    (64, 256, "uint8"),  # 12 MiB
    (32, 512, "uint8"),  # 24 MiB
    (32, 512, "float32"),  # 96 MiB
]


def bench_client(port: int, dataset: str, transport: str, batch: int, patch: int, dtype: str, seconds: float,
                 consume: str) -> dict[str, Any]:
    cmd = python_cmd("trainer_client.cli", "bench", "--endpoint", f"127.0.0.1:{port}", "--dataset", dataset,
                     "--transport", transport, "--batch-size", str(batch), "--patch-size", str(patch),
                     "--seconds", str(seconds), "--dtype", dtype, "--consume", consume, "--credits", "4")
    return run_json(cmd)


def synthetic_rows(seconds: float, repeats: int, consume: str) -> list[dict[str, Any]]:
    rows = []
    with service("--synthetic", "--metrics-port", "-1", "--device", "cpu", "--max-credits", "8") as (port, _):
        for batch, patch, dtype in SHAPES:
            rates: dict[str, list[float]] = {"grpc": [], "shm": []}
            for _ in range(repeats):
                for transport in ("grpc", "shm"):  # interleaved, so drift hits both alike
                    r = bench_client(port, "synthetic", transport, batch, patch, dtype, seconds, consume)
                    assert r["transport_used"] == transport, r
                    rates[transport].append(r["bytes_per_s"])
            row = {"batch": batch, "patch": patch, "dtype": dtype,
                   "batch_mib": batch * 3 * patch * patch * (4 if dtype == "float32" else 1) / 2**20,
                   "grpc_gbps": median(rates["grpc"]) / 1e9, "shm_gbps": median(rates["shm"]) / 1e9}
            row["ratio"] = row["shm_gbps"] / row["grpc_gbps"]
            rows.append(row)
            print(f"synthetic {row['batch_mib']:7.1f} MiB/batch  grpc {row['grpc_gbps']:6.2f} GB/s  "
                  f"shm {row['shm_gbps']:6.2f} GB/s  shm/grpc {row['ratio']:5.1f}x", flush=True)
    return rows


def slide_rows(seconds: float, repeats: int, workers: int) -> list[dict[str, Any]]:
    from loader_service.synthetic import write_synthetic_dataset

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        manifest = write_synthetic_dataset(Path(tmp), n_slides=4, size=8192, seed=0)
        args = ("--manifest", f"bench={manifest}", "--metrics-port", "-1", "--device", "cpu", "--workers", str(workers))
        with service(*args) as (port, _):
            for batch, patch in ((64, 256), (16, 512)):
                rates: dict[str, list[float]] = {"grpc": [], "shm": []}
                for _ in range(repeats):
                    for transport in ("grpc", "shm"):
                        r = bench_client(port, "bench", transport, batch, patch, "uint8", seconds, "none")
                        rates[transport].append(r["tiles_per_s"])
                row = {"batch": batch, "patch": patch, "grpc_patches_s": median(rates["grpc"]),
                       "shm_patches_s": median(rates["shm"])}
                row["ratio"] = row["shm_patches_s"] / row["grpc_patches_s"]
                rows.append(row)
                print(f"slides {batch}x{patch}²  grpc {row['grpc_patches_s']:7.1f} patches/s  "
                      f"shm {row['shm_patches_s']:7.1f} patches/s  shm/grpc {row['ratio']:4.2f}x", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--consume", choices=("none", "copy"), default="none")
    parser.add_argument("--skip-slides", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    result = {"synthetic": synthetic_rows(args.seconds, args.repeats, args.consume)}
    if not args.skip_slides:
        result["slides"] = slide_rows(args.seconds, args.repeats, args.workers)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
