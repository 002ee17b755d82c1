"""The numba kernels behind ``sampling.streams`` (imported on first use: importing numba costs ~0.5 s).

numpy's SeedSequence hashing and Philox4x64-10, and the draws the sampler and the augmentation make, as
``streams`` documents. Every constant is defined in this file (numba's cache checks only this file's stamp).
The entry points have explicit signatures: compiled (or loaded from numba's cache) once, at import; where
no cache can be written they are compiled in memory instead, so no later call compiles or fails on it.
"""

from __future__ import annotations

import numpy as np
from numba import njit, uint32, uint64

from .._numba_jit import eager_jit

__all__ = ["uniforms_kernel", "places_kernel"]

_MASK32 = np.uint64(0xFFFFFFFF)
_INIT_A = np.uint32(0x43B0D7E5)
_MULT_A = np.uint32(0x931E8875)
_INIT_B = np.uint32(0x8B51F9DD)
_MULT_B = np.uint32(0x58F38DED)
_MIX_L = np.uint32(0xCA01F9DD)
_MIX_R = np.uint32(0x4973F715)
_PHILOX_M0 = np.uint64(0xD2E7470EE14C6C93)
_PHILOX_M1 = np.uint64(0xCA5A826395121157)
_PHILOX_W0 = np.uint64(0x9E3779B97F4A7C15)
_PHILOX_W1 = np.uint64(0xBB67AE8584CAA73B)
_POOL = 4
MAX_WORDS = 16  # entropy words per sample: ample for a few values of up to 64 bits each
# A generator's state as one uint64 row: counter[0:4], key[4:6], buffer[6:10], buffer_pos[10],
# has_uint32[11], uinteger[12].
_STATE_WORDS = 13



@njit(nogil=True, inline="always")
def _hashmix(value: uint32, hash_const: uint32) -> tuple[uint32, uint32]:
    value = uint32(value ^ hash_const)
    hash_const = uint32(hash_const * _MULT_A)
    value = uint32(value * hash_const)
    value = uint32(value ^ (value >> uint32(16)))
    return value, hash_const


@njit(nogil=True, inline="always")
def _mix(x: uint32, y: uint32) -> uint32:
    result = uint32(uint32(_MIX_L * x) - uint32(_MIX_R * y))
    return uint32(result ^ (result >> uint32(16)))


@njit(nogil=True)
def _philox_key(words: np.ndarray, n: int, key: np.ndarray) -> None:
    """SeedSequence(entropy words[:n]).generate_state(2, uint64) into ``key`` (2 uint64)."""
    pool = np.empty(_POOL, np.uint32)
    h = _INIT_A
    for i in range(_POOL):
        v = words[i] if i < n else uint32(0)
        pool[i], h = _hashmix(v, h)
    for src in range(_POOL):
        for dst in range(_POOL):
            if src != dst:
                hv, h = _hashmix(pool[src], h)
                pool[dst] = _mix(pool[dst], hv)
    for src in range(_POOL, n):
        for dst in range(_POOL):
            hv, h = _hashmix(words[src], h)
            pool[dst] = _mix(pool[dst], hv)
    hb = _INIT_B
    state = np.empty(4, np.uint32)
    for i in range(4):
        v = uint32(pool[i % _POOL] ^ hb)
        hb = uint32(hb * _MULT_B)
        v = uint32(v * hb)
        state[i] = uint32(v ^ (v >> uint32(16)))
    key[0] = uint64(state[0]) | (uint64(state[1]) << uint64(32))
    key[1] = uint64(state[2]) | (uint64(state[3]) << uint64(32))


@njit(nogil=True, inline="always")
def _mulhilo(a: uint64, b: uint64) -> tuple[uint64, uint64]:
    """The high and low 64 bits of the 128-bit product a * b."""
    a_lo, a_hi = a & _MASK32, a >> uint64(32)
    b_lo, b_hi = b & _MASK32, b >> uint64(32)
    lo_lo = a_lo * b_lo
    hi_lo = a_hi * b_lo
    lo_hi = a_lo * b_hi
    hi_hi = a_hi * b_hi
    cross = (lo_lo >> uint64(32)) + (hi_lo & _MASK32) + lo_hi
    hi = hi_hi + (hi_lo >> uint64(32)) + (cross >> uint64(32))
    lo = (cross << uint64(32)) | (lo_lo & _MASK32)
    return hi, lo


