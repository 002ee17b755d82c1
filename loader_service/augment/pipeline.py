"""The augmented sample, whole (``augment_batch``) or piece by piece (``render_piece``).

Order of operations, for both paths::

    geometric (flip_h, flip_v, then rot90_k)  ->  uint8 to float32 in [0, 1]
    -> colour (brightness -> contrast -> saturation -> hue, one affine map; clip to [0, 1])
    -> HED stain jitter (clip to [0, 1])
    -> Gaussian blur (border: reflect-101 at the augmented image's edges)
    -> round half-to-even of x*255, clamp to [0, 255], uint8

Border rule: the augmented image is the augmentation of the raw region alone. Pixels outside
it are never read; the blur sees the image reflected at its own edges (``reflect_indices``).
``render_piece`` clips its read to the raw region and reproduces that reflection itself, so the
caller's ``read`` is only ever asked for rectangles inside the raw region.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Callable, Sequence

import numpy as np
import torch

from . import cpu_kernels
from .blur import blur_valid, gaussian_kernel
from .colour import apply_colour, apply_hed, colour_coefficients, hed_coefficients
from .geometry import apply_geometry, aug_rect_to_raw, reflect_indices
from .params import AugmentParams, ParamsBatch, Rect, params_halos, params_table
from .resample import resample_rect

__all__ = [
    "augment_batch", "augment_image", "render_piece", "source_rect", "to_nchw", "to_output", "OUTPUT_DTYPES",
    "CPU_BLOCK_ELEMENTS", "GPU_BLOCK_ELEMENTS",
]

logger = logging.getLogger(__name__)

OUTPUT_DTYPES: dict[str, torch.dtype] = {
    "uint8": torch.uint8, "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
}


# ---------------------------------------------------------------------- shared stages
#: The torch-op pointwise and blur stages run on blocks of about this many float32 values: small on
#: CPU (their dozens of elementwise passes then stay in cache; on the CPU ``augment_batch`` and
#: ``render_piece`` use ``cpu_kernels`` instead, and the torch ops serve as their reference in
#: tests), large elsewhere (bounding the temporaries of huge pieces). Blocking never changes
#: results: each pixel's arithmetic is the same in any block.
CPU_BLOCK_ELEMENTS = 1 << 18
GPU_BLOCK_ELEMENTS = 1 << 26


def _blocks(n: int, c: int, h: int, w: int, device: torch.device) -> list[tuple[int, int, int, int]]:
    """(n0, n1, y0, y1) blocks covering an (n, c, h, w) tensor."""
    limit = CPU_BLOCK_ELEMENTS if device.type == "cpu" else GPU_BLOCK_ELEMENTS
    per_image = c * h * w
    if per_image <= limit:
        step = max(1, limit // per_image)
        return [(i, min(i + step, n), 0, h) for i in range(0, n, step)]
    rows = max(1, limit // (c * w))
    return [(i, i + 1, y, min(y + rows, h)) for i in range(n) for y in range(0, h, rows)]


def _to_float(x_u8: torch.Tensor) -> torch.Tensor:
    return x_u8.to(torch.float32, memory_format=torch.contiguous_format).div_(255.0)


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return (x * 255.0).round_().clamp_(0.0, 255.0).to(torch.uint8)


def _pointwise(x_u8: torch.Tensor, params: Sequence[AugmentParams]) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float32 in [0, 1] after colour and HED jitter (contiguous)."""
    if x_u8.device.type == "cpu":
        f = cpu_kernels.pointwise(x_u8, params, "NCHW", [True] * len(params), geometry=False)[1]
        assert f is not None
        return f
    return _pointwise_torch(x_u8, params)


def _pointwise_torch(x_u8: torch.Tensor, params: Sequence[AugmentParams]) -> torch.Tensor:
    """:func:`_pointwise` in torch ops: the path on GPUs, and the reference the CPU kernels equal."""
    n, c, h, w = x_u8.shape
    dev = x_u8.device
    colour = None
    if not all(p.colour_is_identity for p in params):
        colour = torch.from_numpy(colour_coefficients(params)).to(dev)
    hed = None
    if not all(p.hed_is_identity for p in params):
        hed = torch.from_numpy(hed_coefficients(params)).to(dev)
    out = torch.empty((n, c, h, w), dtype=torch.float32, device=dev)
    for n0, n1, y0, y1 in _blocks(n, c, h, w, dev):
        xs = _to_float(x_u8[n0:n1, :, y0:y1])
        if colour is not None:
            xs = apply_colour(xs, colour[n0:n1])
        if hed is not None:
            xs = apply_hed(xs, hed[n0:n1])
        out[n0:n1, :, y0:y1] = xs
    return out


