"""Decode at the hardware's speed: the service against what users run today, side by side in one run.

On one synthetic 16384² pyramidal JPEG slide, for 1..cores cores (pinned with sched_setaffinity):
  (a) codec ceiling: raw level-0 tiles decoded on N threads (libjpeg-turbo), as 256² patches/s;
  (b) baseline: torch DataLoader(num_workers=N) + OpenSlide read_region, same augmentations;
  (c) the service (N decode workers) + `trainer-client bench` over gRPC;
  (d) the same over shared memory.
Patches are random 256² level-0 regions anywhere on the slide for all four (tissue threshold 0). Every
process of (b), (c) and (d) (service and trainer alike) is pinned to the same N cores.
Prints patches/s and the ratios (c)/(b) and (c)/(a); writes a PNG of patches/s against cores.
``--no-augment`` drops the augmentation from (b)-(d) (the read/decode/transport paths alone);
``--patches-per-region K`` turns on locality sampling in (c)/(d). For (c) and (d) it also prints where the
service's threads spent their time, per patch and stage (its ``wsi_loader_stage_seconds`` metric: wall time of
the threads, so waits for a core count too), and the CPU time of the service and trainer processes per patch.

    python -m bench.bench_pipeline [--size 16384] [--seconds 8] [--png docs/pipeline_cores.png] [--json out.json]
    python -m bench.bench_pipeline --no-augment --patches-per-region 4 --locality-window 16
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

import psutil

from bench.common import median, python_cmd, run_json, serve

HERE = Path(__file__).resolve().parents[1]


def _pinned(cores: int) -> dict[str, Any]:
    cpus = sorted(os.sched_getaffinity(0))[:cores]
    return {"preexec_fn": lambda: os.sched_setaffinity(0, cpus)}


def codec(slide: Path, cores: int) -> float:
    code = ("import json,sys; from bench.bench_decode import run_codec_ceiling; "
            f"rows = run_codec_ceiling(sys.argv[1], threads=[{cores}], decoders=['imagecodecs'], max_tiles=1024); "
            "print(json.dumps(max(rows, key=lambda r: r['mp_per_s'])))")
    out = subprocess.run([sys.executable, "-c", code, str(slide)], capture_output=True, text=True, cwd=HERE,
                         check=True, **_pinned(cores))
    row = json.loads(out.stdout.strip().splitlines()[-1])
    return float(row["mp_per_s"]) * 1e6 / 65536


def baseline(slide: Path, cores: int, seconds: float, augment: bool = True) -> float:
    code = ("import json,sys; from bench.baselines import run_dataloader_baseline; "
            f"print(json.dumps(run_dataloader_baseline([sys.argv[1]], workers={cores}, seconds={seconds}, "
            f"augment={augment})))")
    out = subprocess.run([sys.executable, "-c", code, str(slide)], capture_output=True, text=True, cwd=HERE,
                         check=True, **_pinned(cores))
    return float(json.loads(out.stdout.strip().splitlines()[-1])["patches_per_s"])


STAGES = ("read", "augment", "serialize", "send")


def stage_seconds(metrics_url: str) -> dict[str, float]:
    """The service's cumulative thread-seconds per pipeline stage (``wsi_loader_stage_seconds_sum``)."""
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    found = re.findall(r'^wsi_loader_stage_seconds_sum\{stage="(\w+)"\} ([0-9.e+-]+)$', text, re.M)
    return {stage: float(value) for stage, value in found}


def tile_lookups(metrics_url: str) -> tuple[float, float]:
    """The service's cumulative tile-cache (hits, misses): a miss is a tile decode."""
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    found = dict(re.findall(r'^wsi_loader_tile_cache_(hits|misses)_total ([0-9.e+-]+)$', text, re.M))
    return float(found.get("hits", 0.0)), float(found.get("misses", 0.0))


def _cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def served(manifest: Path, cores: int, seconds: float, extra: tuple[str, ...] = (), *,
           service_flags: tuple[str, ...] = (), transports: tuple[str, ...] = ("grpc", "shm")) -> dict[str, Any]:
    """patches/s over each transport, and where the service's threads spent their time (ms per patch).

    ``extra``: flags of `trainer-client bench`; ``service_flags``: flags of the service, after (so overriding)
    this benchmark's own."""
    args = ("--manifest", f"bench={manifest}", "--metrics-port", "0", "--device", "cpu", "--workers", str(cores),
            "--tissue-cache-dir", str(manifest.parent / ".tissue"), *service_flags)
    cpus = ",".join(str(c) for c in sorted(os.sched_getaffinity(0))[:cores])
    rates: dict[str, Any] = {}
    with serve(*args, prefix=("taskset", "-c", cpus)) as (info, proc):  # every thread of it on the N cores
        service = psutil.Process(proc.pid)  # taskset execs the service: same pid
        for transport in transports:
            before = stage_seconds(info["metrics"])
            lookups_before = tile_lookups(info["metrics"])
            cpu_before = _cpu_seconds(service)
            # the trainer shares the same N cores as the service: (b) pins its whole process tree too
            cmd = ["taskset", "-c", cpus, *python_cmd(
                "trainer_client.cli", "bench", "--endpoint", f"127.0.0.1:{info['port']}", "--dataset", "bench",
                "--seconds", str(seconds), "--batch-size", "64", "--patch-size", "256",
                "--tissue-threshold", "0", "--transport", transport, *extra)]
            result = run_json(cmd)
            after = stage_seconds(info["metrics"])
            patches = max(1.0, float(result["tiles"]))
            # CPU-ms per patch: the service's over the whole trainer run (its first batch included), the
            # trainer's over its timed batches (its start-up excluded)
            rates[f"{transport}_cpu_ms_per_patch"] = {"service": 1e3 * (_cpu_seconds(service) - cpu_before) / patches,
                                                      "trainer": 1e3 * float(result["cpu_s"]) / patches}
            rates[transport] = float(result["tiles_per_s"])
            hits, misses = (b - a for a, b in zip(lookups_before, tile_lookups(info["metrics"])))
            rates[f"{transport}_decodes_per_patch"] = misses / patches  # over the whole trainer run
            rates[f"{transport}_lookups_per_patch"] = (hits + misses) / patches
            rates[f"{transport}_ms_per_patch"] = {st: 1e3 * (after.get(st, 0.0) - before.get(st, 0.0)) / patches
                                                  for st in STAGES}
    return rates


