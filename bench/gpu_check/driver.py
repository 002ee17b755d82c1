"""The GPU check's driver: environment facts, then each part in its own process group under its own cap.

Writes ``OUT/summary.json`` (rewritten after every part) and ``OUT/gpu_check.log`` (every part's output).
A part that fails, crashes or outlives its cap is recorded as such and the next one runs; the total stays
under ``--budget`` seconds (default 460: the 8 minutes asked, less the last part's 10 s grace and the start).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .part import gpu_missing

__all__ = ["PARTS", "Part", "environment", "run_check", "main"]

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Part:
    name: str
    cap_s: float        # on the GPU machine
    quick_cap_s: float  # --quick (the CPU dry run of the test suite)
    what: str
    gpu_only: bool      # nothing to run without a CUDA device: skipped without starting a process

    def __post_init__(self) -> None:
        if not 0 < self.quick_cap_s <= self.cap_s:
            raise ValueError(f"part {self.name}: caps must satisfy 0 < quick_cap_s <= cap_s")


PARTS: tuple[Part, ...] = (
    Part("gpu_tests", 75, 20, "pytest -m gpu (all but the CUDA IPC files, which part cuda_ipc runs)", True),
    Part("jpeg_decode", 35, 25, "nvJPEG batched vs the CPU path on the same tiles: pixels and tiles/s", False),
    Part("augment", 35, 25, "GPU vs CPU kernels on one batch: difference, images/s, stitching on the GPU", False),
    Part("cuda_ipc", 75, 20, "service on the GPU, trainer process zero-copy, pixels = gRPC, kill -9 reclaim", True),
    Part("end_to_end", 130, 40, "patches/s to one trainer: CPU aug + shm vs GPU aug + nvJPEG + CUDA IPC", False),
    Part("streaming", 75, 20, "streaming ResNet-34 front, AMP, 4096² and 8192², vs conventional backprop", True),
    Part("memory", 45, 20, "offload with prefetch, grouped recompute vs plain: peak memory and time", True),
)


def environment() -> dict[str, Any]:
    """Machine and library facts for the summary (GPU model, cores, torch/CUDA versions)."""
    env: dict[str, Any] = {"python": platform.python_version(), "machine": platform.machine(),
                           "cpu_count": os.cpu_count(), "cores_available": len(os.sched_getaffinity(0))}
    try:
        import torch

        env.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            env.update(gpu=torch.cuda.get_device_name(0), gpu_count=torch.cuda.device_count(),
                       gpu_memory_gib=round(props.total_memory / 2**30, 1),
                       gpu_capability=f"{props.major}.{props.minor}", cudnn=torch.backends.cudnn.version())
        else:
            env["gpu"] = None
    except Exception as err:  # noqa: BLE001 - the summary says what broke
        env["torch_error"] = f"{type(err).__name__}: {err}"
    try:
        from wsi_loader.cuda_runtime import cuda_ipc_available

        env["cuda_ipc_backend"] = list(cuda_ipc_available())
    except Exception as err:  # noqa: BLE001
        env["cuda_ipc_backend"] = [False, f"{type(err).__name__}: {err}"]
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        env["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()[-300:]
    except (OSError, subprocess.TimeoutExpired) as err:
        env["nvidia_smi"] = f"not run: {err}"
    for name in ("torchvision", "numba", "grpc", "pyvips", "cupy"):
        try:
            module = __import__(name)
            env[f"{name}_version"] = getattr(module, "__version__", "?")
        except Exception as err:  # noqa: BLE001
            env[f"{name}_version"] = f"missing ({type(err).__name__})"
    return env


def _run_part(part: Part, cap: float, work: Path, quick: bool, log: Any, env: dict[str, str]) -> dict[str, Any]:
    """One part in a new process group; killed (the whole group) at ``cap`` + a grace of 10 s."""
    result_path = work / f"{part.name}.json"
    cmd = [sys.executable, "-m", "bench.gpu_check.run_part", part.name, str(result_path), "--workdir",
           str(work / part.name), "--cap", f"{cap:.0f}", *(["--quick"] if quick else [])]
    log.write(f"\n===== {part.name} (cap {cap:.0f} s): {part.what}\n")
    log.flush()
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                            start_new_session=True)
    timed_out = False
    try:
        proc.wait(timeout=cap + 10)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    else:  # what the part left running (a service, a trainer) goes with it
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    seconds = round(time.monotonic() - started, 1)
    try:
        result = json.loads(result_path.read_text())
    except (OSError, ValueError):
        result = {}
    if timed_out:
        result["status"] = f"timeout: killed after {seconds:.0f} s (cap {cap:.0f} s); partial results kept"
    elif proc.returncode != 0 or result.get("status") in (None, "running"):
        result["status"] = f"failed: part process exited with {proc.returncode} (see gpu_check.log)"
    result["wall_s"] = seconds
    result["cap_s"] = round(cap)
    log.write(f"===== {part.name}: {result['status']} in {seconds} s\n")
    log.flush()
    return result


def run_check(out: Path, *, quick: bool = False, skip_gpu: bool = False, budget_s: float = 460.0,
              only: list[str] | None = None) -> dict[str, Any]:
    """Run the parts in order within ``budget_s``; return (and write to OUT/summary.json) the summary."""
    out.mkdir(parents=True, exist_ok=True)
    child_env = {**os.environ, "PYTHONUNBUFFERED": "1", **({"GPU_CHECK_SKIP_GPU": "1"} if skip_gpu else {})}
    started = time.monotonic()
    summary: dict[str, Any] = {"started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "quick": quick,
                               "budget_s": budget_s, "environment": environment(), "parts": {}}
    summary_path = out / "summary.json"
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp, open(out / "gpu_check.log", "a") as log:
        log.write(f"gpu_check {summary['started_utc']}: {json.dumps(summary['environment'])}\n")
        no_gpu = gpu_missing(skip_gpu)
        summary["gpu_missing"] = no_gpu
        for part in PARTS:
            if only and part.name not in only:
                continue
            left = budget_s - (time.monotonic() - started)
            cap = min(part.quick_cap_s if quick else part.cap_s, left - 12)
            if part.gpu_only and no_gpu:
                summary["parts"][part.name] = {"status": f"skipped: {no_gpu}", "wall_s": 0.0}
            elif cap < 5:
                summary["parts"][part.name] = {"status": f"skipped: no time left in the {budget_s:.0f} s budget"}
            else:
                summary["parts"][part.name] = _run_part(part, cap, Path(tmp), quick, log, child_env)
            summary["wall_s"] = round(time.monotonic() - started, 1)
            summary_path.write_text(json.dumps(summary, indent=1, default=str))
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="folder for summary.json and gpu_check.log ($OUT on the GPU machine)")
    ap.add_argument("--quick", action="store_true", help="small sizes and short caps (the CPU dry-run test)")
    ap.add_argument("--skip-gpu", action="store_true", help="report every GPU part as skipped even with a GPU")
    ap.add_argument("--budget", type=float, default=460.0,
                    help="total seconds for all parts (a part is killed 10 s after its cap)")
    ap.add_argument("--only", nargs="+", choices=[p.name for p in PARTS], help="run only these parts")
    a = ap.parse_args(argv)
    summary = run_check(a.out, quick=a.quick, skip_gpu=a.skip_gpu, budget_s=a.budget, only=a.only)
    width = max(len(name) for name in summary["parts"]) if summary["parts"] else 0
    for name, result in summary["parts"].items():
        sys.stdout.write(f"{name:<{width}}  {result.get('wall_s', 0):>6} s  {result['status']}\n")
    sys.stdout.write(f"summary: {a.out / 'summary.json'} ({summary.get('wall_s')} s)\n")
    return 0
