"""Views of a sample: how the (virtual) augmented image travels — whole, as tiles, or as one rank's shard.

Pieces are rectangles of the *augmented* image. ``augment.render_piece`` renders any such rectangle from
the raw region alone, so a piece never depends on how the image was cut and stitching the pieces gives the
`image` view exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

from loader_service.augment import Rect

__all__ = ["VIEWS", "TILE_ORDERS", "ViewConfig", "PieceSpec", "view_pieces", "split_bounds"]

VIEWS = ("patches", "image", "tiles", "shard")
TILE_ORDERS = ("row-major", "column-major", "serpentine")  # the proto's TileOrder, in enum order
MAX_GRID = 4096  # shards per side of a spatial group


@dataclass(frozen=True)
class ViewConfig:
    view: str = "patches"
    tile_size: int = 0
    overlap: int = 0
    grid_rows: int = 1
    grid_cols: int = 1
    shard_row: int = 0
    shard_col: int = 0
    halo: int = 0
    align: int = 1
    tile_order: str = "row-major"

    def __post_init__(self) -> None:
        if self.view not in VIEWS:
            raise ValueError(f"view must be one of {VIEWS}, got {self.view!r}")
        if self.tile_order not in TILE_ORDERS:
            raise ValueError(f"tile_order must be one of {TILE_ORDERS}, got {self.tile_order!r}")
        if self.view == "tiles" and self.tile_size < 16:
            raise ValueError(f"the tiles view needs tile_size >= 16, got {self.tile_size}")
        if self.overlap < 0 or self.halo < 0:
            raise ValueError("overlap and halo must be >= 0")
        if self.view == "shard":
            if not (1 <= self.grid_rows <= MAX_GRID and 1 <= self.grid_cols <= MAX_GRID):
                raise ValueError(f"grid must be 1×1 .. {MAX_GRID}×{MAX_GRID}, got {self.grid_rows}×{self.grid_cols}")
            if not (0 <= self.shard_row < self.grid_rows and 0 <= self.shard_col < self.grid_cols):
                raise ValueError(f"shard ({self.shard_row}, {self.shard_col}) is outside the "
                                 f"{self.grid_rows}×{self.grid_cols} grid")
            if self.align < 1:
                raise ValueError(f"align must be >= 1, got {self.align}")

    @property
    def pieces_per_sample(self) -> bool:
        return self.view in ("tiles", "shard")


@dataclass(frozen=True)
class PieceSpec:
    image_hw: tuple[int, int]  # augmented image size
    rect: Rect  # the piece, with overlap/halo, clipped to the image
    core: Rect  # the part it owns
    index: int
    count: int


def split_bounds(size: int, parts: int, align: int) -> list[int]:
    """Boundaries of ``parts`` near-equal intervals of [0, size) at multiples of ``align`` (first 0, last size).

    With ``align`` 1 this is ``i * size // parts``, the partition `trainer_client.decomposed` uses.
    """
    bounds = [0]
    for i in range(1, parts):
        cut = (size * i // parts) // align * align
        bounds.append(min(max(cut, bounds[-1]), size))
    bounds.append(size)
    if any(b1 - b0 < 1 for b0, b1 in zip(bounds, bounds[1:])):
        raise ValueError(f"an image of {size} px cannot be split into {parts} parts aligned to {align} px; "
                         "use a larger region, fewer parts or a smaller align")
    return bounds


def _grow(core: Rect, margin: int, hw: tuple[int, int]) -> Rect:
    y0, x0 = max(0, core.y - margin), max(0, core.x - margin)
    y1, x1 = min(hw[0], core.y1 + margin), min(hw[1], core.x1 + margin)
    return Rect(y0, x0, y1 - y0, x1 - x0)


def view_pieces(config: ViewConfig, image_hw: tuple[int, int]) -> list[PieceSpec]:
    """The pieces of one augmented image of size ``image_hw`` that this view delivers, in order."""
    h, w = image_hw
    if config.view == "tiles":
        t = config.tile_size
        ys, xs = list(range(0, h, t)), list(range(0, w, t))
        if config.tile_order == "column-major":
            corners = [(y, x) for x in xs for y in ys]
        elif config.tile_order == "serpentine":
            corners = [(y, x) for i, y in enumerate(ys) for x in (xs if i % 2 == 0 else xs[::-1])]
        else:
            corners = [(y, x) for y in ys for x in xs]
        cores = [Rect(y, x, min(t, h - y), min(t, w - x)) for y, x in corners]
        return [PieceSpec(image_hw, _grow(c, config.overlap, image_hw), c, i, len(cores)) for i, c in enumerate(cores)]
    if config.view == "shard":
        rows = split_bounds(h, config.grid_rows, config.align)
        cols = split_bounds(w, config.grid_cols, config.align)
        r, c = config.shard_row, config.shard_col
        core = Rect(rows[r], cols[c], rows[r + 1] - rows[r], cols[c + 1] - cols[c])
        index = r * config.grid_cols + c
        return [PieceSpec(image_hw, _grow(core, config.halo, image_hw), core, index, 1)]
    whole = Rect(0, 0, h, w)
    return [PieceSpec(image_hw, whole, whole, 0, 1)]
