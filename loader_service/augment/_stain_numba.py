"""The numba kernels behind ``stain_kernels`` (imported on first use: importing numba costs ~0.5 s).

See ``stain_kernels`` for what they compute and how close they stay to the torch ops of ``stain``.
Every number that could change (thresholds, percentiles, the background, colour matrices) is passed in
as an argument, so numba's on-disk cache (which only checks this file's stamp) can never keep a stale
constant. Explicit signatures: compiled (or loaded from the cache) once, at import.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import numba
import numpy as np

__all__ = ["levels_kernel", "macenko_gather_kernel", "macenko_cov_kernel", "macenko_angle_kernel",
           "macenko_high_kernel", "macenko_render_kernel", "reinhard_kernel"]

log = logging.getLogger(__name__)

f32 = np.float32
#: (N, H, W, 3) uint8 images: compiled twice, for C-contiguous NHWC batches (~10% faster) and for any strides
#: (NCHW batches seen channels last, views); numba dispatches to the C-contiguous one when it applies.
U8_4D = "{u8}"
_U8_LAYOUTS = ("uint8[:, :, :, ::1]", "uint8[:, :, :, :]")


def _jit(signature: str) -> Callable[[Any], Any]:
    """Compile eagerly for ``signature`` (each image layout where it has ``U8_4D``), cached on disk when numba
    can, in memory when it cannot."""
    signatures = [signature.replace(U8_4D, u8) for u8 in _U8_LAYOUTS] if U8_4D in signature else [signature]

    def compile_(fn: Any) -> Any:
        try:
            return numba.njit(signatures, nogil=True, error_model="numpy", cache=True)(fn)
        except (RuntimeError, OSError) as err:  # no usable cache directory, or writing to it failed
            log.info("numba cannot cache %s (%s); compiling it in memory", fn.__name__, err)
            return numba.njit(signatures, nogil=True, error_model="numpy")(fn)
    return compile_


@numba.njit(nogil=True, error_model="numpy")
def _select(a: Any, n: int, k: int) -> float:
    """The k-th smallest of a[:n] (0-based), reordering a[:n] so that a[k] holds it, a[:k] <= it <= a[k+1:n]
    (quickselect, median-of-three pivot: deterministic)."""
    lo, hi = 0, n - 1
    while hi > lo:
        mid = (lo + hi) // 2
        if a[mid] < a[lo]:
            a[mid], a[lo] = a[lo], a[mid]
        if a[hi] < a[lo]:
            a[hi], a[lo] = a[lo], a[hi]
        if a[hi] < a[mid]:
            a[hi], a[mid] = a[mid], a[hi]
        pivot = a[mid]
        i, j = lo, hi
        while i <= j:
            while a[i] < pivot:
                i += 1
            while a[j] > pivot:
                j -= 1
            if i <= j:
                a[i], a[j] = a[j], a[i]
                i += 1
                j -= 1
        if k <= j:
            hi = j
        elif k >= i:
            lo = i
        else:
            break
    return a[k]


@numba.njit(nogil=True, error_model="numpy")
def _quantile(buf: Any, n: int, q: float) -> float:
    """torch.quantile's linear interpolation (rank q*(n-1) in float32, lerp as torch's) of buf[:n];
    reorders buf[:n]. n >= 1."""
    rank = f32(q) * f32(n - 1)
    below = int(rank)
    weight = rank - f32(below)
    lo = _select(buf, n, below)
    hi = lo
    if below + 1 < n and weight != f32(0.0):
        hi = buf[below + 1]
        for p in range(below + 2, n):
            hi = min(hi, buf[p])
    if abs(weight) < f32(0.5):
        return lo + weight * (hi - lo)
    return hi - (hi - lo) * (f32(1.0) - weight)


@numba.njit(nogil=True, error_model="numpy", inline="always")
def _level(v: float, steps: Any, start: Any, lo: float, scale: float) -> int:
    """How many of the sorted thresholds ``steps`` (255 of them, then +inf twice) are <= v: a monotone
    float -> uint8 map given by where it steps. ``start[b]`` is a lower bound of that count in bucket b of
    [lo, lo + len(start) / scale), short of it by at most 2 (checked when the table is built). Branch-free."""
    u = (v - lo) * scale
    b = min(int(u), start.shape[0] - 1) if u > f32(0.0) else 0
    k = start[b]
    k += steps[k] <= v
    k += steps[k] <= v
    return k


@_jit("void(float32[::1], float32[::1], int32[::1], float32, float32, int64[::1])")
def levels_kernel(v: Any, steps: Any, start: Any, lo: float, scale: float, out: Any) -> None:
    """_level of each value (what the render kernels do per channel; for tests)."""
    for p in range(v.shape[0]):
        out[p] = _level(v[p], steps, start, lo, scale)


@_jit(f"void({U8_4D}, int64, float32[::1], float32, float32[:, :, ::1], int64[::1])")
def macenko_gather_kernel(x: Any, step: int, od_lut: Any, threshold: float, buf: Any, count: Any) -> None:
    """Per image i: the OD of the tissue pixels (OD > threshold in every channel) among every step-th pixel
    (flat order), packed into buf[i, :count[i]]."""
    n, h, w, _ = x.shape
    for i in range(n):
        c = 0
        y = xx = 0
        while y < h:
            o0, o1, o2 = od_lut[x[i, y, xx, 0]], od_lut[x[i, y, xx, 1]], od_lut[x[i, y, xx, 2]]
            if o0 > threshold and o1 > threshold and o2 > threshold:
                buf[i, c, 0] = o0
                buf[i, c, 1] = o1
                buf[i, c, 2] = o2
                c += 1
            xx += step
            while xx >= w:
                xx -= w
                y += 1
        count[i] = c


@_jit("void(float32[:, :, ::1], int64[::1], float64[:, :, ::1])")
def macenko_cov_kernel(buf: Any, count: Any, cov: Any) -> None:
    """Per image: covariance (float64 sums, mean rounded to float32 as the reference's) of buf[i, :count[i]]."""
    for i in range(buf.shape[0]):
        c = count[i]
        s0 = s1 = s2 = 0.0
        for p in range(c):
            s0 += buf[i, p, 0]
            s1 += buf[i, p, 1]
            s2 += buf[i, p, 2]
        d = float(max(c, 1))
        m0, m1, m2 = f32(s0 / d), f32(s1 / d), f32(s2 / d)
        a00 = a01 = a02 = a11 = a12 = a22 = 0.0
        for p in range(c):
            a0, a1, a2 = float(buf[i, p, 0] - m0), float(buf[i, p, 1] - m1), float(buf[i, p, 2] - m2)
            a00 += a0 * a0
            a01 += a0 * a1
            a02 += a0 * a2
            a11 += a1 * a1
            a12 += a1 * a2
            a22 += a2 * a2
        cov[i, 0, 0], cov[i, 1, 1], cov[i, 2, 2] = a00 / d, a11 / d, a22 / d
        cov[i, 0, 1] = cov[i, 1, 0] = a01 / d
        cov[i, 0, 2] = cov[i, 2, 0] = a02 / d
        cov[i, 1, 2] = cov[i, 2, 1] = a12 / d


@numba.njit(nogil=True, error_model="numpy")
def _angle_of(buf: Any, i: int, c: int, plane: Any, key: float) -> float:
    """atan2(v, u) of the first pixel of buf[i, :c] whose v / u is ``key`` (its projection on ``plane[i]``)."""
    for p in range(c):
        o0, o1, o2 = buf[i, p, 0], buf[i, p, 1], buf[i, p, 2]
        u = o0 * plane[i, 0, 0] + o1 * plane[i, 1, 0] + o2 * plane[i, 2, 0]
        v = o0 * plane[i, 0, 1] + o1 * plane[i, 1, 1] + o2 * plane[i, 2, 1]
        if v / u == key:
            return np.arctan2(v, u)
    return f32(np.nan)  # not reached: key is one of them


@numba.njit(nogil=True, error_model="numpy")
def _angle_quantile(buf: Any, i: int, c: int, plane: Any, key: Any, q: float) -> float:
    """The q quantile of the angles, selecting on v / u (the angle's tangent: same order while every u > 0)
    and taking atan2 of the two selected pixels only; interpolated as _quantile."""
    rank = f32(q) * f32(c - 1)
    below = int(rank)
    weight = rank - f32(below)
    lo = _angle_of(buf, i, c, plane, _select(key, c, below))
    hi = lo
    if below + 1 < c and weight != f32(0.0):
        nxt = key[below + 1]
        for p in range(below + 2, c):
            nxt = min(nxt, key[p])
        hi = _angle_of(buf, i, c, plane, nxt)
    if abs(weight) < f32(0.5):
        return lo + weight * (hi - lo)
    return hi - (hi - lo) * (f32(1.0) - weight)


@_jit("void(float32[:, :, ::1], int64[::1], float32[:, :, ::1], float32, float32, float32[:, ::1])")
def macenko_angle_kernel(buf: Any, count: Any, plane: Any, q: float, q_high: float, out: Any) -> None:
    """Per image: the q and q_high quantiles of the angles of buf[i, :count[i]] in ``plane`` (N, 3, 2); 0 if empty.
    While every projection has u > 0 (tissue OD against the leading eigenvector: in practice always), order
    statistics are selected on v / u and atan2 runs on the selected pixels only; else on every pixel's atan2."""
    angle = np.empty(buf.shape[1], np.float32)
    for i in range(buf.shape[0]):
        c = count[i]
        right = True
        for p in range(c):
            o0, o1, o2 = buf[i, p, 0], buf[i, p, 1], buf[i, p, 2]
            u = o0 * plane[i, 0, 0] + o1 * plane[i, 1, 0] + o2 * plane[i, 2, 0]
            v = o0 * plane[i, 0, 1] + o1 * plane[i, 1, 1] + o2 * plane[i, 2, 1]
            right = right and u > f32(0.0)
            angle[p] = v / u
        if c == 0:
            out[i, 0] = out[i, 1] = f32(0.0)
            continue
        if right:
            out[i, 0] = _angle_quantile(buf, i, c, plane, angle, q)
            out[i, 1] = _angle_quantile(buf, i, c, plane, angle, q_high)
            continue
        for p in range(c):
            o0, o1, o2 = buf[i, p, 0], buf[i, p, 1], buf[i, p, 2]
            u = o0 * plane[i, 0, 0] + o1 * plane[i, 1, 0] + o2 * plane[i, 2, 0]
            v = o0 * plane[i, 0, 1] + o1 * plane[i, 1, 1] + o2 * plane[i, 2, 1]
            angle[p] = np.arctan2(v, u)
        out[i, 0] = _quantile(angle, c, q)
        out[i, 1] = _quantile(angle, c, q_high)


@_jit("void(float32[:, :, ::1], int64[::1], float32[:, :, ::1], float32, float32[:, ::1])")
def macenko_high_kernel(buf: Any, count: Any, pinv_t: Any, q: float, out: Any) -> None:
    """Per image: the q quantile of each stain's concentration (OD @ ``pinv_t`` (N, 3, 2)) over
    buf[i, :count[i]]; NaN if empty."""
    b0, b1 = np.empty(buf.shape[1], np.float32), np.empty(buf.shape[1], np.float32)
    for i in range(buf.shape[0]):
        c = count[i]
        for p in range(c):
            o0, o1, o2 = buf[i, p, 0], buf[i, p, 1], buf[i, p, 2]
            b0[p] = o0 * pinv_t[i, 0, 0] + o1 * pinv_t[i, 1, 0] + o2 * pinv_t[i, 2, 0]
            b1[p] = o0 * pinv_t[i, 0, 1] + o1 * pinv_t[i, 1, 1] + o2 * pinv_t[i, 2, 1]
        if c == 0:
            out[i, 0] = out[i, 1] = np.float32(np.nan)
        else:
            out[i, 0] = _quantile(b0, c, q)
            out[i, 1] = _quantile(b1, c, q)


@_jit(f"void({U8_4D}, float32[::1], float32[:, :, ::1], float32[:, ::1], float32[:, ::1], boolean[::1], "
      f"float32[::1], int32[::1], float32, float32, {U8_4D})")
def macenko_render_kernel(x: Any, od_lut: Any, pinv_t: Any, scale: Any, stains: Any, keep: Any,
                          steps: Any, start: Any, lo: float, bucket_scale: float, out: Any) -> None:
    """Per pixel: concentrations (OD @ pinv_t[i]) times scale[i], re-rendered with ``stains`` (3, 2) as the
    grey level 255 - _level(OD) (the steps of round(background * exp(-OD))); images with keep[i] are copied."""
    n, h, w, _ = x.shape
    for i in range(n):
        if keep[i]:
            for y in range(h):
                for xx in range(w):
                    for ch in range(3):
                        out[i, y, xx, ch] = x[i, y, xx, ch]
            continue
        m00, m10, m20 = pinv_t[i, 0, 0], pinv_t[i, 1, 0], pinv_t[i, 2, 0]
        m01, m11, m21 = pinv_t[i, 0, 1], pinv_t[i, 1, 1], pinv_t[i, 2, 1]
        k0, k1 = scale[i, 0], scale[i, 1]
        for y in range(h):
            for xx in range(w):
                o0, o1, o2 = od_lut[x[i, y, xx, 0]], od_lut[x[i, y, xx, 1]], od_lut[x[i, y, xx, 2]]
                c0 = (o0 * m00 + o1 * m10 + o2 * m20) * k0
                c1 = (o0 * m01 + o1 * m11 + o2 * m21) * k1
                for ch in range(3):
                    out[i, y, xx, ch] = np.uint8(255 - _level(c0 * stains[ch, 0] + c1 * stains[ch, 1], steps, start,
                                                              lo, bucket_scale))


@numba.njit(nogil=True, error_model="numpy", inline="always")
def _lab_f(t: float, eps: float) -> float:
    return t ** f32(1.0 / 3.0) if t > eps else f32(7.787) * t + f32(16.0 / 116.0)


@_jit(f"void({U8_4D}, float32[::1], float32[:, ::1], float32[::1], float32[:, ::1], float32[::1], "
      f"float32[::1], float32[::1], float32[::1], int32[::1], float32, {U8_4D})")
def reinhard_kernel(x: Any, lin_lut: Any, to_xyz: Any, white: Any, to_rgb: Any, lab_consts: Any,
                    target_mean: Any, target_std: Any, steps: Any, start: Any, bucket_scale: float, out: Any) -> None:
    """Per image: CIE L*a*b* of every pixel (sRGB linearised by ``lin_lut``), shifted and scaled to the
    target mean and std (whole image, float64 statistics), back to sRGB and rounded half to even.
    lab_consts: (xyz threshold, f threshold). Linear RGB (clipped to [0, 1]) -> grey level: _level (the steps
    of the reference's sRGB gamma and rounding)."""
    n, h, w, _ = x.shape
    lab = np.empty((h * w, 3), np.float32)
    eps, f_eps = lab_consts[0], lab_consts[1]
    k00, k01, k02, k10, k11, k12 = to_xyz[0, 0], to_xyz[0, 1], to_xyz[0, 2], to_xyz[1, 0], to_xyz[1, 1], to_xyz[1, 2]
    k20, k21, k22, w0, w1, w2 = to_xyz[2, 0], to_xyz[2, 1], to_xyz[2, 2], white[0], white[1], white[2]
    size = float(h * w)
    for i in range(n):
        s0 = s1 = s2 = 0.0
        for y in range(h):
            for xx in range(w):
                p = y * w + xx
                r, g, b = lin_lut[x[i, y, xx, 0]], lin_lut[x[i, y, xx, 1]], lin_lut[x[i, y, xx, 2]]
                fx = _lab_f((r * k00 + g * k01 + b * k02) / w0, eps)
                fy = _lab_f((r * k10 + g * k11 + b * k12) / w1, eps)
                fz = _lab_f((r * k20 + g * k21 + b * k22) / w2, eps)
                l_, a_, b_ = f32(116.0) * fy - f32(16.0), f32(500.0) * (fx - fy), f32(200.0) * (fy - fz)
                lab[p, 0], lab[p, 1], lab[p, 2] = l_, a_, b_
                s0 += l_
                s1 += a_
                s2 += b_
        m0, m1, m2 = s0 / size, s1 / size, s2 / size
        v0 = v1 = v2 = 0.0
        for p in range(h * w):
            d0, d1, d2 = lab[p, 0] - m0, lab[p, 1] - m1, lab[p, 2] - m2
            v0 += d0 * d0
            v1 += d1 * d1
            v2 += d2 * d2
        mean0, mean1, mean2 = f32(m0), f32(m1), f32(m2)
        sd0, sd1, sd2 = (max(f32(np.sqrt(v0 / size)), f32(1e-6)), max(f32(np.sqrt(v1 / size)), f32(1e-6)),
                         max(f32(np.sqrt(v2 / size)), f32(1e-6)))
        t0, t1, t2 = target_std[0], target_std[1], target_std[2]
        u0, u1, u2 = target_mean[0], target_mean[1], target_mean[2]
        for y in range(h):
            for xx in range(w):
                p = y * w + xx
                l0 = (lab[p, 0] - mean0) / sd0 * t0 + u0
                a0 = (lab[p, 1] - mean1) / sd1 * t1 + u1
                b0 = (lab[p, 2] - mean2) / sd2 * t2 + u2
                fy = (l0 + f32(16.0)) / f32(116.0)
                f0, f1, f2 = fy + a0 / f32(500.0), fy, fy - b0 / f32(200.0)
                x0 = (f0 * f0 * f0 if f0 > f_eps else (f0 - f32(16.0 / 116.0)) / f32(7.787)) * w0
                x1 = (f1 * f1 * f1 if f1 > f_eps else (f1 - f32(16.0 / 116.0)) / f32(7.787)) * w1
                x2 = (f2 * f2 * f2 if f2 > f_eps else (f2 - f32(16.0 / 116.0)) / f32(7.787)) * w2
                for c in range(3):
                    lin = min(max(x0 * to_rgb[c, 0] + x1 * to_rgb[c, 1] + x2 * to_rgb[c, 2], f32(0.0)), f32(1.0))
                    out[i, y, xx, c] = np.uint8(_level(lin, steps, start, f32(0.0), bucket_scale))
