"""The plan of one epoch: which region every sample index is, and which indices a rank owns.

Every sample is a pure function of (seed, epoch, global index): the order, the coordinates and the
augmentation parameters do not depend on threads, timing or how many ranks read the epoch. Rank ``r`` of
``world_size`` owns the global indices ``r, r + W, r + 2W, ...``: disjoint, equal-length shards whose
union is the epoch (random mode draws a multiple of W samples; grid mode pads with repeats flagged
``padding``). After an elastic resume (``resume`` stages, sampling/elastic.py) the epoch keeps the layout of
the world size that started it, and the ranks share what it left unread.

Locality (random mode, ``patches_per_region`` k > 1): global indices are cut into groups of
``locality_window`` (here L) times k. Region ``group * L + r`` (r < L) is placed over tissue from its own
stream, and its k patches from the same stream; the group's L·k (region, patch) pairs are ordered by a
permutation keyed by (seed, epoch, group). A sample is still a pure function of (seed, epoch, global
index), so sharding and cursors behave exactly as with independent draws.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping, Sequence
import operator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

import numpy as np

from loader_service.dataset import DatasetIndex, SlideRecord
from loader_service.errors import InvalidRequest, OutOfRange, SlideFailure
from loader_service.sampling.candidates import CandidateCache, Candidates, Unservable, mpp_reach, slide_geometry
from loader_service.sampling.elastic import ResumeStages, ShardMap
from loader_service.slides import MAX_READ_FACTOR
from loader_service.sampling.spec import SamplingSpec
from loader_service.sampling.streams import StreamBatch

if TYPE_CHECKING:
    from loader_service.annotations import SessionAnnotations

__all__ = ["Sample", "SampleRun", "RunGroups", "group_by_slide", "EpochPlan", "ShardCursor", "sample_rng",
           "reads_by_mpp"]

_SALT_SAMPLE = 0x5A17  # distinct streams for sampling and augmentation (augment draws its own)
_SALT_ORDER = 0x0D3E
_SALT_GROUP = 0x6A0C  # locality: the order of a group's (region, patch) pairs
_SALT_REGION = 0x5E61  # locality: a region's placement and its patches' positions
_SALT_SUBSTITUTE = 0x5B57  # substitutes of a failed sample: the same index's stream, attempt 1, 2, ...
_MAX_SUBSTITUTE_DRAWS = 256  # draws tried before giving up on finding a slide that is not quarantined
_CACHE_GROUPS = 64  # locality groups (and their regions) kept per plan: consecutive batches reuse them

Rect4 = tuple[int, int, int, int]  # (x, y, width, height) in the sample grid


def sample_rng(seed: int, epoch: int, index: int, salt: int) -> np.random.Generator:
    return np.random.Generator(np.random.Philox(np.random.SeedSequence([seed, epoch, index, salt])))


@dataclass(frozen=True)
class Sample:
    index: int  # position in the rank's shard
    global_index: int  # position in the epoch; keys the augmentation parameters
    record: SlideRecord
    level: int
    mpp: float
    x: int  # in the sample grid (the level's pixels, or the target mpp's)
    y: int
    width: int
    height: int
    padding: bool = False
    region: Rect4 | None = None  # locality sampling: the region this patch was cut from (contains the patch)
    substituted: str = ""  # why this replaces the index's own draw ("quarantined", a failure reason); "" = it is
    attempt: int = 0  # 0: the index's own draw; n: its n-th substitute draw (EpochPlan.substitute)


@dataclass(frozen=True)
class RunGroups:
    """Rows grouped by slide (:func:`group_by_slide`): group g is rows ``order[starts[g]:starts[g + 1]]`` of
    slide ``slides[g]`` in part ``parts[g]``; ``inverse[row]`` is the row's group."""

    order: np.ndarray
    starts: list[int]
    parts: list[int]
    slides: list[int]
    inverse: np.ndarray

    def rows(self, g: int) -> np.ndarray:
        return self.order[self.starts[g]:self.starts[g + 1]]


