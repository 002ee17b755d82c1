"""The augmentation parameters of a batch from its uniforms, in one compiled call (``draw_params_batch``).

The same arithmetic as ``draw_params``, field by field, in the same float64 steps (each product and sum
rounded on its own: no fused multiply-add, no fast-math), so every value is bit-identical
(``tests/test_batch_draws.py``). Done as numpy expressions it was ~40 array operations per batch, run with
cold CPU caches between decode kernels: ~3.5 µs of GIL-held time per patch in the service.
"""

from __future__ import annotations

import math

import numpy as np

from loader_service._numba_jit import eager_jit

__all__ = ["params_table_kernel"]


@eager_jit("boolean(float64[:, ::1], float64[::1], float64[:, ::1], int64[::1])")
def params_table_kernel(u, c, table, halo):  # type: ignore[no-untyped-def]
    """Fill ``table`` (n, 17: ``TABLE_COLUMNS``) and ``halo`` (n: ``halos``) from the uniforms ``u`` (n, 19) of
    each sample and the config ``c`` as ``draw_params_batch`` packs it: flip, rot90, brightness, contrast,
    saturation, hue, hed_sigma, hed_bias, blur_prob, blur_sigma low and high, scale, crop, then the bounds
    MAX_BLUR_SIGMA, MIN_SCALE, MAX_SCALE. Returns whether every value is within the ranges ``AugmentParams``
    accepts."""
    flip, rot90 = c[0] != 0.0, c[1] != 0.0
    ok = True
    for i in range(u.shape[0]):
        r = u[i]
        t = table[i]
        t[0] = 1.0 if flip and r[0] < 0.5 else 0.0
        t[1] = 1.0 if flip and r[1] < 0.5 else 0.0
        t[2] = float(min(int(r[2] * 4.0), 3)) if rot90 else 0.0
        for k in range(3):  # brightness, contrast, saturation
            t[3 + k] = 1.0 + (c[2 + k] * (2.0 * r[3 + k] - 1.0) + 0.0)
        t[6] = c[5] * (2.0 * r[6] - 1.0) + 0.0
        for k in range(3):
            t[7 + k] = 1.0 + (c[6] * (2.0 * r[7 + k] - 1.0) + 0.0)
            t[10 + k] = c[7] * (2.0 * r[10 + k] - 1.0) + 0.0
        t[13] = (c[9] + (c[10] - c[9]) * r[14] if r[13] < c[8] else 0.0) + 0.0
        t[14] = (1.0 + c[11]) ** (2.0 * r[16] - 1.0) if c[11] > 0.0 else 1.0
        t[15] = c[12] * (2.0 * r[17] - 1.0) + 0.0
        t[16] = c[12] * (2.0 * r[18] - 1.0) + 0.0
        halo[i] = int(math.ceil(3.0 * t[13])) if t[13] > 0.0 else 0
        for k in range(3, 17):
            if not math.isfinite(t[k]):
                ok = False
        if not (t[3] > 0.0 and t[4] >= 0.0 and t[5] >= 0.0 and t[13] <= c[13] and abs(t[15]) <= 1.0
                and abs(t[16]) <= 1.0 and c[14] <= t[14] <= c[15]):
            ok = False
    return ok
