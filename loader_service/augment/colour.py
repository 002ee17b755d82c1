"""Pointwise colour maths: jitter (brightness, contrast, saturation, hue) and HED stain jitter.

Everything here is *pointwise* and built only from IEEE-754 correctly rounded float32
operations (``+ - * /``, min/max, round) and integer/bit operations. Each output pixel is
therefore computed by exactly the same arithmetic whatever the tensor's size, layout,
vectorisation or thread split, which is what makes stitched pieces bit-identical to the whole
image. For the same reason ``log2``/``exp2`` are implemented here instead of calling
``torch.log``/``torch.exp`` (whose vectorised and scalar code paths are not guaranteed to agree
to the last bit), and 3x3 colour matrices are applied as explicit sums instead of matmul.

Per-sample coefficients are computed on the host in float64 from the parameters, then cast to
float32 once; identity parameters give exactly identity coefficients, so an identity op is
bit-exact (no op is skipped for one sample but applied to another).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from .params import AugmentParams, params_table

__all__ = [
    "GREY_WEIGHTS", "RGB_FROM_HED", "HED_FROM_RGB", "colour_coefficients", "hed_coefficients",
    "apply_affine3", "apply_colour", "apply_hed", "log2", "exp2", "log2_", "exp2_",
]

#: ITU-R BT.601 luma: the "grey" of a pixel for saturation, and the Y of YIQ.
GREY_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float64)
_RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114],
                        [0.595716, -0.274453, -0.321263],
                        [0.211456, -0.522591, 0.311135]], dtype=np.float64)
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ)
#: Ruifrok & Johnston stain vectors as in skimage.color (rows: H, E, D optical densities).
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29],
                         [0.07, 0.99, 0.11],
                         [0.27, 0.57, 0.78]], dtype=np.float64)
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)
#: skimage's rgb2hed divides OD by -ln(1e-6); betas are in those units. In log2 space:
_LOG2_ADJUST = math.log2(1e-6)
#: Pixels darker than this are treated as this for the OD logarithm (as skimage does).
_OD_EPS = 1e-6
_MID_GREY = 0.5


# ---------------------------------------------------------------------- host-side coefficients
def _colour_matrix(p: AugmentParams) -> np.ndarray:
    """4x4 homogeneous float64 matrix of brightness -> contrast -> saturation -> hue (RGB in [0,1])."""
    eye = np.eye(4)
    b = eye.copy()
    b[:3, :3] *= p.brightness
    c = eye.copy()
    c[:3, :3] *= p.contrast
    c[:3, 3] = _MID_GREY * (1.0 - p.contrast)  # pivot on a fixed mid-grey, not the image mean
    s = eye.copy()
    s[:3, :3] = p.saturation * np.eye(3) + (1.0 - p.saturation) * np.outer(np.ones(3), GREY_WEIGHTS)
    h = eye.copy()
    if p.hue != 0.0:
        theta = 2.0 * math.pi * p.hue
        rot = np.array([[1.0, 0.0, 0.0],
                        [0.0, math.cos(theta), -math.sin(theta)],
                        [0.0, math.sin(theta), math.cos(theta)]])
        h[:3, :3] = _YIQ_TO_RGB @ rot @ _RGB_TO_YIQ
    return h @ s @ c @ b


def _matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, r, k) @ (N, k, c) in float64 as explicit sums over k in ascending order (one fixed order on every
    machine; equal to numpy's ``@`` on these small matrices, checked in tests/test_augment_params.py)."""
    out = a[:, :, 0, None] * b[:, None, 0, :]
    for k in range(1, a.shape[2]):
        out = out + a[:, :, k, None] * b[:, None, k, :]
    return out