def _blur(xp: torch.Tensor, params: Sequence[AugmentParams]) -> torch.Tensor:
    """Blur padded (N, 3, H+2r, W+2r) float32 (all samples with the same halo r) -> (N, 3, H, W)."""
    if xp.device.type == "cpu":
        return cpu_kernels.blur(xp, params)
    return _blur_torch(xp, params)


def _blur_torch(xp: torch.Tensor, params: Sequence[AugmentParams]) -> torch.Tensor:
    """:func:`_blur` in torch ops (GPU path; reference of the CPU kernel)."""
    r = params[0].halo()
    n, c, hp, wp = xp.shape
    h, w = hp - 2 * r, wp - 2 * r
    kernels = torch.from_numpy(np.stack([gaussian_kernel(p.blur_sigma) for p in params])).to(xp.device)
    blocks = _blocks(n, c, h, w, xp.device)
    if len(blocks) == 1:
        return blur_valid(xp, kernels)
    out = torch.empty((n, c, h, w), dtype=torch.float32, device=xp.device)
    for n0, n1, y0, y1 in blocks:
        out[n0:n1, :, y0:y1] = blur_valid(xp[n0:n1, :, y0:y1 + 2 * r], kernels[n0:n1])
    return out


def _check_image(name: str, t: torch.Tensor, channel_dim: int) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8:
        raise TypeError(f"{name} must be a uint8 torch.Tensor (got {type(t).__name__} "
                        f"{getattr(t, 'dtype', '')}); decode to uint8 RGB first.")
    if t.shape[channel_dim] != 3:
        raise ValueError(f"{name} must have 3 (RGB) channels in dim {channel_dim} (got shape "
                         f"{tuple(t.shape)}); drop an alpha channel before augmenting.")


# ---------------------------------------------------------------------- whole images
def augment_batch(batch: torch.Tensor, params: Sequence[AugmentParams], layout: str = "NHWC") -> torch.Tensor:
    """Augment a batch of whole samples: uint8 ``NHWC`` (default, what the decoder yields) or
    ``NCHW`` on any device -> uint8 ``NCHW`` on the same device.

    Geometric ops run per group of samples sharing (flip_h, flip_v, rot90_k); colour and HED
    ops run on the whole batch with per-sample coefficient tensors; blur runs per group of
    samples sharing a kernel radius. All output images must have the same size: with odd and
    even ``rot90_k`` mixed in one batch the patches must be square.
    """
    if layout not in ("NHWC", "NCHW"):
        raise ValueError(f"layout must be 'NHWC' or 'NCHW' (got {layout!r}).")
    if not isinstance(batch, torch.Tensor) or batch.ndim != 4:
        raise ValueError(f"batch must be a 4-D uint8 tensor in {layout} layout "
                         f"(got shape {tuple(getattr(batch, 'shape', ()))}).")
    _check_image("batch", batch, 3 if layout == "NHWC" else 1)
    if not isinstance(params, ParamsBatch):
        params = list(params)
    if len(params) != batch.shape[0]:
        raise ValueError(f"got {batch.shape[0]} images but {len(params)} parameter sets; pass one per image.")
    x = batch.permute(0, 3, 1, 2) if layout == "NHWC" else batch
    n, c, h, w = x.shape
    if n == 0:
        return x.contiguous()
    sizes = {(w, h) if odd else (h, w) for odd in set((params_table(params)[:, 2] % 2).tolist())}
    if len(sizes) != 1:
        raise ValueError(f"the batch mixes odd and even rot90_k on non-square {h}x{w} images, so the outputs "
                         f"would have different sizes {sorted(sizes)}; use square patches, or split the batch "
                         "by rot90_k parity, or render them one at a time.")
    (oh, ow), = sizes
    if h == 0 or w == 0:
        raise ValueError(f"batch images are empty ({h}x{w}); regions must be at least 1x1 pixel.")
    if x.device.type == "cpu":
        return _augment_batch_cpu(batch, params, layout)
    return _augment_batch_torch(x, params, (oh, ow))


