"""What a session asks to sample: validated once, at session open."""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["SamplingSpec", "MODES", "BALANCES"]

MODES = ("random", "grid")
BALANCES = ("area", "slide", "label")


@dataclass(frozen=True)
class SamplingSpec:
    """Patches of ``patch_size`` at a pyramid ``level`` or a target ``mpp`` (µm/px), over tissue.

    ``random``: ``samples_per_epoch`` independent draws, each a pure function of (seed, epoch, index);
    ``grid``: every grid cell (stride ``grid_stride``) whose tissue fraction passes the threshold.

    Locality (random mode): with ``patches_per_region`` k > 1 the epoch is cut into groups of
    ``locality_window`` W times k indices; each group places W regions over tissue (side
    ``locality_region_size``, 0 = ceil(sqrt(k)) patch sides), k patches inside each, and a permutation of
    the W·k (region, patch) pairs keyed by (seed, epoch, group) orders them. The read path reads each
    region once per batch and cuts its patches from it. k = 1 is independent draws, as before.
    """

    patch_size: int = 256  # width (and height, unless patch_height is set) in sample-grid pixels
    patch_height: int = 0  # 0 = square
    whole_slide: bool = False  # one sample per slide covering its whole level (patch sizes ignored)
    level: int = 0
    mpp: float = 0.0  # > 0 selects by resolution instead of level
    mode: str = "random"
    balance: str = "area"
    tissue_threshold: float = 0.5
    samples_per_epoch: int = 4096
    grid_stride: int = 0  # 0 = patch_size
    shuffle_grid: bool = False
    split: str = ""
    seed: int = 0
    patches_per_region: int = 1  # k: patches cut from one region (random mode); 1 = independent patches
    locality_window: int = 16  # W: regions whose patches are shuffled together (random mode, k > 1)
    locality_region_size: int = 0  # region side in sample pixels; 0 = ceil(sqrt(k)) patch sides

    def __post_init__(self) -> None:
        if not 8 <= self.patch_size <= 65536:
            raise ValueError(f"patch_size must be 8..65536 pixels, got {self.patch_size}")
        if self.patch_height and not 8 <= self.patch_height <= 65536:
            raise ValueError(f"patch_height must be 8..65536 pixels (or 0 for square), got {self.patch_height}")
        if self.level < 0:
            raise ValueError(f"level must be >= 0 (0 = full resolution), got {self.level}")
        if not math.isfinite(self.mpp) or self.mpp < 0:
            raise ValueError(f"mpp must be > 0 µm/px to select by resolution, or 0 to use level; got {self.mpp}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.balance not in BALANCES:
            raise ValueError(f"balance must be one of {BALANCES}, got {self.balance!r}")
        if not 0.0 <= self.tissue_threshold <= 1.0:
            raise ValueError(f"tissue_threshold is a fraction 0..1, got {self.tissue_threshold}")
        if self.mode == "random" and self.samples_per_epoch < 1:
            raise ValueError("samples_per_epoch must be >= 1 in random mode")
        if self.grid_stride < 0:
            raise ValueError(f"grid_stride must be >= 0 (0 = patch_size), got {self.grid_stride}")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be 0..2**63-1, got {self.seed}")
        self._check_locality()

    def _check_locality(self) -> None:
        k, window = self.patches_per_region, self.locality_window
        if not 1 <= k <= 1024:
            raise ValueError(f"patches_per_region must be 1..1024 (1 = independent patches), got {k}")
        if not 1 <= window <= 4096:
            raise ValueError(f"locality_window must be 1..4096 regions shuffled together, got {window}")
        if self.locality_region_size < 0:
            raise ValueError(f"locality_region_size must be >= 0 (0 = ceil(sqrt(patches_per_region)) patch sides), "
                             f"got {self.locality_region_size}")
        if k == 1:
            return
        if self.mode != "random" or self.whole_slide:
            what = "whole-slide sampling" if self.whole_slide else "grid mode"
            raise ValueError(f"patches_per_region={k} applies to random mode only ({what} enumerates every region "
                             "once); set patches_per_region=1 or mode=random")
        if self.locality_region_size and self.locality_region_size < max(self.patch_size, self.height):
            raise ValueError(f"locality_region_size {self.locality_region_size} is smaller than a "
                             f"{self.patch_size}×{self.height} patch; use 0 (auto) or at least "
                             f"{max(self.patch_size, self.height)}")

    @property
    def height(self) -> int:
        return self.patch_height or self.patch_size

    @property
    def region_shape(self) -> tuple[int, int]:
        """(height, width) of a locality region in sample pixels (the patch itself when k = 1)."""
        if self.patches_per_region == 1:
            return self.height, self.patch_size
        if self.locality_region_size:
            return self.locality_region_size, self.locality_region_size
        side = math.isqrt(self.patches_per_region - 1) + 1  # ceil(sqrt(k))
        return side * self.height, side * self.patch_size

    @property
    def stride(self) -> int:
        if self.mode == "grid":
            return self.grid_stride or self.patch_size
        return self.patch_size
