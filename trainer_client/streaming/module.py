"""Streaming (tile-by-tile) forward and backward of a convolutional front.

Forward: every tile is run under ``torch.no_grad()`` and only its exact output
region is kept, so no activations survive a tile. Backward: every tile is
recomputed with gradients enabled and its slice of the feature-map gradient is
back-propagated, accumulating parameter gradients (and, optionally, the input
gradient). Tiles are planned by :mod:`.geometry` so that results equal
conventional full-image back-propagation up to floating-point summation order.

The front may be split into stages (``split_at``): the output map of each stage
is stored (no graph) and the next stage streams over it. Each stage then needs a
much smaller halo than the whole front, which cuts the recomputation overhead.
By default the split points and tiles are planned per input shape (:mod:`.planner`).
A stage that may write into its input runs on copies of its tiles (:mod:`.inplace`).

The streamed front always runs in eval mode: batch norm normalises with its
frozen running statistics (which are not updated) while its affine weight and
bias still receive exact gradients; dropout is off.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

import torch
from torch import Tensor, nn

from .feed import RowFeed
from .geometry import AxisGeometry, TileSpan, geometry_of, plan_axis
from .inplace import mutates_input
from .memory import choose_tile_size, frozen_eval
from .planner import StreamingPlan, plan_streaming

__all__ = ["StreamingConfig", "StreamingModule", "StepResult", "streaming_step", "resnet_front"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamingConfig:
    """How to stream a front.

    ``tile_size``: side of every processed input crop, in image pixels (stage ``k``
    uses ``tile_size // stride_before_stage_k`` of its own input), or one value per
    stage in that stage's own input pixels. ``memory_budget_bytes``: instead, a
    per-tile working-memory budget from which each stage's tile is chosen by
    :func:`choose_tile_size`. ``split_at``: indices into the ``nn.Sequential`` front
    where a new stage starts.

    With neither ``tile_size`` nor ``memory_budget_bytes`` the stages (unless
    ``split_at`` is given) and tiles are chosen automatically for each input shape by
    :func:`~.planner.plan_streaming`: the fastest plan whose estimated step memory fits
    ``step_memory_budget_bytes``, or else the plan with the smallest estimated step
    memory within ``max_time_factor`` (default 1.5) times conventional step time.
    ``max_stages`` bounds the automatic split.
    ``amp``: run tiles under ``torch.autocast`` with ``amp_dtype`` (default
    float16 on CUDA, bfloat16 elsewhere).
    """

    tile_size: int | tuple[int, ...] | None = None
    memory_budget_bytes: int | None = None
    split_at: tuple[int, ...] = ()
    amp: bool = False
    amp_dtype: torch.dtype | None = None
    step_memory_budget_bytes: int | None = None
    max_time_factor: float | None = None
    max_stages: int = 5

    @property
    def automatic(self) -> bool:
        """Stages and tiles are planned per input shape (no ``tile_size``, no per-tile budget)."""
        return self.tile_size is None and self.memory_budget_bytes is None

    def __post_init__(self) -> None:
        sizes = (self.tile_size,) if isinstance(self.tile_size, int) else self.tile_size or ()
        if any(not isinstance(t, int) or isinstance(t, bool) or t <= 0 for t in sizes):
            raise ValueError(f"tile_size must be a positive int or a tuple of them, got {self.tile_size!r}")
        if isinstance(self.tile_size, tuple) and len(self.tile_size) != len(self.split_at) + 1:
            raise ValueError(
                f"tile_size has {len(self.tile_size)} entries but there are {len(self.split_at) + 1} stages; "
                "give one per stage or a single int"
            )
        if self.tile_size is not None and self.memory_budget_bytes is not None:
            raise ValueError("give tile_size or memory_budget_bytes, not both")
        if self.memory_budget_bytes is not None and self.memory_budget_bytes <= 0:
            raise ValueError(f"memory_budget_bytes must be positive, got {self.memory_budget_bytes}")
        if list(self.split_at) != sorted(set(self.split_at)) or any(i <= 0 for i in self.split_at):
            raise ValueError(f"split_at must be strictly increasing positive indices, got {self.split_at!r}")
        if not self.automatic and (self.step_memory_budget_bytes is not None or self.max_time_factor is not None):
            raise ValueError("step_memory_budget_bytes / max_time_factor plan tiles automatically; "
                             "do not give tile_size or memory_budget_bytes with them")
        if self.step_memory_budget_bytes is not None and self.step_memory_budget_bytes <= 0:
            raise ValueError(f"step_memory_budget_bytes must be positive, got {self.step_memory_budget_bytes}")
        if self.max_time_factor is not None and not self.max_time_factor > 1:
            raise ValueError(f"max_time_factor must be > 1 (streaming recomputes the forward), got {self.max_time_factor}")
        if self.max_stages < 1:
            raise ValueError(f"max_stages must be >= 1, got {self.max_stages}")
        if self.amp_dtype is not None and self.amp_dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"amp_dtype must be torch.float16 or torch.bfloat16, got {self.amp_dtype}")


class _Stage:
    """One streamed piece of the front."""

    def __init__(self, module: nn.Module, in_stride: int) -> None:
        self.module = module
        self.in_stride = in_stride
        self.geom: tuple[AxisGeometry, AxisGeometry] = (geometry_of(module, 0), geometry_of(module, 1))
        self.tile: int | None = None
        # A stage that may write into its input gets a copy of each tile, never a view of the stored map.
        self.copy_tiles = mutates_input(module)

    def _tile(self, x: Tensor, r: TileSpan, c: TileSpan) -> Tensor:
        return x[..., r.in_lo : r.in_hi, c.in_lo : c.in_hi].detach()

    def plan(self, height: int, width: int) -> list[tuple[TileSpan, TileSpan]]:
        assert self.tile is not None
        rows = plan_axis(self.geom[0], height, self.tile)
        cols = plan_axis(self.geom[1], width, self.tile)
        return [(r, c) for r in rows for c in cols]

    def _crops(self, r: TileSpan, c: TileSpan) -> tuple[slice, slice]:
        return r.crop(self.geom[0].stride), c.crop(self.geom[1].stride)

    def forward(self, x: Tensor, amp: Callable[[], contextlib.AbstractContextManager[None]],
                feed: RowFeed | None = None) -> Tensor:
        out: Tensor | None = None
        plan = self.plan(x.shape[-2], x.shape[-1])  # row-major: tile rows top to bottom
        n_out = (self.geom[0].out_size(x.shape[-2]), self.geom[1].out_size(x.shape[-1]))
        for r, c in plan:
            if feed is not None:
                feed.wait(r.in_hi)  # the input rows this tile reads are final
            xt = self._tile(x, r, c)
            with amp():
                y = self.module(xt.clone() if self.copy_tiles else xt)
            cr, cc = self._crops(r, c)
            y = y[..., cr, cc]
            if y.shape[-2:] != (r.out_hi - r.out_lo, c.out_hi - c.out_lo):  # pragma: no cover - geometry bug
                raise RuntimeError(f"tile output {tuple(y.shape)} does not match plan {r}, {c}")
            if out is None:
                out = y.new_empty(*y.shape[:-2], *n_out)
            out[..., r.out_lo : r.out_hi, c.out_lo : c.out_hi] = y
        assert out is not None
        logger.debug("streamed %d tiles of %s over %s", len(plan), self.tile, tuple(x.shape))
        return out

    def backward(
        self, x: Tensor, grad: Tensor, input_grad: bool, amp: Callable[[], contextlib.AbstractContextManager[None]]
    ) -> Tensor | None:
        params = any(p.requires_grad for p in self.module.parameters())
        if not params and not input_grad:
            return None
        gx = torch.zeros_like(x) if input_grad else None
        for r, c in self.plan(x.shape[-2], x.shape[-1]):
            xt = self._tile(x, r, c)
            if input_grad:
                xt.requires_grad_(True)
            with torch.enable_grad(), amp():
                # the copy is not a leaf: in-place layers may write into it, the gradient reaches xt
                y = self.module(xt.clone() if self.copy_tiles else xt)
            cr, cc = self._crops(r, c)
            g = grad[..., r.out_lo : r.out_hi, c.out_lo : c.out_hi]
            torch.autograd.backward(y[..., cr, cc], g.to(y.dtype))
            if gx is not None:
                assert xt.grad is not None
                gx[..., r.in_lo : r.in_hi, c.in_lo : c.in_hi] += xt.grad
        return gx


class StreamingModule(nn.Module):
    """Tile-by-tile forward/backward of a convolutional front (everything before global pooling).

    ``front`` must be an ``nn.Sequential`` (or a single supported layer) of
    convolutions, poolings, point-wise layers and torchvision residual blocks; use
    :func:`resnet_front` for a torchvision ResNet. Usage::

        fm = streamer(x)                       # detached leaf, requires_grad
        loss = loss_fn(head(fm), y); loss.backward()
        streamer.backward(x, fm.grad)          # accumulates the front's .grad

    Call :meth:`backward` before changing the parameters. The front runs in eval
    mode (frozen batch-norm statistics, see module docs).
    """

    def __init__(
        self,
        front: nn.Module,
        tile_size: int | tuple[int, ...] | None = None,
        memory_budget_bytes: int | None = None,
        *,
        split_at: Sequence[int] = (),
        amp: bool = False,
        amp_dtype: torch.dtype | None = None,
        step_memory_budget_bytes: int | None = None,
        max_time_factor: float | None = None,
        config: StreamingConfig | None = None,
    ) -> None:
        super().__init__()
        if config is None:
            config = StreamingConfig(tile_size, memory_budget_bytes, tuple(split_at), amp, amp_dtype,
                                     step_memory_budget_bytes, max_time_factor)
        self.config = config
        self.front = front
        if config.split_at:
            if not isinstance(front, nn.Sequential):
                raise TypeError("split_at needs an nn.Sequential front")
            if config.split_at[-1] >= len(front):
                raise ValueError(f"split_at {config.split_at} must index inside the front (length {len(front)})")
        self._stages = self._build_stages(config.split_at)
        if not config.automatic:
            in_stride = 1
            for i, stage in enumerate(self._stages):
                if isinstance(config.tile_size, tuple):
                    stage.tile = config.tile_size[i]
                elif isinstance(config.tile_size, int):
                    stage.tile = max(1, config.tile_size // in_stride)
                in_stride *= stage.geom[0].stride
        self._plans: dict[tuple[object, ...], tuple[StreamingPlan, list[_Stage]]] = {}
        self._plan: StreamingPlan | None = None
        self._saved: tuple[Tensor, list[Tensor]] | None = None

    def _build_stages(self, split_at: Sequence[int]) -> list[_Stage]:
        front = self.front
        if split_at:
            bounds = [0, *split_at, len(front)]
            pieces: list[nn.Module] = [front[a:b] for a, b in zip(bounds, bounds[1:])]
        else:
            pieces = [front]
        stages: list[_Stage] = []
        in_stride = 1
        for piece in pieces:
            stages.append(_Stage(piece, in_stride))
            in_stride *= stages[-1].geom[0].stride
        return stages

    def _prepare(self, x: Tensor) -> None:
        """Automatic mode: the stages and tiles planned for ``x``'s shape (planned once per shape)."""
        if not self.config.automatic:
            return
        key = (tuple(x.shape), x.dtype, x.device, self.config.amp)
        if key not in self._plans:
            plan = plan_streaming(
                self.front, tuple(x.shape), step_memory_budget_bytes=self.config.step_memory_budget_bytes,
                max_time_factor=self.config.max_time_factor, split_at=self.config.split_at or None,
                max_stages=self.config.max_stages, dtype=x.dtype, device=x.device,
                autocast_dtype=self._autocast_dtype(x.device))
            stages = self._build_stages(plan.split_at)
            for stage, tile in zip(stages, plan.tile_sizes):
                stage.tile = tile
            self._plans[key] = (plan, stages)
            logger.info("streaming plan for input %s: %s", tuple(x.shape), plan.describe())
        self._plan, self._stages = self._plans[key]

    @property
    def plan(self) -> StreamingPlan | None:
        """What the automatic mode chose for the last input shape (``None`` before or without it)."""
        return self._plan

    @property
    def tile_sizes(self) -> list[int | None]:
        """Tile side of every stage in its own input pixels (``None`` until chosen)."""
        return [stage.tile for stage in self._stages]

    @property
    def tile_copies(self) -> list[bool]:
        """Per stage: whether its tiles are copied because the stage may write into its input (else views)."""
        return [stage.copy_tiles for stage in self._stages]

    def _autocast_dtype(self, device: torch.device) -> torch.dtype | None:
        if not self.config.amp:
            return None
        return self.config.amp_dtype or (torch.float16 if device.type == "cuda" else torch.bfloat16)

    def _amp(self, device: torch.device) -> Callable[[], contextlib.AbstractContextManager[None]]:
        dtype = self._autocast_dtype(device)
        if dtype is None:
            return contextlib.nullcontext
        return lambda: torch.autocast(device_type=device.type, dtype=dtype)

    def _ensure_tile(self, stage: _Stage, x: Tensor) -> None:
        if stage.tile is not None:
            return
        assert self.config.memory_budget_bytes is not None  # otherwise tile_size, or planned
        stage.tile = choose_tile_size(stage.module, self.config.memory_budget_bytes, x.shape[1], x.dtype, x.device,
                                      self._autocast_dtype(x.device), batch_size=x.shape[0])

    @staticmethod
    def _check_input(x: Tensor) -> None:
        if x.dim() != 4:
            raise ValueError(f"expected an NCHW tensor, got shape {tuple(x.shape)}")

    def _stage_inputs(self, x: Tensor, feed: RowFeed | None = None) -> list[Tensor]:
        self._prepare(x)
        amp = self._amp(x.device)
        inputs = [x]
        with torch.no_grad(), frozen_eval(self.front):
            for i, stage in enumerate(self._stages):
                self._ensure_tile(stage, inputs[-1])
                inputs.append(stage.forward(inputs[-1], amp, feed if i == 0 else None))
        return inputs

    def forward(self, x: Tensor, feed: RowFeed | None = None) -> Tensor:
        """Feature map of the whole front, as a detached leaf that requires grad.

        With ``feed``, ``x`` may still be arriving: the first stage waits for the rows each tile reads
        (``feed.wait``), so computing starts before the image is whole; the result is the same."""
        self._check_input(x)
        if feed is not None and feed.height != x.shape[-2]:
            raise ValueError(f"feed is for {feed.height} rows but the input has {x.shape[-2]}")
        inputs = self._stage_inputs(x, feed)
        self._saved = (x, inputs[1:-1])
        return inputs[-1].detach().requires_grad_(True)

    def backward(  # type: ignore[override]
        self, x: Tensor, feature_map_grad: Tensor, input_grad: bool = False
    ) -> Tensor | None:
        """Back-propagate ``feature_map_grad`` through the front; returns d(loss)/dx when ``input_grad``."""
        self._check_input(x)
        self._prepare(x)
        if self._saved is not None and self._saved[0] is x:
            inputs = [x, *self._saved[1]]
        else:
            inputs = self._stage_inputs(x)[:-1]
        self._saved = None
        amp = self._amp(x.device)
        grad: Tensor | None = feature_map_grad
        with frozen_eval(self.front):
            for i in reversed(range(len(self._stages))):
                assert grad is not None
                want = input_grad if i == 0 else True
                grad = self._stages[i].backward(inputs[i], grad, want, amp)
                inputs[i] = x  # drop the reference to the stage-boundary map
        return grad


class StepResult(NamedTuple):
    """Outcome of :func:`streaming_step`."""

    loss: Tensor
    output: Tensor
    input_grad: Tensor | None


def streaming_step(
    streamer: StreamingModule,
    head: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    *,
    input_grad: bool = False,
    feed: RowFeed | None = None,
) -> StepResult:
    """Streamed forward, head + loss, backward; gradients accumulate in ``.grad`` of front and head.

    The caller zeroes gradients and steps the optimizer as usual. ``feed``: ``x`` is still arriving
    (see :class:`RowFeed`); the forward starts on the rows already there.
    """
    fm = streamer(x, feed)
    amp = streamer._amp(x.device)
    with amp():
        output = head(fm)
        loss = loss_fn(output, y)
    loss.backward()
    assert fm.grad is not None
    gx = streamer.backward(x, fm.grad, input_grad=input_grad)
    return StepResult(loss.detach(), output.detach(), gx)


def resnet_front(model: nn.Module, flatten_blocks: bool = False) -> nn.Sequential:
    """The convolutional front of a torchvision ResNet: conv1, bn1, relu, maxpool, layer1..layer4.

    With ``flatten_blocks`` the residual blocks of layer1..layer4 become direct
    children (indices 4.. are blocks), so ``split_at`` can cut inside a layer. The
    modules are shared with ``model`` (no copy); parameter names differ from the
    model's accordingly.
    """
    names = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
    missing = [n for n in names if not hasattr(model, n)]
    if missing:
        raise TypeError(f"{type(model).__name__} is not a torchvision ResNet (missing {missing})")
    parts: list[nn.Module] = [getattr(model, n) for n in names[:4]]
    for name in names[4:]:
        layer = getattr(model, name)
        parts.extend(layer if flatten_blocks else [layer])
    return nn.Sequential(*parts)