def colour_coefficients(params: Sequence[AugmentParams]) -> np.ndarray:
    """(N, 3, 4) float32: out_c = m[c,0]*r + m[c,1]*g + m[c,2]*b + m[c,3].

    The batch at once (array expressions, not a matrix product per sample): the same values as
    ``_colour_matrix`` of each sample."""
    n = len(params)
    if n == 0:
        return np.zeros((0, 3, 4), np.float32)
    bright, contrast, sat, hue = params_table(params)[:, 3:7].T
    eye = np.broadcast_to(np.eye(4), (n, 4, 4))
    b = eye.copy()
    b[:, :3, :3] *= bright[:, None, None]
    c = eye.copy()
    c[:, :3, :3] *= contrast[:, None, None]
    c[:, :3, 3] = (_MID_GREY * (1.0 - contrast))[:, None]
    s = eye.copy()
    s[:, :3, :3] = sat[:, None, None] * np.eye(3) + (1.0 - sat)[:, None, None] * np.outer(np.ones(3), GREY_WEIGHTS)
    h = eye.copy()
    turned = np.flatnonzero(hue != 0.0)
    if len(turned):
        theta = [2.0 * math.pi * v for v in hue[turned].tolist()]  # libm's cos/sin, as _colour_matrix
        rot = np.zeros((len(turned), 3, 3))
        rot[:, 0, 0] = 1.0
        rot[:, 1, 1] = rot[:, 2, 2] = [math.cos(t) for t in theta]
        rot[:, 2, 1] = [math.sin(t) for t in theta]
        rot[:, 1, 2] = -rot[:, 2, 1]
        m = len(turned)
        h[turned, :3, :3] = _matmul(_matmul(np.broadcast_to(_YIQ_TO_RGB, (m, 3, 3)), rot),
                                    np.broadcast_to(_RGB_TO_YIQ, (m, 3, 3)))
    return _matmul(_matmul(_matmul(h, s), c), b)[:, :3, :].astype(np.float32)


def _hed_matrix(p: AugmentParams) -> np.ndarray:
    """(3, 4) float64 map of log2(rgb) to log2(rgb') - log2(rgb), column c = output channel."""
    if p.hed_is_identity:
        return np.zeros((3, 4))
    # od' = od @ (HED_FROM_RGB diag(alpha) RGB_FROM_HED) + beta @ RGB_FROM_HED (od in skimage units);
    # linear in log(rgb), so the same map holds for log2(rgb) with the shift scaled by log2(1e-6).
    t = HED_FROM_RGB @ np.diag(p.hed_alpha) @ RGB_FROM_HED - np.eye(3)
    shift = (np.asarray(p.hed_beta) @ RGB_FROM_HED) * _LOG2_ADJUST
    return np.concatenate([t.T, shift[:, None]], axis=1)


def hed_coefficients(params: Sequence[AugmentParams]) -> np.ndarray:
    """(N, 3, 4) float32: delta_c = m[c,0]*L_r + m[c,1]*L_g + m[c,2]*L_b + m[c,3], L = log2(rgb).

    The batch at once: the same values as ``_hed_matrix`` of each sample (zeros for the identity)."""
    n = len(params)
    out = np.zeros((n, 3, 4), np.float64)
    if n == 0:
        return out.astype(np.float32)
    values = params_table(params)[:, 7:13]
    jitter = np.flatnonzero((values[:, :3] != 1.0).any(axis=1) | (values[:, 3:] != 0.0).any(axis=1))
    if len(jitter):
        m = len(jitter)
        alpha, beta = values[jitter, :3], values[jitter, 3:]
        scaled = np.broadcast_to(HED_FROM_RGB, (m, 3, 3)) * alpha[:, None, :]  # HED_FROM_RGB @ diag(alpha)
        t = _matmul(scaled, np.broadcast_to(RGB_FROM_HED, (m, 3, 3))) - np.eye(3)
        shift = _matmul(beta[:, None, :], np.broadcast_to(RGB_FROM_HED, (m, 3, 3)))[:, 0, :] * _LOG2_ADJUST
        out[jitter, :, :3] = t.transpose(0, 2, 1)
        out[jitter, :, 3] = shift
    return out.astype(np.float32)


