"""Four trainers on one node: one service for all of them against four independent DataLoaders.

Ours: one `loader-service` (decode threads = the cores) and N `trainer-client bench` processes (one job,
ranks 0..N-1, shared memory). Baseline: N processes, each a torch DataLoader whose workers open the slides
with OpenSlide and read random 256² patches, with the same augmentations (our `augment_batch` on the CPU),
``num_workers`` split so the total equals the cores. Memory is the proportional set size (PSS: shared pages
counted once) summed over every process of each setup, sampled while it runs; throughput is the sum of the
trainers' patches/s.

    python -m bench.bench_multi_trainer [--trainers 4] [--seconds 20] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from bench.common import python_cmd, service

BASELINE = r"""
import json, sys
from bench.baselines import run_dataloader_baseline
slides, seconds, workers, rank = json.loads(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
result = run_dataloader_baseline(slides, workers=workers, seconds=seconds, batch=32, seed=rank)
print(json.dumps({"tiles_per_s": result["patches_per_s"]}), flush=True)
"""


class PssSampler:
    """Peak of the summed PSS of a set of process trees, sampled every 0.5 s, with the split at the peak:
    ``parts[i]`` = (PSS of root ``i`` itself, PSS of its descendants)."""

    def __init__(self, roots: list[int]) -> None:
        self.roots, self.peak, self._stop = roots, 0, threading.Event()
        self.parts: list[tuple[int, int]] = [(0, 0)] * len(roots)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            parts = []
            for pid in self.roots:
                try:
                    root = psutil.Process(pid)
                    own = root.memory_full_info().pss
                    children = sum(c.memory_full_info().pss for c in root.children(recursive=True))
                except psutil.Error:
                    own = children = 0
                parts.append((own, children))
            total = sum(a + b for a, b in parts)
            if total > self.peak:
                self.peak, self.parts = total, parts
            self._stop.wait(0.5)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(timeout=5)
        return self.peak


def run_ours(manifest: Path, trainers: int, seconds: float, cores: int) -> dict[str, Any]:
    args = ("--manifest", f"bench={manifest}", "--metrics-port", "-1", "--device", "cpu", "--workers", str(cores),
            "--tissue-cache-dir", str(manifest.parent / ".tissue"))
    with service(*args) as (port, proc):
        procs = [subprocess.Popen(python_cmd("trainer_client.cli", "bench", "--endpoint", f"127.0.0.1:{port}",
                                             "--dataset", "bench", "--seconds", str(seconds), "--batch-size", "32",
                                             "--patch-size", "256", "--transport", "shm", "--rank", str(r),
                                             "--world-size", str(trainers), "--job-id", "bench"),
                                  stdout=subprocess.PIPE, text=True) for r in range(trainers)]
        sampler = PssSampler([proc.pid, *(p.pid for p in procs)])
        outs = [json.loads(p.communicate(timeout=seconds + 300)[0].strip().splitlines()[-1]) for p in procs]
        peak = sampler.stop()
    service_mib = sum(sampler.parts[0]) / 2**20
    return {"patches_per_s": sum(o["tiles_per_s"] for o in outs), "pss_mib": peak / 2**20,
            "service_mib": service_mib, "trainers_mib": peak / 2**20 - service_mib}


def run_baseline(slides: list[str], trainers: int, seconds: float, cores: int) -> dict[str, Any]:
    workers = max(1, cores // trainers)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    procs = [subprocess.Popen([sys.executable, "-c", BASELINE, json.dumps(slides), str(seconds), str(workers), str(r)],
                              stdout=subprocess.PIPE, text=True, env=env) for r in range(trainers)]
    sampler = PssSampler([p.pid for p in procs])
    outs = [json.loads(p.communicate(timeout=seconds + 300)[0].strip().splitlines()[-1]) for p in procs]
    peak = sampler.stop()
    workers_mib = sum(b for _, b in sampler.parts) / 2**20
    return {"patches_per_s": sum(o["tiles_per_s"] for o in outs), "pss_mib": peak / 2**20, "workers_each": workers,
            "trainers_mib": peak / 2**20 - workers_mib, "workers_mib": workers_mib}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trainers", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--cores", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--slide-size", type=int, default=8192)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from loader_service.synthetic import write_synthetic_dataset

    with tempfile.TemporaryDirectory() as tmp:
        manifest = write_synthetic_dataset(Path(tmp), n_slides=4, size=args.slide_size, seed=0)
        slides = sorted(str(p) for p in Path(tmp).rglob("*.tif*"))
        baseline = run_baseline(slides, args.trainers, args.seconds, args.cores)
        ours = run_ours(manifest, args.trainers, args.seconds, args.cores)
    result = {"trainers": args.trainers, "cores": args.cores, "ours": ours, "baseline": baseline,
              "memory_ratio": ours["pss_mib"] / baseline["pss_mib"],
              "throughput_ratio": ours["patches_per_s"] / baseline["patches_per_s"]}
    print(f"{args.trainers} trainers, {args.cores} cores")
    print(f"  baseline (DataLoader+OpenSlide, {baseline['workers_each']} worker each): "
          f"{baseline['patches_per_s']:7.1f} patches/s, PSS {baseline['pss_mib']:7.0f} MiB "
          f"(trainer processes {baseline['trainers_mib']:.0f}, their workers {baseline['workers_mib']:.0f})")
    print(f"  ours (one service, shared memory):            {ours['patches_per_s']:7.1f} patches/s, "
          f"PSS {ours['pss_mib']:7.0f} MiB (service {ours['service_mib']:.0f}, trainers {ours['trainers_mib']:.0f})")
    print(f"  memory ours/baseline {result['memory_ratio']:.2f}  throughput ours/baseline {result['throughput_ratio']:.2f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
