"""What a session asks of the annotations: where patches may come from, class balance, masks."""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["AnnotationOptions", "REGIONS", "BACKGROUND"]

REGIONS = ("tissue", "annotated", "balanced", "tissue_minus")  # the proto's AnnotationRegion, in enum order
BACKGROUND = "background"  # class index 0: no annotation at that point


@dataclass(frozen=True)
class AnnotationOptions:
    """``region``: tissue (no restriction), annotated (patch centre inside an annotation of ``classes``, or any),
    balanced (as annotated, each class drawn with its ``proportions`` weight, equal when empty) or tissue_minus
    (tissue whose patch centre is in none of ``exclude``). ``masks``: send per-pixel class masks."""

    region: str = "tissue"
    classes: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    proportions: tuple[tuple[str, float], ...] = ()
    masks: bool = False

    def __post_init__(self) -> None:
        if self.region not in REGIONS:
            raise ValueError(f"annotation region must be one of {REGIONS}, got {self.region!r}")
        for name, weight in self.proportions:
            if not (math.isfinite(weight) and weight >= 0):
                raise ValueError(f"class proportion of {name!r} must be a finite number >= 0, got {weight}")
        if self.proportions and not any(w > 0 for _, w in self.proportions):
            raise ValueError("class proportions are all 0; give at least one class a positive weight")
        if self.proportions and self.region != "balanced":
            raise ValueError("class proportions apply to region=balanced only")
        if self.exclude and self.region != "tissue_minus":
            raise ValueError("exclude applies to region=tissue_minus only (use classes= to restrict annotated regions)")
        if self.classes and self.region not in ("annotated", "balanced"):
            raise ValueError("classes applies to region=annotated or balanced only")
        if BACKGROUND in self.classes or BACKGROUND in dict(self.proportions):
            raise ValueError(f"{BACKGROUND!r} is the class of unannotated area, not an annotation class")

    @property
    def active(self) -> bool:
        return self.region != "tissue" or self.masks

    @property
    def restricts(self) -> bool:
        """Whether sampling depends on the annotations (patches are then placed on cells, without jitter)."""
        return self.region != "tissue"
