"""Service settings side by side: the same trainer pull against services started with different flags.

On one synthetic 16384² pyramidal JPEG slide (bench_decode.make_bench_slide), every variant's service and its
`trainer-client bench` are pinned to the same cores; the variants run in turn, repeated, so that drift of a
noisy machine hits them alike. Prints, per variant, the median patches/s and service CPU-ms per patch, and
the ratio of each median to the first variant's.

    python -m bench.bench_settings --variant "--workers 2" --variant "--workers 1" --variant "--workers 3" \\
        [--cores 2] [--repeats 3] [--seconds 6] [--augment] [--transport shm]
"""

from __future__ import annotations

import argparse
import os
import shlex
import tempfile
from pathlib import Path
from typing import Any

import psutil

from bench.common import median, python_cmd, run_json, serve


def pull(manifest: Path, flags: list[str], cpus: str, args: argparse.Namespace) -> dict[str, float]:
    """patches/s and service CPU-ms per patch of one service started with ``flags``."""
    base = ("--manifest", f"bench={manifest}", "--metrics-port", "-1", "--device", "cpu",
            "--tissue-cache-dir", str(manifest.parent / ".tissue"))
    with serve(*base, *flags, prefix=("taskset", "-c", cpus)) as (info, proc):
        service = psutil.Process(proc.pid)
        before = service.cpu_times()
        cmd = ["taskset", "-c", cpus, *python_cmd(
            "trainer_client.cli", "bench", "--endpoint", f"127.0.0.1:{info['port']}", "--dataset", "bench",
            "--seconds", str(args.seconds), "--batch-size", "64", "--patch-size", "256", "--tissue-threshold", "0",
            "--transport", args.transport, *([] if args.augment else ["--no-augment"]))]
        result: dict[str, Any] = run_json(cmd)
        after = service.cpu_times()
    patches = max(1.0, float(result["tiles"]))
    cpu_s = (after.user + after.system) - (before.user + before.system)
    return {"patches_per_s": float(result["tiles_per_s"]), "cpu_ms_per_patch": 1e3 * cpu_s / patches}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", action="append", required=True,
                        help="service flags of one variant, quoted; the first is the reference")
    parser.add_argument("--cores", type=int, default=min(2, len(os.sched_getaffinity(0))))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--size", type=int, default=16384)
    parser.add_argument("--transport", choices=("shm", "grpc"), default="shm")
    parser.add_argument("--augment", action="store_true", help="the pathology preset (default: no augmentation)")
    args = parser.parse_args()
    from bench.bench_decode import make_bench_slide

    cpus = ",".join(str(c) for c in sorted(os.sched_getaffinity(0))[: args.cores])
    runs: dict[str, list[dict[str, float]]] = {v: [] for v in args.variant}
    with tempfile.TemporaryDirectory() as tmp:
        slide = make_bench_slide(tmp, args.size)
        manifest = Path(tmp) / "manifest.csv"
        manifest.write_text(f"path,label\n{slide.name},x\n")
        for rep in range(args.repeats):
            for variant in args.variant:
                row = pull(manifest, shlex.split(variant), cpus, args)
                runs[variant].append(row)
                print(f"run {rep}  {variant:30s} {row['patches_per_s']:7.0f} patches/s  "
                      f"{row['cpu_ms_per_patch']:.3f} CPU-ms/patch", flush=True)
    ref = median([r["patches_per_s"] for r in runs[args.variant[0]]])
    print(f"medians of {args.repeats} on {args.cores} cores ({args.transport}, "
          f"{'pathology' if args.augment else 'no augmentation'}):")
    for variant, rows in runs.items():
        rate = median([r["patches_per_s"] for r in rows])
        cpu = median([r["cpu_ms_per_patch"] for r in rows])
        print(f"  {variant:30s} {rate:7.0f} patches/s  {cpu:.3f} CPU-ms/patch  x{rate / ref:.2f}")


if __name__ == "__main__":
    main()
