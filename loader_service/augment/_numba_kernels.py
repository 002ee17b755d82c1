"""The numba kernels behind ``cpu_kernels`` (imported on first use: importing numba costs ~0.5 s).

See ``cpu_kernels`` for what they compute and why the bits equal the torch ops'.

Two rules keep numba's on-disk cache honest and harmless:

* Every constant the kernels use is defined **in this file**. numba bakes constants into the cached
  machine code but only checks this file's stamp to decide whether a cached kernel is still valid,
  so a constant imported from ``colour.py`` could change there while a stale kernel keeps loading.
  ``tests/test_augment_kernels.py`` checks that these equal ``colour.py``'s.
* The kernels have explicit signatures, so they are compiled (or loaded) once, at import, and never
  at run time. If the cache cannot be used or written then (no writable directory, full disk), they
  are compiled in memory instead; no later call can fail on the cache.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from .._numba_jit import eager_jit

__all__ = ["pointwise_kernel", "blur_kernel", "to_planar_kernel", "coefficients_kernel", "CONSTANTS"]


#: colour.py's constants, repeated here on purpose (see the module docstring); a test keeps them equal.
OD_EPS = 1e-6
SQRT2 = math.sqrt(2.0)
LN2 = math.log(2.0)
LOG2E = 1.0 / LN2
EXP_COEFS = [1.0 / math.factorial(i) for i in range(7)]
LOG_COEFS = [2.0 / (2 * i + 1) for i in range(5)]
CONSTANTS = {"_OD_EPS": OD_EPS, "_SQRT2": SQRT2, "_LN2": LN2, "_LOG2E": LOG2E, "_EXP_COEFS": EXP_COEFS,
             "_LOG_COEFS": LOG_COEFS}


def _jit(signature: str) -> Callable[[Any], Any]:
    return eager_jit(signature, error_model="numpy")


@intrinsic
def as_int(typingctx: Any, x: Any) -> Any:  # float32 bits as int32
    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        return builder.bitcast(args[0], ir.IntType(32))
    return types.int32(types.float32), codegen


@intrinsic
def as_float(typingctx: Any, x: Any) -> Any:  # int32 bits as float32
    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.int32), codegen


f32, i32 = np.float32, np.int32
zero, one, half, k255 = f32(0.0), f32(1.0), f32(0.5), f32(255.0)
eps, sqrt2, ln2, log2e = f32(OD_EPS), f32(SQRT2), f32(LN2), f32(LOG2E)
lo, hi = f32(-100.0), f32(100.0)
l0, l1, l2, l3, l4 = (f32(c) for c in LOG_COEFS)
e0, e1, e2, e3, e4, e5, e6 = (f32(c) for c in EXP_COEFS)
bias, mant, one_bits, i_one, i_zero = i32(127), i32(0x007FFFFF), i32(0x3F800000), i32(1), i32(0)


@numba.njit(nogil=True, error_model="numpy", inline="always")
def log2f(x: float) -> float:  # colour.log2_, one value
    bits = as_int(x)
    e = (bits >> 23) - bias
    m = as_float((bits & mant) | one_bits)
    big = m > sqrt2
    m = m * (half if big else one)
    ef = f32(e + (i_one if big else i_zero))
    f = (m - one) / (m + one)
    s = f * f
    p = s * l4
    p = p + l3
    p = p * s + l2
    p = p * s + l1
    p = p * s + l0
    return p * f * log2e + ef


@numba.njit(nogil=True, error_model="numpy", inline="always")
def exp2f(y: float) -> float:  # colour.exp2_, one value
    y = min(max(y, lo), hi)
    n = np.rint(y)
    t = (y - n) * ln2
    p = t * e6
    p = p + e5
    p = p * t + e4
    p = p * t + e3
    p = p * t + e2
    p = p * t + e1
    p = p * t + e0
    return p * as_float((i32(n) + bias) << 23)


@_jit("void(uint8[:, :, :, :], int64[:, ::1], float32[:, :, ::1], float32[:, :, ::1], boolean, boolean, "
      "int64[::1], uint8[:, :, :, ::1], float32[:, :, :, ::1])")
def pointwise_kernel(src: Any, geo: Any, colour: Any, hed: Any, do_colour: bool, do_hed: bool,
                     fidx: Any, out_u8: Any, out_f: Any) -> None:
    n_images, oh, ow = fidx.shape[0], out_u8.shape[2], out_u8.shape[3]
    to_float = np.empty(256, np.float32)
    for v in range(256):
        to_float[v] = f32(v) / k255  # pipeline._to_float, exactly
    buf = np.empty((3, ow), np.float32)
    br, bg, bb = buf[0], buf[1], buf[2]
    for n in range(n_images):
        a, b, c, d, e, f = geo[n, 0], geo[n, 1], geo[n, 2], geo[n, 3], geo[n, 4], geo[n, 5]
        m, h = colour[n], hed[n]
        m00, m01, m02, m03 = m[0, 0], m[0, 1], m[0, 2], m[0, 3]
        m10, m11, m12, m13 = m[1, 0], m[1, 1], m[1, 2], m[1, 3]
        m20, m21, m22, m23 = m[2, 0], m[2, 1], m[2, 2], m[2, 3]
        h00, h01, h02, h03 = h[0, 0], h[0, 1], h[0, 2], h[0, 3]
        h10, h11, h12, h13 = h[1, 0], h[1, 1], h[1, 2], h[1, 3]
        h20, h21, h22, h23 = h[2, 0], h[2, 1], h[2, 2], h[2, 3]
        fi = fidx[n]
        for i in range(oh):
            y0, x0 = a + b * i, d + e * i
            for j in range(ow):  # gather (geometry); uint8 -> float32 (a table of v / 255)
                y, x = y0 + c * j, x0 + f * j
                br[j] = to_float[src[n, y, x, 0]]
                bg[j] = to_float[src[n, y, x, 1]]
                bb[j] = to_float[src[n, y, x, 2]]
            if do_colour:  # colour.apply_colour: ((a0*x0 + a1*x1) + a2*x2) + a3, clip
                for j in range(ow):
                    r, g, bl = br[j], bg[j], bb[j]
                    r2 = ((r * m00 + g * m01) + bl * m02) + m03
                    g2 = ((r * m10 + g * m11) + bl * m12) + m13
                    b2 = ((r * m20 + g * m21) + bl * m22) + m23
                    br[j], bg[j], bb[j] = min(max(r2, zero), one), min(max(g2, zero), one), min(max(b2, zero), one)
            if do_hed:  # colour.apply_hed: rgb * 2**(log2(rgb) @ T + t), clip
                for j in range(ow):
                    r, g, bl = br[j], bg[j], bb[j]
                    lr, lg, lb = log2f(max(r, eps)), log2f(max(g, eps)), log2f(max(bl, eps))
                    dr = ((lr * h00 + lg * h01) + lb * h02) + h03
                    dg = ((lr * h10 + lg * h11) + lb * h12) + h13
                    db = ((lr * h20 + lg * h21) + lb * h22) + h23
                    br[j] = min(max(r * exp2f(dr), zero), one)
                    bg[j] = min(max(g * exp2f(dg), zero), one)
                    bb[j] = min(max(bl * exp2f(db), zero), one)
            if fi >= 0:  # float32 out, for the blur
                of = out_f[fi]
                for j in range(ow):
                    of[0, i, j], of[1, i, j], of[2, i, j] = br[j], bg[j], bb[j]
            else:  # pipeline._to_uint8: round half to even of x*255, clamp
                o = out_u8[n]
                for j in range(ow):
                    o[0, i, j] = np.uint8(min(max(np.rint(br[j] * k255), zero), k255))
                    o[1, i, j] = np.uint8(min(max(np.rint(bg[j] * k255), zero), k255))
                    o[2, i, j] = np.uint8(min(max(np.rint(bb[j] * k255), zero), k255))


@numba.njit(nogil=True, inline="always")
def _blur_along_x(plane: Any, rx: Any, cols: int, kn: Any, taps: int, w: int, row: Any, acc: Any) -> None:
    """acc[y, x] = sum over t of row[x + t] * kn[t], in t order, where row is src row y padded by the index map
    rx (its first ``cols`` entries): every src row once, since a padded row is a copy of one."""
    for y in range(plane.shape[0]):
        srow, arow = plane[y], acc[y]
        for x in range(cols):
            row[x] = srow[rx[x]]
        for x in range(w):
            arow[x] = row[x] * kn[0]
        for t in range(1, taps):
            kt = kn[t]
            for x in range(w):
                arow[x] = arow[x] + row[x + t] * kt


@numba.njit(nogil=True, inline="always")
def _blur_along_y(acc: Any, ry: Any, y: int, kn: Any, taps: int, w: int, out: Any) -> None:
    """out = output row y: sum over t of acc[ry[y + t]] * kn[t], in t order."""
    a0 = acc[ry[y]]
    for x in range(w):
        out[x] = a0[x] * kn[0]
    for t in range(1, taps):
        kt, at = kn[t], acc[ry[y + t]]
        for x in range(w):
            out[x] = out[x] + at[x] * kt


@numba.njit(nogil=True, inline="always")
def _round_into(out: Any, urow: Any, w: int) -> None:
    """pipeline._to_uint8 of one row: round half to even of x*255, clamp."""
    for x in range(w):
        urow[x] = np.uint8(min(max(np.rint(out[x] * k255), zero), k255))


@_jit("void(float32[:, :, :, ::1], float32[:, ::1], int64[::1], int64[::1], int64[::1], float32[:, :, :, ::1], "
      "uint8[:, :, :, ::1])")
def blur_kernel(src: Any, k: Any, ry: Any, rx: Any, dest: Any, out_f: Any, out_u8: Any) -> None:
    """blur.blur_valid of the image padded by index maps: padded row y is src row ry[y], padded
    column x is src column rx[x]. Along x (each src row once: a padded row is a copy of one), then
    along y. Image n goes to out_f[n] (float32) when dest[n] < 0, else rounded to out_u8[dest[n]]."""
    n_images, channels = src.shape[0], src.shape[1]
    taps = k.shape[1]
    h, w = ry.shape[0] - taps + 1, rx.shape[0] - taps + 1
    row = np.empty(rx.shape[0], np.float32)
    acc = np.empty((src.shape[2], w), np.float32)
    out = np.empty(w, np.float32)
    for n in range(n_images):
        kn = k[n]
        for ch in range(channels):
            _blur_along_x(src[n, ch], rx, rx.shape[0], kn, taps, w, row, acc)
            for y in range(h):
                _blur_along_y(acc, ry, y, kn, taps, w, out)
                if dest[n] < 0:
                    drow = out_f[n, ch, y]
                    for x in range(w):
                        drow[x] = out[x]
                else:
                    _round_into(out, out_u8[dest[n], ch, y], w)


@_jit("void(float32[:, :, :, ::1], float32[:, ::1], int64[::1], int64[:, ::1], int64[:, ::1], int64[::1], "
      "uint8[:, :, :, ::1])")
def blur_reflect_kernel(src: Any, k: Any, radius: Any, ry: Any, rx: Any, dest: Any, out_u8: Any) -> None:
    """:func:`blur_kernel` of images with halos of their own, reflected at the edges, rounded to uint8: image n
    (halo r = radius[n], kernel k[n, :2r+1]) reads padded row y from src row ry[r, y] and padded column x from
    src column rx[r, x], and goes to out_u8[dest[n]]. The same sums in the same order as blur_kernel, per image."""
    n_images, channels, h, w = src.shape[0], src.shape[1], src.shape[2], src.shape[3]
    row = np.empty(rx.shape[1], np.float32)
    acc = np.empty((h, w), np.float32)
    out = np.empty(w, np.float32)
    for n in range(n_images):
        kn, r = k[n], radius[n]
        for ch in range(channels):
            _blur_along_x(src[n, ch], rx[r], w + 2 * r, kn, 2 * r + 1, w, row, acc)
            for y in range(h):
                _blur_along_y(acc, ry[r], y, kn, 2 * r + 1, w, out)
                _round_into(out, out_u8[dest[n], ch, y], w)


@_jit("void(float64[:, ::1], int64, int64, int64[:, ::1])")
def geometry_kernel(table: Any, h: int, w: int, maps: Any) -> None:
    """cpu_kernels.geometry_maps of every row of a parameter table (flip_h, flip_v, rot90_k in columns 0..2):
    the quarter turn as an affine index map, then the flips negate and shift its halves."""
    for n in range(table.shape[0]):
        k = np.int64(table[n, 2])
        if k == 0:
            p0, pi, pj, q0, qi, qj = 0, 1, 0, 0, 0, 1
        elif k == 1:
            p0, pi, pj, q0, qi, qj = 0, 0, 1, w - 1, -1, 0
        elif k == 2:
            p0, pi, pj, q0, qi, qj = h - 1, -1, 0, w - 1, 0, -1
        else:
            p0, pi, pj, q0, qi, qj = h - 1, 0, -1, 0, 1, 0
        if table[n, 1] != 0.0:  # flip_v
            p0, pi, pj = h - 1 - p0, -pi, -pj
        if table[n, 0] != 0.0:  # flip_h
            q0, qi, qj = w - 1 - q0, -qi, -qj
        maps[n, 0], maps[n, 1], maps[n, 2], maps[n, 3], maps[n, 4], maps[n, 5] = p0, pi, pj, q0, qi, qj


@_jit("void(uint8[:, :, :, ::1], uint8[:, :, :, ::1])")
def to_planar_kernel(src: Any, out: Any) -> None:
    """uint8 (N, H, W, 3) -> (N, 3, H, W): the channel de-interleave of an unaugmented batch."""
    for n in range(src.shape[0]):
        for y in range(src.shape[1]):
            row = src[n, y].reshape(-1)  # flat r, g, b, r, ...: LLVM vectorises the stride-3 loads
            o0, o1, o2 = out[n, 0, y], out[n, 1, y], out[n, 2, y]
            for x in range(src.shape[2]):
                o0[x], o1[x], o2[x] = row[3 * x], row[3 * x + 1], row[3 * x + 2]


@numba.njit(nogil=True, inline="always")
def _mm(a: Any, b: Any, out: Any, n: int) -> None:
    """out[:n, :n] = a[:n, :n] @ b[:n, :n] in float64, summing k in ascending order (colour._matmul's order)."""
    for i in range(n):
        for j in range(n):
            acc = a[i, 0] * b[0, j]
            for k in range(1, n):
                acc = acc + a[i, k] * b[k, j]
            out[i, j] = acc


@_jit("void(float64[:, ::1], float64[::1], float64[:, ::1], float64[:, ::1], float64[:, ::1], float64[:, ::1], "
      "float64, float64, float32[:, :, ::1], float32[:, :, ::1])")
def coefficients_kernel(table: Any, grey: Any, yiq_to_rgb: Any, rgb_to_yiq: Any, hed_from_rgb: Any,
                        rgb_from_hed: Any, log2_adjust: float, mid_grey: float, colour: Any, hed: Any) -> None:
    """colour.colour_coefficients and colour.hed_coefficients of every row of a parameter table, with the
    same float64 operations in the same order (the matrices come in as arguments, see the module docstring);
    ``tests/test_batch_draws.py`` checks equality with the per-sample matrices."""
    b, c, s, h = np.zeros((4, 4)), np.zeros((4, 4)), np.zeros((4, 4)), np.zeros((4, 4))
    t1, t2, t3 = np.empty((4, 4)), np.empty((4, 4)), np.empty((4, 4))
    for n in range(table.shape[0]):
        bright, contrast, sat, hue = table[n, 3], table[n, 4], table[n, 5], table[n, 6]
        for m in (b, c, s, h):
            m[:] = 0.0
            for i in range(4):
                m[i, i] = 1.0
        for i in range(3):
            b[i, i] = 1.0 * bright
            c[i, i] = 1.0 * contrast
            c[i, 3] = mid_grey * (1.0 - contrast)
            for j in range(3):
                s[i, j] = sat * (1.0 if i == j else 0.0) + (1.0 - sat) * (1.0 * grey[j])
        if hue != 0.0:
            theta = 2.0 * math.pi * hue
            cos, sin = math.cos(theta), math.sin(theta)
            rot = np.array([[1.0, 0.0, 0.0], [0.0, cos, -sin], [0.0, sin, cos]])
            _mm(yiq_to_rgb, rot, t1, 3)  # (yiq_to_rgb @ rot) @ rgb_to_yiq into the top-left 3x3 of h
            _mm(t1, rgb_to_yiq, h, 3)
        _mm(h, s, t1, 4)
        _mm(t1, c, t2, 4)
        _mm(t2, b, t3, 4)
        for i in range(3):
            for j in range(4):
                colour[n, i, j] = np.float32(t3[i, j])
        jitter = False
        for k in range(3):
            if table[n, 7 + k] != 1.0 or table[n, 10 + k] != 0.0:
                jitter = True
        if not jitter:
            hed[n] = np.float32(0.0)
            continue
        for i in range(3):  # (hed_from_rgb * alpha) @ rgb_from_hed - I, then transposed
            for j in range(3):
                acc = (hed_from_rgb[i, 0] * table[n, 7]) * rgb_from_hed[0, j]
                for k in range(1, 3):
                    acc = acc + (hed_from_rgb[i, k] * table[n, 7 + k]) * rgb_from_hed[k, j]
                hed[n, j, i] = np.float32(acc - (1.0 if i == j else 0.0))
        for j in range(3):
            acc = table[n, 10] * rgb_from_hed[0, j]
            for k in range(1, 3):
                acc = acc + table[n, 10 + k] * rgb_from_hed[k, j]
            hed[n, j, 3] = np.float32(acc * log2_adjust)


@_jit("UniTuple(int64, 4)(float64[:, ::1], int64, int64, boolean[::1], float64[::1], float64[:, ::1], "
      "float64[:, ::1], float64[:, ::1], float64[:, ::1], float64, float64, int64[:, ::1], float32[:, :, ::1], "
      "float32[:, :, ::1], int64[::1])")
def prepare_pointwise_kernel(table: Any, h: int, w: int, float_for: Any, grey: Any, yiq_to_rgb: Any, rgb_to_yiq: Any,
                             hed_from_rgb: Any, rgb_from_hed: Any, log2_adjust: float, mid_grey: float, maps: Any,
                             colour: Any, hed: Any, fidx: Any) -> tuple[int, int, int, int]:
    """Everything cpu_kernels.pointwise works out before its pass, in one call: the geometry maps, whether any
    sample changes colour or HED and then the coefficients (zeros otherwise, as before), each sample's row of
    the float output (-1: none). Returns (rot90 parity of every sample, or -1 when they mix; do_colour;
    do_hed; samples with a float row)."""
    n = table.shape[0]
    geometry_kernel(table, h, w, maps)
    parity = np.int64(table[0, 2]) % 2 if n else 0
    do_colour = do_hed = False
    k = 0
    for i in range(n):
        if np.int64(table[i, 2]) % 2 != parity:
            parity = -1
        if table[i, 3] != 1.0 or table[i, 4] != 1.0 or table[i, 5] != 1.0 or table[i, 6] != 0.0:
            do_colour = True
        for c in range(3):
            if table[i, 7 + c] != 1.0 or table[i, 10 + c] != 0.0:
                do_hed = True
        fidx[i] = k if float_for[i] else -1
        k += 1 if float_for[i] else 0
    if do_colour or do_hed:
        coefficients_kernel(table, grey, yiq_to_rgb, rgb_to_yiq, hed_from_rgb, rgb_from_hed, log2_adjust, mid_grey,
                            colour, hed)
    else:
        colour[:] = np.float32(0.0)
        hed[:] = np.float32(0.0)
    return parity, np.int64(do_colour), np.int64(do_hed), k
