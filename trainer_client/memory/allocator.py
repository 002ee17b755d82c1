"""CUDA caching-allocator settings as a frozen config, applied through ``PYTORCH_CUDA_ALLOC_CONF``.

``torch.cuda.memory._set_allocator_settings`` is private, so the settings are written to the
environment variable, which the allocator reads once, when CUDA initialises.  Applying after
that point would silently do nothing, so :func:`apply_allocator_config` raises instead.
"""

from __future__ import annotations

import logging
import os
from collections.abc import MutableMapping
from dataclasses import dataclass

import torch

__all__ = ["ENV_VAR", "AllocatorConfig", "apply_allocator_config"]

_LOG = logging.getLogger(__name__)

ENV_VAR = "PYTORCH_CUDA_ALLOC_CONF"


@dataclass(frozen=True)
class AllocatorConfig:
    """``None`` leaves a setting at the allocator's default.

    - ``expandable_segments``: grow segments in place instead of allocating new ones (less
      fragmentation with changing shapes, e.g. variable slide tile counts).
    - ``max_split_size_mb``: blocks larger than this are never split (must be > 20).
    - ``garbage_collection_threshold``: fraction (0, 1) of memory use at which cached blocks are
      reclaimed before falling back to freeing everything.
    - ``roundup_power2_divisions``: round allocation sizes to power-of-two fractions.
    """

    expandable_segments: bool | None = None
    max_split_size_mb: int | None = None
    garbage_collection_threshold: float | None = None
    roundup_power2_divisions: int | None = None

    def __post_init__(self) -> None:
        if self.max_split_size_mb is not None and self.max_split_size_mb <= 20:
            raise ValueError(f"max_split_size_mb must be > 20 (allocator minimum), got {self.max_split_size_mb}")
        t = self.garbage_collection_threshold
        if t is not None and not 0.0 < t < 1.0:
            raise ValueError(f"garbage_collection_threshold must be in (0, 1), got {t}")
        d = self.roundup_power2_divisions
        if d is not None and (d < 1 or d & (d - 1)):
            raise ValueError(f"roundup_power2_divisions must be a power of two >= 1, got {d}")

    def to_env(self) -> str:
        """The ``PYTORCH_CUDA_ALLOC_CONF`` value, e.g. ``expandable_segments:True,max_split_size_mb:256``."""
        items: list[str] = []
        if self.expandable_segments is not None:
            items.append(f"expandable_segments:{self.expandable_segments}")
        if self.max_split_size_mb is not None:
            items.append(f"max_split_size_mb:{self.max_split_size_mb}")
        if self.garbage_collection_threshold is not None:
            items.append(f"garbage_collection_threshold:{self.garbage_collection_threshold}")
        if self.roundup_power2_divisions is not None:
            items.append(f"roundup_power2_divisions:{self.roundup_power2_divisions}")
        return ",".join(items)


def apply_allocator_config(config: AllocatorConfig, environ: MutableMapping[str, str] | None = None) -> str:
    """Write ``config`` to ``PYTORCH_CUDA_ALLOC_CONF``; call it before anything touches CUDA.

    Raises ``RuntimeError`` if CUDA is already initialised in this process (the allocator has
    read its settings; start a fresh process or apply earlier).  Returns the value written.
    """
    env = os.environ if environ is None else environ
    if torch.cuda.is_initialized():
        raise RuntimeError(
            f"CUDA is already initialised, so {ENV_VAR} would be ignored; call apply_allocator_config() at "
            "program start, before any CUDA tensor, device query or model.cuda()"
        )
    value = config.to_env()
    old = env.get(ENV_VAR)
    if old and old != value:
        _LOG.warning("replacing %s=%r with %r", ENV_VAR, old, value)
    if value:
        env[ENV_VAR] = value
    else:
        env.pop(ENV_VAR, None)
    return value