def group_by_slide(slide: np.ndarray, parts: int = 1) -> RunGroups:
    """Rows ``0..n-1`` cut into ``parts`` contiguous parts, each part's rows grouped by ``slide`` (int64),
    slides ascending, rows ascending within a group: one compiled call (``_run_kernels``)."""
    from loader_service.sampling._run_kernels import group_rows  # numba: imported on first use

    n = len(slide)
    order, starts, part_of, inverse = (np.empty(size, np.int64) for size in (n, n + 1, n, n))
    g = group_rows(np.ascontiguousarray(slide, np.int64), max(1, parts), order, starts, part_of, inverse)
    first = order[starts[:g]]
    return RunGroups(order, starts[:g + 1].tolist(), part_of[:g].tolist(), slide[first].tolist(), inverse)


class SampleRun(Sequence[Sample]):
    """Random patches drawn together (:meth:`EpochPlan.samples`) as arrays: a sequence of :class:`Sample` whose
    objects are made only when asked for, so that the service's patch path (read, augment, message) handles a
    batch without a Python step or object per sample.

    The arrays: ``slide`` (the plan's slide index of each sample), ``x``, ``y``, ``global_index`` and ``label``
    (the label index), all int64; ``width`` and ``height``; ``start``, the shard index of the first sample; and
    per slide, ``fields``: what every sample of the slide has in common. Every sample of a run is a plain level
    read (no locality region, read at its level's own pixels, not by mpp) and none is a substitute; code that
    changes samples makes a plain ``list`` first (``list(run)``)."""

    def __init__(self, start: int, slide: np.ndarray, global_index: np.ndarray, x: np.ndarray, y: np.ndarray,
                 label: np.ndarray, fields: dict[int, dict[str, Any]], width: int, height: int) -> None:
        self.start, self.slide, self.global_index, self.x, self.y, self.label = start, slide, global_index, x, y, label
        self.fields, self.width, self.height = fields, width, height
        self._made: list[Sample] | None = None
        self._groups: dict[int, RunGroups] = {}  # parts -> groups()

    def __len__(self) -> int:
        return len(self.slide)

    def groups(self, parts: int = 1) -> RunGroups:
        """The samples grouped by slide within each of ``parts`` contiguous parts (:func:`group_by_slide`; kept)."""
        found = self._groups.get(parts)
        if found is None:
            found = self._groups[parts] = group_by_slide(self.slide, parts)
        return found

    def _one(self, i: int) -> Sample:
        return _new_sample({**self.fields[int(self.slide[i])], "index": self.start + i,
                            "global_index": int(self.global_index[i]), "x": int(self.x[i]), "y": int(self.y[i])})

    def samples(self) -> list[Sample]:
        """Every sample as an object (made once)."""
        if self._made is None:
            fields, start = self.fields, self.start
            self._made = [_new_sample({**fields[s], "index": start + i, "global_index": g, "x": x, "y": y})
                          for i, (s, g, x, y) in enumerate(zip(self.slide.tolist(), self.global_index.tolist(),
                                                               self.x.tolist(), self.y.tolist()))]
        return self._made

    @overload
    def __getitem__(self, i: int) -> Sample: ...

    @overload
    def __getitem__(self, i: slice) -> list[Sample]: ...

    def __getitem__(self, i: int | slice) -> Sample | list[Sample]:
        if isinstance(i, slice) or self._made is not None:
            return self.samples()[i]
        i = operator.index(i)
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sample {i} outside a run of {n}")
        return self._one(i % n)

    def __iter__(self) -> Iterator[Sample]:
        return iter(self.samples())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (list, SampleRun)):
            return self.samples() == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"SampleRun({len(self)} samples from shard index {self.start})"


