"""Building one batch: region reads on the read pool, straight into the batch buffer, then augmentation.

Pixels are written once by the decoder into the batch buffer (pinned host memory when the service has a
GPU). Augmentation runs batch-wise on tensors, on the service's GPU when it has one. The result comes back
to the CPU, except with ``on_device=True`` (CUDA IPC sessions: the batch stays on the service's device).
"""

from __future__ import annotations

import math
import os
import threading
import time
from contextlib import nullcontext
from concurrent.futures import Executor, Future
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from PIL import Image

from loader_service.augment.stain import StainConfig, normalise_batch
from loader_service.context import ContextScale, build_context, context_sample
from loader_service.augment import (AugmentConfig, AugmentParams, ParamsBatch, Rect, augment_batch, draw_params,
                                    draw_params_batch, params_table, render_piece, resample_rect, to_nchw, to_output)
from loader_service.dataset import SlideHandles
from loader_service.errors import OutOfRange, SlideFailure
from loader_service.handoff import Wakeup
from loader_service.failures import FailureBudget, SampleFailed, sample_failed
from loader_service.metrics import Metrics
from loader_service.sampling import Sample, SampleRun, reads_by_mpp
from loader_service.slides import DecodePool, MppOutOfRange, Slide, SlideError, TiffSlide, read_patches_of
from loader_service.slides.base import MPP_TOLERANCE
from loader_service.views import PieceSpec

__all__ = ["OutputSpec", "BuiltBatch", "BatchBuilder", "resolve_device"]

T = TypeVar("T")
_READ_WAIT_S = 60.0

_DTYPES = ("uint8", "float16", "float32")
_Rendered = tuple[torch.Tensor, list[torch.Tensor]]  # a piece (CHW) and its raw context patches (may be none)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available here; use --device cpu or auto")
    return device


@dataclass(frozen=True)
class OutputSpec:
    dtype: str = "uint8"
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    channels_last: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"output dtype must be one of {_DTYPES}, got {self.dtype!r}")
        if len(self.mean) != len(self.std) or len(self.mean) not in (0, 1, 3):
            raise ValueError("mean and std must both be empty, or both have 1 or 3 values (one per channel)")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std values must be > 0, got {self.std}")
        if self.dtype == "uint8" and self.mean:
            raise ValueError("normalisation (mean/std) needs a float output dtype: float16 or float32")


@dataclass
class BuiltBatch:
    images: torch.Tensor  # contiguous, in the requested dtype and layout; on the CPU unless built on_device
    labels: torch.Tensor  # int64
    samples: list[Sample]
    timings: dict[str, float] = field(default_factory=dict)
    piece: PieceSpec | None = None  # tiles/shard views: where these pixels lie in the augmented image
    masks: torch.Tensor | None = None  # annotations: uint8 (N, H, W) class indices, aligned with images
    classes: torch.Tensor | None = None  # annotations: int64 (N,) class index at each sample's centre
    context: list[torch.Tensor] = field(default_factory=list)  # multi-scale context: one tensor per scale
    context_samples: list[list[Sample]] = field(default_factory=list)  # where each scale's patches were read


