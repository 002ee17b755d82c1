"""GIL-held time per patch of the service's patch path, measured where py-spy can be trusted (#12).

``py-spy record --gil`` is right only while a process has no more runnable threads than cores
(``bench.bench_pyspy_gil``): a thread that holds the GIL while other runnable threads keep it off the CPU
still holds it, so on a machine with fewer cores than the service's busy threads it counts the waits as
GIL time. This harness removes the threads instead of adding cores. It runs one real session of the service
on ONE thread: the service's own objects (``LoaderServer.plan_session``, ``forecast_for``, ``Session``,
its shared-memory ``SlotPool``, ``Session.batches``), with an executor that runs each build where it is
submitted and a loop that plays the trainer (it takes each batch message, releases its slot, grants the next
credit). Reads decode on that thread too (``workers`` 1: one chunk per batch, tiles decoded inline). So every
Python line of the patch path runs, in the service's order, on one busy thread, and with one spare core
py-spy's GIL share is the real one. What it leaves out is per batch, not per patch: the hand-offs between the
session's, the batch and the read threads, and gRPC's own work to pass a ~200-byte message on.

    python -m bench.gil_serial --augment pathology --seconds 10 --py-spy .venv/bin/py-spy [--top 25]

The child (``--child``) builds batches for ``--seconds`` after a warm-up; the parent samples it with
``py-spy record --gil --nonblocking`` meanwhile and prints patches/s, CPU-ms/patch, GIL share and
GIL-held us per patch (share / patches/s), as ``bench.bench_scaling`` does.
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
from collections.abc import Callable
from concurrent.futures import Executor, Future
from pathlib import Path
from typing import Any

import psutil

from bench.bench_scaling import gil_samples, top_frames


class InlineExecutor(Executor):
    """Runs each submitted call at once, on the submitting thread (the session's build, here)."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as err:  # noqa: BLE001 - as a pool would: the error travels in the future
            future.set_exception(err)
        return future


def child(augment: bool, seconds: float, warmup: float, batch_size: int, slide_size: int = 8192) -> None:
    """Serve one session on this thread; print READY after the warm-up, then a JSON line after ``seconds``."""
    import torch

    from loader_service.config import DatasetConfig, ServiceConfig
    from loader_service.requests import parse_open
    from loader_service.server import LoaderServer
    from loader_service.session import Session, SessionLimits
    from loader_service.synthetic import write_synthetic_dataset
    from loader_service.transport.shm import SlotPool
    from trainer_client import StreamConfig
    from wsi_loader.v1 import loader_pb2 as pb

    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        manifest = write_synthetic_dataset(tmp, n_slides=4, size=slide_size, seed=0)  # as bench_scaling
        cfg = ServiceConfig(datasets=(DatasetConfig("bench", manifest),), data_roots=(tmp,), listen="127.0.0.1:0",
                            metrics_port=-1, workers=1, device="cpu", tissue_cache_dir=tmp / ".tissue")
        torch.set_num_threads(cfg.torch_threads)  # as the service's entry point does (one intra-op thread)
        with LoaderServer(cfg) as server:
            config = StreamConfig(dataset="bench", batch_size=batch_size, patch_size=256, augment=augment,
                                  samples_per_epoch=10**7)
            request = parse_open(config.open_message(0, 0, 1, 0, pb.SHM), cfg.max_batch_bytes,
                                 cfg.max_region_pixels)
            plan, build, build_piece = server.plan_session(request)
            session = Session(request, plan, build, InlineExecutor(), server.metrics, SessionLimits(4, 60.0),
                              threading.Event(), build_piece, forecast=server.forecast_for(request, plan))
            pool = SlotPool(2, batch_size * 3 * 256 * 256, session.gate.cond)
            session.use_shm(pool)
            session.gate.grant(1)
            me = psutil.Process()
            patches, t_end, measuring = 0, time.monotonic() + warmup, False
            cpu0 = t0 = 0.0
            try:
                for message in session.batches():  # the trainer's part: take, release the slot, grant a credit
                    if message.WhichOneof("kind") != "batch":
                        break
                    session.gate.release([message.batch.images.shm.slot])
                    session.gate.grant(1)
                    now = time.monotonic()
                    if not measuring and now >= t_end:
                        measuring, t0, t_end = True, now, now + seconds
                        cpu0 = sum(me.cpu_times()[:2])
                        print("READY", flush=True)
                    elif measuring:
                        patches += len(message.batch.samples)
                        if now >= t_end:
                            break
            finally:
                session.close()
                pool.close()
            elapsed = time.monotonic() - t0
            cpu = sum(me.cpu_times()[:2]) - cpu0
    print(json.dumps({"patches_s": patches / elapsed, "cpu_ms_per_patch": cpu / patches * 1e3}), flush=True)


def measure(augment: str, seconds: float, rate: int, py_spy: str | None, raw: Path, batch_size: int,
            slide_size: int = 8192, warmup: float = 4.0) -> dict[str, Any]:
    """Run the child and sample it with py-spy for ``seconds``; the row bench_scaling prints."""
    cmd = [sys.executable, "-m", "bench.gil_serial", "--child", "--augment", augment, "--seconds", str(seconds + 2),
           "--batch-size", str(batch_size), "--slide-size", str(slide_size), "--warmup", str(warmup)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "READY":
        proc.kill()
        raise RuntimeError(f"the serial harness did not start: {line!r}")
    samples, err = (None, "py-spy not given") if py_spy is None else gil_samples(py_spy, proc.pid, rate, seconds, raw)
    out, _ = proc.communicate(timeout=seconds + 120)
    row: dict[str, Any] = {"augment": augment, **json.loads(out.strip().splitlines()[-1])}
    if samples is not None:
        share = samples / (rate * seconds)
        row.update(gil_share=share, gil_us_per_patch=share / row["patches_s"] * 1e6)
        row["ceiling_patches_s"] = 1e6 / row["gil_us_per_patch"]
    else:
        row["py_spy_error"] = err
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--augment", choices=("none", "pathology"), nargs="+", default=["pathology", "none"])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rate", type=int, default=1000, help="py-spy samples per second")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--slide-size", type=int, default=8192, help="side of the 4 synthetic slides (pixels)")
    parser.add_argument("--py-spy", help="path of py-spy (the dev extra installs it)")
    parser.add_argument("--top", type=int, default=0, help="also print the N functions most often holding the GIL")
    parser.add_argument("--raw-dir", type=Path, help="keep py-spy's raw profiles here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=float, default=4.0, help="seconds of batches before the measurement")
    args = parser.parse_args()
    if args.child:
        child(args.augment[0] == "pathology", args.seconds, args.warmup, args.batch_size, args.slide_size)
        return
    with tempfile.TemporaryDirectory() as tmp_dir:
        raw_dir = args.raw_dir or Path(tmp_dir)
        raw_dir.mkdir(parents=True, exist_ok=True)
        for augment in args.augment:
            raw = raw_dir / f"serial-{augment}.txt"
            row = measure(augment, args.seconds, args.rate, args.py_spy, raw, args.batch_size, args.slide_size,
                          args.warmup)
            gil = (f"GIL {row['gil_share']:5.1%}  {row['gil_us_per_patch']:6.1f} us/patch  "
                   f"ceiling {row['ceiling_patches_s']:7.0f}/s" if "gil_share" in row else row["py_spy_error"])
            print(f"serial  {augment:9s} shm  {row['patches_s']:7.1f} patches/s  "
                  f"CPU {row['cpu_ms_per_patch']:5.2f} ms/patch  {gil}", flush=True)
            if args.top and raw.exists():
                scale = 1e6 / (args.rate * args.seconds * row["patches_s"])
                for name, own, incl in top_frames(raw, args.top):
                    print(f"    {own * scale:6.2f} us self {incl * scale:6.2f} us incl  {name}", flush=True)


if __name__ == "__main__":
    main()
