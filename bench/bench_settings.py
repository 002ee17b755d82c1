"""Service settings side by side: the same trainer pull against services started with different flags.

On one synthetic 16384² pyramidal JPEG slide (bench_decode.make_bench_slide), every variant's service and its
`trainer-client bench` are pinned to the same cores (bench_pipeline.served, with the variant's flags after its
own); the variants run in turn, repeated, so that drift of a noisy machine hits them alike. Prints, per
variant, the median patches/s, service CPU-ms per patch and tile decodes per patch (tile-cache misses, from
the service's metrics), and the ratio of each median to the first variant's.

    python -m bench.bench_settings --variant "--workers 2" --variant "--workers 1" --variant "--workers 3" \\
        [--cores 2] [--repeats 3] [--seconds 6] [--augment] [--transport shm]
"""

from __future__ import annotations

import argparse
import os
import shlex
import tempfile
from pathlib import Path

from bench.bench_pipeline import served
from bench.common import median


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

    extra = () if args.augment else ("--no-augment",)
    runs: dict[str, list[tuple[float, float, float]]] = {v: [] for v in args.variant}
    with tempfile.TemporaryDirectory() as tmp:
        slide = make_bench_slide(tmp, args.size)
        manifest = Path(tmp) / "manifest.csv"
        manifest.write_text(f"path,label\n{slide.name},x\n")
        for rep in range(args.repeats):
            for variant in args.variant:
                got = served(manifest, args.cores, args.seconds, extra, service_flags=tuple(shlex.split(variant)),
                             transports=(args.transport,))
                row = (got[args.transport], got[f"{args.transport}_cpu_ms_per_patch"]["service"],
                       got[f"{args.transport}_decodes_per_patch"])
                runs[variant].append(row)
                print(f"run {rep}  {variant:30s} {row[0]:7.0f} patches/s  {row[1]:.3f} CPU-ms/patch  "
                      f"{row[2]:.2f} tile decodes/patch", flush=True)
    ref = median([r[0] for r in runs[args.variant[0]]])
    print(f"medians of {args.repeats} on {args.cores} cores ({args.transport}, "
          f"{'pathology' if args.augment else 'no augmentation'}):")
    for variant, rows in runs.items():
        rate, cpu, decodes = (median([r[k] for r in rows]) for k in range(3))
        print(f"  {variant:30s} {rate:7.0f} patches/s  {cpu:.3f} CPU-ms/patch  {decodes:.2f} tile decodes/patch  "
              f"x{rate / ref:.2f}")


if __name__ == "__main__":
    main()
