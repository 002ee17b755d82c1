"""Automatic stages and tiles: split points and per-stage tile sizes from a step-memory budget or a time limit.

One probe forward (no gradient) of the whole ``nn.Sequential`` front on a small image records, per
child, through forward hooks on every leaf layer: activation bytes, the largest single activation,
multiply-accumulates (convolutions) and the child's output bytes, all per image pixel. From these,
for any split of the front into stages and any tile per stage, the planner estimates:

* **step memory** (peak while a stage runs backward, the largest phase)::

      input + 2*weights + 2*feature map                        (held all step)
      + stored boundary maps up to the stage's input + the gradient of its input and its output
      + one tile's working set  T*T*batch*(A + 2M + c*I)     (see :mod:`.memory`)

* **time**, relative to conventional back-propagation, in multiply-accumulates: conventional is
  ``3F + 2*L*k`` (forward + backward of ``L`` layers, ``k`` the fixed cost of one layer call:
  :data:`LAYER_CALL_MACS`); streaming runs every stage's tiles twice forward (no-grad, then the
  recompute) and once backward, on crops that overlap by their halo:
  ``sum_stages 4*F_s*overlap_s + 3*tiles_s*L_s*k``. Each is then multiplied by the **footprint
  factor** ``1 + step_bytes / B`` (``B``: :data:`FOOTPRINT_SLOWDOWN_BYTES`): the time per
  multiply-accumulate grows with the memory a step touches (fresh pages to fault in and zero, TLB
  and memory traffic for activations written in the forward and read back in the backward).
  Measured on the CPU (idle machine, ResNet-34 front, float32): a conventional step costs 1.46x more
  per pixel at 4096² than at 2048² (42.7 s vs 7.31 s for 4x the pixels) while a streamed one stays
  linear (43.2 s vs 10.6 s); ``B`` is fitted to that, in the planner's own byte estimates. So the
  streaming time ratio falls as the image grows; the floor is ``4/3`` only for small images.

:func:`plan_streaming` searches every split of the front's children into at most ``max_stages``
stages and, per stage, tiles that give 1, 2, 3, ... tiles per axis, and returns either the fastest
plan within a step-memory budget or, within a time factor, the fastest plan whose step memory is within
:data:`MEMORY_SLACK` of the smallest (near the memory floor a few MiB less can cost much smaller tiles).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from .geometry import geometry_of, min_tile_size, plan_axis
from .inplace import mutates_input
from .memory import probe_forward

__all__ = ["StreamingPlan", "plan_streaming", "LAYER_CALL_MACS", "FOOTPRINT_SLOWDOWN_BYTES", "MEMORY_SLACK"]

LAYER_CALL_MACS = {"cpu": 2e6, "cuda": 5e8}
"""Fixed cost of one layer call (dispatch, allocation; kernel launch on a GPU) in multiply-accumulate
equivalents, per device type (others: as CUDA): keeps the planner from choosing thousands of tiny tiles."""

FOOTPRINT_SLOWDOWN_BYTES = {"cpu": 20 * 2**30, "cuda": math.inf}
"""Estimated step memory at which the time per multiply-accumulate doubles, per device type (others:
as CUDA, whose caching allocator reuses its memory: no growth). CPU: fitted to conventional steps of a
ResNet-34 front at 2048² and 4096² (planner estimates 3.7 and 14.4 GiB; 1.46x the time per pixel)."""

MEMORY_SLACK = 0.05
"""With a time goal, plans whose estimated step memory is within this fraction of the smallest count as
equally small, and the fastest of them is chosen."""

_TILES_PER_AXIS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 48, 64)


@dataclass(frozen=True)
class StreamingPlan:
    """What the planner chose, with its estimates (bytes, and time relative to conventional backprop)."""

    split_at: tuple[int, ...]
    tile_sizes: tuple[int, ...]
    step_bytes: int
    conventional_bytes: int
    time_factor: float
    stage_peak_bytes: tuple[int, ...]
    conventional_footprint_factor: float = 1.0
    streaming_footprint_factor: float = 1.0

    @property
    def memory_factor(self) -> float:
        return self.step_bytes / self.conventional_bytes

    def describe(self) -> str:
        """One line for logs and the CLI."""
        return (f"split_at={list(self.split_at)} tiles={list(self.tile_sizes)} (each stage's input pixels): "
                f"estimated step memory {self.step_bytes / 2**20:.0f} MiB = x{self.memory_factor:.3f} of "
                f"conventional ({self.conventional_bytes / 2**20:.0f} MiB), time x{self.time_factor:.2f} "
                f"(time per multiply-accumulate for the step's footprint: conventional "
                f"x{self.conventional_footprint_factor:.2f}, streaming x{self.streaming_footprint_factor:.2f})")


@dataclass(frozen=True)
class _Child:
    act: float  # activation bytes per image pixel (sum of leaf outputs)
    largest: float  # largest single leaf output, bytes per image pixel
    macs: float  # multiply-accumulates per image pixel
    out: float  # bytes per image pixel of the child's output
    layers: int  # leaf layers


def _profile(front: nn.Sequential, channels: int, dtype: torch.dtype, device: torch.device,
             autocast_dtype: torch.dtype | None) -> tuple[list[_Child], float]:
    """Per-child statistics per image pixel (batch 1), and the input's bytes per image pixel."""
    geom = geometry_of(front, 0)
    side = max(64, 8 * geom.stride)
    while geom.out_size(side) < 2:
        side *= 2
    stats = [{"act": 0.0, "largest": 0.0, "macs": 0.0, "out": 0.0, "layers": 0} for _ in front]
    handles = []
    for index, child in enumerate(front):
        def leaf_hook(m: nn.Module, inputs: object, out: object, entry: dict = stats[index]) -> None:
            if isinstance(out, torch.Tensor):
                entry["act"] += out.nbytes
                entry["largest"] = max(entry["largest"], out.nbytes)
                entry["layers"] += 1
                per_out = 1.0
                if isinstance(m, nn.Conv2d):
                    per_out = m.in_channels // m.groups * math.prod(m.kernel_size)
                entry["macs"] += out.numel() * per_out

        def child_hook(_m: nn.Module, _i: object, out: object, entry: dict = stats[index]) -> None:
            if isinstance(out, torch.Tensor):
                entry["out"] = out.nbytes

        leaves = [m for m in child.modules() if next(m.children(), None) is None]
        handles += [leaf.register_forward_hook(leaf_hook) for leaf in leaves]
        handles.append(child.register_forward_hook(child_hook))
    probe = probe_forward(front, handles, channels, side, dtype, device, autocast_dtype)
    pixels = float(side * side)
    children = [_Child(s["act"] / pixels, s["largest"] / pixels, s["macs"] / pixels, s["out"] / pixels,
                       int(s["layers"])) for s in stats]
    return children, channels * probe.element_size()


