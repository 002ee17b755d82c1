"""Scaling (#12): GIL-held time per patch of one service process, and the ceiling it implies.

For the patch path with and without the pathology augmentation preset, over shared memory and gRPC:
start a real service on synthetic pyramidal JPEG slides, pull with `trainer-client bench` for N seconds,
sample the service with `py-spy record --gil --nonblocking -r RATE -d N --format raw` and read its CPU time
with psutil. GIL-held share = samples recorded with --gil / (rate x duration); GIL-held us/patch =
share / patches/s x 1e6; projected ceiling of one process = 1e6 / (GIL-held us/patch). If py-spy is missing
or cannot attach (ptrace), only patches/s and CPU-ms/patch are reported.

    python -m bench.bench_scaling [--seconds 10] [--workers 1 2 4 8 16] [--py-spy PATH]
        [--baseline-tree DIR] [--cases pathology+shm ...] [--top N] [--raw-dir DIR] [--pin] [--credits N]

With ``--baseline-tree`` each case also runs on a service started from another checkout (the code before
#12), one right after the other, and the ratios are printed.

py-spy counts too much GIL time when the service has more busy threads than the machine has cores
(``bench.bench_pyspy_gil``), which is always the case on 2 cores: there, ``bench.gil_serial`` measures the same
patch path on one thread instead.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import psutil

from bench.common import python_cmd, run_json, service

CASES = (("none", "shm"), ("pathology", "shm"), ("none", "grpc"), ("pathology", "grpc"))


def gil_samples(py_spy: str, pid: int, rate: int, seconds: float, out: Path) -> tuple[int | None, str]:
    """Run py-spy against ``pid``; return (sample count or None, error text)."""
    cmd = [py_spy, "record", "--gil", "--nonblocking", "-r", str(rate), "-d", str(int(seconds)),
           "--format", "raw", "-o", str(out), "-p", str(pid)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, check=False)
    if res.returncode != 0 or not out.exists():
        return None, (res.stderr or res.stdout)[-400:]
    total = 0
    for line in out.read_text().splitlines():  # raw (collapsed) format: "stack count"
        head, _, count = line.rpartition(" ")
        if head and count.isdigit():
            total += int(count)
    return total, ""


def top_frames(raw: Path, n: int) -> list[tuple[str, int, int]]:
    """The ``n`` functions most often on a GIL-holding stack: (function, self samples, inclusive samples)."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for line in raw.read_text().splitlines():
        head, _, count = line.rpartition(" ")
        if not (head and count.isdigit()):
            continue
        frames = [f.split(" (")[0] + " (" + f.split(" (")[-1].split(":")[0].rsplit("/", 1)[-1] + ")"
                  if " (" in f else f for f in head.split(";")[1:]]  # drop the thread's name
        if frames:
            own[frames[-1]] += int(count)
        for f in set(frames):
            inclusive[f] += int(count)
    return [(f, own[f], inclusive[f]) for f, _ in own.most_common(n)]


def measure(port: int, pid: int, augment: str, transport: str, seconds: float, rate: int,
            py_spy: str | None, tmp: Path, tree: str = "this", client_prefix: tuple[str, ...] = (),
            credits: int = 4) -> dict[str, Any]:
    cmd = [*client_prefix] + python_cmd("trainer_client.cli", "bench", "--endpoint", f"127.0.0.1:{port}", "--dataset", "bench",
                     "--transport", transport, "--batch-size", "64", "--patch-size", "256",
                     "--seconds", str(seconds + 4), "--consume", "none", "--credits", str(credits))
    if augment == "none":
        cmd.append("--no-augment")
    result: dict[str, Any] = {}
    client = threading.Thread(target=lambda: result.update(run_json(cmd)))
    client.start()
    proc = psutil.Process(pid)
    threading.Event().wait(2.0)  # warm-up: let the client connect and the pipeline fill
    cpu0 = proc.cpu_times()
    samples, err = (None, "py-spy not found") if py_spy is None else \
        gil_samples(py_spy, pid, rate, seconds, tmp / f"{tree}-{augment}-{transport}.txt")
    if py_spy is None:
        threading.Event().wait(seconds)
    cpu1 = proc.cpu_times()
    client.join()
    patches_s = float(result["tiles_per_s"])
    cpu_s = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
    row = {"augment": augment, "transport": transport, "patches_s": patches_s,
           "cpu_ms_per_patch": cpu_s / seconds / patches_s * 1e3}
    if samples is not None:
        share = samples / (rate * seconds)
        us = share / patches_s * 1e6
        row.update(gil_share=share, gil_us_per_patch=us, ceiling_patches_s=1e6 / us)
    else:
        row["py_spy_error"] = err
    return row


