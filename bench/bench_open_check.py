"""Cost of re-checking the data roots at every slide lookup (SlideHandles.get with roots) against none.

    python -m bench.bench_open_check

Writes one synthetic slide in a temporary folder nested a few levels deep, opens it once, then times 20000 cached
lookups each way, median of 5 rounds, and prints microseconds per lookup and the ratio. Not a test.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from loader_service.dataset import SlideHandles
from loader_service.synthetic import write_synthetic_slide


def per_call(fn, n: int = 20000) -> float:  # type: ignore[no-untyped-def]
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        folder = root / "site" / "2026" / "batch"
        folder.mkdir(parents=True)
        path = write_synthetic_slide(folder / "s.tiff", 512, 512, seed=1).resolve()
        handles = SlideHandles(4, None, None)
        handles.get(path)
        roots = (root,)
        plain = statistics.median(per_call(lambda: handles.get(path)) for _ in range(5))
        checked = statistics.median(per_call(lambda: handles.get(path, roots)) for _ in range(5))
        handles.close()
    print(f"cached lookup: {plain * 1e6:.1f} µs without the roots check, {checked * 1e6:.1f} µs with it "
          f"(ratio {checked / plain:.1f}); per 32-patch batch {32 * (checked - plain) * 1e3:.2f} ms more")


if __name__ == "__main__":
    main()
