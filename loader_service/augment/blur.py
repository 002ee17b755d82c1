"""Separable Gaussian blur as explicit shifted multiply-adds (no conv2d).

``conv2d`` picks algorithms (im2col/GEMM blocking, Winograd, FFT, cuDNN heuristics) by tensor
size, so its summation order -- and last bits -- can change with the size of the piece. Here
each output pixel is ``((w0*x0 + w1*x1) + w2*x2) + ...`` over its own taps, in a fixed order,
with separate (correctly rounded) multiplies and adds: identical for any piece that contains
the pixel's halo.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch

__all__ = ["gaussian_kernel", "blur_valid"]


@lru_cache(maxsize=4096)
def gaussian_kernel(sigma: float) -> np.ndarray:
    """Normalised 1-D Gaussian, radius ceil(3*sigma), float32 (computed in float64)."""
    if sigma <= 0.0:
        return np.ones(1, dtype=np.float32)
    radius = int(math.ceil(3.0 * sigma))
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    g = np.exp(-(t * t) / (2.0 * sigma * sigma))
    out = (g / g.sum()).astype(np.float32)
    out.setflags(write=False)
    return out


def blur_valid(xp: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """'Valid' separable blur: xp (N, C, H+2r, W+2r) already padded, kernels (N, 2r+1) float32
    (one per sample) -> (N, C, H, W). Along x (width) first, then along y."""
    n, _, hp, wp = xp.shape
    taps = kernels.shape[1]
    r = (taps - 1) // 2
    h, w = hp - 2 * r, wp - 2 * r
    k = kernels.reshape(n, taps, 1, 1, 1)
    acc = xp[..., 0:w] * k[:, 0]
    for t in range(1, taps):
        acc = acc + xp[..., t:t + w] * k[:, t]
    out = acc[:, :, 0:h, :] * k[:, 0]
    for t in range(1, taps):
        out = out + acc[:, :, t:t + h, :] * k[:, t]
    return out
