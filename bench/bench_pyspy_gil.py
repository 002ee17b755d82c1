"""How far `py-spy record --gil` can be trusted when a process runs more busy threads than it has cores.

A probe process on ``--cores`` cores: its main thread does a little pure-Python work (timed with
``time.thread_time``: the CPU it really spends holding the GIL), then calls a numba ``nogil`` kernel, in a loop;
``N`` other threads call a ``nogil`` kernel in a loop (what decode threads do in the service). py-spy samples the
process with ``--gil``; its GIL-held share of wall time is printed beside the main thread's real Python CPU
share. With no more busy threads than cores the two agree; with more, py-spy counts far more: a thread that
holds the GIL while other runnable threads keep it off the CPU still holds it. The service's GIL figures on a
2-core machine (decode threads + batch threads + the trainer) are taken in the second situation.

    python -m bench.bench_pyspy_gil [--cores 2] [--busy 0 1 3] [--seconds 6] [--py-spy PATH]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROBE = r'''
import sys, threading, time
import numba

@numba.njit(nogil=True, cache=False)
def spin(n):
    s = 0.0
    for i in range(n):
        s += (i % 7) * 0.5
    return s

spin(10)
busy, seconds = int(sys.argv[1]), float(sys.argv[2])
stop = False

def work():
    while not stop:
        spin(2_000_000)

for _ in range(busy):
    threading.Thread(target=work, daemon=True).start()
python_cpu, loops, t_end = 0.0, 0, time.perf_counter() + seconds
print("ready", flush=True)
while time.perf_counter() < t_end:
    c0 = time.thread_time()
    acc = 0
    for i in range(300):  # a little Python under the GIL
        acc += i * 3 % 7
    python_cpu += time.thread_time() - c0
    spin(400_000)  # then GIL-free work
    loops += 1
stop = True
print(f"{python_cpu / seconds} {loops}", flush=True)
'''


def probe(busy: int, cores: int, seconds: float, rate: int, py_spy: str, tmp: Path) -> tuple[float, float]:
    """(real Python CPU share of the main thread, py-spy's GIL-held share) for ``busy`` extra threads."""
    script = tmp / "probe.py"
    script.write_text(PROBE)
    cpus = ",".join(str(c) for c in sorted(os.sched_getaffinity(0))[:cores])
    proc = subprocess.Popen(["taskset", "-c", cpus, sys.executable, str(script), str(busy), str(seconds + 3)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "ready":
        raise RuntimeError("the probe did not start")
    time.sleep(1.0)
    raw = tmp / f"gil-{busy}.txt"
    subprocess.run([py_spy, "record", "--gil", "--nonblocking", "-r", str(rate), "-d", str(int(seconds)),
                    "--format", "raw", "-o", str(raw), "-p", str(proc.pid)], capture_output=True, check=True,
                   timeout=seconds + 60)
    real = float(proc.stdout.readline().split()[0])
    proc.wait(timeout=60)
    samples = sum(int(line.rpartition(" ")[2]) for line in raw.read_text().splitlines()
                  if line.rpartition(" ")[2].isdigit())
    return real, samples / (rate * int(seconds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--busy", type=int, nargs="+", default=[0, 1, 3], help="extra busy nogil threads")
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--rate", type=int, default=200)
    parser.add_argument("--py-spy", default=shutil.which("py-spy"))
    args = parser.parse_args()
    if not args.py_spy:
        raise SystemExit("py-spy not found: install the dev extra or pass --py-spy PATH")
    with tempfile.TemporaryDirectory() as tmp:
        for busy in args.busy:
            real, measured = probe(busy, args.cores, args.seconds, args.rate, args.py_spy, Path(tmp))
            threads = busy + 1
            print(f"{threads} busy threads on {args.cores} cores: real Python CPU {real:6.2%} of wall, py-spy --gil "
                  f"{measured:6.2%}  (x{measured / real:.1f})", flush=True)


if __name__ == "__main__":
    main()
