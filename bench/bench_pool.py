"""Aggregate patches/s to one trainer from 1 and from 2 services of a pool, each service pinned to its own core.

Two `loader-service serve` processes (`taskset -c 0` and `taskset -c 1`, one decode thread each) over the same
synthetic slides; one trainer (this process, unpinned) iterating a ``PoolStream`` over gRPC bytes: first over the
service on core 0 alone, then over both (its shard split into two sub-shards). The two settings alternate for
``--rounds`` rounds of ``--seconds`` each, after a warm-up; medians and the scaling ratio are printed.

    python -m bench.bench_pool [--seconds 8] [--rounds 3] [--patch-size 256] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import median, service
from trainer_client import PoolConfig, PoolStream, StreamConfig


def _rate(endpoints: list[str], args: argparse.Namespace, seed: int, warm: int = 3) -> tuple[float, dict[str, int]]:
    """Patches/s over ``args.seconds`` of one trainer pulling from ``endpoints`` (after ``warm`` warm-up batches),
    and the batches each service served."""
    config = StreamConfig(dataset="bench", batch_size=args.batch_size, patch_size=args.patch_size,
                          samples_per_epoch=1_000_000, seed=seed, credits=4, transport="grpc", timeout_s=120)
    stream = PoolStream(config, PoolConfig(tuple(endpoints), queue_batches=4), rank=0, world_size=1)
    patches, started = 0, 0.0
    for i, batch in enumerate(stream):
        if i == warm:
            started = time.perf_counter()
        elif i > warm:
            patches += len(batch["x"])
            if time.perf_counter() - started >= args.seconds:
                break
    return patches / (time.perf_counter() - started), dict(stream.stats.batches_by_endpoint)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--patch-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        raise SystemExit(f"needs two cores to pin one service on each, this process may use {cores}")
    from loader_service.synthetic import write_synthetic_dataset

    with tempfile.TemporaryDirectory() as tmp:
        manifest = write_synthetic_dataset(Path(tmp), n_slides=4, size=4096, seed=7)
        common = ("--manifest", f"bench={manifest}", "--workers", "1", "--device", "cpu", "--metrics-port", "-1",
                  "--tissue-cache-dir", str(Path(tmp) / "cache"))
        with service(*common, prefix=("taskset", "-c", str(cores[0]))) as (port0, _), \
                service(*common, prefix=("taskset", "-c", str(cores[1]))) as (port1, _):
            one, two = [f"127.0.0.1:{port0}"], [f"127.0.0.1:{port0}", f"127.0.0.1:{port1}"]
            warm = _rate(two, argparse.Namespace(**{**vars(args), "seconds": 5.0}), seed=99, warm=20)
            print(f"warm-up: batches by service {warm[1]}")  # both indexed and serving
            rates: dict[str, list[float]] = {"1 service": [], "2 services": []}
            for round_ in range(args.rounds):
                for name, endpoints in (("1 service", one), ("2 services", two))[:: 1 if round_ % 2 == 0 else -1]:
                    rate, served = _rate(endpoints, args, seed=round_)
                    rates[name].append(rate)
                    print(f"round {round_} {name}: {rate:.0f} patches/s, batches by service {served}", flush=True)
    result: dict[str, Any] = {name: {"median": median(v), "runs": v} for name, v in rates.items()}
    result["scaling"] = result["2 services"]["median"] / result["1 service"]["median"]
    print(f"{'setting':<12} {'median patches/s':>17}  runs")
    for name in rates:
        print(f"{name:<12} {result[name]['median']:>17.0f}  {', '.join(f'{v:.0f}' for v in rates[name])}")
    print(f"scaling 2/1: {result['scaling']:.2f}x  (patch {args.patch_size}², batch {args.batch_size}, gRPC bytes)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