def _new_sample(fields: dict[str, Any]) -> Sample:
    """``Sample(**fields)`` without the 13 ``object.__setattr__`` calls of a frozen dataclass's ``__init__``
    (per patch, in the service's hot loop): the instance gets ``fields``, every field's value, as its
    ``__dict__`` (``tests/test_batch_draws.py`` compares such samples with ``Sample(...)`` field by field)."""
    sample = object.__new__(Sample)
    object.__setattr__(sample, "__dict__", fields)
    return sample


def sample_scale(sample: Sample) -> float:
    """Level-0 pixels per sample pixel."""
    info = sample.record.info
    assert info is not None
    level = info.levels[min(sample.level, len(info.levels) - 1)]
    if sample.mpp > 0 and info.mpp and abs(sample.mpp - info.mpp * level.downsample) > 1e-9 * sample.mpp:
        return sample.mpp / info.mpp
    return level.downsample


def reads_by_mpp(sample: Sample) -> bool:
    """Whether the sample is read at a target mpp (``Slide.read_region_mpp``), not as a level's own pixels."""
    info = sample.record.info
    if info is None or sample.mpp <= 0:
        return False
    return sample.mpp != (info.mpp or 0.0) * info.levels[sample.level].downsample


class EpochPlan:
    """Samples of one (spec, epoch) over a dataset, and one rank's shard of them."""

    def __init__(self, index: DatasetIndex, spec: SamplingSpec, epoch: int, rank: int, world_size: int,
                 candidates: CandidateCache, avoid: Mapping[Path, str] | Collection[Path] = (),
                 unservable: str = "skip", resume: ResumeStages | None = None,
                 annotations: SessionAnnotations | None = None) -> None:
        """``avoid``: quarantined slides (path -> why); samples drawn on them are replaced by :meth:`substitute`
        (the plan's slides and weights stay those of the dataset, so the other indices draw exactly what they
        would). ``unservable``: slides that cannot serve the level or mpp are left out ("skip") or read at the
        nearest resolution and resampled ("fallback"); ``skipped`` lists them ("slide_id: why").
        ``resume``: elastic resume stages (how the epoch was read before at other world sizes)."""
        if world_size < 1 or not 0 <= rank < world_size:
            raise InvalidRequest(f"rank {rank} must be in 0..world_size-1 with world_size >= 1 (got {world_size})")
        self.spec, self.epoch, self.rank, self.world_size = spec, epoch, rank, world_size
        self.avoid = frozenset(avoid)
        self._layout_world = (resume.base_world if resume else None) or world_size  # who laid the epoch out
        self.annotations = annotations  # restricts and balances sampling by annotation class (loader_service.annotations)
        self._parts: list[str] = []  # per entry of _slides: its annotation class when balanced by class, else ""
        self._jitter = annotations is None or not annotations.options.restricts
        records = [r for r in index.usable if not spec.split or r.entry.split == spec.split]
        if not records:
            split = f" in split {spec.split!r}" if spec.split else ""
            raise InvalidRequest(f"dataset {index.name} has no usable slides{split}; check the manifest and the server log")
        self._ahead: dict[tuple[int, int], list[Sample]] = {}  # drawn by samples_ahead, for one later samples()
        self.skipped: list[str] = []  # "slide_id: why" of the slides this session leaves out
        self.skipped_reasons: list[str] = []
        self._slides: list[tuple[SlideRecord, Candidates]] = []
        patch = self._select(records, candidates, unservable)
        if not self._slides and self.annotations is not None and self.annotations.options.restricts:
            raise InvalidRequest(self.annotations.nothing_to_sample(index.name, patch, self.skipped))
        if not self._slides and self.skipped_reasons:
            error = OutOfRange if "mpp_too_coarse" in self.skipped_reasons else InvalidRequest
            raise error(_unservable_text(index.name, records, spec))
        if self._slides and all(r.path in self.avoid for r, _ in self._slides):
            raise SlideFailure(f"every slide of dataset {index.name} this session samples is quarantined after failed "
                               "reads (see the server log); repair the slides and restart the service")
        for record in records:
            if record.path in self.avoid:
                why = avoid[record.path] if isinstance(avoid, Mapping) else "quarantined"
                self.skipped.append(f"{record.slide_id}: {why}")
        if not self._slides:
            locality = (f" (a locality region of {spec.patches_per_region} patches; lower patches_per_region or "
                        "locality_region_size)") if spec.patches_per_region > 1 else ""
            raise InvalidRequest(
                f"no {patch[1]}×{patch[0]} px region{locality} of dataset {index.name} passes tissue_threshold="
                f"{spec.tissue_threshold}; lower the threshold, the region size or the level"
            )
        self._label_index = index.label_index
        self._labels_of_slides: np.ndarray | None = None  # see _slide_labels
        self._templates: dict[int, tuple[dict[str, Any], bool, bool]] = {}  # slide -> _template(slide)
        self.labels: list[str] = list(index.labels)
        if spec.mode == "random" and not spec.whole_slide:
            self._init_random()
        else:
            self._init_grid()
        self._shards = ShardMap(self.epoch_length, rank, world_size, resume)
        self.shard_length = self._shards.shard_length

    def _select(self, records: list[SlideRecord], candidates: CandidateCache, unservable: str) -> tuple[int, int]:
        """Fill ``_slides`` with the slides that serve the spec (and have a region over tissue); the region shape."""
        spec = self.spec
        patch = spec.region_shape  # the patch itself unless patches_per_region > 1
        stride = spec.stride if spec.patches_per_region == 1 else min(patch)
        fallback = _level_downsample(records, spec.level) if unservable == "fallback" else None
        for record in records:
            try:
                try:
                    geo = slide_geometry(record, spec.level, spec.mpp)
                    fell_back = None
                except Unservable as err:
                    if fallback is None or err.reason == "no_mpp":
                        raise
                    geo, fell_back = slide_geometry(record, spec.level, spec.mpp, fallback), fallback
                if spec.whole_slide:
                    self._slides.append((record, Candidates(geo, np.zeros((1, 2), dtype=np.int64))))
                    self._parts.append("")
                    continue
                cands = candidates.get(record, spec.level, spec.mpp, patch, stride, spec.tissue_threshold, fell_back)
                parts = [(cands, "")] if self.annotations is None else self.annotations.split(record, cands, patch)
            except Unservable as err:
                self.skipped.append(f"{record.slide_id}: {err}")
                self.skipped_reasons.append(err.reason)
                continue
            for part, name in parts:
                if len(part.cells):
                    self._slides.append((record, part))
                    self._parts.append(name)
        return patch

    # --- random mode -------------------------------------------------------------------------------------
    def _init_random(self) -> None:
        spec = self.spec
        if spec.samples_per_epoch < self._layout_world:
            raise InvalidRequest(
                f"samples_per_epoch ({spec.samples_per_epoch}) is smaller than world_size ({self._layout_world})"
            )
        self.epoch_length = spec.samples_per_epoch - spec.samples_per_epoch % self._layout_world
        counts = np.array([len(c.cells) for _, c in self._slides], dtype=np.float64)
        if spec.balance == "area":
            weights = counts
        elif spec.balance == "slide":
            weights = np.ones_like(counts)
        else:  # label: each label equally likely, slides within a label by tissue area
            labels = [r.entry.label for r, _ in self._slides]
            per_label = {lab: counts[[i for i, l in enumerate(labels) if l == lab]].sum() for lab in set(labels)}
            weights = np.array([c / per_label[lab] for c, lab in zip(counts, labels)]) / len(per_label)
        by_class = self.annotations.weights(self._parts, counts) if self.annotations is not None else None
        if by_class is not None:  # balanced by annotation class: overrides the balance
            weights = by_class
        self._cdf = np.cumsum(weights / weights.sum())
        self._stream: StreamBatch | None = None  # _place for a batch of indices at once (made on first use)
        self._groups: dict[int, np.ndarray] = {}
        self._regions: dict[int, tuple[int, Rect4, np.ndarray]] = {}

    def _random_sample(self, global_index: int) -> tuple[int, int, int]:
        rng = sample_rng(self.spec.seed, self.epoch, global_index, _SALT_SAMPLE)
        return self._place(rng, self.spec.patch_size, self.spec.height)

    def _place(self, rng: np.random.Generator, width: int, height: int) -> tuple[int, int, int]:
        """A slide (by the balance), a tissue cell of it, then a jitter of half the size: (slide, x, y)."""
        slide = int(np.searchsorted(self._cdf, rng.random(), side="right"))
        slide = min(slide, len(self._slides) - 1)
        cands = self._slides[slide][1]
        cx, cy = cands.cells[int(rng.integers(len(cands.cells)))]
        geo = cands.geometry
        jx = int(rng.integers(-(width // 2), width // 2 + 1))
        jy = int(rng.integers(-(height // 2), height // 2 + 1))
        if not self._jitter:  # annotation sampling: the cell itself, whose centre was classified
            jx = jy = 0
        x = min(max(int(cx) + jx, 0), geo.width - width)  # np.clip's result, without its ~5 µs per call
        y = min(max(int(cy) + jy, 0), geo.height - height)
        return slide, x, y

    # --- random mode with locality -------------------------------------------------------------------------
    def _local_sample(self, global_index: int) -> tuple[int, int, int, Rect4]:
        k, window = self.spec.patches_per_region, self.spec.locality_window
        group, position = divmod(global_index, window * k)
        order = self._groups.get(group)
        if order is None:
            order = sample_rng(self.spec.seed, self.epoch, group, _SALT_GROUP).permutation(window * k)
            if len(self._groups) >= _CACHE_GROUPS:
                self._groups.clear()
            self._groups[group] = order
        region, patch = divmod(int(order[position]), k)
        slide, rect, offsets = self._region(group * window + region)
        return slide, rect[0] + int(offsets[patch, 0]), rect[1] + int(offsets[patch, 1]), rect

    def _region(self, region_index: int) -> tuple[int, Rect4, np.ndarray]:
        """(slide, region rect, (k, 2) patch offsets in it) of one region: a pure function of its index.

        The patches take k distinct cells of the region's patch grid (no overlap) when it has k cells,
        otherwise k uniform positions (they may overlap).
        """
        found = self._regions.get(region_index)
        if found is not None:
            return found
        spec, k = self.spec, self.spec.patches_per_region
        rh, rw = spec.region_shape
        rng = sample_rng(spec.seed, self.epoch, region_index, _SALT_REGION)
        slide, rx, ry = self._place(rng, rw, rh)
        pw, ph = spec.patch_size, spec.height
        cols, rows = rw // pw, rh // ph
        if cols * rows >= k:
            cells = rng.choice(cols * rows, size=k, replace=False)
            ox, oy = rng.integers(0, rw - cols * pw + 1), rng.integers(0, rh - rows * ph + 1)  # the grid's slack
            offsets = np.stack([ox + (cells % cols) * pw, oy + (cells // cols) * ph], axis=1)
        else:
            offsets = np.stack([rng.integers(0, rw - pw + 1, size=k), rng.integers(0, rh - ph + 1, size=k)], axis=1)
        result = (slide, (rx, ry, rw, rh), offsets.astype(np.int64))
        if len(self._regions) >= _CACHE_GROUPS * spec.locality_window:
            self._regions.clear()
        self._regions[region_index] = result
        return result

    # --- grid mode ---------------------------------------------------------------------------------------
    def _init_grid(self) -> None:
        self._offsets = np.cumsum([0] + [len(c.cells) for _, c in self._slides])
        self._grid_total = int(self._offsets[-1])
        w = self._layout_world
        self.epoch_length = -(-self._grid_total // w) * w
        self._order: np.ndarray | None = None
        if self.spec.shuffle_grid or (self.spec.whole_slide and self.spec.mode == "random"):
            self._order = sample_rng(self.spec.seed, self.epoch, 0, _SALT_ORDER).permutation(self._grid_total)

    def _grid_sample(self, global_index: int) -> tuple[int, int, int]:
        position = global_index % self._grid_total  # padding wraps around to the start
        if self._order is not None:
            position = int(self._order[position])  # grid shuffled, or whole slides in random mode
        slide = int(np.searchsorted(self._offsets, position, side="right")) - 1
        x, y = self._slides[slide][1].cells[position - self._offsets[slide]]
        return slide, int(x), int(y)

    def _random_rows(self, global_indices: np.ndarray) -> np.ndarray:
        """:meth:`_random_sample` of many indices in one GIL-free call: (slide, x, y) rows, the same values."""
        if self._stream is None:
            self._stream = StreamBatch(
                [self.spec.seed, self.epoch], [_SALT_SAMPLE], self._cdf, [c.cells for _, c in self._slides],
                np.array([(c.geometry.width, c.geometry.height) for _, c in self._slides], np.int64))
        return self._stream.places(global_indices, self.spec.patch_size, self.spec.height,
                                   self._jitter)

    # --- public ------------------------------------------------------------------------------------------
    def samples(self, start: int, stop: int) -> list[Sample]:
        """``[sample(i) for i in range(start, stop)]``; in random mode drawn as one batch, outside the GIL."""
        kept = self._ahead.pop((start, stop), None)
        if kept is not None:
            return kept
        spec = self.spec
        if spec.mode != "random" or spec.whole_slide or spec.patches_per_region > 1 or stop - start < 2:
            return [self.sample(i) for i in range(start, stop)]
        if not 0 <= start <= stop <= self.shard_length:
            raise IndexError(f"shard indices {start}..{stop - 1} outside 0..{self.shard_length - 1}")
        global_array = self._shards.global_indices(start, stop)
        rows = self._random_rows(global_array)
        slides = rows[:, 0].copy()
        grouped = group_by_slide(slides)
        templates = {slide: self._template(slide) for slide in grouped.slides}
        if any(t[1] or not t[2] for t in templates.values()):  # quarantined slides, or reads by mpp: objects
            out = []
            for i, g, (slide, x, y) in zip(range(start, stop), global_array.tolist(), rows.tolist()):
                drawn = _new_sample({**templates[slide][0], "index": i, "global_index": g, "x": x, "y": y})
                out.append(self.substitute(drawn, 1, "quarantined") if templates[slide][1] else drawn)
            return out
        run = SampleRun(start, slides, global_array, rows[:, 1].copy(), rows[:, 2].copy(), self._slide_labels()[slides],
                        {slide: t[0] for slide, t in templates.items()}, self.spec.patch_size, self.spec.height)
        run._groups[1] = grouped
        return run

    def _slide_labels(self) -> np.ndarray:
        """Each of the plan's slides' label index (int64), worked out once."""
        if self._labels_of_slides is None:
            self._labels_of_slides = np.array([self.label_index(record) for record, _ in self._slides], np.int64)
        return self._labels_of_slides

    def _template(self, slide: int) -> tuple[dict[str, Any], bool, bool]:
        """The fields :meth:`_make` gives every random sample of ``slide`` but index and place; whether the
        slide is avoided; whether its samples are read at their level's own pixels (not by mpp). Kept: they are
        the plan's (its ``avoid`` is frozen), and nobody writes into the fields (samples copy them)."""
        found = self._templates.get(slide)
        if found is None:
            found = self._templates[slide] = self._new_template(slide)
        return found

    def _new_template(self, slide: int) -> tuple[dict[str, Any], bool, bool]:
        record, cands = self._slides[slide]
        geo = cands.geometry
        fields = {"record": record, "level": geo.level, "mpp": geo.mpp, "width": self.spec.patch_size,
                  "height": self.spec.height, "padding": False, "region": None, "substituted": "", "attempt": 0}
        return fields, record.path in self.avoid, not reads_by_mpp(_new_sample({**fields, "index": 0,
                                                                              "global_index": 0, "x": 0, "y": 0}))

    def samples_ahead(self, start: int, stop: int) -> list[Sample]:
        """:meth:`samples`, also kept for the next ``samples(start, stop)``: a forecast looks at batches before
        they are built (``loader_service.forecast``), and each is drawn once."""
        drawn = self.samples(start, stop)
        self._ahead[(start, stop)] = drawn
        return drawn

    def sample(self, shard_index: int) -> Sample:
        if not 0 <= shard_index < self.shard_length:
            raise IndexError(f"shard index {shard_index} outside 0..{self.shard_length - 1}")
        global_index = self._shards.global_index(shard_index)
        region: Rect4 | None = None
        padding = False
        if self.spec.mode == "random" and not self.spec.whole_slide and self.spec.patches_per_region > 1:
            slide, x, y, region = self._local_sample(global_index)
        elif self.spec.mode == "random" and not self.spec.whole_slide:
            slide, x, y = self._random_sample(global_index)
        else:
            slide, x, y = self._grid_sample(global_index)
            padding = global_index >= self._grid_total
        drawn = self._make(shard_index, global_index, slide, x, y, padding, region)
        if drawn.record.path in self.avoid:
            return self.substitute(drawn, 1, "quarantined")
        return drawn

    def _make(self, shard_index: int, global_index: int, slide: int, x: int, y: int, padding: bool,
              region: Rect4 | None, substituted: str = "", attempt: int = 0) -> Sample:
        record, cands = self._slides[slide]
        geo = cands.geometry
        if self.spec.whole_slide:
            return Sample(shard_index, global_index, record, geo.level, geo.mpp, 0, 0, geo.width, geo.height, padding,
                          None, substituted, attempt)
        return Sample(shard_index, global_index, record, geo.level, geo.mpp, x, y, self.spec.patch_size,
                      self.spec.height, padding, region, substituted, attempt)

    def substitute(self, sample: Sample, attempt: int, reason: str) -> Sample:
        """The first substitute draw of ``sample``'s index from ``attempt`` on whose slide is not avoided.

        Draw ``n`` is a pure function of (seed, epoch, global index, n): a sample of the same mode (random: a
        slide by the balance, a tissue cell, a jitter; grid and whole slides: a uniform cell of the grid), same
        size, shard index and augmentation parameters. Raises SlideFailure when no such draw is found.
        """
        for n in range(attempt, attempt + _MAX_SUBSTITUTE_DRAWS):
            rng = np.random.Generator(np.random.Philox(np.random.SeedSequence(
                [self.spec.seed, self.epoch, sample.global_index, _SALT_SUBSTITUTE, n])))
            if self.spec.mode == "random" and not self.spec.whole_slide:
                slide, x, y = self._place(rng, self.spec.patch_size, self.spec.height)
            else:
                position = int(rng.integers(self._grid_total))
                slide = int(np.searchsorted(self._offsets, position, side="right")) - 1
                x, y = (int(v) for v in self._slides[slide][1].cells[position - self._offsets[slide]])
            if self._slides[slide][0].path not in self.avoid:
                return self._make(sample.index, sample.global_index, slide, x, y, sample.padding, None, reason, n)
        raise SlideFailure(f"sample {sample.index}: no readable substitute in {_MAX_SUBSTITUTE_DRAWS} draws; most of "
                           "the dataset's tissue is on quarantined slides (see the server log)")

    def label_index(self, record: SlideRecord) -> int:
        return self._label_index[record.entry.label]

    @property
    def slides(self) -> list[tuple[SlideRecord, Candidates]]:
        """The slides this plan samples from, with their candidate cells."""
        return self._slides


def _level_downsample(records: list[SlideRecord], level: int) -> float:
    """The downsample of ``level`` in the slides that have it (their median): what a fallback reads others at."""
    found = [r.info.levels[level].downsample for r in records if r.info is not None and level < len(r.info.levels)]
    return float(np.median(found)) if found else 2.0 ** level


def _unservable_text(name: str, records: list[SlideRecord], spec: SamplingSpec) -> str:
    """Why no slide serves the spec, suggesting only what every slide serves."""
    infos = [r.info for r in records if r.info is not None]
    if spec.mpp > 0:
        with_mpp = [i.mpp for i in infos if i.mpp]
        if not with_mpp:
            return (f"no slide of dataset {name} has microns-per-pixel metadata, so none can be read at {spec.mpp} "
                    "µm/px; ask by level (mpp=0), or give the slides' resolution in a manifest column `mpp`")
        finest = max(with_mpp)
        coarsest = min(mpp_reach(r) for r in records if r.info is not None and r.info.mpp)
        if finest <= coarsest:
            served = f"mpp from {finest:.4f} to {coarsest:.4g} µm/px is served by every slide with metadata"
        else:
            served = (f"no single mpp is served by every slide with metadata (full resolutions up to {finest:.4f}, "
                      f"reach down to {coarsest:.4g} µm/px); pick an mpp within one slide's range "
                      "(unservable=skip leaves the others out)")
        return (f"no slide of dataset {name} can serve {spec.mpp} µm/px (finer than the slides' full resolution, "
                f"coarser than the server decodes within {MAX_READ_FACTOR:g}× (MAX_READ_FACTOR) of their "
                f"coarsest level, or no mpp metadata); {served}, or ask unservable=fallback to upsample a too-fine mpp")
    common = min(len(i.levels) for i in infos) - 1
    return (f"level {spec.level} does not exist in any slide of dataset {name}; levels 0..{common} exist in every "
            "slide, or ask unservable=fallback to resample the nearest level")


class ShardCursor:
    """Walks a rank's shard in batches from a cursor; ``state_dict`` is the resume point."""

    def __init__(self, plan: EpochPlan, batch_size: int, cursor: int = 0, drop_last: bool = False) -> None:
        if batch_size < 1:
            raise InvalidRequest(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= cursor <= plan.shard_length:
            raise InvalidRequest(
                f"cursor {cursor} is outside this rank's shard (0..{plan.shard_length}); was it saved with another "
                "world_size, samples_per_epoch or dataset?"
            )
        self.plan, self.batch_size, self.drop_last = plan, batch_size, drop_last
        self.cursor = cursor

    def remaining_batches(self) -> int:
        left = self.plan.shard_length - self.cursor
        return left // self.batch_size if self.drop_last else -(-left // self.batch_size)

    def next_batch(self) -> list[Sample] | None:
        """The next batch's samples, advancing the cursor; None at the end of the shard."""
        left = self.plan.shard_length - self.cursor
        if left <= 0 or (self.drop_last and left < self.batch_size):
            return None
        count = min(self.batch_size, left)
        samples = self.plan.samples(self.cursor, self.cursor + count)
        self.cursor += count
        return samples

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.plan.epoch, "cursor": self.cursor, "rank": self.plan.rank,
                "world_size": self.plan.world_size, "seed": self.plan.spec.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("epoch", "rank", "world_size", "seed"):
            mine = self.state_dict()[key]
            if state[key] != mine:
                raise ValueError(f"state_dict {key}={state[key]} does not match this cursor's {key}={mine}")
        if not 0 <= state["cursor"] <= self.plan.shard_length:
            raise ValueError(f"cursor {state['cursor']} outside 0..{self.plan.shard_length}")
        self.cursor = int(state["cursor"])
