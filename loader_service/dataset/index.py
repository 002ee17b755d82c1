"""Dataset index: every slide of a manifest opened once, described, and given a tissue mask.

Built once at start-up (in parallel; progress lines in the log, a progress bar on a terminal); a slide that
cannot be used (corrupt, unsupported, outside the data roots) is recorded with the reason, counted in metrics and left out
of sampling, and the service keeps serving the rest.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from loader_service.config import DatasetConfig
from loader_service.dataset.manifest import ManifestEntry, read_manifest
from loader_service.dataset.progress import IndexProgress
from loader_service.metrics import Metrics
from loader_service.slides import DecodePool, Slide, SlideError, SlideInfo, TileCache, open_slide
from loader_service.tissue import TissueMask, TissueMaskCache, compute_tissue_mask

__all__ = ["SlideRecord", "DatasetIndex", "SlideHandles", "is_under_roots"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SlideRecord:
    entry: ManifestEntry
    path: Path  # resolved (symlinks followed)
    info: SlideInfo | None
    tissue: TissueMask | None
    error: str = ""

    @property
    def usable(self) -> bool:
        return not self.error

    @property
    def slide_id(self) -> str:
        return self.entry.slide_id


def is_under_roots(path: Path, roots: tuple[Path, ...]) -> bool:
    """True when the fully resolved path lies inside one of the resolved roots."""
    real = Path(os.path.realpath(path))
    return any(real.is_relative_to(Path(os.path.realpath(root))) for root in roots)


class SlideHandles:
    """Open slides shared by every session: an LRU bounded in count, so file handles stay bounded."""

    def __init__(self, capacity: int, cache: TileCache | None, pool: DecodePool | None) -> None:
        self._capacity = capacity
        self._cache = cache
        self._pool = pool
        self._open: OrderedDict[Path, Slide] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, path: Path) -> Slide:
        with self._lock:
            slide = self._open.get(path)
            if slide is not None:
                self._open.move_to_end(path)
                return slide
        slide = open_slide(path, cache=self._cache, pool=self._pool)
        with self._lock:
            existing = self._open.get(path)
            if existing is not None:  # another thread opened it meanwhile
                slide.close()
                return existing
            self._open[path] = slide
            while len(self._open) > self._capacity:
                # Closing only drops our reference; readers holding the object finish their read first
                # because Slide.close() is safe to call while no read is running on *our* side.
                _, old = self._open.popitem(last=False)
                old.close()
            return slide

    def close(self) -> None:
        with self._lock:
            for slide in self._open.values():
                slide.close()
            self._open.clear()


class DatasetIndex:
    """The slides of one dataset, with their info, tissue masks and label vocabulary."""

    def __init__(self, name: str, records: list[SlideRecord]) -> None:
        self.name = name
        self.records = records
        self.by_id = {r.slide_id: r for r in records}
        self.labels = sorted({r.entry.label for r in records})
        self.label_index = {label: i for i, label in enumerate(self.labels)}

    @property
    def usable(self) -> list[SlideRecord]:
        return [r for r in self.records if r.usable]

    @classmethod
    def build(
        cls,
        config: DatasetConfig,
        roots: tuple[Path, ...],
        *,
        metrics: Metrics,
        tissue_cache: TissueMaskCache | None,
        tissue_max_size: int,
        workers: int,
        progress: bool | None = None,
        progress_interval_s: float = 10.0,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> DatasetIndex:
        """Index every slide of the manifest; ``on_progress(done, total)`` is called as slides finish."""
        entries = read_manifest(config.manifest)
        roots = roots or (config.manifest.resolve().parent,)
        show = sys.stderr.isatty() if progress is None else progress
        reporter = IndexProgress(config.name, len(entries), progress_interval_s, on_progress)

        def index_one(entry: ManifestEntry) -> SlideRecord:
            record = _index_slide(entry, roots, metrics, tissue_cache, tissue_max_size)
            reporter.advance()
            return record

        with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="index") as pool:
            records = list(
                tqdm(pool.map(index_one, entries), total=len(entries), desc=f"indexing {config.name}",
                     unit="slide", disable=not show, file=sys.stderr)
            )
        reporter.finish()
        failed = [r for r in records if not r.usable]
        for record in failed:
            log.warning("dataset %s: slide %s left out: %s", config.name, record.slide_id, record.error)
        log.info("dataset %s: %d slides usable, %d left out", config.name, len(records) - len(failed), len(failed))
        return cls(config.name, records)


def _index_slide(
    entry: ManifestEntry,
    roots: tuple[Path, ...],
    metrics: Metrics,
    tissue_cache: TissueMaskCache | None,
    tissue_max_size: int,
) -> SlideRecord:
    if not is_under_roots(entry.path, roots):
        metrics.slides_failed.labels(reason="outside_roots").inc()
        roots_text = ", ".join(str(r) for r in roots)
        return SlideRecord(entry, entry.path, None, None, f"{entry.path} is outside the data roots ({roots_text})")
    path = Path(os.path.realpath(entry.path))
    try:
        with open_slide(path) as slide:
            info = slide.info
            if tissue_cache is not None:
                mask = tissue_cache.get(slide, max_size=tissue_max_size)
            else:
                mask = compute_tissue_mask(slide, max_size=tissue_max_size)
    except SlideError as err:
        metrics.slides_failed.labels(reason="unreadable").inc()
        return SlideRecord(entry, path, None, None, str(err))
    except Exception as err:  # noqa: BLE001 - any failure of one slide must not stop the index
        metrics.slides_failed.labels(reason="unreadable").inc()
        return SlideRecord(entry, path, None, None, f"{path}: {type(err).__name__}: {err}")
    metrics.slides_opened.inc()
    if mask.tissue_fraction <= 0.0:
        metrics.slides_failed.labels(reason="no_tissue").inc()
        return SlideRecord(entry, path, info, mask, f"{path}: no tissue found (tissue fraction 0)")
    return SlideRecord(entry, path, info, mask)
