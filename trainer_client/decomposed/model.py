"""``decompose(model, group)``: run a conv/pool/norm/pointwise network on this rank's image shard."""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

from trainer_client.decomposed.geometry import plan_axis
from trainer_client.decomposed.groups import SpatialGroup, partition
from trainer_client.decomposed.halo import HaloSpec, Link, all_reduce_
from trainer_client.decomposed.layers import SWAPS, DecomposedLayer, LayerPlan, SpatialContext, SpatialPlan
from trainer_client.memory.blocks import meta_copy

__all__ = ["DecomposedModule", "check_supported", "decompose", "expected_shard_shape"]

_LOG = logging.getLogger(__name__)

_POINTWISE: frozenset[type[nn.Module]] = frozenset({
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid,
    nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Identity, nn.Dropout,
})
_HEAD: frozenset[type[nn.Module]] = frozenset({nn.Linear, nn.Flatten})
_HALO_TYPES = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)


def _type_name(m: nn.Module) -> str:
    cls = type(m)
    return f"nn.{cls.__name__}" if cls.__module__.startswith("torch.nn") else f"{cls.__module__}.{cls.__qualname__}"


def _pair(v: Any) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


def check_supported(model: nn.Module) -> None:
    """Raise ``ValueError`` naming the first layer the decomposition cannot run.

    Containers are accepted (their ``forward`` is assumed to compose their children plus
    pointwise/elementwise tensor ops such as residual additions, ``torch.flatten`` after the pool
    or ``torch.cat`` along channels); leaves must be one of the supported layer types.
    """
    for name, m in model.named_modules():
        if any(True for _ in m.children()):
            continue
        label = name or "<root>"
        kind = type(m)
        reason: str | None = None
        if kind in SWAPS:
            if isinstance(m, nn.Conv2d):
                if m.padding_mode != "zeros":
                    reason = f"padding_mode={m.padding_mode!r} is not supported (only zero padding)"
                elif isinstance(m.padding, str) and m.padding != "valid":
                    reason = f"padding={m.padding!r} is not supported; give explicit integer padding"
            elif isinstance(m, nn.MaxPool2d) and m.return_indices:
                reason = "return_indices=True is not supported"
            elif isinstance(m, nn.AvgPool2d):
                if m.ceil_mode:
                    reason = "ceil_mode=True is not supported"
                elif not m.count_include_pad and _pair(m.padding) != (0, 0):
                    reason = "count_include_pad=False with padding is not supported"
            elif isinstance(m, nn.AdaptiveAvgPool2d) and _pair(m.output_size) != (1, 1):
                reason = f"output_size={m.output_size} is not supported (only the global pool, 1)"
        elif kind not in _POINTWISE and kind not in _HEAD:
            reason = "is not supported by spatial decomposition (supported: Conv2d, MaxPool2d, AvgPool2d, " \
                     "BatchNorm2d, AdaptiveAvgPool2d(1), pointwise activations, Linear/Flatten after the pool)"
        if reason is not None:
            raise ValueError(f"{label}: {_type_name(m)} {reason}")


def expected_shard_shape(image_hw: tuple[int, int], spatial: SpatialGroup) -> tuple[int, int]:
    """Local (rows, cols) of this rank's shard of an image (see ``partition``)."""
    r0, r1 = partition(image_hw[0], spatial.rows)[spatial.row]
    c0, c1 = partition(image_hw[1], spatial.cols)[spatial.col]
    return r1 - r0, c1 - c0