@njit(nogil=True)
def _philox_block(state: np.ndarray) -> None:
    """Advance the counter (state[0:4]) and fill the buffer (state[6:10]) with Philox4x64-10 of it."""
    state[0] += uint64(1)  # numpy increments before it generates; carries into the next words
    if state[0] == 0:
        state[1] += uint64(1)
        if state[1] == 0:
            state[2] += uint64(1)
            if state[2] == 0:
                state[3] += uint64(1)
    c0, c1, c2, c3 = state[0], state[1], state[2], state[3]
    k0, k1 = state[4], state[5]
    for r in range(10):
        if r > 0:
            k0 += _PHILOX_W0
            k1 += _PHILOX_W1
        hi0, lo0 = _mulhilo(_PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(_PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    state[6], state[7], state[8], state[9] = c0, c1, c2, c3
    state[10] = uint64(0)


@njit(nogil=True)
def _seed_state(words: np.ndarray, n: int, state: np.ndarray) -> None:
    state[:] = 0
    _philox_key(words, n, state[4:6])
    state[10] = uint64(4)  # buffer empty


@njit(nogil=True)
def _next64(state: np.ndarray) -> uint64:
    if state[10] >= 4:
        _philox_block(state)
    out = state[6 + int(state[10])]
    state[10] += uint64(1)
    return out


@njit(nogil=True)
def _next_double(state: np.ndarray) -> float:
    return float(_next64(state) >> uint64(11)) * (1.0 / 9007199254740992.0)


@njit(nogil=True)
def _next32(state: np.ndarray) -> uint64:
    if state[11] != 0:
        state[11] = uint64(0)
        return state[12]
    value = _next64(state)
    state[11] = uint64(1)
    state[12] = value >> uint64(32)
    return value & _MASK32


@njit(nogil=True)
def _integers(state: np.ndarray, low: np.int64, high: np.int64) -> np.int64:
    """``Generator.integers(low, high)`` (int64, high exclusive) for high - low <= 2**32."""
    rng = uint64(high - low - 1)
    if rng == 0:
        return low
    if rng == _MASK32:
        return low + np.int64(_next32(state))
    excl = rng + uint64(1)
    m = _next32(state) * excl
    leftover = m & _MASK32
    if leftover < excl:
        threshold = (_MASK32 - rng) % excl
        while leftover < threshold:
            m = _next32(state) * excl
            leftover = m & _MASK32
    return low + np.int64(m >> uint64(32))


@njit(nogil=True)
def _fill_words(prefix: np.ndarray, index: np.int64, suffix: np.ndarray, words: np.ndarray) -> int:
    n = 0
    for w in prefix:
        words[n] = w
        n += 1
    value = uint64(index)
    if value == 0:
        words[n] = 0
        n += 1
    while value > 0:
        words[n] = uint32(value & _MASK32)
        value >>= uint64(32)
        n += 1
    for w in suffix:
        words[n] = w
        n += 1
    return n


@eager_jit("float64[:, :](uint32[:], int64[:], uint32[:], int64)")
def uniforms_kernel(prefix: np.ndarray, indices: np.ndarray, suffix: np.ndarray, count: int) -> np.ndarray:
    out = np.empty((len(indices), count), np.float64)
    words = np.empty(MAX_WORDS, np.uint32)
    state = np.empty(_STATE_WORDS, np.uint64)
    for i in range(len(indices)):
        n = _fill_words(prefix, indices[i], suffix, words)
        _seed_state(words, n, state)
        for j in range(count):
            out[i, j] = _next_double(state)
    return out


@eager_jit("int64[:, :](uint32[:], int64[:], uint32[:], float64[:], int64[:], int64[:, :], int64[:, :], int64, int64, "
      "boolean)")
def places_kernel(prefix: np.ndarray, indices: np.ndarray, suffix: np.ndarray, cdf: np.ndarray, cell_start: np.ndarray,
            cells: np.ndarray, limits: np.ndarray, width: int, height: int, jitter: bool) -> np.ndarray:
    """``EpochPlan._place`` for every index: (slide, x, y) rows."""
    out = np.empty((len(indices), 3), np.int64)
    words = np.empty(MAX_WORDS, np.uint32)
    state = np.empty(_STATE_WORDS, np.uint64)
    n_slides = len(cdf)
    for i in range(len(indices)):
        n = _fill_words(prefix, indices[i], suffix, words)
        _seed_state(words, n, state)
        u = _next_double(state)
        slide = np.searchsorted(cdf, u, side="right")
        if slide > n_slides - 1:
            slide = n_slides - 1
        first, count = cell_start[slide], cell_start[slide + 1] - cell_start[slide]
        cell = _integers(state, np.int64(0), np.int64(count))
        jx = _integers(state, np.int64(-(width // 2)), np.int64(width // 2 + 1))
        jy = _integers(state, np.int64(-(height // 2)), np.int64(height // 2 + 1))
        if not jitter:
            jx = 0
            jy = 0
        x = cells[first + cell, 0] + jx
        y = cells[first + cell, 1] + jy
        x = min(max(x, 0), limits[slide, 0] - width)
        y = min(max(y, 0), limits[slide, 1] - height)
        out[i, 0], out[i, 1], out[i, 2] = slide, x, y
    return out
