"""One sample's augmentation parameters, drawn deterministically from (seed, epoch, index)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from collections.abc import Iterator, Sequence
from typing import Any, Mapping

import numpy as np

from .config import MAX_BLUR_SIGMA, AugmentConfig

#: Range of AugmentParams.scale; AugmentConfig.scale <= 1 draws within [0.5, 2].
MIN_SCALE, MAX_SCALE = 0.25, 4.0

__all__ = ["AugmentParams", "ParamsBatch", "Rect", "draw_params", "draw_params_batch", "params_table", "PARAMS_SALT",
           "TABLE_COLUMNS"]

#: Mixed into every SeedSequence so that augmentation streams never collide with other
#: consumers of (seed, epoch, index) such as the sampler.
PARAMS_SALT: int = 0xA6_5EED_2026

#: Uniform draws per sample, always all of them and always in this order, so that turning
#: one op off (or changing its amplitude) never changes what the others draw.
_N_UNIFORMS = 19  # 16 until scale and crop were added: the first 16 draws are unchanged


@dataclass(frozen=True)
class Rect:
    """A pixel rectangle: rows ``[y, y + height)``, columns ``[x, x + width)``."""

    y: int
    x: int
    height: int
    width: int

    def __post_init__(self) -> None:
        for name in ("y", "x", "height", "width"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
                raise ValueError(f"Rect.{name} must be an int (got {value!r}).")
            object.__setattr__(self, name, int(value))
        if self.height < 0 or self.width < 0:
            raise ValueError(f"Rect height and width must be >= 0 (got {self.height}x{self.width}).")

    @property
    def y1(self) -> int:
        return self.y + self.height

    @property
    def x1(self) -> int:
        return self.x + self.width

    def to_dict(self) -> dict[str, int]:
        return {"y": self.y, "x": self.x, "height": self.height, "width": self.width}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Rect":
        return cls(int(data["y"]), int(data["x"]), int(data["height"]), int(data["width"]))


def _finite(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise ValueError(f"AugmentParams.{name} must be a number (got {value!r}).")
    out = float(value)
    if not math.isfinite(out):
        raise ValueError(f"AugmentParams.{name} must be finite (got {value!r}).")
    return out + 0.0  # -0.0 -> 0.0


def _triple(name: str, value: object) -> tuple[float, float, float]:
    if not isinstance(value, (tuple, list)) or len(value) != 3:
        raise ValueError(f"AugmentParams.{name} must be 3 numbers, one per H, E, D channel (got {value!r}).")
    a, b, c = (_finite(name, v) for v in value)
    return (a, b, c)


@dataclass(frozen=True)
class AugmentParams:
    """The augmentation of one sample (plain Python values; the identity is ``AugmentParams()``).

    * ``flip_h`` mirrors left-right, ``flip_v`` top-bottom; then ``rot90_k`` quarter turns
      counter-clockwise (``numpy.rot90`` semantics): ``rot90(flipud?(fliplr?(raw)), k)``.
    * ``brightness``, ``contrast``, ``saturation``: multiplicative factors, 1.0 = unchanged.
    * ``hue``: hue rotation in turns, 0.0 = unchanged.
    * ``hed_alpha``/``hed_beta``: per-stain (H, E, D) scale and shift, (1,1,1)/(0,0,0) = unchanged.
    * ``blur_sigma``: Gaussian blur sigma in pixels, 0.0 = no blur.
    * ``scale``: image-level zoom, 1.0 = unchanged (> 1 zooms in); ``crop_shift``: (rows, columns)
      offset of the window's centre as a fraction of the region's height and width, (0, 0) =
      centred. Both are read-side (``augment.resample``): they define the raw image the other ops see.
    """

    flip_h: bool = False
    flip_v: bool = False
    rot90_k: int = 0
    brightness: float = 1.0
    contrast: float = 1.0
    saturation: float = 1.0
    hue: float = 0.0
    hed_alpha: tuple[float, float, float] = (1.0, 1.0, 1.0)
    hed_beta: tuple[float, float, float] = (0.0, 0.0, 0.0)
    blur_sigma: float = 0.0
    scale: float = 1.0
    crop_shift: tuple[float, float] = (0.0, 0.0)

    def __post_init__(self) -> None:
        for name in ("flip_h", "flip_v"):
            value = getattr(self, name)
            if not isinstance(value, (bool, np.bool_)):
                raise ValueError(f"AugmentParams.{name} must be a bool (got {value!r}).")
            object.__setattr__(self, name, bool(value))
        k = self.rot90_k
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= int(k) <= 3:
            raise ValueError(f"AugmentParams.rot90_k must be an int in 0..3 (quarter turns), got {k!r}.")
        object.__setattr__(self, "rot90_k", int(k))
        for name in ("brightness", "contrast", "saturation", "hue", "blur_sigma", "scale"):
            object.__setattr__(self, name, _finite(name, getattr(self, name)))
        if self.brightness <= 0.0:
            raise ValueError(f"AugmentParams.brightness is a factor and must be > 0 (got {self.brightness}).")
        if self.contrast < 0.0 or self.saturation < 0.0:
            raise ValueError("AugmentParams.contrast and .saturation are factors and must be >= 0 "
                             f"(got {self.contrast}, {self.saturation}).")
        if not 0.0 <= self.blur_sigma <= MAX_BLUR_SIGMA:
            raise ValueError(f"AugmentParams.blur_sigma must be in [0, {MAX_BLUR_SIGMA:g}] pixels, "
                             f"0 meaning no blur (got {self.blur_sigma}).")
        if not MIN_SCALE <= self.scale <= MAX_SCALE:
            raise ValueError(f"AugmentParams.scale is a zoom factor and must be in [{MIN_SCALE}, {MAX_SCALE}] "
                             f"(got {self.scale}); 1.0 means unchanged.")
        shift = self.crop_shift
        if not isinstance(shift, (tuple, list)) or len(shift) != 2:
            raise ValueError(f"AugmentParams.crop_shift must be 2 numbers (rows, columns) (got {shift!r}).")
        fy, fx = (_finite("crop_shift", v) for v in shift)
        if not (-1.0 <= fy <= 1.0 and -1.0 <= fx <= 1.0):
            raise ValueError(f"AugmentParams.crop_shift values are fractions of the region size in [-1, 1] "
                             f"(got {shift!r}).")
        object.__setattr__(self, "crop_shift", (fy, fx))
        object.__setattr__(self, "hed_alpha", _triple("hed_alpha", self.hed_alpha))
        object.__setattr__(self, "hed_beta", _triple("hed_beta", self.hed_beta))

    @classmethod
    def _checked(cls, values: dict[str, Any]) -> "AugmentParams":
        """An instance of values already of the right types and ranges (``draw_params_batch`` checks them
        for the whole batch at once): skips ``__post_init__``'s per-field checks."""
        params = object.__new__(cls)
        params.__dict__.update(values)
        return params

    # ------------------------------------------------------------------ queries
    def halo(self) -> int:
        """Pixels of context each side that the neighbourhood ops (blur) need: ceil(3 * sigma)."""
        return int(math.ceil(3.0 * self.blur_sigma)) if self.blur_sigma > 0.0 else 0

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """Size of the augmented image of a ``height x width`` raw image (odd rot90 swaps)."""
        return (width, height) if self.rot90_k % 2 else (height, width)

    @property
    def geometry_key(self) -> tuple[bool, bool, int]:
        return (self.flip_h, self.flip_v, self.rot90_k)

    @property
    def colour_is_identity(self) -> bool:
        return self.brightness == 1.0 and self.contrast == 1.0 and self.saturation == 1.0 and self.hue == 0.0

    @property
    def resample_is_identity(self) -> bool:
        """True when the raw image is the region itself (no image-level scale or crop)."""
        return self.scale == 1.0 and self.crop_shift == (0.0, 0.0)

    @property
    def hed_is_identity(self) -> bool:
        return self.hed_alpha == (1.0, 1.0, 1.0) and self.hed_beta == (0.0, 0.0, 0.0)

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return {
            "flip_h": self.flip_h, "flip_v": self.flip_v, "rot90_k": self.rot90_k,
            "brightness": self.brightness, "contrast": self.contrast,
            "saturation": self.saturation, "hue": self.hue,
            "hed_alpha": list(self.hed_alpha), "hed_beta": list(self.hed_beta),
            "blur_sigma": self.blur_sigma, "scale": self.scale, "crop_shift": list(self.crop_shift),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "AugmentParams":
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown AugmentParams keys {unknown}; valid keys are {sorted(known)}.")
        return cls(**dict(data))


def draw_params(config: AugmentConfig, seed: int, epoch: int, index: int) -> AugmentParams:
    """The parameters of sample ``index`` of ``epoch`` under ``seed``.

    A pure function of its arguments: ``numpy.random.Generator(Philox(SeedSequence([seed, epoch,
    index, PARAMS_SALT])))`` draws 16 uniforms in a fixed order, so the result does not depend on
    threads, devices, or the order in which samples are drawn.
    """
    for name, value in (("seed", seed), ("epoch", epoch), ("index", index)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < 0:
            raise ValueError(f"draw_params: {name} must be a non-negative int (got {value!r}).")
    rng = np.random.Generator(np.random.Philox(np.random.SeedSequence([int(seed), int(epoch), int(index),
                                                                         PARAMS_SALT])))
    u = [float(v) for v in rng.random(_N_UNIFORMS)]

    def sym(amplitude: float, v: float) -> float:  # uniform in [-amplitude, amplitude)
        return amplitude * (2.0 * v - 1.0)

    c = config
    lo, hi = c.blur_sigma
    return AugmentParams(
        flip_h=c.flip and u[0] < 0.5,
        flip_v=c.flip and u[1] < 0.5,
        rot90_k=min(int(u[2] * 4.0), 3) if c.rot90 else 0,
        brightness=1.0 + sym(c.brightness, u[3]),
        contrast=1.0 + sym(c.contrast, u[4]),
        saturation=1.0 + sym(c.saturation, u[5]),
        hue=sym(c.hue, u[6]),
        hed_alpha=(1.0 + sym(c.hed_sigma, u[7]), 1.0 + sym(c.hed_sigma, u[8]), 1.0 + sym(c.hed_sigma, u[9])),
        hed_beta=(sym(c.hed_bias, u[10]), sym(c.hed_bias, u[11]), sym(c.hed_bias, u[12])),
        blur_sigma=lo + (hi - lo) * u[14] if u[13] < c.blur_prob else 0.0,
        scale=(1.0 + c.scale) ** (2.0 * u[16] - 1.0) if c.scale > 0.0 else 1.0,
        crop_shift=(sym(c.crop, u[17]), sym(c.crop, u[18])),
    )


def draw_params_batch(config: AugmentConfig, seed: int, epoch: int, indices: Sequence[int] | np.ndarray
                      ) -> list[AugmentParams]:
    """``[draw_params(config, seed, epoch, i) for i in indices]``, equal field for field, drawn as one batch:
    the uniforms in one GIL-free call (``sampling.streams``), the fields in another (``_params_kernel``)."""
    if len(indices) < 2:
        return [draw_params(config, seed, epoch, i) for i in indices]
    from loader_service.sampling.streams import uniforms  # numba: compiled on first use

    for name, value in (("seed", seed), ("epoch", epoch)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < 0:
            raise ValueError(f"draw_params: {name} must be a non-negative int (got {value!r}).")
    idx = indices if isinstance(indices, np.ndarray) and indices.dtype == np.int64 else \
        np.array([int(i) for i in indices], np.int64)
    if (idx < 0).any():
        raise ValueError(f"draw_params: index must be a non-negative int (got {int(idx.min())}).")
    from ._params_kernel import params_table_kernel  # numba: compiled on first use

    u = uniforms([int(seed), int(epoch)], idx, [PARAMS_SALT], _N_UNIFORMS)
    c = config
    packed = np.array([c.flip, c.rot90, c.brightness, c.contrast, c.saturation, c.hue, c.hed_sigma, c.hed_bias,
                       c.blur_prob, *c.blur_sigma, c.scale, c.crop, MAX_BLUR_SIGMA, MIN_SCALE, MAX_SCALE], np.float64)
    table = np.empty((len(idx), len(TABLE_COLUMNS)), np.float64)
    halo = np.empty(len(idx), np.int64)
    if not params_table_kernel(u, packed, table, halo):
        return [draw_params(config, seed, epoch, int(i)) for i in idx]  # raises the per-field error
    return ParamsBatch(table, halo)


#: The columns of a parameter table (``ParamsBatch.table``, ``params_table``): one row per sample.
TABLE_COLUMNS = ("flip_h", "flip_v", "rot90_k", "brightness", "contrast", "saturation", "hue", "hed_alpha_h",
                 "hed_alpha_e", "hed_alpha_d", "hed_beta_h", "hed_beta_e", "hed_beta_d", "blur_sigma", "scale",
                 "crop_shift_y", "crop_shift_x")


class ParamsBatch(Sequence[AugmentParams]):
    """The parameters of a batch as one float64 table (``TABLE_COLUMNS``), checked once for the whole batch.

    A sequence of :class:`AugmentParams`, made one by one only where asked for (``batch[i]``, iteration);
    the batch kernels read ``table`` directly, so a batch costs no per-sample Python objects.
    """

    def __init__(self, table: np.ndarray, halo: np.ndarray | None = None) -> None:
        if table.ndim != 2 or table.shape[1] != len(TABLE_COLUMNS):
            raise ValueError(f"a parameter table has {len(TABLE_COLUMNS)} columns, got shape {table.shape}")
        self.table = table
        self.table.setflags(write=False)
        self._halo = halo  # halos(table), when the maker has it
        self._made: dict[int, AugmentParams] = {}

    @property
    def halo(self) -> np.ndarray:
        """``halos(self.table)``, computed once."""
        if self._halo is None:
            self._halo = halos(self.table)
            self._halo.setflags(write=False)
        return self._halo

    def __len__(self) -> int:
        return len(self.table)

    def _one(self, i: int) -> AugmentParams:
        made = self._made.get(i)
        if made is None:
            row = self.table[i].tolist()
            made = self._made[i] = AugmentParams._checked({
                "flip_h": row[0] != 0.0, "flip_v": row[1] != 0.0, "rot90_k": int(row[2]), "brightness": row[3],
                "contrast": row[4], "saturation": row[5], "hue": row[6], "hed_alpha": tuple(row[7:10]),
                "hed_beta": tuple(row[10:13]), "blur_sigma": row[13], "scale": row[14],
                "crop_shift": tuple(row[15:17])})
        return made

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return ParamsBatch(self.table[i].copy())
        n = len(self)
        i = int(i)
        if not -n <= i < n:
            raise IndexError(f"parameter index {i} outside a batch of {n}")
        return self._one(i % n)

    def __iter__(self) -> Iterator[AugmentParams]:
        return (self._one(i) for i in range(len(self)))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ParamsBatch):
            return bool(np.array_equal(self.table, other.table))
        if isinstance(other, (list, tuple)):
            return len(other) == len(self) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"ParamsBatch({len(self)} samples)"


def params_table(params: Sequence[AugmentParams]) -> np.ndarray:
    """(N, len(TABLE_COLUMNS)) float64: ``params.table`` for a :class:`ParamsBatch`, else made from the objects."""
    if isinstance(params, ParamsBatch):
        return params.table
    return np.array([(p.flip_h, p.flip_v, p.rot90_k, p.brightness, p.contrast, p.saturation, p.hue, *p.hed_alpha,
                      *p.hed_beta, p.blur_sigma, p.scale, *p.crop_shift) for p in params],
                    np.float64).reshape(len(params), len(TABLE_COLUMNS))


def warm_up_draws() -> None:
    """Compile (or load from numba's cache) :func:`draw_params_batch`'s kernel now, not on the first batch."""
    from . import _params_kernel  # noqa: F401 - its kernel is compiled when it is imported


def params_halos(params: Sequence[AugmentParams]) -> np.ndarray:
    """:func:`halos` of the parameters' table (a :class:`ParamsBatch` keeps its own)."""
    return params.halo if isinstance(params, ParamsBatch) else halos(params_table(params))


def halos(table: np.ndarray) -> np.ndarray:
    """``AugmentParams.halo()`` of every row: ceil(3 * blur_sigma) as int64, 0 without blur."""
    sigma = table[:, 13]
    return np.where(sigma > 0.0, np.ceil(3.0 * sigma), 0.0).astype(np.int64)