class DecomposedModule(nn.Module):
    """Runs the wrapped network on this rank's shard; the output (after the global pool) is replicated.

    Call :meth:`reduce_gradients` after ``backward``: parameters used on the sharded feature maps hold
    partial gradients (summed over the spatial group), those of the replicated head are identical on
    every rank (averaged); then everything is averaged over data-parallel replicas.
    """

    def __init__(self, module: nn.Module, meta: nn.Module, ctx: SpatialContext) -> None:
        super().__init__()
        self.module = module
        self._meta = (meta,)  # a tuple: not registered as a submodule, never moved by .to()
        self._ctx = ctx
        self._plans: dict[tuple[int, int, int], SpatialPlan] = {}
        self._last_plan: SpatialPlan | None = None

    @property
    def spatial(self) -> SpatialGroup:
        return self._ctx.spatial

    def plan_for(self, image_hw: tuple[int, int], channels: int) -> SpatialPlan:
        """The plan for a global image size (pure: no communication; raises ``ValueError`` if impossible)."""
        key = (channels, int(image_hw[0]), int(image_hw[1]))
        plan = self._plans.get(key)
        if plan is None:
            plan = _build_plan(self._meta[0], self._ctx.spatial, channels, (key[1], key[2]))
            self._plans[key] = plan
        return plan

    def _global_size(self, x: Tensor) -> tuple[int, int]:
        sp = self._ctx.spatial
        if sp.size == 1:
            return int(x.shape[2]), int(x.shape[3])
        mine = torch.tensor([x.shape[2], x.shape[3]], dtype=torch.int64)
        if x.device.type != "cpu" and dist.get_backend(sp.group) == "nccl":
            mine = mine.to(x.device)
        parts = [torch.empty_like(mine) for _ in range(sp.size)]
        work = dist.all_gather(parts, mine, group=sp.group, async_op=True)
        assert work is not None
        work.wait(sp.timeout)
        shapes = [tuple(int(v) for v in p.tolist()) for p in parts]
        h = sum(shapes[r * sp.cols][0] for r in range(sp.rows))
        w = sum(shapes[c][1] for c in range(sp.cols))
        return h, w

    def forward(self, x: Tensor, image_size: tuple[int, int] | None = None) -> Any:
        """``x``: this rank's NCHW shard (cut with ``shard_batch``); ``image_size``: the global (H, W).

        Without ``image_size`` the global size is found with an all-gather of shard shapes.
        """
        if x.dim() != 4:
            raise ValueError(f"expected an NCHW shard, got shape {tuple(x.shape)}")
        hw = (int(image_size[0]), int(image_size[1])) if image_size is not None else self._global_size(x)
        want = expected_shard_shape(hw, self._ctx.spatial)
        if tuple(x.shape[2:]) != want:
            sp = self._ctx.spatial
            raise ValueError(f"shard at grid position ({sp.row}, {sp.col}) of a {hw[0]}x{hw[1]} image on a "
                             f"{sp.rows}x{sp.cols} grid must be {want[0]}x{want[1]}, got "
                             f"{x.shape[2]}x{x.shape[3]}; cut it with shard_batch()")
        plan = self.plan_for(hw, int(x.shape[1]))
        self._ctx.plan = self._last_plan = plan
        try:
            return self.module(x)
        finally:
            self._ctx.plan = None

    def _param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        if self._last_plan is None:
            raise RuntimeError("reduce_gradients() needs a forward pass first")
        sharded: list[nn.Parameter] = []
        replicated: list[nn.Parameter] = []
        seen: set[int] = set()
        for name, m in self.module.named_modules():
            target = sharded if name in self._last_plan.sharded_modules else replicated
            for p in m.parameters(recurse=False):
                if id(p) not in seen:
                    seen.add(id(p))
                    target.append(p)
        return sharded, replicated

    def reduce_gradients(self, data_parallel: dist.ProcessGroup | None = None, replicas: int = 1,
                         bucket_elems: int = 1 << 20) -> None:
        """Sum sharded-parameter gradients over the spatial group, average replicated ones; then
        average everything over ``replicas`` data-parallel copies (group ``data_parallel``).

        Gradients are flattened into buckets of at most ``bucket_elems`` elements (bounded memory)."""
        if bucket_elems < 1:
            raise ValueError("bucket_elems must be >= 1")
        sharded, replicated = self._param_groups()
        sp = self._ctx.spatial
        if sp.size == 1 and replicas == 1:
            return
        items = [(p.grad, 1.0) for p in sharded if p.grad is not None]
        items += [(p.grad, 1.0 / sp.size) for p in replicated if p.grad is not None]
        dp_link = Link(data_parallel, replicas, sp.timeout)
        bucket: list[tuple[Tensor, float]] = []
        size = 0
        for g, scale in items + [(None, 0.0)]:  # type: ignore[list-item]
            if bucket and (g is None or size + g.numel() > bucket_elems or g.dtype != bucket[0][0].dtype):
                self._reduce_bucket(bucket, dp_link)
                bucket, size = [], 0
            if g is not None:
                bucket.append((g, scale))
                size += g.numel()

    def _reduce_bucket(self, bucket: list[tuple[Tensor, float]], dp_link: Link) -> None:
        flat = torch.cat([g.reshape(-1) for g, _ in bucket])
        offset = 0
        for g, scale in bucket:
            if scale != 1.0:
                flat[offset:offset + g.numel()].mul_(scale)
            offset += g.numel()
        all_reduce_(flat, self._ctx.link)
        if dp_link.size > 1:
            all_reduce_(flat, dp_link)
            flat /= dp_link.size
        offset = 0
        for g, _ in bucket:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def _trace(meta: nn.Module, channels: int, image_hw: tuple[int, int]) -> list[tuple[str, nn.Module, tuple[int, ...], tuple[int, ...]]]:
    records: list[tuple[str, nn.Module, tuple[int, ...], tuple[int, ...]]] = []
    handles = []
    for name, m in meta.named_modules():
        if any(True for _ in m.children()):
            continue

        def hook(mod: nn.Module, args: tuple[Any, ...], out: Any, name: str = name) -> None:
            ins = tuple(args[0].shape) if args and isinstance(args[0], Tensor) else ()
            outs = tuple(out.shape) if isinstance(out, Tensor) else ()
            records.append((name, mod, ins, outs))

        handles.append(m.register_forward_hook(hook))
    was_training = meta.training
    meta.eval()  # shapes only; avoids "more than 1 value per channel" on tiny maps
    try:
        with torch.no_grad():
            dtype = next((p.dtype for p in meta.parameters() if p.is_floating_point()), torch.get_default_dtype())
            meta(torch.empty((1, channels, *image_hw), device="meta", dtype=dtype))
    finally:
        meta.train(was_training)
        for h in handles:
            h.remove()
    return records


