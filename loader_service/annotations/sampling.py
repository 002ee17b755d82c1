"""One session's view of the annotations: the class vocabulary, and which tissue cells it may sample."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from loader_service.annotations.model import AnnotationError, SlideAnnotations
from loader_service.annotations.options import BACKGROUND, AnnotationOptions
from loader_service.annotations.store import AnnotationStore
from loader_service.dataset import SlideRecord
from loader_service.errors import InvalidRequest
from loader_service.sampling.candidates import Candidates, Unservable

__all__ = ["SessionAnnotations"]


class SessionAnnotations:
    """The annotations of a session's slides (loaded through ``store``), its classes and its sampling rule.

    Class indices: 0 is ``background`` (no annotation), then the class names of every slide's file, sorted.
    A slide whose file is malformed (or outside the data roots) is left out of the session with the error as its
    reason; a slide without a file is left out unless the region is ``tissue`` or ``tissue_minus``.
    """

    def __init__(self, options: AnnotationOptions, store: AnnotationStore, records: Sequence[SlideRecord]) -> None:
        self.options = options
        self.by_path: dict[Path, SlideAnnotations | None] = {}
        self.errors: dict[Path, AnnotationError] = {}
        for record in records:
            try:
                self.by_path[record.path] = store.load(record)
            except AnnotationError as err:
                self.errors[record.path] = err
        names = sorted({n for a in self.by_path.values() if a is not None for n in a.names})
        self.classes: list[str] = [BACKGROUND, *names]
        self.index = {name: i for i, name in enumerate(self.classes)}
        asked = set(options.classes) | set(options.exclude) | {n for n, _ in options.proportions}
        unknown = sorted(asked - set(names))
        if unknown:
            raise InvalidRequest(f"annotation classes {unknown} appear in no readable annotation file of this "
                                 f"dataset; its classes are {names}")

    def annotations(self, record: SlideRecord) -> SlideAnnotations | None:
        return self.by_path.get(record.path)

    def split(self, record: SlideRecord, cands: Candidates, patch_hw: tuple[int, int]) -> list[tuple[Candidates, str]]:
        """The slide's cells this session samples, as (cells, class name) parts: one part per class when balanced,
        else one part (class ""). Raises Unservable (with the reason) for a slide left out."""
        err = self.errors.get(record.path)
        if err is not None:
            raise Unservable(str(err), err.reason)
        region = self.options.region
        found = self.by_path.get(record.path)
        if region == "tissue" or (found is None and region == "tissue_minus"):
            return [(cands, "")]
        if found is None:
            raise Unservable(f"slide {record.slide_id} has no annotation file (manifest column `annotation`), and "
                             f"region={region} samples annotated areas only", "no_annotation")
        cls = self.cell_classes(found, cands, patch_hw)
        geo = cands.geometry
        if region == "tissue_minus":
            excluded = [self.index[n] for n in self.options.exclude]
            return [(Candidates(geo, cands.cells[~np.isin(cls, excluded)]), "")]
        wanted = [self.index[n] for n in self.options.classes] if self.options.classes else range(1, len(self.classes))
        if region == "annotated":
            return [(Candidates(geo, cands.cells[np.isin(cls, list(wanted))]), "")]
        return [(Candidates(geo, cands.cells[cls == c]), self.classes[c]) for c in wanted if (cls == c).any()]

    def cell_classes(self, found: SlideAnnotations, cands: Candidates, patch_hw: tuple[int, int]) -> np.ndarray:
        """Class index at the centre of each candidate cell."""
        h, w = patch_hw
        scale = cands.geometry.scale
        xs = (cands.cells[:, 0].astype(np.float64) + w / 2.0) * scale
        ys = (cands.cells[:, 1].astype(np.float64) + h / 2.0) * scale
        return found.classify_points(xs, ys, self.index)

    def weights(self, parts: list[str], counts: np.ndarray) -> np.ndarray | None:
        """Balanced region: the weight of each part (a slide's cells of class ``parts[i]``), so that a class is
        drawn with its proportion and, within it, cells uniformly. None for the other regions."""
        if self.options.region != "balanced":
            return None
        present = sorted(set(parts))
        asked = dict(self.options.proportions) or {name: 1.0 for name in present}
        total = {name: counts[[i for i, p in enumerate(parts) if p == name]].sum() for name in present}
        weights = np.array([asked.get(p, 0.0) * c / total[p] for p, c in zip(parts, counts)])
        if not weights.sum() > 0:
            raise InvalidRequest(f"no cell of the classes with a positive proportion passes the tissue threshold "
                                 f"(classes found: {present}); lower tissue_threshold or change the proportions")
        return weights

    def nothing_to_sample(self, dataset: str, patch_hw: tuple[int, int], skipped: list[str]) -> str:
        """Why a session restricted to annotations found no cell, saying what to change."""
        o = self.options
        which = f" of classes {list(o.classes)}" if o.classes else ""
        text = (f"no {patch_hw[1]}×{patch_hw[0]} px cell of dataset {dataset} has its centre in the asked region "
                f"(region={o.region}{which}"
                + (f", excluding {list(o.exclude)}" if o.exclude else "") + "); lower patch_size, level or "
                "tissue_threshold, or check the annotations' classes")
        if skipped:
            text += f". Slides left out: {'; '.join(skipped[:3])}" + (" ..." if len(skipped) > 3 else "")
        return text
