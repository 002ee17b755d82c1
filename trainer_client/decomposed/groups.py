"""Process-group layout for spatial decomposition (rows x cols grid) with data parallelism on top.

Global ranks are laid out replica-major and row-major inside a replica::

    global_rank = replica * (rows * cols) + row * cols + col

so the ranks of one spatial group are contiguous (they exchange halos on every layer and
should share a node) and the data-parallel group of a grid position strides over replicas.
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass, field

import torch.distributed as dist

__all__ = [
    "DEFAULT_TIMEOUT",
    "LayoutPlan",
    "ParallelLayout",
    "SpatialGroup",
    "init_layout",
    "parse_grid",
    "partition",
    "plan_layout",
]

_LOG = logging.getLogger(__name__)

DEFAULT_TIMEOUT = datetime.timedelta(seconds=300)


def partition(n: int, parts: int) -> tuple[tuple[int, int], ...]:
    """Split ``range(n)`` into ``parts`` contiguous half-open intervals, ``[i*n//parts, (i+1)*n//parts)``.

    The same rule is used for the input image and for every feature map, so a rank's
    block at one resolution sits at (about) the same place as its block at the next.
    """
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return tuple(((i * n) // parts, ((i + 1) * n) // parts) for i in range(parts))


def parse_grid(text: str) -> tuple[int, int]:
    """Parse ``"RxC"`` (e.g. ``"2x2"``) into ``(rows, cols)``."""
    parts = text.lower().replace("×", "x").split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"grid must look like RxC (e.g. 2x2), got {text!r}")
    rows, cols = int(parts[0]), int(parts[1])
    if rows < 1 or cols < 1:
        raise ValueError(f"grid dimensions must be >= 1, got {text!r}")
    return rows, cols


@dataclass(frozen=True)
class SpatialGroup:
    """A spatial process group arranged as a ``rows x cols`` grid (row-major).

    ``global_ranks[i]`` is the global rank of grid position ``(i // cols, i % cols)``;
    ``index`` is this process's position in that list.  ``group`` is the torch process
    group (``None`` means the default group); it is only used when communicating, so a
    ``SpatialGroup`` can be built without an initialised process group (for planning).
    """

    rows: int
    cols: int
    index: int
    global_ranks: tuple[int, ...]
    group: dist.ProcessGroup | None = field(default=None, compare=False)
    timeout: datetime.timedelta = DEFAULT_TIMEOUT

    def __post_init__(self) -> None:
        if self.rows < 1 or self.cols < 1:
            raise ValueError(f"grid must be at least 1x1, got {self.rows}x{self.cols}")
        if len(self.global_ranks) != self.rows * self.cols:
            raise ValueError(
                f"grid {self.rows}x{self.cols} needs {self.rows * self.cols} ranks in the spatial group "
                f"but the group has {len(self.global_ranks)}; pick a grid whose rows*cols equals the "
                "group size (or world_size / replicas)"
            )
        if len(set(self.global_ranks)) != len(self.global_ranks):
            raise ValueError(f"duplicate ranks in spatial group: {self.global_ranks}")
        if not 0 <= self.index < len(self.global_ranks):
            raise ValueError(f"index {self.index} outside the group of {len(self.global_ranks)} ranks")
        if self.timeout.total_seconds() <= 0:
            raise ValueError("timeout must be positive")

    @classmethod
    def from_process_group(
        cls,
        rows: int,
        cols: int,
        group: dist.ProcessGroup | None = None,
        timeout: datetime.timedelta = DEFAULT_TIMEOUT,
    ) -> SpatialGroup:
        """Wrap an existing process group (``None``: the default group) as a ``rows x cols`` grid."""
        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised; call init_process_group first")
        size = dist.get_world_size(group)
        ranks = tuple(dist.get_process_group_ranks(group)) if group is not None else tuple(range(size))
        if rows * cols != size:
            raise ValueError(
                f"grid {rows}x{cols} needs {rows * cols} ranks but the process group has {size}; "
                f"pick a grid whose rows*cols equals {size}"
            )
        return cls(rows, cols, dist.get_rank(group), ranks, group, timeout)

    @property
    def size(self) -> int:
        return self.rows * self.cols

    @property
    def row(self) -> int:
        return self.index // self.cols

    @property
    def col(self) -> int:
        return self.index % self.cols

    def rank_at(self, row: int, col: int) -> int:
        """Global rank at grid position ``(row, col)``."""
        return self.global_ranks[row * self.cols + col]


@dataclass(frozen=True)
class LayoutPlan:
    """Pure description of ``world_size = replicas * rows * cols``: which global ranks form which groups."""

    replicas: int
    rows: int
    cols: int
    spatial_groups: tuple[tuple[int, ...], ...]
    data_parallel_groups: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        if min(self.replicas, self.rows, self.cols) < 1:
            raise ValueError("replicas, rows and cols must all be >= 1")
        if len(self.spatial_groups) != self.replicas:
            raise ValueError("one spatial group per replica expected")

    @property
    def world_size(self) -> int:
        return self.replicas * self.rows * self.cols

    def position(self, rank: int) -> tuple[int, int]:
        """``(replica, index in spatial group)`` of a global rank."""
        per = self.rows * self.cols
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside world of {self.world_size}")
        return rank // per, rank % per


def plan_layout(world_size: int, replicas: int, rows: int, cols: int) -> LayoutPlan:
    """Lay out ``world_size = replicas * rows * cols`` ranks (see module docstring)."""
    if min(replicas, rows, cols) < 1:
        raise ValueError(f"replicas, rows and cols must be >= 1, got {replicas}, {rows}, {cols}")
    if replicas * rows * cols != world_size:
        raise ValueError(
            f"grid {rows}x{cols} with {replicas} replica(s) needs world_size {replicas * rows * cols} "
            f"but world_size is {world_size}; launch {replicas * rows * cols} processes or change "
            "--grid / --replicas"
        )
    per = rows * cols
    spatial = tuple(tuple(range(r * per, (r + 1) * per)) for r in range(replicas))
    dp = tuple(tuple(r * per + i for r in range(replicas)) for i in range(per))
    return LayoutPlan(replicas, rows, cols, spatial, dp)


@dataclass(frozen=True)
class ParallelLayout:
    """This process's groups: its spatial group and the data-parallel group of its grid position."""

    plan: LayoutPlan
    rank: int
    replica: int
    spatial: SpatialGroup
    data_parallel: dist.ProcessGroup | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.plan.position(self.rank)[0] != self.replica:
            raise ValueError("replica does not match the layout plan")

    @property
    def replicas(self) -> int:
        return self.plan.replicas


def init_layout(
    replicas: int, rows: int, cols: int, timeout: datetime.timedelta = DEFAULT_TIMEOUT
) -> ParallelLayout:
    """Create the spatial and data-parallel groups with ``dist.new_group`` (collective: every rank calls it)."""
    if not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised; call init_process_group first")
    world, rank = dist.get_world_size(), dist.get_rank()
    plan = plan_layout(world, replicas, rows, cols)
    replica, index = plan.position(rank)
    my_spatial: dist.ProcessGroup | None = None
    my_dp: dist.ProcessGroup | None = None
    # Every rank must create every group, in the same order.
    for ranks in plan.spatial_groups:
        g = dist.new_group(list(ranks), timeout=timeout)
        if rank in ranks:
            my_spatial = g
    for ranks in plan.data_parallel_groups:
        g = dist.new_group(list(ranks), timeout=timeout) if len(ranks) > 1 else None
        if rank in ranks:
            my_dp = g
    spatial = SpatialGroup(rows, cols, index, plan.spatial_groups[replica], my_spatial, timeout)
    _LOG.info(
        "rank %d: replica %d, grid position (%d, %d) of %dx%d", rank, replica, spatial.row, spatial.col, rows, cols
    )
    return ParallelLayout(plan, rank, replica, spatial, my_dp)
