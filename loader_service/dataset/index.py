"""Dataset index: every slide of a manifest opened once, described, and given a tissue mask.

Built once at start-up (in parallel; progress lines in the log, a progress bar on a terminal); a slide that
cannot be used (corrupt, unsupported, outside the data roots) is recorded with the reason, counted in metrics and left out
of sampling, and the service keeps serving the rest.
"""

from __future__ import annotations

import logging
import os
import stat
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from tqdm import tqdm

from loader_service.config import DatasetConfig
from loader_service.dataset.manifest import ManifestEntry, read_manifest
from loader_service.dataset.progress import IndexProgress
from loader_service.metrics import Metrics
from loader_service.slides import (BadTiles, DecodePool, Slide, SlideError, SlideInfo, SlideOpenError, TileCache,
                                   open_slide)
from loader_service.tissue import TissueMask, TissueMaskCache, compute_tissue_mask

__all__ = ["SlideRecord", "DatasetIndex", "SlideHandles", "SlideOutsideRoots", "client_text", "is_under_roots"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SlideRecord:
    entry: ManifestEntry
    path: Path  # resolved (symlinks followed)
    info: SlideInfo | None
    tissue: TissueMask | None
    error: str = ""
    roots: tuple[Path, ...] = ()  # the data roots every open of the slide is checked against (empty: none)

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


def client_text(text: str, record_path: Path, entry: ManifestEntry) -> str:
    """``text`` as a client may see it: the server's paths of the slide replaced by its dataset id."""
    for path in sorted({str(record_path), str(entry.path), os.path.realpath(entry.path)}, key=len, reverse=True):
        text = text.replace(path, entry.slide_id)
    return text


class SlideOutsideRoots(SlideOpenError):
    """The slide's path now resolves outside the data roots (it was replaced by a link): it is not opened."""


def _check_roots(path: Path, roots: tuple[Path, ...]) -> None:
    if roots and not is_under_roots(path, roots):
        raise SlideOutsideRoots(path, "the path now resolves outside the data roots (replaced by a link?)",
                                "put the slide back inside the data roots; it stays quarantined until restart")


class SlideHandles:
    """Open slides shared by every session: an LRU bounded in count, so file handles stay bounded.

    Every open with ``roots`` checks that the path resolves inside them, before opening and again after (a
    slide swapped for a link after indexing is refused with :class:`SlideOutsideRoots`). A ``get`` served from
    the open handles costs one ``lstat``: when the path has become a link or names another file since it was
    opened, the handle is dropped and the path opened (and checked) again. Damaged tiles found by any read are
    remembered in ``bad_tiles``.
    """

    def __init__(self, capacity: int, cache: TileCache | None, pool: DecodePool | None,
                 bad_tiles: BadTiles | None = None) -> None:
        self._capacity = capacity
        self._cache = cache
        self._pool = pool
        self.bad_tiles = bad_tiles if bad_tiles is not None else BadTiles()
        self._open: OrderedDict[Path, tuple[Slide, tuple[int, int]]] = OrderedDict()  # slide, (st_dev, st_ino)
        self._lock = threading.Lock()

    def for_record(self, record: SlideRecord) -> Slide:
        """The open slide of ``record``: checked against its data roots, with the manifest's mpp if it has one."""
        return self.get(record.path, record.roots, record.entry.mpp)

    def get(self, path: Path, roots: tuple[Path, ...] = (), mpp: float | None = None) -> Slide:
        with self._lock:
            entry = self._open.get(path)
            if entry is not None:
                self._open.move_to_end(path)
        if entry is not None:
            slide, file_id = entry
            if not roots or _still_the_file(path, file_id):  # one lstat: the path still names the opened file
                return slide
            self._drop(path)
        _check_roots(path, roots)
        slide = open_slide(path, cache=self._cache, pool=self._pool, bad_tiles=self.bad_tiles)
        try:
            _check_roots(path, roots)  # swapped between the check and the open
            file_id = _file_id(os.stat(path))
        except (SlideOutsideRoots, OSError) as err:
            slide.close()
            if isinstance(err, SlideOutsideRoots):
                raise
            raise SlideOpenError(path, f"the file changed while it was opened: {err}") from err
        if mpp is not None:
            slide.info = replace(slide.info, mpp_x=mpp, mpp_y=mpp)
        with self._lock:
            existing = self._open.get(path)
            if existing is not None:  # another thread opened it meanwhile
                slide.close()
                return existing[0]
            self._open[path] = (slide, file_id)
            while len(self._open) > self._capacity:
                # Closing only drops our reference; readers holding the object finish their read first
                # because Slide.close() is safe to call while no read is running on *our* side.
                _, (old, _) = self._open.popitem(last=False)
                old.close()
            return slide

    def _drop(self, path: Path) -> None:
        with self._lock:
            entry = self._open.pop(path, None)
        if entry is not None:
            entry[0].close()

    def close(self) -> None:
        with self._lock:
            for slide, _ in self._open.values():
                slide.close()
            self._open.clear()


def _file_id(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def _still_the_file(path: Path, file_id: tuple[int, int]) -> bool:
    """The path is not a link now and names the same file (a swapped file or parent folder changes the inode)."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return not stat.S_ISLNK(st.st_mode) and _file_id(st) == file_id


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
    """One slide's record. Errors name the slide by its id, never by the server's path (clients see them)."""
    if not is_under_roots(entry.path, roots):
        metrics.slides_failed.labels(reason="outside_roots").inc()
        log.warning("slide %s: %s is outside the data roots (%s)", entry.slide_id, entry.path,
                    ", ".join(str(r) for r in roots))
        return SlideRecord(entry, entry.path, None, None, "the slide's path is outside the data roots",
                           roots)
    path = Path(os.path.realpath(entry.path))
    try:
        with open_slide(path) as slide:
            if entry.mpp is not None:
                slide.info = replace(slide.info, mpp_x=entry.mpp, mpp_y=entry.mpp)
            info = slide.info
            if tissue_cache is not None:
                mask = tissue_cache.get(slide, max_size=tissue_max_size)
            else:
                mask = compute_tissue_mask(slide, max_size=tissue_max_size)
    except SlideError as err:
        metrics.slides_failed.labels(reason="unreadable").inc()
        log.warning("slide %s: %s", entry.slide_id, err)
        text = f"{err.reason} ({err.hint})" if err.hint else err.reason
        return SlideRecord(entry, path, None, None, client_text(text, path, entry), roots)
    except Exception as err:  # noqa: BLE001 - any failure of one slide must not stop the index
        metrics.slides_failed.labels(reason="unreadable").inc()
        log.warning("slide %s (%s) failed to index", entry.slide_id, path, exc_info=True)
        return SlideRecord(entry, path, None, None, f"unreadable: {type(err).__name__}", roots)
    metrics.slides_opened.inc()
    if mask.tissue_fraction <= 0.0:
        metrics.slides_failed.labels(reason="no_tissue").inc()
        return SlideRecord(entry, path, info, mask, "no tissue found (tissue fraction 0)", roots)
    return SlideRecord(entry, path, info, mask, "", roots)
