"""Per-sample random streams for a whole batch at once, without the GIL.

Every sample's draws come from ``numpy.random.Generator(Philox(SeedSequence([seed, epoch, index, salt...])))``
(``sample_rng``). Building one such generator costs ~10 µs of Python per sample, under the GIL. This module
computes the *same* numbers for a batch of indices in one numba ``nogil`` call: numpy's SeedSequence
hashing (pool of four 32-bit words), its Philox4x64-10 with the key from ``generate_state(2, uint64)``, and
the three draws the sampler and the augmentation use, each as numpy computes it:

* ``random()``: ``(next_uint64 >> 11) * 2**-53``;
* ``integers(low, high)`` for ranges below 2**32: Lemire's bounded method on ``next_uint32`` (numpy's
  ``buffered_bounded_lemire_uint32``; a range of one value draws nothing);
* ``next_uint32``: the low half of a fresh 64-bit output, the high half kept for the next call.

``tests/test_streams.py`` checks every function against numpy itself, bit for bit, over random seeds,
epochs, indices (including ones of more than 32 bits) and ranges; the batch paths of the sampler and the
augmentation parameters are checked against their per-sample reference in the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType

import numpy as np

__all__ = ["entropy_words", "uniforms", "StreamBatch", "warm_up"]


def _kernels() -> ModuleType:
    """The numba kernels, compiled (or loaded from numba's cache) on first use, once."""
    from . import _numba_streams

    return _numba_streams


def entropy_words(values: Sequence[int]) -> np.ndarray:
    """The uint32 words numpy's SeedSequence makes of non-negative ints (32-bit chunks, low first; 0 -> [0])."""
    words: list[int] = []
    for value in values:
        value = int(value)
        if value < 0:
            raise ValueError(f"seed material must be non-negative, got {value}")
        if value == 0:
            words.append(0)
        while value > 0:
            words.append(value & 0xFFFFFFFF)
            value >>= 32
    return np.array(words, dtype=np.uint32)


def uniforms(head: Sequence[int], indices: np.ndarray, tail: Sequence[int], count: int) -> np.ndarray:
    """(len(indices), count) float64: row i is ``Generator(Philox(SeedSequence([*head, indices[i], *tail])))
    .random(count)``, bit for bit."""
    return _kernels().uniforms_kernel(entropy_words(head), np.asarray(indices, np.int64), entropy_words(tail), int(count))


class StreamBatch:
    """The sampler's ``_place`` for many indices of one (seed, epoch, salt): slides, cells and jitters."""

    def __init__(self, head: Sequence[int], tail: Sequence[int], cdf: np.ndarray, cells: Sequence[np.ndarray],
                 limits: np.ndarray) -> None:
        self._prefix, self._suffix = entropy_words(head), entropy_words(tail)
        self._cdf = np.ascontiguousarray(cdf, np.float64)
        sizes = np.array([len(c) for c in cells], np.int64)
        self._cell_start = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self._cells = np.ascontiguousarray(np.concatenate([np.asarray(c, np.int64).reshape(-1, 2) for c in cells]))
        self._limits = np.ascontiguousarray(limits, np.int64)

    def places(self, indices: np.ndarray, width: int, height: int, jitter: bool) -> np.ndarray:
        """(len(indices), 3) int64 rows (slide, x, y), as ``EpochPlan._place`` draws them one by one."""
        return _kernels().places_kernel(self._prefix, np.asarray(indices, np.int64), self._suffix, self._cdf, self._cell_start,
                       self._cells, self._limits, int(width), int(height), bool(jitter))


def warm_up() -> None:
    """Compile (or load from numba's cache) the kernels now rather than on the first batch: the draws', and the
    grouping of a batch's samples by slide (``_run_kernels``)."""
    _kernels()
    from loader_service.sampling import _run_kernels  # noqa: F401 - its kernel is compiled when it is imported
