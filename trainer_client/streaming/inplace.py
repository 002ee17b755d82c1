"""Can a stage write into its own input? Decides whether a stage's tiles must be copies.

A stage's tile is a view of the stored input map (or of the caller's image for the first stage). A
stage whose first effective layer works in place (``ReLU(inplace=True)`` right after a split point,
``x.mul_()`` in a custom layer) would then overwrite the stored map: overlapping tiles would apply a
non-idempotent layer twice, the backward recompute would see the already transformed map, and the
recompute's gradient-requiring leaf would be modified in place (an autograd error).

:func:`mutates_input` answers conservatively, from the module structure alone: ``False`` only when
the stage provably reads its input without writing it, i.e. its first layer that is not a pure
pass-through is one of a short list of exact layer types known to return a new tensor (subclasses
may override ``forward``, so they do not count). The stage then streams over views (no copy at
all); otherwise every tile is copied first (a tile-sized copy, never the whole map).
"""

from __future__ import annotations

import enum

from torch import nn

__all__ = ["mutates_input"]


class _Effect(enum.Enum):
    FRESH = "returns a new tensor, input untouched"
    ALIAS = "may return its input itself, input untouched"
    MUTATES = "may write into its input"


# Exact types whose forward never writes into its input and returns a new tensor.
_FRESH_TYPES: tuple[type[nn.Module], ...] = (
    nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d, nn.BatchNorm2d, nn.PReLU, nn.GELU, nn.Sigmoid, nn.Tanh,
)  # fmt: skip
# Exact types with an ``inplace`` flag: new tensor when it is False, writes into the input when True.
_INPLACE_FLAG_TYPES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SiLU, nn.Mish, nn.Hardswish, nn.Hardsigmoid,
)  # fmt: skip
# Exact types that may return their input itself (identity, dropout in eval mode).
_PASS_TYPES: tuple[type[nn.Module], ...] = (nn.Identity, nn.Dropout, nn.Dropout2d)


def _effect(module: nn.Module) -> _Effect:
    kind = type(module)
    if kind in _FRESH_TYPES:
        return _Effect.FRESH
    if kind in _INPLACE_FLAG_TYPES:
        return _Effect.MUTATES if getattr(module, "inplace", True) else _Effect.FRESH
    if kind in _PASS_TYPES:
        return _Effect.MUTATES if getattr(module, "inplace", False) else _Effect.ALIAS
    if kind is nn.Sequential:
        for child in module:
            effect = _effect(child)
            if effect is not _Effect.ALIAS:
                return effect  # FRESH: later layers never see the input; MUTATES: it may be written
        return _Effect.ALIAS
    return _block_effect(module)


def _block_effect(module: nn.Module) -> _Effect:
    try:
        from torchvision.models.resnet import BasicBlock, Bottleneck
    except ImportError:  # pragma: no cover - torchvision is a dependency of the streaming fronts
        return _Effect.MUTATES
    if type(module) not in (BasicBlock, Bottleneck):
        return _Effect.MUTATES
    # torchvision's blocks read x through conv1 and the shortcut; ``out += identity`` writes into the
    # main path's fresh output, so x is written only if the shortcut itself writes into it.
    first = _effect(module.conv1)
    shortcut = _effect(module.downsample) if module.downsample is not None else _Effect.ALIAS
    if _Effect.MUTATES in (first, shortcut):
        return _Effect.MUTATES
    return _Effect.FRESH


def mutates_input(module: nn.Module) -> bool:
    """``True`` unless ``module`` provably never writes into its input tensor (see module docs)."""
    return _effect(module) is _Effect.MUTATES
