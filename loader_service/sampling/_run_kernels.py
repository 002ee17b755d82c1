"""Grouping a run's samples by slide in one compiled call (``SampleRun.groups``).

A batch read takes its patches slide by slide (one ``read_patches_of`` entry per slide and level), a forecast
announces them slide by slide, a batch message writes one template per slide. ``numpy.unique`` or an argsort
plus splits cost several numpy calls each (~50 µs a batch with cold caches); this is one call.
"""

from __future__ import annotations

import numpy as np

from loader_service._numba_jit import eager_jit

__all__ = ["group_rows"]


@eager_jit("int64(int64[::1], int64, int64[::1], int64[::1], int64[::1], int64[::1])")
def group_rows(slide, parts, order, starts, part_of, inverse):  # type: ignore[no-untyped-def]
    """Rows ``0..n-1`` cut into ``parts`` contiguous parts (part k: ``n*k//parts`` to ``n*(k+1)//parts``), each
    part's rows grouped by ``slide`` (ascending; rows ascending within a group). Writes ``order`` (the rows,
    group after group), ``starts`` (group g is ``order[starts[g]:starts[g + 1]]``), ``part_of`` (each group's
    part) and ``inverse`` (each row's group). Returns the number of groups."""
    n = slide.shape[0]
    g = 0
    for k in range(parts):
        lo, hi = n * k // parts, n * (k + 1) // parts
        idx = np.argsort(slide[lo:hi], kind="mergesort")
        for j in range(hi - lo):
            r = idx[j] + lo
            if j == 0 or slide[r] != slide[order[lo + j - 1]]:
                starts[g] = lo + j
                part_of[g] = k
                g += 1
            order[lo + j] = r
            inverse[r] = g - 1
    starts[g] = n
    return g
