"""Stain normalisation (Macenko 2009, Reinhard 2001) of uint8 RGB batches, in torch ops (CPU or GPU).

These torch ops are the reference and what runs on GPUs; on the CPU :func:`normalise_batch` runs the fused numba
kernels of ``stain_kernels`` instead (within 1 grey level, mean difference < 0.05: see there).

A *target* is a tuple of floats fitted once (to a reference image, or to tissue patches of a dataset) by
:func:`fit_target`; :func:`normalise_batch` then maps every image of a batch onto it, each image with its
own source statistics, computed batch-wise. No randomness: the output is a pure function of the pixels and
the target, so a normalised sample is as reproducible as its read.

* ``macenko``: target = the 3×2 H&E stain matrix (optical density per unit concentration, columns H then E,
  unit length; 6 values, column-major) and the 99th percentiles of the two concentrations (2 values).
  Each image's stains are estimated from its tissue pixels (OD > ``OD_THRESHOLD`` in every channel) as the
  extreme angles (1st/99th percentile) in the plane of the two leading eigenvectors of the OD covariance;
  its concentrations are rescaled to the target's percentiles and re-rendered with the target's stains.
  Images with fewer than ``MIN_TISSUE_PIXELS`` tissue pixels pass unchanged. An image's statistics come from
  a fixed subsample (every k-th pixel, about ``STATS_PIXELS`` of them); fits use every pixel.
* ``reinhard``: target = CIE L*a*b* mean (3) and standard deviation (3); each image's channels are shifted
  and scaled to them (whole image), then converted back and rounded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["StainConfig", "STAIN_METHODS", "fit_target", "normalise_batch", "rgb_to_lab", "lab_to_rgb",
           "macenko_stains", "leading_plane", "stain_vectors", "unmixing", "concentration_scale", "TARGET_LENGTH"]

STAIN_METHODS = ("macenko", "reinhard")
TARGET_LENGTH = {"macenko": 8, "reinhard": 6}
#: Transmitted light intensity of the background (the Beer–Lambert ``I0``).
BACKGROUND = 240.0
OD_THRESHOLD = 0.15
ANGLE_PERCENTILE = 0.01
MAX_PERCENTILE = 0.99
MIN_TISSUE_PIXELS = 64  # (counted in the statistics' subsample)
#: Macenko normalisation estimates an image's stains and percentiles from every k-th pixel, k = pixels // this.
STATS_PIXELS = 16384
_MAX_FIT_PIXELS = 1 << 22  # quantile's input limit; fits subsample deterministically (a fixed stride) above it


@dataclass(frozen=True)
class StainConfig:
    """A stain normalisation: ``method`` and its fitted ``target`` (see the module docstring)."""

    method: str
    target: tuple[float, ...]

    def __post_init__(self) -> None:
        if self.method not in STAIN_METHODS:
            raise ValueError(f"stain method must be one of {STAIN_METHODS} (got {self.method!r}).")
        target = tuple(float(v) for v in self.target)
        if len(target) != TARGET_LENGTH[self.method]:
            raise ValueError(f"a {self.method} target has {TARGET_LENGTH[self.method]} values (got {len(target)}); "
                             "fit it to a reference image or to the dataset instead of giving it.")
        if not all(abs(v) < 1e6 for v in target):
            raise ValueError(f"stain target values must be finite (got {target}).")
        if self.method == "reinhard" and min(target[3:]) <= 0:
            raise ValueError(f"Reinhard target standard deviations must be > 0 (got {target[3:]}).")
        if self.method == "macenko" and min(target[6:]) <= 0:
            raise ValueError(f"Macenko target concentration percentiles must be > 0 (got {target[6:]}).")
        object.__setattr__(self, "target", target)


# ---------------------------------------------------------------------- colour spaces
_RGB_TO_XYZ = torch.tensor([[0.412453, 0.357580, 0.180423],
                            [0.212671, 0.715160, 0.072169],
                            [0.019334, 0.119193, 0.950227]], dtype=torch.float64)
_WHITE = (0.950456, 1.0, 1.088754)


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB in [0, 1], channels last (..., 3) -> CIE L*a*b* (D65), float32."""
    rgb = rgb.to(torch.float32)
    lin = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    xyz = lin @ _RGB_TO_XYZ.to(rgb.device, torch.float32).T
    xyz = xyz / torch.tensor(_WHITE, device=rgb.device, dtype=torch.float32)
    f = torch.where(xyz > 0.008856, xyz.clamp_min(1e-12) ** (1 / 3), 7.787 * xyz + 16 / 116)
    l = 116 * f[..., 1] - 16
    a = 500 * (f[..., 0] - f[..., 1])
    b = 200 * (f[..., 1] - f[..., 2])
    return torch.stack([l, a, b], dim=-1)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rgb_to_lab` (values outside the sRGB gamut are clipped to [0, 1])."""
    fy = (lab[..., 0] + 16) / 116
    f = torch.stack([fy + lab[..., 1] / 500, fy, fy - lab[..., 2] / 200], dim=-1)
    xyz = torch.where(f > 0.206893, f ** 3, (f - 16 / 116) / 7.787)
    xyz = xyz * torch.tensor(_WHITE, device=lab.device, dtype=torch.float32)
    lin = xyz @ torch.linalg.inv(_RGB_TO_XYZ).to(lab.device, torch.float32).T
    lin = lin.clamp(0.0, 1.0)
    return torch.where(lin > 0.0031308, 1.055 * lin ** (1 / 2.4) - 0.055, 12.92 * lin)


# ---------------------------------------------------------------------- Macenko
def _optical_density(x_u8: torch.Tensor) -> torch.Tensor:
    """uint8 (N, P, 3) -> OD (N, P, 3) float32, 0 at (and above) the background."""
    return -torch.log(x_u8.to(torch.float32).clamp(1.0, BACKGROUND) / BACKGROUND)


def _tissue(od: torch.Tensor) -> torch.Tensor:
    return (od > OD_THRESHOLD).all(dim=-1)


def macenko_stains(od: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image: (N, 3, 2) unit stain vectors (H, E) and (N,) tissue pixel counts, from OD (N, P, 3)."""
    w = mask.to(torch.float32)
    count = w.sum(dim=1)
    denom = count.clamp_min(1.0)[:, None]
    mean = (od * w[..., None]).sum(dim=1) / denom
    centred = (od - mean[:, None]) * w[..., None]
    cov = centred.transpose(1, 2) @ centred / denom[..., None]
    plane = leading_plane(cov)
    proj = od @ plane  # (N, P, 2)
    angle = torch.atan2(proj[..., 1], proj[..., 0]).masked_fill(~mask, float("nan"))
    q = torch.nanquantile(angle, torch.tensor([ANGLE_PERCENTILE, 1 - ANGLE_PERCENTILE], device=od.device), dim=1)
    return stain_vectors(plane, torch.nan_to_num(q)), count  # images without tissue: any angle, they pass unchanged


def leading_plane(cov: torch.Tensor) -> torch.Tensor:
    """(N, 3, 2) float32: the two leading eigenvectors of OD covariances (N, 3, 3), signed to sum >= 0."""
    _, vecs = torch.linalg.eigh(cov.to(torch.float64))
    plane = vecs[..., [2, 1]].to(torch.float32)  # (N, 3, 2): the two leading eigenvectors
    return plane * torch.where(plane.sum(dim=1, keepdim=True) < 0, -1.0, 1.0)


def stain_vectors(plane: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """(N, 3, 2) unit stain vectors (H, E) from the extreme angles q (2 [lo, hi], N) in ``plane`` (N, 3, 2)."""
    ends = torch.stack([torch.cos(q), torch.sin(q)], dim=1)  # (2 [lo, hi], 2 [cos, sin], N)
    vectors = plane @ ends.permute(2, 1, 0)  # (N, 3, 2 [lo, hi])
    vectors = vectors * torch.where(vectors.sum(dim=1, keepdim=True) < 0, -1.0, 1.0)
    hematoxylin_first = vectors[:, 0, 0] >= vectors[:, 0, 1]  # haematoxylin absorbs red more than eosin
    vectors = torch.where(hematoxylin_first[:, None, None], vectors, vectors.flip(2))
    return vectors / vectors.norm(dim=1, keepdim=True).clamp_min(1e-8)


def _concentrations(od: torch.Tensor, stains: torch.Tensor) -> torch.Tensor:
    """Least-squares concentrations (N, P, 2) of OD (N, P, 3) in stains (N, 3, 2)."""
    return od @ unmixing(stains)


def unmixing(stains: torch.Tensor) -> torch.Tensor:
    """(N, 3, 2): OD (., 3) @ this = least-squares concentrations in ``stains`` (N, 3, 2)."""
    return torch.linalg.pinv(stains).transpose(1, 2)


def concentration_scale(high: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(N, 2) factors taking images' 99th-percentile concentrations ``high`` (NaN: no tissue) to the target's."""
    return target[6:] / torch.nan_to_num(high, nan=1.0).clamp_min(1e-6)


def _macenko(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    n, p, _ = x.shape
    od = _optical_density(x)
    mask = _tissue(od)
    step = max(1, p // STATS_PIXELS)  # statistics from a fixed subsample: every step-th pixel
    stains, count = macenko_stains(od[:, ::step], mask[:, ::step])
    conc = _concentrations(od, stains)
    sub = conc[:, ::step].masked_fill(~mask[:, ::step, None], float("nan"))
    high = torch.nanquantile(sub, MAX_PERCENTILE, dim=1)  # (N, 2)
    conc = conc * concentration_scale(high, target)[:, None]
    target_stains = target[:6].view(2, 3).T
    out = BACKGROUND * torch.exp(-(conc @ target_stains.T))
    out = out.round_().clamp_(0.0, 255.0).to(torch.uint8)
    keep = count < MIN_TISSUE_PIXELS
    return torch.where(keep[:, None, None], x, out)


def _fit_macenko(x: torch.Tensor) -> tuple[float, ...]:
    od = _optical_density(x)
    mask = _tissue(od)
    stains, count = macenko_stains(od, mask)
    if int(count[0]) < MIN_TISSUE_PIXELS:
        raise ValueError(f"the reference has {int(count[0])} tissue pixels (OD > {OD_THRESHOLD} in every channel); "
                         f"a Macenko fit needs at least {MIN_TISSUE_PIXELS}: use a reference with stained tissue.")
    conc = _concentrations(od[0][mask[0]][None], stains)
    high = torch.quantile(conc[0], MAX_PERCENTILE, dim=0)
    return tuple(stains[0].T.reshape(-1).tolist()) + tuple(high.tolist())


# ---------------------------------------------------------------------- Reinhard
def _reinhard(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    lab = rgb_to_lab(x.to(torch.float32) / 255.0)
    mean = lab.mean(dim=1, keepdim=True)
    std = lab.std(dim=1, keepdim=True, correction=0).clamp_min(1e-6)
    lab = (lab - mean) / std * target[3:] + target[:3]
    return (lab_to_rgb(lab) * 255.0).round_().clamp_(0.0, 255.0).to(torch.uint8)


def _fit_reinhard(x: torch.Tensor) -> tuple[float, ...]:
    lab = rgb_to_lab(x[0].to(torch.float32) / 255.0)
    return tuple(lab.mean(dim=0).tolist()) + tuple(lab.std(dim=0, correction=0).tolist())


# ---------------------------------------------------------------------- public
def _flat(images: torch.Tensor, layout: str) -> torch.Tensor:
    if layout not in ("NHWC", "NCHW"):
        raise ValueError(f"layout must be 'NHWC' or 'NCHW' (got {layout!r}).")
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"stain normalisation takes a 4-D uint8 {layout} tensor (got "
                         f"{getattr(images, 'dtype', type(images).__name__)} {tuple(getattr(images, 'shape', ()))}).")
    x = images if layout == "NHWC" else images.permute(0, 2, 3, 1)
    if x.shape[-1] != 3:
        raise ValueError(f"stain normalisation needs RGB images (3 channels), got shape {tuple(images.shape)}.")
    return x.reshape(x.shape[0], x.shape[1] * x.shape[2], 3)  # (not -1: empty batches too)


def fit_target(method: str, images: torch.Tensor, layout: str = "NHWC") -> StainConfig:
    """Fit ``method``'s target to the pixels of ``images`` (uint8, all images pooled as one)."""
    if method not in STAIN_METHODS:
        raise ValueError(f"stain method must be one of {STAIN_METHODS} (got {method!r}).")
    x = _flat(images, layout).reshape(1, -1, 3)
    if x.shape[1] > _MAX_FIT_PIXELS:
        x = x[:, :: -(-x.shape[1] // _MAX_FIT_PIXELS)]
    fit = _fit_macenko if method == "macenko" else _fit_reinhard
    return StainConfig(method, fit(x))


def normalise_batch(images: torch.Tensor, config: StainConfig, layout: str = "NHWC",
                    cpu_kernels: bool = True) -> torch.Tensor:
    """Each image of a uint8 batch (``NHWC`` or ``NCHW``, any device) normalised to ``config``'s target,
    as a new uint8 tensor in the same layout and device.

    On the CPU the fused numba kernels of ``stain_kernels`` run (within 1 grey level of these torch ops,
    mean difference < 0.05: see there); ``cpu_kernels=False`` runs the torch ops, the reference, as GPUs do."""
    x = _flat(images, layout)
    if x.shape[0] == 0 or x.shape[1] == 0:
        return images.clone()
    target = torch.tensor(config.target, dtype=torch.float32, device=images.device)
    if images.device.type == "cpu" and cpu_kernels:
        from .stain_kernels import normalise_cpu

        return normalise_cpu(images, config.method, target, layout)
    run = _macenko if config.method == "macenko" else _reinhard
    if images.device.type == "cpu":  # image by image: its temporaries stay in cache (same result: tested)
        out = torch.cat([run(x[i:i + 1], target) for i in range(x.shape[0])])
    else:
        out = run(x, target)
    if layout == "NHWC":
        return out.reshape(images.shape)
    n, c, h, w = images.shape
    return out.reshape(n, h, w, c).permute(0, 3, 1, 2).contiguous()
