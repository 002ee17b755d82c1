"""Receptive-field geometry of a convolutional front, by interval arithmetic.

Each supported layer is described, per spatial axis, by a node that answers two
questions:

* ``need(lo, hi)``: which input rows ``[i0, i1)`` (unclamped, may be negative or
  past the end) are read to compute output rows ``[lo, hi)``;
* ``out_size(n)``: the conventional output length for an input of length ``n``.

For a window layer (convolution or pooling) with kernel ``k``, stride ``s``,
padding ``p`` and dilation ``d`` the needed interval is
``[lo*s - p, (hi-1)*s - p + d*(k-1) + 1)``. Chains compose these backwards,
residual blocks take the union over their branches.

A tile plan (:func:`plan_axis`) then splits the OUTPUT feature map into
contiguous pieces and, for every piece, picks an input crop that (a) starts at a
multiple of the total stride, so that every layer's sampling grid of the crop
coincides with the conventional grid, and (b) contains every needed input row
that lies inside the image. Running the unmodified network on such a crop gives
outputs that are exactly the conventional ones on that piece: rows whose
computation would read past a crop edge are either outside the image (zero /
-inf padded in both computations) or inside the crop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from torch import nn

__all__ = [
    "AxisGeometry",
    "Window",
    "Chain",
    "Parallel",
    "TileSpan",
    "geometry_of",
    "plan_axis",
    "min_tile_size",
]

_POINTWISE: tuple[type[nn.Module], ...] = (
    nn.BatchNorm2d,
    nn.Identity,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Sigmoid,
    nn.Tanh,
    nn.Dropout,
    nn.Dropout2d,
)


class AxisGeometry:
    """Geometry of a module along one spatial axis."""

    stride: int = 1

    def need(self, lo: int, hi: int) -> tuple[int, int]:
        """Input interval (unclamped) read when computing outputs ``[lo, hi)``."""
        raise NotImplementedError

    def out_size(self, n: int) -> int:
        """Conventional output length for input length ``n``."""
        raise NotImplementedError


@dataclass(frozen=True)
class Window(AxisGeometry):
    """A sliding-window layer: convolution or pooling (point-wise when k=s=1, p=0)."""

    kernel: int = 1
    stride: int = 1
    padding: int = 0
    dilation: int = 1

    def need(self, lo: int, hi: int) -> tuple[int, int]:
        s, p = self.stride, self.padding
        return lo * s - p, (hi - 1) * s - p + self.dilation * (self.kernel - 1) + 1

    def out_size(self, n: int) -> int:
        return (n + 2 * self.padding - self.dilation * (self.kernel - 1) - 1) // self.stride + 1


@dataclass(frozen=True)
class Chain(AxisGeometry):
    """Layers applied one after another."""

    parts: tuple[AxisGeometry, ...] = ()

    @property
    def stride(self) -> int:  # type: ignore[override]
        return math.prod(part.stride for part in self.parts)

    def need(self, lo: int, hi: int) -> tuple[int, int]:
        for part in reversed(self.parts):
            lo, hi = part.need(lo, hi)
        return lo, hi

    def out_size(self, n: int) -> int:
        for part in self.parts:
            n = part.out_size(n)
        return n


@dataclass(frozen=True)
class Parallel(AxisGeometry):
    """Branches applied to the same input and merged point-wise (residual add)."""

    branches: tuple[AxisGeometry, ...] = ()

    def __post_init__(self) -> None:
        strides = {branch.stride for branch in self.branches}
        if len(strides) != 1:
            raise ValueError(f"residual branches have different strides {sorted(strides)}; cannot stream")

    @property
    def stride(self) -> int:  # type: ignore[override]
        return self.branches[0].stride

    def need(self, lo: int, hi: int) -> tuple[int, int]:
        spans = [branch.need(lo, hi) for branch in self.branches]
        return min(s[0] for s in spans), max(s[1] for s in spans)

    def out_size(self, n: int) -> int:
        sizes = {branch.out_size(n) for branch in self.branches}
        if len(sizes) != 1:
            raise ValueError(f"residual branches give different output sizes {sorted(sizes)} for input {n}")
        return sizes.pop()


def _pair(value: int | Sequence[int], axis: int) -> int:
    if isinstance(value, int):
        return value
    return int(value[axis])


def _window_of(module: nn.Module, axis: int) -> Window:
    if isinstance(module, nn.Conv2d):
        if isinstance(module.padding, str):
            raise TypeError(f"{module}: string padding {module.padding!r} is not supported; give integer padding")
        if module.padding_mode != "zeros":
            raise TypeError(f"{module}: padding_mode {module.padding_mode!r} is not supported; use 'zeros'")
        return Window(
            _pair(module.kernel_size, axis),
            _pair(module.stride, axis),
            _pair(module.padding, axis),
            _pair(module.dilation, axis),
        )
    if isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)):
        if module.ceil_mode:
            raise TypeError(f"{module}: ceil_mode=True is not supported; use ceil_mode=False")
        dilation = _pair(module.dilation, axis) if isinstance(module, nn.MaxPool2d) else 1
        stride = module.stride if module.stride is not None else module.kernel_size
        return Window(_pair(module.kernel_size, axis), _pair(stride, axis), _pair(module.padding, axis), dilation)
    raise TypeError(f"not a window layer: {type(module).__name__}")


def _resnet_block_parts(module: nn.Module) -> tuple[list[nn.Module], nn.Module | None] | None:
    """Main path and shortcut of a torchvision BasicBlock / Bottleneck, else None."""
    try:
        from torchvision.models.resnet import BasicBlock, Bottleneck
    except ImportError:  # pragma: no cover - torchvision is a dependency of the tests
        return None
    if isinstance(module, BasicBlock):
        return [module.conv1, module.bn1, module.conv2, module.bn2], module.downsample
    if isinstance(module, Bottleneck):
        return [module.conv1, module.bn1, module.conv2, module.bn2, module.conv3, module.bn3], module.downsample
    return None


def geometry_of(module: nn.Module, axis: int) -> AxisGeometry:
    """Geometry of ``module`` along spatial ``axis`` (0 = height, 1 = width).

    Supported: ``nn.Sequential``, ``nn.Conv2d`` (zero padding), ``nn.MaxPool2d`` /
    ``nn.AvgPool2d`` (``ceil_mode=False``), torchvision ``BasicBlock`` /
    ``Bottleneck``, and point-wise layers (batch norm, activations, identity,
    dropout). Anything else raises ``TypeError`` naming the layer.
    """
    if axis not in (0, 1):
        raise ValueError(f"axis must be 0 (height) or 1 (width), got {axis}")
    if isinstance(module, nn.Sequential):
        return Chain(tuple(geometry_of(child, axis) for child in module))
    if isinstance(module, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
        return _window_of(module, axis)
    if isinstance(module, _POINTWISE):
        return Window()
    block = _resnet_block_parts(module)
    if block is not None:
        main, shortcut = block
        main_geom = Chain(tuple(geometry_of(m, axis) for m in main))
        short_geom = geometry_of(shortcut, axis) if shortcut is not None else Window()
        return Parallel((main_geom, short_geom))
    raise TypeError(
        f"cannot stream through {type(module).__name__}: only Sequential, Conv2d, MaxPool2d, AvgPool2d, "
        "torchvision BasicBlock/Bottleneck and point-wise layers are supported (for a torchvision ResNet "
        "pass resnet_front(model))"
    )


@dataclass(frozen=True)
class TileSpan:
    """One tile along one axis: output rows ``[out_lo, out_hi)`` computed from input ``[in_lo, in_hi)``.

    ``crop_lo`` is where ``out_lo`` sits inside the tile's own output.
    """

    out_lo: int
    out_hi: int
    in_lo: int
    in_hi: int

    def crop(self, stride: int) -> slice:
        start = self.out_lo - self.in_lo // stride
        return slice(start, start + self.out_hi - self.out_lo)


def _aligned_need(geom: AxisGeometry, lo: int, hi: int) -> tuple[int, int]:
    i0, i1 = geom.need(lo, hi)
    stride = geom.stride
    return (i0 // stride) * stride, i1


def min_tile_size(geom: AxisGeometry) -> int:
    """Smallest tile side (input pixels) that yields one exact output pixel anywhere in an image."""
    i0, i1 = _aligned_need(geom, 0, 1)
    return i1 - i0


def plan_axis(geom: AxisGeometry, size: int, tile: int) -> list[TileSpan]:
    """Split the output of an axis of input length ``size`` into exact tiles of at most ``tile`` input pixels."""
    n_out = geom.out_size(size)
    if n_out <= 0:
        raise ValueError(f"input length {size} is too small for this network (output length {n_out})")
    if size <= tile:
        return [TileSpan(0, n_out, 0, size)]
    smallest = min_tile_size(geom)
    if tile < smallest:
        raise ValueError(
            f"tile_size {tile} is smaller than the receptive field plus stride alignment of the network "
            f"({smallest} input pixels); use tile_size >= {smallest} (several times larger is much faster)"
        )
    per_tile = (tile - smallest) // geom.stride + 1
    count = -(-n_out // per_tile)
    per_tile = -(-n_out // count)  # balance: all tiles about the same size
    spans = []
    for out_lo in range(0, n_out, per_tile):
        out_hi = min(n_out, out_lo + per_tile)
        in_lo, in_hi = _aligned_need(geom, out_lo, out_hi)
        spans.append(TileSpan(out_lo, out_hi, max(0, in_lo), min(size, in_hi)))
    return spans
