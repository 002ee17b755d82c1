"""The GPU-only parts: the suite's GPU tests, CUDA IPC end to end, streaming training, memory strategies.

Each skips at once without a CUDA device. Children run with the part's remaining time as their timeout and
their failures (an out-of-memory at 8192², a failing test) become rows of the result, not exceptions.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from .part import PartContext, SkipPart

__all__ = ["gpu_tests", "cuda_ipc", "streaming", "memory"]

log = logging.getLogger("gpu_check")
ROOT = Path(__file__).resolve().parents[2]
IPC_FILES = ("tests/test_cuda_ipc.py", "tests/test_cuda_ipc_session.py")


def _env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}


def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """Run a child; its output goes to the log as well. TimeoutExpired kills it (and is re-raised)."""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(timeout, 1), cwd=ROOT, env=_env(),
                          check=False)
    sys.stdout.write(proc.stdout[-20000:])
    sys.stdout.write(proc.stderr[-8000:])
    sys.stdout.flush()
    return proc


def _junit(path: Path) -> dict[str, Any]:
    """Counts and the failing tests (name, first line of the message) of a pytest junit XML file."""
    if not path.exists():
        return {"error": "pytest wrote no report"}
    root = ET.parse(path).getroot()
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    failures, skips = [], []
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        if bad is not None:
            counts["failed"] += 1
            failures.append({"test": name, "message": (bad.get("message") or "")[:400],
                             "seconds": float(case.get("time", 0))})
        elif (skipped := case.find("skipped")) is not None:
            counts["skipped"] += 1
            skips.append({"test": name, "reason": (skipped.get("message") or "")[:200]})
        else:
            counts["passed"] += 1
    return {**counts, "failures": failures, "skips": skips[:20]}


def _pytest(ctx: PartContext, args: list[str], report: str, timeout: float) -> dict[str, Any]:
    xml = ctx.workdir / report
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", "--junitxml", str(xml), *args]
    try:
        proc = _run(cmd, timeout)
    except subprocess.TimeoutExpired:
        return {**_junit(xml), "error": f"pytest did not finish within {timeout:.0f} s"}
    return {**_junit(xml), "exit_code": proc.returncode, "command": " ".join(cmd[1:])}


def _last_json(text: str) -> Any:
    """The JSON document (one line or indented) that ends ``text``."""
    lines = text.rstrip().splitlines()
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith(("{", "[")):
            try:
                return json.loads("\n".join(lines[i:]))
            except ValueError:
                continue
    raise ValueError(f"no JSON at the end of: {text[-300:]!r}")


def _check_tests(what: str, result: dict[str, Any]) -> None:
    """The part fails when a test failed, pytest did not finish, or nothing ran (all skipped: a missing binding)."""
    if result.get("error") or result.get("failed"):
        raise RuntimeError(f"{what}: {result.get('failed', '?')} failed {result.get('error', '')}".strip())
    if not result.get("passed"):
        reasons = sorted({s["reason"] for s in result.get("skips", [])})
        raise RuntimeError(f"{what}: none ran ({result.get('skipped', 0)} skipped: {'; '.join(reasons)[:300]})")


# --- part 1 -------------------------------------------------------------------------------------------------
def gpu_tests(ctx: PartContext) -> None:
    """``pytest -m gpu`` over the suite, the CUDA IPC files excepted (part ``cuda_ipc`` runs those)."""
    if ctx.gpu_reason:
        raise SkipPart(ctx.gpu_reason)
    ignore = [arg for f in IPC_FILES for arg in ("--ignore", f)]
    result = _pytest(ctx, ["-m", "gpu", *ignore, "tests"], "gpu_tests.xml", ctx.left() - 5)
    ctx.record("pytest", result)
    _check_tests("GPU tests", result)


# --- part 4 -------------------------------------------------------------------------------------------------
def cuda_ipc(ctx: PartContext) -> None:
    """The CUDA IPC GPU tests (service on the GPU, trainer process, zero-copy, pixels, kill -9), then the
    per-batch hand-off micro-benchmark of tests/test_cuda_ipc.py with the time left."""
    if ctx.gpu_reason:
        raise SkipPart(ctx.gpu_reason)
    result = _pytest(ctx, ["-m", "gpu", *IPC_FILES], "cuda_ipc.xml", ctx.left() - 25)
    ctx.record("pytest", result)
    if ctx.left() > 20:
        try:
            proc = _run([sys.executable, "-m", "tests.test_cuda_ipc"], ctx.left() - 5)
            ctx.record("handoff_bench", _last_json(proc.stdout) if proc.returncode == 0
                       else {"error": proc.stderr.strip()[-800:]})
        except (subprocess.TimeoutExpired, ValueError) as err:
            ctx.record("handoff_bench", {"error": f"{type(err).__name__}: {err}"[:400]})
    _check_tests("CUDA IPC tests", result)


# --- part 6 -------------------------------------------------------------------------------------------------
def streaming(ctx: PartContext) -> None:
    """ResNet-34 front + head, AMP, 4096² and 8192²: streaming vs conventional (peak GPU memory, step time)."""
    if ctx.gpu_reason:
        raise SkipPart(ctx.gpu_reason)
    rows: list[dict[str, Any]] = []
    script = str(ROOT / "bench" / "bench_streaming.py")
    for size in (4096, 8192):
        for mode in ("streaming", "conventional"):
            row: dict[str, Any] = {"size": size, "mode": mode, "amp": True}
            if ctx.left() < 15:
                rows.append({**row, "error": "not run: no time left in the part's cap"})
                continue
            cmd = [sys.executable, script, "--worker", "--mode", mode, "--size", str(size), "--device", "cuda",
                   "--amp", "--steps", "2", "--batch", "1", "--budget-mb", "256", "--tile", "0",
                   "--split", "8,12,18", "--threads", "0"]
            try:
                proc = _run(cmd, ctx.left() - 5)
            except subprocess.TimeoutExpired:
                rows.append({**row, "error": "timed out"})
                continue
            if proc.returncode == 0:
                rows.append({**row, **_last_json(proc.stdout)})
            elif "out of memory" in proc.stderr.lower():
                rows.append({**row, "fits": False, "error": "CUDA out of memory (does not fit this GPU)"})
            else:
                rows.append({**row, "error": (proc.stderr.strip().splitlines() or ["?"])[-1][:400]})
            ctx.record("rows", rows)
    ctx.record("rows", rows)


# --- part 7 -------------------------------------------------------------------------------------------------
def memory(ctx: PartContext) -> None:
    """Plain vs grouped recompute vs activation offload (with prefetch) on the GPU: peak memory and step time."""
    if ctx.gpu_reason:
        raise SkipPart(ctx.gpu_reason)
    out = ctx.workdir / "memory.json"
    cmd = [sys.executable, str(ROOT / "bench" / "bench_memory.py"), "--device", "cuda", "--arch", "resnet34",
           "--image-size", "2048", "--batch-size", "2", "--steps", "2", "--configs", "plain,recompute,offload",
           "--timeout", f"{max(ctx.left() - 10, 5):.0f}", "--json", str(out)]
    proc = _run(cmd, ctx.left() - 3)
    ctx.record("command", " ".join(cmd[1:]))
    if not out.exists():
        raise RuntimeError(f"bench_memory wrote nothing (exit {proc.returncode}): {proc.stderr.strip()[-400:]}")
    results = json.loads(out.read_text())
    ctx.record("configs", results)
    plain = (results.get("plain") or [{}])[0]
    ctx.record("vs_plain", {name: {"peak_ratio": round(rows[0]["peak_bytes"] / plain["peak_bytes"], 3),
                                   "time_ratio": round(rows[0]["step_s"] / plain["step_s"], 2)}
                            for name, rows in results.items() if "peak_bytes" in rows[0] and "peak_bytes" in plain})