def _halo_spec(name: str, m: nn.Module, ins: tuple[int, ...], outs: tuple[int, ...], sp: SpatialGroup) -> HaloSpec | None:
    k, s, d = _pair(m.kernel_size), _pair(m.stride or m.kernel_size), _pair(getattr(m, "dilation", 1))
    pad = (0, 0) if isinstance(m.padding, str) else _pair(m.padding)
    rows = plan_axis(name, "row", ins[2], outs[2], sp.rows, k[0], s[0], pad[0], d[0])[sp.row]
    cols = plan_axis(name, "col", ins[3], outs[3], sp.cols, k[1], s[1], pad[1], d[1])[sp.col]
    if rows.is_identity and cols.is_identity:
        return None
    fill = float("-inf") if isinstance(m, nn.MaxPool2d) else 0.0
    return HaloSpec(
        row=rows, col=cols,
        row_prev=sp.rank_at(sp.row - 1, sp.col) if sp.row > 0 else None,
        row_next=sp.rank_at(sp.row + 1, sp.col) if sp.row < sp.rows - 1 else None,
        col_prev=sp.rank_at(sp.row, sp.col - 1) if sp.col > 0 else None,
        col_next=sp.rank_at(sp.row, sp.col + 1) if sp.col < sp.cols - 1 else None,
        fill=fill,
    )


def _build_plan(meta: nn.Module, sp: SpatialGroup, channels: int, image_hw: tuple[int, int]) -> SpatialPlan:
    layers: dict[str, LayerPlan] = {}
    sharded: set[str] = set()
    replicated = False
    for name, m, ins, outs in _trace(meta, channels, image_hw):
        if not replicated:
            if isinstance(m, tuple(_HEAD)):
                raise ValueError(f"{name}: {_type_name(m)} applied to a spatially sharded feature map is not "
                                 "supported; it must follow the global average pool")
            if len(ins) != 4:
                raise ValueError(f"{name}: expected a 4-D feature map before the global pool, got {ins}")
            sharded.add(name)
        global_in = (ins[2], ins[3]) if len(ins) == 4 else (0, 0)
        local_in = (0, 0)
        halo = None
        if not replicated:
            r0, r1 = partition(ins[2], sp.rows)[sp.row]
            c0, c1 = partition(ins[3], sp.cols)[sp.col]
            local_in = (r1 - r0, c1 - c0)
            if isinstance(m, _HALO_TYPES):
                halo = _halo_spec(name, m, ins, outs, sp)
        if type(m) not in SWAPS:  # pointwise / head layers need no plan
            continue
        lp = LayerPlan(name, replicated, global_in, local_in, halo)
        if name in layers and layers[name] != lp:
            raise ValueError(f"{name}: module is called more than once on differently sized inputs; "
                             "use separate module instances")
        layers[name] = lp
        if isinstance(m, nn.AdaptiveAvgPool2d) and not replicated:
            replicated = True
    if not replicated:
        _LOG.warning("no global average pool found: the output stays sharded over the spatial group")
    return SpatialPlan(image_hw, layers, frozenset(sharded))


def _leaves(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, m in model.named_modules():
        if not any(True for _ in m.children()):
            yield name, m


def decompose(model: nn.Module, group: SpatialGroup, *, inplace: bool = False) -> DecomposedModule:
    """Return a module that runs ``model`` on this rank's shard of the image.

    ``model`` (e.g. a torchvision ResNet) may contain convolutions, max/avg pooling, batch norm,
    pointwise activations and a global average pool followed by a head; anything else raises a
    ``ValueError`` naming the layer.  Layers are swapped for their decomposed subclasses in a copy
    (or in place with ``inplace=True``); parameter names and ``state_dict`` keys are unchanged
    (under ``.module``).  Halo widths are planned per global image size on first use.
    """
    check_supported(model)
    meta = meta_copy(model)
    target = model if inplace else copy.deepcopy(model)
    ctx = SpatialContext(group)
    for name, m in _leaves(target):
        new_cls = SWAPS.get(type(m))
        if new_cls is not None:
            m.__class__ = new_cls
            layer: DecomposedLayer = m  # type: ignore[assignment]
            layer._spatial_ctx = ctx
            layer._spatial_name = name
    _LOG.debug("decomposed %s over a %dx%d grid", type(model).__name__, group.rows, group.cols)
    return DecomposedModule(target, meta, ctx)