def pinned(workers: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``taskset`` prefixes: the service on ``workers`` cores, the trainer on the others (none left: refused)."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) <= workers:
        raise SystemExit(f"--pin needs more cores than --workers {workers} (this machine lets us use {len(cores)}): "
                         "the trainer gets the rest")
    mine = ",".join(str(c) for c in cores[:workers])
    rest = ",".join(str(c) for c in cores[workers:])
    return ("taskset", "-c", mine), ("taskset", "-c", rest)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rate", type=int, default=200)
    parser.add_argument("--workers", type=int, nargs="+", default=[2])
    parser.add_argument("--py-spy", default=shutil.which("py-spy"))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--cases", nargs="+", choices=[f"{a}+{t}" for a, t in CASES],
                        help="only these cases (augment+transport); default all four")
    parser.add_argument("--top", type=int, default=0,
                        help="also print the N functions most often holding the GIL (self samples)")
    parser.add_argument("--raw-dir", type=Path, help="keep py-spy's raw (collapsed) profiles here")
    parser.add_argument("--credits", type=int, default=4,
                        help="batches the trainer lets the service build ahead (1: one batch at a time, so the "
                             "service runs one batch thread: with --pin --workers 1, no more busy threads than cores)")
    parser.add_argument("--pin", action="store_true",
                        help="service on the first --workers cores, trainer on the rest, so that no core runs more "
                             "busy threads than the measured ones: py-spy counts a GIL holder that other runnable "
                             "threads keep off the CPU as holding the GIL (docs/benchmarks.md)")
    parser.add_argument("--baseline-tree", type=Path,
                        help="a checkout of the previous code (e.g. `git worktree add /tmp/base 150188a`): each "
                             "case is run on its service too, alternately with this tree's, and the ratios printed")
    args = parser.parse_args()
    from loader_service.synthetic import write_synthetic_dataset

    here = str(Path(__file__).resolve().parents[1])  # this checkout, whatever the venv's install points at
    trees: list[tuple[str, str]] = [("this", here)]
    if args.baseline_tree:
        trees.insert(0, ("baseline", str(args.baseline_tree.resolve())))
    rows = []
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        raw_dir = args.raw_dir or tmp
        raw_dir.mkdir(parents=True, exist_ok=True)
        manifest = write_synthetic_dataset(tmp, n_slides=4, size=8192, seed=0)
        for workers in args.workers:
            svc = ("--manifest", f"bench={manifest}", "--metrics-port", "-1", "--device", "cpu",
                   "--workers", str(workers))
            service_prefix, client_prefix = pinned(workers) if args.pin else ((), ())
            for augment, transport in CASES:
                if args.cases and f"{augment}+{transport}" not in args.cases:
                    continue
                pair = []
                for tree, root in trees:  # the same case on each tree, one after the other
                    with service(*svc, env={"PYTHONPATH": root}, cwd=root, prefix=service_prefix) as (port, proc):
                        row = {"workers": workers, "tree": tree, "pinned": args.pin,
                               **measure(port, proc.pid, augment, transport, args.seconds, args.rate, args.py_spy,
                                         raw_dir, tree, client_prefix, args.credits)}
                    rows.append(row)
                    pair.append(row)
                    _print_row(row)
                    raw = raw_dir / f"{tree}-{augment}-{transport}.txt"
                    if args.top and raw.exists():
                        scale = 1e6 / (args.rate * args.seconds * row["patches_s"])  # samples -> us per patch
                        for name, own, incl in top_frames(raw, args.top):
                            print(f"    {own * scale:6.1f} us self {incl * scale:6.1f} us incl  {name}", flush=True)
                if len(pair) == 2:
                    base, new = pair
                    gil = (f", GIL us/patch x{new['gil_us_per_patch'] / base['gil_us_per_patch']:.2f}"
                           if "gil_us_per_patch" in base and "gil_us_per_patch" in new else "")
                    print(f"           this/baseline: patches/s x{new['patches_s'] / base['patches_s']:.2f}, "
                          f"CPU ms/patch x{new['cpu_ms_per_patch'] / base['cpu_ms_per_patch']:.2f}{gil}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


def _print_row(row: dict[str, Any]) -> None:
    gil = (f"GIL {row['gil_share']:5.1%}  {row['gil_us_per_patch']:6.0f} us/patch  "
           f"ceiling {row['ceiling_patches_s']:7.0f}/s" if "gil_share" in row
           else f"py-spy failed: {row['py_spy_error'].strip()[:120]}")
    print(f"workers {row['workers']:2d}  {row['tree']:8s} {row['augment']:9s} {row['transport']:4s}  "
          f"{row['patches_s']:7.1f} patches/s  CPU {row['cpu_ms_per_patch']:5.2f} ms/patch  {gil}", flush=True)


if __name__ == "__main__":
    main()