class BatchBuilder:
    """Reads, decodes and augments batches; shared by every session of the server."""

    def __init__(self, handles: SlideHandles, read_pool: Executor, device: torch.device, metrics: Metrics,
                 workers: int = 2) -> None:
        self.handles = handles
        self.read_pool = read_pool
        self.workers = max(1, workers)  # the cores the service decodes on
        self._building = 0  # batches being built now (all sessions): they share the cores
        self._building_lock = threading.Lock()
        self._local = threading.local()
        self.device = device
        self.metrics = metrics

    def _read_one(self, sample: Sample, out: np.ndarray, rect: Rect | None = None,
                  opened: dict[Path, Slide] | None = None) -> None:
        """Read the sample's region (or ``rect`` of it, in region coordinates) into ``out``. ``opened``: the
        slides this batch has opened already (the data roots are checked once per slide and batch)."""
        x, y, w, h = sample.x, sample.y, sample.width, sample.height
        if rect is not None:
            x, y, w, h = x + rect.x, y + rect.y, rect.width, rect.height
        try:
            slide = opened.get(sample.record.path) if opened is not None else None
            if slide is None:
                slide = self.handles.for_record(sample.record)  # re-checks the data roots at every open
                if opened is not None:
                    opened[sample.record.path] = slide
            if reads_by_mpp(sample):
                if sample.mpp < (slide.info.mpp or 0.0) * (1.0 - MPP_TOLERANCE):  # mixed datasets, fallback
                    _read_upsampled(slide, sample.mpp / (slide.info.mpp or 1.0), x, y, w, h, out)
                else:
                    slide.read_region_mpp(sample.mpp, x, y, w, h, out=out)
            else:
                slide.read_region(sample.level, x, y, w, h, out=out)
        except MppOutOfRange as err:
            raise OutOfRange(f"slide {sample.record.slide_id}: {err}") from err
        except SlideError as err:
            raise sample_failed(sample.record, err) from err

    def read(self, samples: list[Sample], params: list[AugmentParams] | None = None,
             failures: FailureBudget | None = None) -> torch.Tensor:
        """Decode the samples' regions into one uint8 NHWC tensor (pinned when the device is a GPU).

        Patches cut from one locality region (``Sample.region``) are read together: one read of their
        bounding box (inside the region), then cut, when that touches no more tiles than reading them one by one.
        Samples whose ``params`` set an image-level scale or crop are resampled from the slide around their
        region (``augment.resample``), each on its own. Without ``failures`` a failed read raises; with it see
        :meth:`read_substituting`.
        """
        return self.read_substituting(samples, params, failures)[0]

    def read_substituting(self, samples: list[Sample], params: list[AugmentParams] | None,
                          failures: FailureBudget | None) -> tuple[torch.Tensor, list[Sample]]:
        """:meth:`read`, and the samples actually read: a sample whose read fails is counted against its slide
        and, with ``on_error='skip'``, replaced by its next substitute draw (``Sample.substituted`` says why)."""
        if isinstance(samples, SampleRun):
            shape = (len(samples), samples.height, samples.width, 3)
        else:
            shape = (len(samples), samples[0].height, samples[0].width, 3)
        buffer = torch.empty(shape, dtype=torch.uint8, pin_memory=self.device.type == "cuda")
        array = buffer.numpy()
        run = isinstance(samples, SampleRun) and len(samples) > 1 and not _any_resampled(params)
        params = params or [AugmentParams()] * len(samples)
        opened: dict[Path, Slide] = {}
        tasks: list[tuple[list[int], Callable[[], None]]] = []
        plain: list[int] = []
        if run:
            tasks = self._run_tasks(samples, array, opened)  # the same reads, grouped with arrays
        else:
            table = params_table(params)
            resampled = ((table[:, 14] != 1.0) | (table[:, 15] != 0.0) | (table[:, 16] != 0.0)).tolist()
            tasks = [([i], partial(self._read_resampled, samples[i], params[i], array[i]))
                     for i, r in enumerate(resampled) if r]
            plain = [i for i, r in enumerate(resampled) if not r]
            by_level = [i for i in plain if samples[i].region is None and not reads_by_mpp(samples[i])]
            if len(by_level) > 1:
                tasks.extend(self._patch_tasks(samples, by_level, array, opened))
                taken = set(by_level)
                plain = [i for i in plain if i not in taken]
        for group in _region_groups([samples[i] for i in plain]):
            idx = [plain[g] for g in group]
            if len(idx) == 1:
                tasks.append((idx, partial(self._read_one, samples[idx[0]], array[idx[0]], None, opened)))
            else:
                tasks.append((idx, partial(self._read_cut, [samples[i] for i in idx], [array[i] for i in idx])))
        failed: dict[int, SampleFailed] = {}
        for idx, err in self._run_reads(tasks):
            if failures is None:
                raise err
            failed.update(self._which_failed(samples, params, array, idx, err))
        if failed or not isinstance(samples, SampleRun):  # a run has no substitutes: it stays as it is
            samples = list(samples)
            for i in sorted(failed):  # index order: the same substitutes whatever the thread timing
                assert failures is not None
                samples[i], pixels = self._substitute(samples[i], params[i], array[i], failed[i], failures)
                if pixels is not None:  # whole slides: the substitute has its own size (batches of one)
                    buffer = torch.from_numpy(pixels[None]).pin_memory() if self.device.type == "cuda" \
                        else torch.from_numpy(pixels[None])
            quarantined = sum(1 for s in samples if s.substituted == "quarantined")
            if quarantined:
                self.metrics.samples_failed.labels(reason="quarantined").inc(quarantined)
        self.metrics.samples_decoded.inc(len(samples))
        return buffer, samples

    def _patch_tasks(self, samples: list[Sample], indices: list[int], array: np.ndarray, opened: dict[Path, Slide]
                     ) -> list[tuple[list[int], Callable[[], None]]]:
        """Level reads of plain patches as batch reads: the batch's share of the cores in contiguous parts, each
        part one task that reads all its slides at once (:func:`slides.read_patches_of` for the TIFF fast path,
        :meth:`Slide.read_patches` per slide and level for the others)."""
        parts = self._chunk_count(len(indices))
        inline = len(samples) > self.workers  # as _run_reads decides for one task per sample
        tasks: list[tuple[list[int], Callable[[], None]]] = []
        for k in range(parts):
            part = indices[len(indices) * k // parts:len(indices) * (k + 1) // parts]
            groups: dict[tuple[Path, int], list[int]] = {}
            for i in part:
                groups.setdefault((samples[i].record.path, samples[i].level), []).append(i)
            tasks.append((part, partial(self._read_patches, samples, list(groups.values()), array, opened, inline)))
        return tasks

    def _run_tasks(self, run: SampleRun, array: np.ndarray, opened: dict[Path, Slide]
                   ) -> list[tuple[list[int], Callable[[], None]]]:
        """:meth:`_patch_tasks` of every sample of a :class:`SampleRun`, its rows grouped by slide with arrays."""
        n = len(run)
        parts = self._chunk_count(n)
        inline = n > self.workers
        grouped = run.groups(parts)
        by_part: list[list[np.ndarray]] = [[] for _ in range(parts)]
        for g, part in enumerate(grouped.parts):
            by_part[part].append(grouped.rows(g))
        return [(list(range(n * k // parts, n * (k + 1) // parts)),
                 partial(self._read_patches, run, groups, array, opened, inline)) for k, groups in enumerate(by_part)]

    def _read_patches(self, samples: list[Sample], groups: list[list[int]] | list[np.ndarray], array: np.ndarray,
                      opened: dict[Path, Slide], inline: bool) -> None:
        """Patches of several slides and levels (one group of batch rows per slide and level) into their rows of
        the batch buffer, as one read where the slides allow."""
        fast: list[tuple[TiffSlide, int, np.ndarray, np.ndarray, np.ndarray]] = []
        run = samples if isinstance(samples, SampleRun) else None
        head = samples[int(groups[0][0])] if run is None else run
        width, height = head.width, head.height
        try:
            with DecodePool.inline() if inline else nullcontext():
                for rows in groups:
                    if run is not None:  # the slide's fields and the places as arrays: no Sample made
                        fields = run.fields[int(run.slide[rows[0]])]
                        record, level = fields["record"], fields["level"]
                        xs, ys = run.x[rows], run.y[rows]
                    else:
                        first = samples[int(rows[0])]
                        record, level = first.record, first.level
                        xs = np.fromiter((samples[i].x for i in rows), np.int64, len(rows))
                        ys = np.fromiter((samples[i].y for i in rows), np.int64, len(rows))
                    slide = opened.get(record.path)
                    if slide is None:
                        slide = opened[record.path] = self.handles.for_record(record)
                    if isinstance(slide, TiffSlide):
                        fast.append((slide, level, xs, ys, np.asarray(rows, np.int64)))
                    else:
                        slide.read_patches(level, xs, ys, width, height, array, np.asarray(rows, np.int64))
                if fast:
                    read_patches_of(fast, width, height, array)
        except SlideError as err:  # _which_failed reads the patches one by one to tell which fail
            failing = next((samples[int(rows[0])] for rows in groups
                            if os.fspath(samples[int(rows[0])].record.path) == err.path), samples[int(groups[0][0])])
            raise sample_failed(failing.record, err) from err

    def _chunk_count(self, tasks: int) -> int:
        """How many parts a batch's reads are spread over: its share of the cores among the batches read now."""
        return min(tasks, max(1, -(-self.workers // max(1, self._building))))

    def _run_reads(self, tasks: list[tuple[list[int], Callable[[], None]]]) -> list[tuple[list[int], SampleFailed]]:
        """Run the read tasks with one hand-off per chunk of the batch, not per sample or tile.

        The batches being read at once share the cores: this one takes ``workers / batches being read``
        contiguous chunks, the first read on this thread, the others on the read pool. With more reads than
        cores each read decodes its own tiles (the chunks and the other batches keep the cores busy);
        with fewer (a few large regions) the tiles of each read go to the decode pool. Returns the tasks
        that failed, in task order; any other error is raised once every chunk has finished."""
        if not tasks:
            return []
        n = self._chunk_count(len(tasks))
        inline = len(tasks) > self.workers
        bounds = [len(tasks) * k // n for k in range(n + 1)]
        chunks = [tasks[bounds[k]:bounds[k + 1]] for k in range(n)]
        futures = [self.read_pool.submit(_read_chunk, chunk, inline) for chunk in chunks[1:]]
        if futures:
            wake = self._wakeup()
            for future in futures:
                future.add_done_callback(lambda _f: wake.set())
        results: list[tuple[list[int], SampleFailed]] = []
        error: BaseException | None = None
        for outcome in [partial(_read_chunk, chunks[0], inline), *(partial(_after, f, wake) for f in futures)]:
            try:
                results.extend(outcome())
            except BaseException as err:  # noqa: BLE001 - raised once every chunk has ended
                error = error or err
        if error is not None:
            raise error
        return results

    def _wakeup(self) -> Wakeup:
        """This thread's Wakeup for the read chunks it waits for (one per thread, reused)."""
        wake = getattr(self._local, "wakeup", None)
        if wake is None:
            wake = self._local.wakeup = Wakeup()
        return wake

    def _count_building(self, step: int) -> None:
        with self._building_lock:
            self._building += step

    def _which_failed(self, samples: list[Sample], params: list[AugmentParams], array: np.ndarray, idx: list[int],
                      err: SampleFailed) -> dict[int, SampleFailed]:
        """The samples of one failed read task that fail on their own (a locality box may touch tiles none needs)."""
        if len(idx) == 1:
            return {idx[0]: err}
        failed: dict[int, SampleFailed] = {}
        for i in idx:
            try:
                self._read_sample(samples[i], params[i], array[i])
            except SampleFailed as one:
                failed[i] = one
        if err.reason == "read":  # the read did read the tile: count it so, not as already known
            mine = [i for i in sorted(failed) if failed[i].record.path == err.record.path]  # a task reads many slides
            same = [i for i in mine if failed[i].tile == err.tile] or mine[:1] or sorted(failed)[:1]
            for i in same[:1]:
                failed[i] = err
        return failed

    def _read_sample(self, sample: Sample, params: AugmentParams, out: np.ndarray) -> None:
        if params.resample_is_identity:
            self._read_one(sample, out)
        else:
            self._read_resampled(sample, params, out)

    def _substitute(self, sample: Sample, params: AugmentParams, out: np.ndarray, failure: SampleFailed,
                    failures: FailureBudget) -> tuple[Sample, np.ndarray | None]:
        """Count the failure, then read substitute draws until one reads (or fail, by policy or budget).

        Returns the substitute and, when its size differs from ``out`` (whole slides), its own pixels.
        """
        last = failure
        for _ in range(failures.max_attempts):
            failures.quarantine.failed(last)
            if failures.on_error == "fail":
                raise last
            candidate = failures.draw(sample, sample.attempt + 1, last.reason)
            pixels = out if (candidate.height, candidate.width) == out.shape[:2] else \
                np.empty((candidate.height, candidate.width, 3), np.uint8)
            try:
                self._read_sample(candidate, params, pixels)
            except SampleFailed as err:
                sample, last = candidate, err
                continue
            return replace(candidate, substituted=failure.reason), (None if pixels is out else pixels)
        raise SlideFailure(f"sample {sample.index}: {failures.max_attempts} substitutes in a row failed to read "
                           f"(last: {last}); too much of the dataset is unreadable, see the server log")

    def _read_context(self, samples: list[Sample], params: list[AugmentParams], array: np.ndarray,
                      scales: tuple[ContextScale, ...], by_mpp: bool, failures: FailureBudget | None
                      ) -> tuple[list[torch.Tensor], list[Sample]]:
        """The raw context patches (uint8 NHWC, one tensor per scale) and the samples they belong to. With
        ``failures``, a sample one of whose context patches fails to read is counted against its slide and
        replaced by its substitute draw, image (re-read into ``array``) and context alike."""
        samples = list(samples)
        for _ in range((failures.max_attempts if failures is not None else 0) + 1):
            try:
                return [self.read([context_sample(s, scale, by_mpp) for s in samples]) for scale in scales], samples
            except SampleFailed:
                if failures is None:
                    raise
            bad = self._context_failures(samples, scales, by_mpp)
            if not bad:
                raise SlideFailure("a context read failed, then read when retried one by one; see the server log")
            for i, failure in sorted(bad.items()):
                p = params[i] if params else AugmentParams()
                replacement, _ = self._substitute(samples[i], p, array[i], failure, failures)
                samples[i] = replacement if samples[i].substituted == "" else \
                    replace(replacement, substituted=samples[i].substituted)
        raise SlideFailure(f"{failures.max_attempts if failures else 0} substitutes in a row failed to read their "
                           "context patches; too much of the dataset is unreadable, see the server log")

    def _context_failures(self, samples: list[Sample], scales: tuple[ContextScale, ...], by_mpp: bool
                          ) -> dict[int, SampleFailed]:
        """The samples whose context patches fail to read, each with its first failure."""
        failed: dict[int, SampleFailed] = {}
        for i, sample in enumerate(samples):
            for scale in scales:
                ctx = context_sample(sample, scale, by_mpp)
                try:
                    self._read_one(ctx, np.empty((ctx.height, ctx.width, 3), np.uint8))
                except SampleFailed as err:
                    failed[i] = err
                    break
        return failed

    def _read_resampled(self, sample: Sample, params: AugmentParams, out: np.ndarray) -> None:
        whole = Rect(0, 0, sample.height, sample.width)
        out[...] = resample_rect(params, (sample.height, sample.width), whole,
                                 lambda rect: self._read_rect(sample, rect)).numpy()

    def _read_cut(self, samples: list[Sample], outs: list[np.ndarray]) -> None:
        """Patches of one region: read their bounding box once and cut them from it (pixels as read alone)."""
        x0, y0 = min(s.x for s in samples), min(s.y for s in samples)
        x1, y1 = max(s.x + s.width for s in samples), max(s.y + s.height for s in samples)
        if not (self._cuttable(samples[0]) and _box_pays(samples, (x0, y0, x1, y1))):
            for sample, out in zip(samples, outs):
                self._read_one(sample, out)
            return
        block = np.empty((y1 - y0, x1 - x0, 3), dtype=np.uint8)
        self._read_one(replace(samples[0], x=x0, y=y0, width=x1 - x0, height=y1 - y0), block)
        for sample, out in zip(samples, outs):
            out[...] = block[sample.y - y0:sample.y - y0 + sample.height, sample.x - x0:sample.x - x0 + sample.width]

    def _cuttable(self, sample: Sample) -> bool:
        """Whether a patch cut from a larger read equals the patch read alone (false when resampled to an mpp)."""
        if sample.record.info is None or sample.mpp <= 0 or sample.mpp == _level_mpp(sample):
            return True
        try:
            return self.handles.for_record(sample.record).level_for_mpp(sample.mpp)[1] == 1.0
        except (SlideError, ValueError):
            return False  # read one by one: each read reports the failure

    def _read_rect(self, sample: Sample, rect: Rect) -> np.ndarray:
        """``rect`` in the sample's region coordinates (may reach outside the region; white outside the slide)."""
        out = np.empty((rect.height, rect.width, 3), dtype=np.uint8)
        self._read_one(sample, out, rect)
        return out

    def build(self, samples: list[Sample], labels: list[int], augment: AugmentConfig | None, seed: int, epoch: int,
              output: OutputSpec, on_device: bool = False, failures: FailureBudget | None = None,
              stain: StainConfig | None = None, context: tuple[ContextScale, ...] = (),
              context_by_mpp: bool = False) -> BuiltBatch:
        """One batch of augmented images (stain-normalised first with ``stain``); on the service's device with
        ``on_device``, else on the CPU."""
        self._count_building(1)
        try:
            return self._build(samples, labels, augment, seed, epoch, output, on_device, failures, stain, context,
                               context_by_mpp)
        finally:
            self._count_building(-1)

    def _build(self, samples: list[Sample], labels: list[int], augment: AugmentConfig | None, seed: int, epoch: int,
               output: OutputSpec, on_device: bool, failures: FailureBudget | None, stain: StainConfig | None,
               context: tuple[ContextScale, ...], context_by_mpp: bool) -> BuiltBatch:
        t0 = time.perf_counter()
        if augment is None:
            params: list[AugmentParams] = []
        else:
            indices = samples.global_index if isinstance(samples, SampleRun) else [s.global_index for s in samples]
            params = draw_params_batch(augment, seed, epoch, indices)
        pixels, read = self.read_substituting(samples, params, failures)
        raw_context: list[torch.Tensor] = []
        if context:  # a sample whose context fails to read is substituted whole, as a failed image read is
            raw_context, read = self._read_context(read, params, pixels.numpy(), context, context_by_mpp, failures)
        if failures is not None and not isinstance(read, SampleRun):
            labels = [failures.label_of(s.record) if s.substituted else label for s, label in zip(read, labels)]
        samples = read
        t1 = time.perf_counter()
        batch = pixels.to(self.device, non_blocking=True)
        if stain is not None:
            batch = normalise_batch(batch, stain)
        if augment is not None:
            images = augment_batch(batch, params)  # uint8 NCHW
        elif output.dtype == "uint8" and not output.channels_last:
            images = to_nchw(batch)  # the one copy this batch needs, without torch's slow 3-channel transpose
        else:
            images = batch.permute(0, 3, 1, 2)  # to_output / channels_last make the copy (or none)
        images = to_output(images, output.dtype, output.mean or None, output.std or None)
        if output.channels_last:
            images = images.permute(0, 2, 3, 1)
        images = _placed(images, on_device)
        t2 = time.perf_counter()
        self.metrics.stage["read"].observe(t1 - t0)
        self.metrics.stage["augment"].observe(t2 - t1)
        built = BuiltBatch(images, torch.from_numpy(np.asarray(labels, np.int64)), samples,
                           {"read": t1 - t0, "augment": t2 - t1})
        if context:
            pending = iter(raw_context)  # read above, one tensor per scale in order
            built.context, built.context_samples = build_context(samples, params, context, context_by_mpp,
                                                                 lambda _ctx: next(pending), self.device, stain, output)
        return built


    def build_piece(self, samples: list[Sample], labels: list[int], augment: AugmentConfig | None, seed: int,
                    epoch: int, output: OutputSpec, piece: PieceSpec, on_device: bool = False,
                    failures: FailureBudget | None = None, stain: StainConfig | None = None,
                    context: tuple[ContextScale, ...] = (), context_by_mpp: bool = False) -> BuiltBatch:
        """One piece (tile or shard) of one sample's augmented image, reading only the raw pixels it needs.

        With ``stain`` the normalisation is fitted to the whole image, so the whole raw image is read, normalised
        and augmented as :meth:`build` does, and the piece cut from it: stitched pieces equal the image view.

        With ``context``, the sample's first piece in this stream (a tile of index 0, or the shard: the only
        piece of a shard stream) also carries the sample's whole context patches, one tensor per scale, built
        as :meth:`build` builds them; the sample's later tiles carry none.

        On the service's device with ``on_device``, else on the CPU. A failed read (image or context) is
        substituted only when the piece is the sample's only one in this stream (shard view): pieces already
        sent cannot be taken back, so otherwise the slide is quarantined at once and the session ends (its
        resume substitutes the sample).
        """
        sample = samples[0]
        t0 = time.perf_counter()
        params = draw_params(augment, seed, epoch, sample.global_index) if augment is not None else AugmentParams()
        with_context = bool(context) and (piece.index == 0 or piece.count == 1)

        def render(s: Sample) -> tuple[torch.Tensor, list[torch.Tensor]]:
            if stain is not None:
                chw = self._stained_piece(s, params, augment is not None, piece, stain)
            else:
                chw = render_piece(params, (s.height, s.width), piece.rect, lambda rect: self._read_rect(s, rect),
                                   self.device)
            raw = [self.read([context_sample(s, scale, context_by_mpp)]) for scale in context] if with_context else []
            return chw, raw

        try:
            chw, raw_context = render(sample)
        except SampleFailed as err:
            if failures is None:
                raise
            sample, (chw, raw_context) = self._substitute_piece(sample, piece, err, render, failures)
            samples, labels = [sample], [failures.label_of(sample.record)]
        if sample.substituted == "quarantined" and piece.index == 0:
            self.metrics.samples_failed.labels(reason="quarantined").inc()
        images = to_output(chw[None], output.dtype, output.mean or None, output.std or None)
        if output.channels_last:
            images = images.permute(0, 2, 3, 1)
        images = _placed(images, on_device)
        self.metrics.samples_decoded.inc(1 if piece.index == 0 else 0)
        self.metrics.stage["read"].observe(time.perf_counter() - t0)
        built = BuiltBatch(images, torch.tensor(labels, dtype=torch.int64), samples, piece=piece)
        if raw_context:
            pending = iter(raw_context)  # read with the piece, one tensor per scale in order
            built.context, built.context_samples = build_context(
                samples, [params] if augment is not None else [], context, context_by_mpp,
                lambda _ctx: next(pending), self.device, stain, output)
        return built

    def _stained_piece(self, sample: Sample, params: AugmentParams, augmented: bool, piece: PieceSpec,
                       stain: StainConfig) -> torch.Tensor:
        """``piece`` of the sample's whole image, stain-normalised then augmented exactly as in :meth:`build`."""
        pixels, _ = self.read_substituting([sample], [params], None)  # a failed read raises SampleFailed
        batch = normalise_batch(pixels.to(self.device, non_blocking=True), stain)
        image = augment_batch(batch, [params])[0] if augmented else batch[0].permute(2, 0, 1)
        rect = piece.rect
        return image[:, rect.y:rect.y1, rect.x:rect.x1].contiguous()

    def _substitute_piece(self, sample: Sample, piece: PieceSpec, failure: SampleFailed,
                          render: Callable[[Sample], _Rendered], failures: FailureBudget
                          ) -> tuple[Sample, _Rendered]:
        first = sample
        last = failure
        for _ in range(failures.max_attempts):
            failures.quarantine.failed(last)
            if failures.on_error == "fail":
                raise last
            if piece.count != 1:
                why = "its earlier pieces were sent" if piece.index else "its later pieces are cut from this sample"
                failures.quarantine.set_aside(first.record, f"failed in piece {piece.index} of {piece.count} "
                                              f"({why}): {failure.detail}")
                raise SlideFailure(f"sample {first.index} of slide {first.record.slide_id} failed in piece "
                                   f"{piece.index} of {piece.count} ({failure.detail}); {why}, "
                                   "so it cannot be replaced in this stream. The slide is now quarantined: resume "
                                   "from the last cursor and the sample is replaced")
            candidate = failures.draw(sample, sample.attempt + 1, last.reason)
            if (candidate.height, candidate.width) != (first.height, first.width):
                break  # whole slides differ in size: the piece's geometry no longer fits
            try:
                return replace(candidate, substituted=failure.reason), render(candidate)
            except SampleFailed as err:
                sample, last = candidate, err
        failures.quarantine.set_aside(first.record, failure.detail)
        raise SlideFailure(f"sample {first.index} of slide {first.record.slide_id} failed ({failure.detail}) and no "
                           "substitute of the same size could be read; the slide is now quarantined: resume from the "
                           "last cursor and the sample is replaced")


def _after(future: Future[T], wake: Wakeup) -> T:
    """The future's result, waiting on ``wake`` (set by its done-callback) rather than in ``future.result``."""
    while not future.done():
        wake.wait(_READ_WAIT_S)  # a read has no deadline of its own; the session's batch timeout covers it
    return future.result()


def _read_chunk(tasks: list[tuple[list[int], Callable[[], None]]], inline: bool
                ) -> list[tuple[list[int], SampleFailed]]:
    """Run read tasks one after the other; the failed ones with their errors. With ``inline`` (the batch is
    spread over several threads already) each read decodes its own tiles instead of handing them on."""
    failed: list[tuple[list[int], SampleFailed]] = []
    with DecodePool.inline() if inline else nullcontext():
        for idx, task in tasks:
            try:
                task()
            except SampleFailed as err:
                failed.append((idx, err))
    return failed


def _placed(images: torch.Tensor, on_device: bool) -> torch.Tensor:
    """The finished batch, contiguous: where it was built (the service's device) or copied to the CPU."""
    images = images.contiguous()
    return images if on_device else images.cpu()


def _read_upsampled(slide: Slide, f: float, x: int, y: int, w: int, h: int, out: np.ndarray) -> None:
    """The region in a grid ``1/f`` times finer than level 0 (f < 1): level 0 around it, bilinear upsampling."""
    box = (x * f, y * f, (x + w) * f, (y + h) * f)
    x0, y0 = math.floor(box[0]) - 1, math.floor(box[1]) - 1
    x1, y1 = math.ceil(box[2]) + 1, math.ceil(box[3]) + 1
    src = slide.read_region(0, x0, y0, x1 - x0, y1 - y0)
    resized = Image.fromarray(src).resize((w, h), Image.Resampling.BILINEAR,
                                          box=(box[0] - x0, box[1] - y0, box[2] - x0, box[3] - y0))
    np.copyto(out, np.asarray(resized))


def _any_resampled(params: list[AugmentParams] | None) -> bool:
    """Whether any sample's parameters rescale or shift its read (``_read_resampled``), from the table at once."""
    if not params:
        return False
    if isinstance(params, ParamsBatch):
        t = params.table
        return bool(((t[:, 14] != 1.0) | (t[:, 15] != 0.0) | (t[:, 16] != 0.0)).any())
    return any(p.scale != 1.0 or p.crop_shift != (0.0, 0.0) for p in params)


def _region_groups(samples: list[Sample]) -> list[list[int]]:
    """Indices of the samples grouped by locality region (slide, level, mpp, region), in first-seen order."""
    groups: dict[object, list[int]] = {}
    for i, s in enumerate(samples):
        key = (s.record.path, s.level, s.mpp, s.region) if s.region is not None else i
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def _box_pays(samples: list[Sample], box: tuple[int, int, int, int]) -> bool:
    """Reading ``box`` (x0, y0, x1, y1) once decodes no more tiles than reading the patches one by one looks up."""
    info = samples[0].record.info
    if info is None:
        return True
    level = info.levels[samples[0].level]
    tw, th = level.tile_width, level.tile_height

    def tiles(x0: int, y0: int, x1: int, y1: int) -> int:
        return ((x1 - 1) // tw - x0 // tw + 1) * ((y1 - 1) // th - y0 // th + 1)

    return tiles(*box) <= sum(tiles(s.x, s.y, s.x + s.width, s.y + s.height) for s in samples)


def _level_mpp(sample: Sample) -> float:
    info = sample.record.info
    assert info is not None
    return (info.mpp or 0.0) * info.levels[sample.level].downsample