def _augment_batch_torch(x: torch.Tensor, params: list[AugmentParams], out_hw: tuple[int, int]) -> torch.Tensor:
    """:func:`augment_batch` in torch ops on uint8 NCHW ``x``: the path on GPUs, and on any device
    the reference that the CPU kernels equal bit for bit."""
    n, c, h, w = x.shape
    oh, ow = out_hw

    # Geometry, per group of identical transforms (on uint8: cheap).
    groups: dict[tuple[bool, bool, int], list[int]] = defaultdict(list)
    for i, p in enumerate(params):
        groups[p.geometry_key].append(i)
    if len(groups) == 1:
        (key, _), = groups.items()
        geo = apply_geometry(x, *key)
    else:
        geo = torch.empty((n, c, oh, ow), dtype=torch.uint8, device=x.device)
        for key, idx in groups.items():
            index = torch.tensor(idx, device=x.device)
            geo[index] = apply_geometry(x.index_select(0, index), *key)

    f = _pointwise_torch(geo, params)

    # Blur, per group of equal radius (each sample with its own kernel).
    radii: dict[int, list[int]] = defaultdict(list)
    for i, p in enumerate(params):
        if p.halo() > 0:
            radii[p.halo()].append(i)
    for r, idx in radii.items():
        index = torch.tensor(idx, device=x.device)
        sub = f.index_select(0, index)
        sub = sub.index_select(2, reflect_indices(-r, oh + r, oh, x.device))
        sub = sub.index_select(3, reflect_indices(-r, ow + r, ow, x.device))
        f[index] = _blur_torch(sub, [params[i] for i in idx])
    logger.debug("augment_batch: %d images %dx%d, %d geometry groups, %d blur groups",
                 n, h, w, len(groups), len(radii))
    return _to_uint8(f)


def _augment_batch_cpu(batch: torch.Tensor, params: list[AugmentParams], layout: str) -> torch.Tensor:
    """:func:`augment_batch` on the CPU: one fused pass (geometry to uint8) for samples without blur,
    the same pass to float32 then the blur for the others. Same bits as the torch ops."""
    table = params_table(params)
    radius = params_halos(params)
    blur = radius > 0
    out, f = cpu_kernels.pointwise(batch, params, layout, blur, geometry=True)
    if f is None:
        return out
    blurred = np.flatnonzero(blur)  # sample of each row of f
    cpu_kernels.blur_reflected_into(f, ParamsBatch(table[blurred], radius[blurred]), blurred, out)  # own halos
    return out


def augment_image(image: torch.Tensor, params: AugmentParams, layout: str = "HWC") -> torch.Tensor:
    """One image (uint8 ``HWC`` or ``CHW``) -> augmented uint8 ``CHW``."""
    if layout not in ("HWC", "CHW"):
        raise ValueError(f"layout must be 'HWC' or 'CHW' (got {layout!r}).")
    return augment_batch(image[None], [params], layout="N" + layout)[0]


# ---------------------------------------------------------------------- pieces
def _check_piece(params: AugmentParams, image_hw: tuple[int, int], piece: Rect) -> tuple[int, int]:
    h, w = image_hw
    if h <= 0 or w <= 0:
        raise ValueError(f"image_hw must be positive (got {image_hw}).")
    oh, ow = params.output_size(h, w)
    if piece.height <= 0 or piece.width <= 0 or piece.y < 0 or piece.x < 0 or piece.y1 > oh or piece.x1 > ow:
        raise ValueError(f"piece {piece} must be a non-empty rectangle inside the augmented image "
                         f"[0, {oh}) x [0, {ow}) (raw {h}x{w}, rot90_k={params.rot90_k}); clip edge tiles to it.")
    return oh, ow


def _window(start: int, stop: int, size: int) -> tuple[int, int]:
    """Bounds of ``reflect_indices(start, stop, size)`` (a range inside [0, size))."""
    if start >= 0 and stop <= size:
        return start, stop
    idx = reflect_indices(start, stop, size)
    return int(idx.min()), int(idx.max()) + 1


def _piece_window(params: AugmentParams, image_hw: tuple[int, int], piece: Rect) -> Rect:
    """The rectangle of the augmented image the piece and its halo (reflected) draw from."""
    oh, ow = _check_piece(params, image_hw, piece)
    r = params.halo()
    y0, y1 = _window(piece.y - r, piece.y1 + r, oh)
    x0, x1 = _window(piece.x - r, piece.x1 + r, ow)
    return Rect(y0, x0, y1 - y0, x1 - x0)


def source_rect(params: AugmentParams, image_hw: tuple[int, int], piece: Rect) -> Rect:
    """The rectangle of the RAW region (raw coordinates) that ``render_piece`` reads for ``piece``
    (a rectangle of the AUGMENTED image), halo included. Always inside ``[0, H) x [0, W)``:
    context beyond the region's edges is made by reflection, not read."""
    return aug_rect_to_raw(params, image_hw, _piece_window(params, image_hw, piece))


