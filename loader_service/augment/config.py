"""Augmentation configuration: what may be drawn, and how strongly.

`AugmentConfig` holds *amplitudes* (the largest change an op may make); the per-sample
values are drawn from it by :func:`loader_service.augment.params.draw_params`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

__all__ = ["AugmentConfig", "MAX_BLUR_SIGMA"]

#: Largest Gaussian blur sigma accepted (pixels); the halo is ceil(3 * sigma).
MAX_BLUR_SIGMA: float = 16.0


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_range(name: str, value: object, lo: float, hi: float, hi_open: bool, meaning: str) -> None:
    upper = ")" if hi_open else "]"
    ok = _is_number(value) and lo <= float(value) and (  # type: ignore[arg-type]
        float(value) < hi if hi_open else float(value) <= hi  # type: ignore[arg-type]
    )
    if not ok:
        raise ValueError(
            f"AugmentConfig.{name} must be a finite number in [{lo:g}, {hi:g}{upper} (got {value!r}); "
            f"{meaning}; use 0 to disable it."
        )


@dataclass(frozen=True)
class AugmentConfig:
    """Amplitudes of the per-sample augmentations (the defaults are the ``'pathology'`` preset).

    * ``flip`` / ``rot90``: draw horizontal and vertical flips (each p=0.5) / a rotation by
      k*90 degrees (k uniform in 0..3).
    * ``brightness``, ``contrast``, ``saturation``: a factor uniform in [1-a, 1+a].
    * ``hue``: a hue rotation uniform in [-a, a] turns (0.5 = half a turn).
    * ``hed_sigma``, ``hed_bias``: HED stain jitter (Tellez et al. 2018): per stain channel
      alpha ~ U(1-sigma, 1+sigma) and beta ~ U(-bias, bias), in skimage's ``rgb2hed`` units.
    * ``blur_prob``, ``blur_sigma``: with probability ``blur_prob`` a Gaussian blur whose sigma
      (pixels) is uniform in ``blur_sigma = (low, high)``.
    * ``scale``: image-level zoom, log-uniform in [1/(1+a), 1+a] (0 = off, the default).
    * ``crop``: image-level random crop: the window's centre moves by up to ``a`` times the region's
      height and width (0 = off, the default). Scale and crop resample the slide around the region
      (``augment.resample``), so context comes from the slide, not from padding.
    """

    flip: bool = True
    rot90: bool = True
    brightness: float = 0.1
    contrast: float = 0.1
    saturation: float = 0.1
    hue: float = 0.02
    hed_sigma: float = 0.03
    hed_bias: float = 0.01
    blur_prob: float = 0.1
    blur_sigma: tuple[float, float] = (0.1, 1.5)
    scale: float = 0.0
    crop: float = 0.0

    PRESETS: ClassVar[tuple[str, ...]] = ("none", "pathology")

    def __post_init__(self) -> None:
        for name in ("flip", "rot90"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ValueError(f"AugmentConfig.{name} must be true or false (got {value!r}).")
        _check_range("brightness", self.brightness, 0.0, 1.0, True,
                     "it is the largest relative brightness change, e.g. 0.1 for a factor in [0.9, 1.1]")
        _check_range("contrast", self.contrast, 0.0, 1.0, True,
                     "it is the largest relative contrast change, e.g. 0.1 for a factor in [0.9, 1.1]")
        _check_range("saturation", self.saturation, 0.0, 1.0, False,
                     "it is the largest relative saturation change, e.g. 0.1 for a factor in [0.9, 1.1]")
        _check_range("hue", self.hue, 0.0, 0.5, False,
                     "it is the largest hue rotation in turns, e.g. 0.02 for +-7.2 degrees")
        _check_range("hed_sigma", self.hed_sigma, 0.0, 1.0, True,
                     "it is the HED stain scale amplitude, alpha ~ U(1-sigma, 1+sigma); Tellez et al. use 0.03")
        _check_range("hed_bias", self.hed_bias, 0.0, 1.0, False,
                     "it is the HED stain shift amplitude, beta ~ U(-bias, bias); Tellez et al. use 0.01")
        _check_range("blur_prob", self.blur_prob, 0.0, 1.0, False,
                     "it is the probability that a sample is blurred")
        _check_range("scale", self.scale, 0.0, 1.0, False,
                     "it is the largest zoom, e.g. 0.2 for a factor log-uniform in [1/1.2, 1.2]")
        _check_range("crop", self.crop, 0.0, 0.5, False,
                     "it is the largest shift of the window's centre as a fraction of the region, e.g. 0.1")
        sig = self.blur_sigma
        if (
            not isinstance(sig, tuple)
            or len(sig) != 2
            or not all(_is_number(s) for s in sig)
            or not 0.0 < float(sig[0]) <= float(sig[1]) <= MAX_BLUR_SIGMA
        ):
            raise ValueError(
                f"AugmentConfig.blur_sigma must be a pair (low, high) with 0 < low <= high <= "
                f"{MAX_BLUR_SIGMA:g} pixels (got {sig!r}), e.g. (0.1, 1.5); set blur_prob = 0 to disable blur."
            )
        # Normalise ints to floats so that to_dict()/equality are stable.
        object.__setattr__(self, "blur_sigma", (float(sig[0]), float(sig[1])))
        for name in ("brightness", "contrast", "saturation", "hue", "hed_sigma", "hed_bias", "blur_prob", "scale",
                     "crop"):
            object.__setattr__(self, name, float(getattr(self, name)))

    # ------------------------------------------------------------------ presets
    @classmethod
    def preset(cls, name: str) -> "AugmentConfig":
        """``'none'`` (every op off: the identity) or ``'pathology'`` (the defaults)."""
        if name == "pathology":
            return cls()
        if name == "none":
            return cls(flip=False, rot90=False, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0,
                       hed_sigma=0.0, hed_bias=0.0, blur_prob=0.0)
        raise ValueError(f"unknown augmentation preset {name!r}; choose one of {list(cls.PRESETS)}.")

    @property
    def is_identity(self) -> bool:
        """True when every drawn parameter set is the identity."""
        return self == AugmentConfig.preset("none")

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML types (tuples become lists)."""
        out = dataclasses.asdict(self)
        out["blur_sigma"] = list(self.blur_sigma)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> "AugmentConfig":
        """Inverse of :meth:`to_dict`. An optional ``"preset"`` key names the base
        (``'none'`` or ``'pathology'``, default ``'pathology'``); the other keys override it.
        ``None`` or ``{}`` gives the default. Unknown keys are an error."""
        data = dict(data or {})
        base = cls.preset(str(data.pop("preset", "pathology")))
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ValueError(
                f"unknown AugmentConfig keys {unknown}; valid keys are {sorted(fields)} and 'preset'."
            )
        if "blur_sigma" in data and isinstance(data["blur_sigma"], list):
            data["blur_sigma"] = tuple(data["blur_sigma"])
        return dataclasses.replace(base, **data)