# ---------------------------------------------------------------------- device-side maths
def apply_affine3(x: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """x: (N, 3, H, W) float32, coef: (N, 3, 4) float32 -> new (N, 3, H, W).

    Explicit, fixed-order sums ((a0*x0 + a1*x1) + a2*x2) + a3, never matmul/einsum."""
    n = x.shape[0]
    c = coef.reshape(n, 3, 4, 1, 1)
    out = torch.empty_like(x)
    for ch in range(3):
        acc = out[:, ch]
        torch.mul(x[:, 0], c[:, ch, 0], out=acc)
        acc.add_(x[:, 1] * c[:, ch, 1])
        acc.add_(x[:, 2] * c[:, ch, 2])
        acc.add_(c[:, ch, 3])
    return out


def apply_colour(x: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """Brightness -> contrast -> saturation -> hue as one affine map per sample (``coef`` from
    :func:`colour_coefficients`), then clip to [0, 1]. Returns a new tensor."""
    return apply_affine3(x, coef).clamp_(0.0, 1.0)


def apply_hed(x: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """HED stain jitter (``coef`` from :func:`hed_coefficients`), in place on ``x``:
    rgb' = rgb * 2**(L @ T + s) with L = log2(max(rgb, 1e-6)), clipped to [0, 1].

    Equal to exp(-(OD @ HED_FROM_RGB * alpha + beta) @ RGB_FROM_HED) (skimage's rgb2hed ->
    jitter -> hed2rgb, without its clipping of negative stain densities), written as a
    multiplicative correction so that alpha=1, beta=0 is exactly the identity."""
    delta = apply_affine3(log2_(x.clamp(min=_OD_EPS)), coef)
    return x.mul_(exp2_(delta)).clamp_(0.0, 1.0)


_SQRT2 = math.sqrt(2.0)
_LN2 = math.log(2.0)
_LOG2E = 1.0 / _LN2
# 2**r = e**(r ln2), Taylor to degree 6 (|r ln2| <= 0.347: relative error < 2e-7).
_EXP_COEFS = [1.0 / math.factorial(i) for i in range(7)]
# log(m) = 2 atanh(f), f = (m-1)/(m+1), |f| <= 0.172: 2 * sum_i f**(2i+1) / (2i+1), error < 1e-8.
_LOG_COEFS = [2.0 / (2 * i + 1) for i in range(5)]


def log2_(x: torch.Tensor) -> torch.Tensor:
    """log2 of positive normal float32 values, overwriting ``x`` (contiguous) and returning it;
    exactly rounded operations only (absolute error ~1e-7)."""
    bits = x.view(torch.int32)
    e = (bits >> 23).sub_(127)
    bits.bitwise_and_(0x007FFFFF).bitwise_or_(0x3F800000)  # x now holds the mantissa m in [1, 2)
    big = x > _SQRT2
    x.mul_(torch.where(big, 0.5, 1.0))  # exact; m in [sqrt(1/2), sqrt(2)]
    ef = e.add_(big.to(torch.int32)).to(torch.float32)
    f = x.sub(1.0).div_(x.add_(1.0))
    s = f * f
    poly = s * _LOG_COEFS[-1]
    poly.add_(_LOG_COEFS[-2])
    for coef in reversed(_LOG_COEFS[:-2]):
        poly.mul_(s).add_(coef)
    return x.copy_(poly.mul_(f).mul_(_LOG2E).add_(ef))


def exp2_(y: torch.Tensor) -> torch.Tensor:
    """2**y (y clipped to [-100, 100]), overwriting float32 ``y`` and returning it; exactly
    rounded operations only (relative error ~2e-7)."""
    y.clamp_(-100.0, 100.0)
    n = torch.round(y)
    t = y.sub_(n).mul_(_LN2)  # y - n is exact
    poly = t * _EXP_COEFS[-1]
    poly.add_(_EXP_COEFS[-2])
    for coef in reversed(_EXP_COEFS[:-2]):
        poly.mul_(t).add_(coef)
    scale = n.to(torch.int32).add_(127).bitwise_left_shift_(23).view(torch.float32)  # exactly 2**n
    return y.copy_(poly.mul_(scale))


def log2(x: torch.Tensor) -> torch.Tensor:
    """Out-of-place :func:`log2_`."""
    return log2_(x.contiguous().clone())


def exp2(y: torch.Tensor) -> torch.Tensor:
    """Out-of-place :func:`exp2_`."""
    return exp2_(y.contiguous().clone())
