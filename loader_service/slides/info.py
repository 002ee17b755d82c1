"""Immutable descriptions of a slide and its pyramid levels."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["LevelInfo", "SlideInfo", "COMPRESSIONS"]

#: names used in :attr:`LevelInfo.compression`
COMPRESSIONS = frozenset(
    {"jpeg", "jpeg2000", "lzw", "deflate", "none", "webp", "zstd", "jpegxl", "unknown"}
)


@dataclass(frozen=True)
class LevelInfo:
    """One pyramid level: size in pixels, downsample relative to level 0, tile size, compression."""

    width: int
    height: int
    downsample: float
    tile_width: int
    tile_height: int
    compression: str

    def __post_init__(self) -> None:
        if self.width <= 0 or self.height <= 0:
            raise ValueError(f"level size must be positive, got {self.width}x{self.height}")
        if not self.downsample >= 1.0 - 1e-9:
            raise ValueError(f"downsample must be >= 1, got {self.downsample}")
        if self.tile_width <= 0 or self.tile_height <= 0:
            raise ValueError(f"tile size must be positive, got {self.tile_width}x{self.tile_height}")
        if self.compression not in COMPRESSIONS:
            raise ValueError(f"unknown compression name {self.compression!r}")

    @property
    def dimensions(self) -> tuple[int, int]:
        return (self.width, self.height)


@dataclass(frozen=True)
class SlideInfo:
    """What a slide is: file, vendor, backend, levels (finest first) and microns per pixel."""

    path: str
    vendor: str
    backend: str
    levels: tuple[LevelInfo, ...]
    mpp_x: float | None
    mpp_y: float | None

    def __post_init__(self) -> None:
        if self.backend not in ("tiff", "openslide"):
            raise ValueError(f"backend must be 'tiff' or 'openslide', got {self.backend!r}")
        if not self.levels:
            raise ValueError("a slide needs at least one level")
        if abs(self.levels[0].downsample - 1.0) > 1e-9:
            raise ValueError("level 0 must have downsample 1")
        for a, b in zip(self.levels, self.levels[1:]):
            if b.downsample < a.downsample:
                raise ValueError("levels must be ordered finest first")
        for name, v in (("mpp_x", self.mpp_x), ("mpp_y", self.mpp_y)):
            if v is not None and not v > 0:
                raise ValueError(f"{name} must be positive or None, got {v}")

    @property
    def dimensions(self) -> tuple[int, int]:
        """(width, height) of level 0."""
        return self.levels[0].dimensions

    @property
    def level_count(self) -> int:
        return len(self.levels)

    @property
    def mpp(self) -> float | None:
        """Mean microns per pixel at level 0, or None when the slide does not say."""
        if self.mpp_x is None and self.mpp_y is None:
            return None
        if self.mpp_x is None or self.mpp_y is None:
            return self.mpp_x if self.mpp_x is not None else self.mpp_y
        return (self.mpp_x + self.mpp_y) / 2.0

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return tuple(level.dimensions for level in self.levels)

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return tuple(level.downsample for level in self.levels)
