"""The one way this package compiles its numba kernels: eagerly, for explicit signatures, without the GIL.

Each kernel is compiled (or loaded from numba's on-disk cache) once, when its module is imported, never at
run time. Where no cache can be used or written (no writable directory, a full disk) it is compiled in
memory instead, so no later call can fail on the cache. numba itself is imported by the kernel modules,
which are imported on first use (importing numba costs ~0.5 s).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Callable

import numba

__all__ = ["eager_jit"]

log = logging.getLogger(__name__)


def eager_jit(signatures: str | Sequence[str], *, error_model: str = "python") -> Callable[[Any], Any]:
    """A decorator: ``numba.njit(signatures, nogil=True, cache=True)``, in memory where the cache fails."""
    sigs = [signatures] if isinstance(signatures, str) else list(signatures)

    def compile_(fn: Any) -> Any:
        try:
            return numba.njit(sigs, nogil=True, error_model=error_model, cache=True)(fn)
        except (RuntimeError, OSError) as err:  # no usable cache directory, or writing to it failed
            log.info("numba cannot cache %s (%s); compiling it in memory", fn.__name__, err)
            return numba.njit(sigs, nogil=True, error_model=error_model)(fn)

    return compile_
