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

__all__ = ["eager_jit", "uncached_kernels"]

log = logging.getLogger(__name__)
_UNCACHED: list[str] = []  # kernels compiled in memory: they will be compiled again at the next start


def eager_jit(signatures: str | Sequence[str], *, error_model: str = "python") -> Callable[[Any], Any]:
    """A decorator: ``numba.njit(signatures, nogil=True, cache=True)``, in memory where the cache fails."""
    import numba  # here, not at module level: uncached_kernels() must not import numba (~0.5 s)

    sigs = [signatures] if isinstance(signatures, str) else list(signatures)

    def compile_(fn: Any) -> Any:
        try:
            return numba.njit(sigs, nogil=True, error_model=error_model, cache=True)(fn)
        except (RuntimeError, OSError) as err:  # no usable cache directory, or writing to it failed
            log.info("numba cannot cache %s (%s); compiling it in memory", fn.__name__, err)
            _UNCACHED.append(f"{fn.__module__}.{fn.__qualname__}: {err}")
            return numba.njit(sigs, nogil=True, error_model=error_model)(fn)

    return compile_


def uncached_kernels() -> list[str]:
    """The kernels compiled so far that numba could not cache (``module.name: why``), in compile order.

    numba caches next to the source (``__pycache__``) or under ``NUMBA_CACHE_DIR``, and needs the folder to be
    writable even to load from it: in a read-only install (a container image run as a non-root user) every
    process compiles every kernel again unless ``NUMBA_CACHE_DIR`` names a writable folder that persists."""
    return list(_UNCACHED)
