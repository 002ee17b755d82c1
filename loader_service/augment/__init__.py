"""Per-sample augmentation of whole-slide image regions.

A *sample* is a region of a slide plus one :class:`AugmentParams` drawn from
``(seed, epoch, index)``. Its augmented image is virtual: :func:`augment_batch` renders whole
samples (patch training), :func:`render_piece` renders any rectangle of it (tiles, shards with
halo), and stitched pieces equal the whole image bit for bit on the same device. Image-level
scale and crop are read-side: :func:`resample_rect` makes the raw image from the slide around the
region. On the CPU the per-pixel stages run as fused numba kernels (``cpu_kernels``), bit-identical to
the torch ops that run on GPUs. See ``docs/augment.md``.
"""

from .config import MAX_BLUR_SIGMA, AugmentConfig
from .cpu_kernels import warm_up as warm_up_cpu_kernels
from .params import PARAMS_SALT, AugmentParams, ParamsBatch, Rect, draw_params, draw_params_batch, params_table
from .params import warm_up_draws as warm_up_param_draws
from .pipeline import OUTPUT_DTYPES, augment_batch, augment_image, render_piece, source_rect, to_nchw, to_output
from .resample import resample_rect, source_window
from .stain import STAIN_METHODS, StainConfig, fit_target, normalise_batch
from .stain_kernels import warm_up as warm_up_stain_kernels

__all__ = [
    "AugmentConfig",
    "AugmentParams",
    "Rect",
    "draw_params",
    "draw_params_batch",
    "ParamsBatch",
    "params_table",
    "augment_batch",
    "augment_image",
    "to_output",
    "to_nchw",
    "source_rect",
    "render_piece",
    "resample_rect",
    "source_window",
    "warm_up_cpu_kernels",
    "warm_up_param_draws",
    "warm_up_stain_kernels",
    "MAX_BLUR_SIGMA",
    "OUTPUT_DTYPES",
    "PARAMS_SALT",
    "STAIN_METHODS",
    "StainConfig",
    "fit_target",
    "normalise_batch",
]