def plot(rows: list[dict[str, Any]], size: int, png: Path) -> None:
    """patches/s of (a)-(d) against cores (``rows`` as written by ``--json``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    labels = {"a": "(a) codec ceiling", "b": "(b) DataLoader + OpenSlide", "c": "(c) service, gRPC",
              "d": "(d) service, shared memory"}
    for key, label in labels.items():
        ax.plot([r["cores"] for r in rows], [r[key] for r in rows], marker="o", label=label)
    ax.set_xlabel("cores")
    ax.set_ylabel("256² patches/s")
    ax.set_title(f"random 256² patches, {size}² JPEG slide")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=16384)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--max-cores", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--png", type=Path)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--no-augment", action="store_true",
                        help="no augmentation in (b), (c) and (d): compare the read/decode/transport paths alone")
    parser.add_argument("--patches-per-region", type=int, default=1,
                        help="(c)/(d): locality sampling, patches cut from one region read (the baseline cannot)")
    parser.add_argument("--locality-window", type=int, default=16, help="(c)/(d): regions shuffled together")
    args = parser.parse_args()
    extra: tuple[str, ...] = ("--patches-per-region", str(args.patches_per_region),
                              "--locality-window", str(args.locality_window))
    if args.no_augment:
        extra += ("--no-augment",)
    from bench.bench_decode import make_bench_slide

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        slide = make_bench_slide(tmp, args.size)
        manifest = Path(tmp) / "manifest.csv"
        manifest.write_text(f"path,label\n{slide.name},x\n")
        counts = sorted({1, args.max_cores} | {c for c in (2, 4, 8, 16) if c < args.max_cores})
        for cores in counts:
            runs: dict[str, list[float]] = {"a": [], "b": [], "c": [], "d": []}
            profiles: dict[str, list[dict[str, float]]] = {"grpc": [], "shm": []}
            cpu: dict[str, list[dict[str, float]]] = {"grpc": [], "shm": []}
            decodes: dict[str, list[float]] = {"grpc": [], "shm": []}
            for _ in range(args.repeats):
                runs["a"].append(codec(slide, cores))
                runs["b"].append(baseline(slide, cores, args.seconds, augment=not args.no_augment))
                svc = served(manifest, cores, args.seconds, extra)
                runs["c"].append(svc["grpc"])
                runs["d"].append(svc["shm"])
                for transport in profiles:
                    profiles[transport].append(svc[f"{transport}_ms_per_patch"])
                    cpu[transport].append(svc[f"{transport}_cpu_ms_per_patch"])
                    decodes[transport].append(svc[f"{transport}_decodes_per_patch"])
            row: dict[str, Any] = {"cores": cores, **{k: median(v) for k, v in runs.items()}}
            row["profile_ms_per_patch"] = {t: {st: median([p[st] for p in ps]) for st in STAGES}
                                           for t, ps in profiles.items()}
            row["cpu_ms_per_patch"] = {t: {role: median([c[role] for c in cs]) for role in ("service", "trainer")}
                                       for t, cs in cpu.items()}
            row["tile_decodes_per_patch"] = {t: median(d) for t, d in decodes.items()}
            row["c_over_b"], row["c_over_a"], row["d_over_b"] = row["c"] / row["b"], row["c"] / row["a"], row["d"] / row["b"]
            rows.append(row)
            print(f"{cores:2d} cores  (a) codec {row['a']:7.0f}  (b) DataLoader+OpenSlide {row['b']:7.0f}  "
                  f"(c) service/gRPC {row['c']:7.0f}  (d) service/shm {row['d']:7.0f} patches/s   "
                  f"(c)/(b) {row['c_over_b']:.2f}  (c)/(a) {row['c_over_a']:.2f}  (d)/(b) {row['d_over_b']:.2f}",
                  flush=True)
            for transport, stages in row["profile_ms_per_patch"].items():
                spent = "  ".join(f"{st} {ms:.2f}" for st, ms in stages.items())
                used = row["cpu_ms_per_patch"][transport]
                print(f"         service thread-ms per patch ({transport}): {spent};  CPU-ms per patch: "
                      f"service {used['service']:.2f}, trainer {used['trainer']:.2f};  tile decodes per patch "
                      f"{row['tile_decodes_per_patch'][transport]:.2f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    if args.png:
        plot(rows, args.size, args.png)

if __name__ == "__main__":
    main()
