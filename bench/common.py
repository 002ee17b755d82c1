"""Helpers shared by the benchmarks: a service in a subprocess, client commands, medians."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["service", "run_json", "median", "python_cmd"]


def python_cmd(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


@contextmanager
def serve(*args: str, env: dict[str, str] | None = None, prefix: tuple[str, ...] = (),
          cwd: str | None = None) -> Iterator[tuple[dict[str, Any], subprocess.Popen[str]]]:
    """`loader-service serve ARGS` on a free loopback port (``prefix``: e.g. ``taskset -c 0``; ``cwd``: the
    checkout whose code it runs, since ``python -m`` puts the working directory first on sys.path); yields its
    `serving` line (port, metrics address) and the process."""
    cmd = [*prefix, *python_cmd("loader_service.cli", "--log-level", "WARNING", "serve", "--listen", "127.0.0.1:0", *args)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, **(env or {})}, cwd=cwd)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"service did not start: {' '.join(cmd)}")
        yield json.loads(line), proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


@contextmanager
def service(*args: str, env: dict[str, str] | None = None, prefix: tuple[str, ...] = (),
            cwd: str | None = None) -> Iterator[tuple[int, subprocess.Popen[str]]]:
    """Like :func:`serve`, yielding (port, process)."""
    with serve(*args, env=env, prefix=prefix, cwd=cwd) as (info, proc):
        yield int(info["port"]), proc


def run_json(cmd: list[str], timeout: float = 600) -> dict[str, Any]:
    """Run a command that prints one JSON line last; return it."""
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")