@dataclass(frozen=True)
class _Option:
    tile: int
    work_bytes: float  # tile working set
    cost: float  # multiply-accumulates, all passes


class _Segments:
    """Tile options (working set, cost) of every stage ``front[a:b]`` at a given input shape."""

    def __init__(self, front: nn.Sequential, children: list[_Child], input_bpp: float,
                 batch: int, height: int, width: int, call_macs: float, slowdown_bytes: float) -> None:
        self.front, self.children, self.batch, self.call_macs = front, children, batch, call_macs
        self.slowdown_bytes = slowdown_bytes
        self.sizes = [(height, width)]  # input size of every child, and the output of the last
        self.strides = [1]
        for child in front:
            g = (geometry_of(child, 0), geometry_of(child, 1))
            h, w = self.sizes[-1]
            self.sizes.append((g[0].out_size(h), g[1].out_size(w)))
            self.strides.append(self.strides[-1] * g[0].stride)
        self.image_pixels = height * width
        self.in_bpp = [input_bpp] + [c.out for c in children]  # bytes per image pixel of child k's input
        self._cache: dict[tuple[int, int], list[_Option]] = {}

    def map_bytes(self, k: int) -> float:
        """Bytes of the map entering child ``k`` (``k == len``: the front's output)."""
        return self.in_bpp[k] * self.image_pixels * self.batch

    def options(self, a: int, b: int) -> list[_Option]:
        if (a, b) not in self._cache:
            self._cache[(a, b)] = self._options(a, b)
        return self._cache[(a, b)]

    def footprint_factor(self, step_bytes: float) -> float:
        """Time per multiply-accumulate of a step touching ``step_bytes``, relative to a small one."""
        return 1.0 + step_bytes / self.slowdown_bytes

    def _options(self, a: int, b: int) -> list[_Option]:
        stage = self.front[a:b]
        geom = (geometry_of(stage, 0), geometry_of(stage, 1))
        h, w = self.sizes[a]
        scale = float(self.strides[a] ** 2)  # image pixels per stage-input pixel
        part = self.children[a:b]
        copies = 3 if mutates_input(stage) else 2
        per_px = scale * (sum(c.act for c in part) + 2 * max(c.largest for c in part)) + copies * scale * self.in_bpp[a]
        macs = sum(c.macs for c in part) * self.image_pixels * self.batch
        layers = sum(c.layers for c in part)
        smallest = max(min_tile_size(geom[0]), min_tile_size(geom[1]))
        n_out = max(geom[0].out_size(h), geom[1].out_size(w))
        tiles = sorted({max(smallest, min(max(h, w), smallest + geom[0].stride * (-(-n_out // k) - 1)))
                        for k in _TILES_PER_AXIS if -(-n_out // k) >= 1})
        options = []
        for tile in tiles:
            rows, cols = plan_axis(geom[0], h, tile), plan_axis(geom[1], w, tile)
            overlap = sum(r.in_hi - r.in_lo for r in rows) / h * sum(c.in_hi - c.in_lo for c in cols) / w
            crop = max(r.in_hi - r.in_lo for r in rows) * max(c.in_hi - c.in_lo for c in cols)
            cost = 4 * macs * overlap + 3 * len(rows) * len(cols) * layers * self.call_macs
            options.append(_Option(tile, crop * self.batch * per_px, cost))
        return options


def _partitions(n: int, max_stages: int, fixed: Sequence[int] | None) -> list[tuple[int, ...]]:
    if fixed is not None:
        return [tuple(fixed)]
    out: list[tuple[int, ...]] = []
    for count in range(min(max_stages, n)):
        out.extend(itertools.combinations(range(1, n), count))
    return out


def _evaluate(seg: _Segments, split: tuple[int, ...], fixed_bytes: float, input_grad: bool,
              cap: float) -> tuple[float, float, list[_Option], list[float]] | None:
    """Fastest tiles of ``split`` whose every stage's peak fits ``cap``: (time, peak, options, peaks); the
    time is the tiles' cost times the footprint factor of the step's peak."""
    bounds = [0, *split, len(seg.front)]
    stored = 0.0
    total_cost, peak, chosen, peaks = 0.0, 0.0, [], []
    for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
        if i > 0:
            stored += seg.map_bytes(a)
        base = fixed_bytes + stored
        base += seg.map_bytes(b) if b < len(seg.front) else 0.0  # gradient of the stage's output
        base += seg.map_bytes(a) if (i > 0 or input_grad) else 0.0  # gradient of its input
        fits = [o for o in seg.options(a, b) if base + o.work_bytes <= cap]
        if not fits:
            return None
        best = min(fits, key=lambda o: (o.cost, o.work_bytes))
        total_cost += best.cost
        chosen.append(best)
        peaks.append(base + best.work_bytes)
        peak = max(peak, peaks[-1])
    return total_cost * seg.footprint_factor(peak), peak, chosen, peaks


def plan_streaming(
    front: nn.Module,
    input_shape: Sequence[int],
    *,
    step_memory_budget_bytes: int | None = None,
    max_time_factor: float | None = None,
    split_at: Sequence[int] | None = None,
    max_stages: int = 5,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
    input_grad: bool = False,
    memory_slack: float = MEMORY_SLACK,
) -> StreamingPlan:
    """Choose split points and tiles for an NCHW input of ``input_shape``.

    With ``step_memory_budget_bytes``: the fastest plan whose estimated step memory fits (and, with
    ``max_time_factor`` too, that also meets it). Otherwise: among the plans whose estimated time is at
    most ``max_time_factor`` (default 1.5) times conventional, the fastest whose estimated step memory is
    within ``memory_slack`` (a fraction) of the smallest.
    ``split_at`` fixes the stages (only tiles are chosen). Raises ``ValueError`` saying what is
    achievable when nothing meets the request.
    """
    if len(input_shape) != 4:
        raise ValueError(f"input_shape must be NCHW, got {tuple(input_shape)}")
    batch, channels, height, width = (int(v) for v in input_shape)
    if not isinstance(front, nn.Sequential):
        front = nn.Sequential(front)
        if split_at:
            raise TypeError("split_at needs an nn.Sequential front")
    if max_stages < 1:
        raise ValueError(f"max_stages must be >= 1, got {max_stages}")
    if not 0.0 <= memory_slack < 1.0:
        raise ValueError(f"memory_slack is a fraction of the smallest step memory, 0 <= it < 1; got {memory_slack}")
    if device is None:
        first = next(front.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    device = torch.device(device)
    children, input_bpp = _profile(front, channels, dtype, device, autocast_dtype)
    call_macs = LAYER_CALL_MACS.get(device.type, LAYER_CALL_MACS["cuda"])
    slowdown = FOOTPRINT_SLOWDOWN_BYTES.get(device.type, FOOTPRINT_SLOWDOWN_BYTES["cuda"])
    seg = _Segments(front, children, input_bpp, batch, height, width, call_macs, slowdown)
    weights = sum(p.numel() * p.element_size() for p in front.parameters())
    out_bytes = seg.map_bytes(len(front))
    fixed = seg.map_bytes(0) + 2 * weights + 2 * out_bytes
    conventional = seg.map_bytes(0) * (2 if input_grad else 1) + 2 * weights + out_bytes + sum(
        c.act for c in children) * height * width * batch
    conv_cost = 3 * sum(c.macs for c in children) * height * width * batch + 2 * sum(
        c.layers for c in children) * call_macs
    conv_factor = seg.footprint_factor(conventional)
    conv_cost *= conv_factor

    def made(split: tuple[int, ...], options: list[_Option], cost: float, peak: float,
             peaks: list[float]) -> StreamingPlan:
        return StreamingPlan(split, tuple(o.tile for o in options), int(peak), int(conventional), cost / conv_cost,
                             tuple(int(p) for p in peaks), conv_factor, seg.footprint_factor(peak))

    partitions = _partitions(len(front), max_stages, split_at)
    candidates: list[tuple[float, float, tuple[int, ...], list[_Option], list[float]]] = []
    for split in partitions:
        if step_memory_budget_bytes is not None:
            result = _evaluate(seg, split, fixed, input_grad, float(step_memory_budget_bytes))
            if result is not None:
                candidates.append((result[0], result[1], split, result[2], result[3]))
            continue
        limit = (max_time_factor or 1.5) * conv_cost
        result = _smallest_within(seg, split, fixed, input_grad, limit)
        if result is not None:
            candidates.append((result[0], result[1], split, result[2], result[3]))
    if not candidates:
        loosest = [(r, s) for s in partitions if (r := _evaluate(seg, s, fixed, input_grad, math.inf)) is not None]
        (fast_cost, fast_peak, fast_options, fast_peaks), fast_split = min(loosest, key=lambda rs: rs[0][0])
        if step_memory_budget_bytes is not None:
            smallest = min(r[1] for s in partitions if (r := _smallest_within(seg, s, fixed, input_grad, math.inf)))
            raise ValueError(
                f"no plan fits a step memory budget of {step_memory_budget_bytes / 2**20:.0f} MiB: the smallest "
                f"estimate is {smallest / 2**20:.0f} MiB; raise the budget (or allow more stages)")
        if max_time_factor is None:  # the default goal: the image is too small to gain, run the fastest plan
            return made(fast_split, fast_options, fast_cost, fast_peak, fast_peaks)
        raise ValueError(
            f"no plan runs within x{max_time_factor} of conventional time: the fastest is estimated at "
            f"x{fast_cost / conv_cost:.2f} (streaming runs each forward twice); raise max_time_factor")
    if step_memory_budget_bytes is not None:
        cost, peak, split, options, peaks = min(candidates, key=lambda c: (c[0], c[1]))
        if max_time_factor is not None and cost > max_time_factor * conv_cost:
            raise ValueError(
                f"within {step_memory_budget_bytes / 2**20:.0f} MiB the fastest plan is estimated at "
                f"x{cost / conv_cost:.2f} of conventional time, above max_time_factor {max_time_factor}; "
                "raise the budget or the factor")
    else:
        # The smallest estimate, then the fastest plan within MEMORY_SLACK of it: near the memory floor (the
        # stored maps) a few MiB less can cost a much smaller first-stage tile, i.e. much more recompute.
        limit = (max_time_factor or 1.5) * conv_cost
        cap = min(c[1] for c in candidates) * (1.0 + memory_slack)
        near = [(r, c[2]) for c in candidates
                if (r := _evaluate(seg, c[2], fixed, input_grad, cap)) is not None and r[0] <= limit]
        (cost, peak, options, peaks), split = min(near, key=lambda rs: (rs[0][0], rs[0][1]))
    return made(split, options, cost, peak, peaks)


def _smallest_within(seg: _Segments, split: tuple[int, ...], fixed: float, input_grad: bool,
                     limit: float) -> tuple[float, float, list[_Option], list[float]] | None:
    """Smallest-peak tiles of ``split`` whose estimated cost is within ``limit``."""
    loosest = _evaluate(seg, split, fixed, input_grad, math.inf)
    if loosest is None or loosest[0] > limit:
        return None
    bounds = [0, *split, len(seg.front)]
    caps = sorted({p for p in _all_peaks(seg, bounds, fixed, input_grad)})
    lo, hi = 0, len(caps) - 1  # the loosest cap (largest) is feasible; find the smallest that is
    while lo < hi:
        mid = (lo + hi) // 2
        result = _evaluate(seg, split, fixed, input_grad, caps[mid])
        if result is not None and result[0] <= limit:
            hi = mid
        else:
            lo = mid + 1
    return _evaluate(seg, split, fixed, input_grad, caps[lo])


def _all_peaks(seg: _Segments, bounds: list[int], fixed: float, input_grad: bool) -> list[float]:
    """Every stage peak any tile option of ``bounds`` can have: the caps worth trying."""
    peaks, stored = [], 0.0
    for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
        if i > 0:
            stored += seg.map_bytes(a)
        base = fixed + stored + (seg.map_bytes(b) if b < len(seg.front) else 0.0)
        base += seg.map_bytes(a) if (i > 0 or input_grad) else 0.0
        peaks += [base + o.work_bytes for o in seg.options(a, b)]
    return peaks

