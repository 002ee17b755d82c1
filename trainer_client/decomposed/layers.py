"""Decomposed layers.  Each subclasses the torch layer it replaces (the instance's class is swapped),
so parameters, buffers, hooks and ``state_dict`` keys are untouched and a checkpoint of a
decomposed model loads into the plain one."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from trainer_client.decomposed.groups import SpatialGroup
from trainer_client.decomposed.halo import (
    HaloSpec,
    HaloStash,
    Link,
    global_avg_pool,
    halo_exchange,
    save_extended_as_stash,
    sync_batch_norm,
)

__all__ = [
    "DecomposedLayer",
    "HaloAvgPool2d",
    "HaloConv2d",
    "HaloMaxPool2d",
    "LayerPlan",
    "SpatialAvgPool",
    "SpatialBatchNorm2d",
    "SpatialContext",
    "SpatialPlan",
]


@dataclass(frozen=True)
class LayerPlan:
    """One layer's place in the decomposition for one image size (this rank's view).

    ``local_in`` is the shard (rows, cols) the layer receives; ``halo`` is ``None`` when the layer
    needs nothing from its neighbours and no border padding (e.g. a 1x1 stride-1 convolution);
    ``replicated`` layers run after the global pool on the full (replicated) tensor.
    """

    name: str
    replicated: bool
    global_in: tuple[int, int]
    local_in: tuple[int, int]
    halo: HaloSpec | None = None

    def __post_init__(self) -> None:
        if min(self.global_in) < 0 or min(self.local_in) < 0:
            raise ValueError(f"{self.name}: negative extent")


@dataclass(frozen=True)
class SpatialPlan:
    """All layer plans of a model for one global image size on one rank."""

    image_hw: tuple[int, int]
    layers: Mapping[str, LayerPlan] = field(compare=False)
    sharded_modules: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if min(self.image_hw) < 1:
            raise ValueError(f"image size must be positive, got {self.image_hw}")


class SpatialContext:
    """Shared by the decomposed layers of one model: the group and the plan of the current forward."""

    def __init__(self, spatial: SpatialGroup) -> None:
        self.spatial = spatial
        self.link = Link(spatial.group, spatial.size, spatial.timeout)
        self.plan: SpatialPlan | None = None

    def layer(self, name: str) -> LayerPlan:
        if self.plan is None:
            raise RuntimeError(f"{name}: decomposed layer called outside the DecomposedModule forward")
        try:
            return self.plan.layers[name]
        except KeyError:
            raise RuntimeError(f"{name}: layer was not seen when tracing the model; is it called "
                               "from a forward path that depends on the input values?") from None


class DecomposedLayer(nn.Module):
    """Mixin attributes set by :func:`~trainer_client.decomposed.model.decompose`."""

    _spatial_ctx: SpatialContext
    _spatial_name: str


def _check_shape(x: Tensor, lp: LayerPlan) -> None:
    if x.dim() != 4 or tuple(x.shape[2:]) != lp.local_in:
        raise RuntimeError(
            f"{lp.name}: expected a local shard of spatial size {lp.local_in} for a {lp.global_in} feature "
            f"map, got shape {tuple(x.shape)}; functional resampling between layers is not supported"
        )


def _with_halo(x: Tensor, lp: LayerPlan, link: Link, op: Callable[[Tensor], Tensor]) -> Tensor:
    _check_shape(x, lp)
    if lp.halo is None:
        return op(x)
    stash = HaloStash()
    ext = halo_exchange(x, lp.halo, link, stash)
    with save_extended_as_stash(x, ext, lp.halo, stash):
        return op(ext)


class HaloConv2d(nn.Conv2d, DecomposedLayer):
    def forward(self, x: Tensor) -> Tensor:
        lp = self._spatial_ctx.layer(self._spatial_name)
        if lp.replicated:
            return super().forward(x)
        return _with_halo(x, lp, self._spatial_ctx.link, lambda t: F.conv2d(
            t, self.weight, self.bias, self.stride, 0, self.dilation, self.groups))


class HaloMaxPool2d(nn.MaxPool2d, DecomposedLayer):
    def forward(self, x: Tensor) -> Tensor:
        lp = self._spatial_ctx.layer(self._spatial_name)
        if lp.replicated:
            return super().forward(x)
        return _with_halo(x, lp, self._spatial_ctx.link, lambda t: F.max_pool2d(
            t, self.kernel_size, self.stride, 0, self.dilation, ceil_mode=False))


class HaloAvgPool2d(nn.AvgPool2d, DecomposedLayer):
    def forward(self, x: Tensor) -> Tensor:
        lp = self._spatial_ctx.layer(self._spatial_name)
        if lp.replicated:
            return super().forward(x)
        return _with_halo(x, lp, self._spatial_ctx.link, lambda t: F.avg_pool2d(
            t, self.kernel_size, self.stride, 0, ceil_mode=False, count_include_pad=True,
            divisor_override=self.divisor_override))


class SpatialAvgPool(nn.AdaptiveAvgPool2d, DecomposedLayer):
    """``AdaptiveAvgPool2d(1)`` over the whole image; the output is replicated on every rank."""

    def forward(self, x: Tensor) -> Tensor:
        lp = self._spatial_ctx.layer(self._spatial_name)
        if lp.replicated:
            return super().forward(x)
        _check_shape(x, lp)
        return global_avg_pool(x, lp.global_in[0] * lp.global_in[1], self._spatial_ctx.link)


class SpatialBatchNorm2d(nn.BatchNorm2d, DecomposedLayer):
    """Batch norm whose training statistics are reduced over the spatial group."""

    def forward(self, x: Tensor) -> Tensor:
        lp = self._spatial_ctx.layer(self._spatial_name)
        if lp.replicated:
            return super().forward(x)
        _check_shape(x, lp)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        use_batch = self.training or (self.running_mean is None and self.running_var is None)
        if not use_batch:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        y, mean, var = sync_batch_norm(x, self.weight, self.bias, self.eps, self._spatial_ctx.link)
        if self.training and self.running_mean is not None and self.running_var is not None:
            count = float(lp.global_in[0] * lp.global_in[1] * x.shape[0])
            with torch.no_grad():
                self.running_mean.mul_(1 - factor).add_(mean, alpha=factor)
                self.running_var.mul_(1 - factor).add_(var * (count / max(count - 1.0, 1.0)), alpha=factor)
        return y


SWAPS: dict[type[nn.Module], type[nn.Module]] = {
    nn.Conv2d: HaloConv2d,
    nn.MaxPool2d: HaloMaxPool2d,
    nn.AvgPool2d: HaloAvgPool2d,
    nn.AdaptiveAvgPool2d: SpatialAvgPool,
    nn.BatchNorm2d: SpatialBatchNorm2d,
}