def render_piece(
    params: AugmentParams,
    image_hw: tuple[int, int],
    piece: Rect,
    read: Callable[[Rect], torch.Tensor | np.ndarray],
    device: torch.device | str,
) -> torch.Tensor:
    """Pixels of ``piece`` of the augmented image of a raw ``image_hw`` region, as uint8 ``CHW``
    on ``device``: bit-identical to the same rectangle of ``augment_image(raw, params)`` on that
    device, however the image is cut.

    ``read(rect)`` is called once and must return the source pixels of ``rect`` as uint8 ``HWC`` RGB
    (tensor or numpy array, any device). Without image-level scale and crop, ``rect`` is
    ``source_rect(params, image_hw, piece)``, always inside the raw region; with them it is the
    slide window that ``augment.resample`` needs (region coordinates, possibly outside the region)."""
    device = torch.device(device)
    window = _piece_window(params, image_hw, piece)
    src = aug_rect_to_raw(params, image_hw, window)
    raw = read(src) if params.resample_is_identity else resample_rect(params, image_hw, src, read)
    if isinstance(raw, np.ndarray):
        raw = torch.from_numpy(np.ascontiguousarray(raw))
    _check_image("read(rect)", raw, 2)
    if tuple(raw.shape) != (src.height, src.width, 3):
        raise ValueError(f"read({src}) returned shape {tuple(raw.shape)}; expected "
                         f"({src.height}, {src.width}, 3) uint8 HWC.")
    win = apply_geometry(raw.to(device).permute(2, 0, 1), *params.geometry_key)  # augmented window, CHW
    r = params.halo()
    oh, ow = params.output_size(*image_hw)
    if (window.y, window.y1) != (piece.y - r, piece.y1 + r):
        win = win.index_select(1, reflect_indices(piece.y - r, piece.y1 + r, oh, device) - window.y)
    if (window.x, window.x1) != (piece.x - r, piece.x1 + r):
        win = win.index_select(2, reflect_indices(piece.x - r, piece.x1 + r, ow, device) - window.x)
    f = _pointwise(win[None], [params])
    if r > 0:
        f = _blur(f, [params])
    return _to_uint8(f)[0]


# ---------------------------------------------------------------------- output
def to_nchw(batch_u8_nhwc: torch.Tensor) -> torch.Tensor:
    """An unaugmented uint8 NHWC batch as a new contiguous NCHW tensor (a numba kernel on the CPU,
    faster than torch's 3-channel transpose; ``permute(...).contiguous()`` elsewhere)."""
    if batch_u8_nhwc.device.type == "cpu" and batch_u8_nhwc.dtype == torch.uint8 and batch_u8_nhwc.ndim == 4:
        return cpu_kernels.to_planar(batch_u8_nhwc)
    return batch_u8_nhwc.permute(0, 3, 1, 2).contiguous()


def to_output(
    batch_u8_nchw: torch.Tensor,
    dtype: str,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    *,
    channels_last: bool = False,
) -> torch.Tensor:
    """The trainer-facing tensor: ``'uint8'`` passes through (``mean``/``std`` must be None);
    ``'float16'``, ``'bfloat16'`` or ``'float32'`` are ``(x/255 - mean) / std`` computed in float32
    (mean/std on the 0..1 scale, one per channel; None = no normalisation). ``channels_last``
    returns NHWC instead of NCHW."""
    if dtype not in OUTPUT_DTYPES:
        raise ValueError(f"output dtype must be one of {list(OUTPUT_DTYPES)} (got {dtype!r}).")
    if not isinstance(batch_u8_nchw, torch.Tensor) or batch_u8_nchw.dtype != torch.uint8 or batch_u8_nchw.ndim != 4:
        raise ValueError("to_output expects a uint8 NCHW tensor.")
    if (mean is None) != (std is None):
        raise ValueError("give both mean and std for normalisation, or neither.")
    c = batch_u8_nchw.shape[1]
    x = batch_u8_nchw
    if dtype == "uint8":
        if mean is not None:
            raise ValueError("mean/std normalisation needs a float output dtype; uint8 passes through unchanged.")
    else:
        x = _to_float(x)
        if mean is not None and std is not None:
            mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
            if len(mean) != c or len(std) != c:
                raise ValueError(f"mean and std need one value per channel ({c}); got {len(mean)} and {len(std)}.")
            if any(not s > 0 for s in std):
                raise ValueError(f"std values must be > 0 (got {tuple(std)}).")
            m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, c, 1, 1)
            s = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, c, 1, 1)
            x = (x - m) / s
        x = x.to(OUTPUT_DTYPES[dtype])
    if channels_last:
        x = x.permute(0, 2, 3, 1)
    return x.contiguous()
