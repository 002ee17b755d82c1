"""Telling the shared tile cache which tiles a session's next batches will read (clairvoyant caching).

Every sample is a pure function of (seed, epoch, index), so a session knows the patches of its next batches
long before it reads them. A random 256² patch touches ~4 tiles; when the slides hold more decoded tiles than
the cache, plain LRU keeps an arbitrary capacity/size share of them and most of a patch's tiles are decoded
again. With a forecast the cache keeps the tiles that are about to be read instead (``TileCache.expect``):
on a slide 1.6x the cache, 1.26 -> 0.72 tile decodes per patch (docs/benchmarks.md, "Batch reads and
announced reads").

How far ahead: chunk after chunk of up to 4 batches while the distinct announced tiles fit in ``share`` of the
cache (a window that holds more than the cache only makes the cache evict tiles that are also wanted) and at most
``max_batches`` ahead, one chunk per batch built (so the first batch is not delayed by drawing the whole
window). A chunk's tiles are worked out and announced in one call per slide, and withdrawn together once its
last batch is built (read, failed or substituted alike): the forecast's Python cost is per slide and call, not
per batch. Sessions share the room evenly: with n sessions forecasting at once (the ranks of a job on one
node), each announces at most 1/n of it (counted per chunk, so a tile announced by two chunks counts twice),
so that none of them takes the cache and leaves the others' tiles unstored. Everything is withdrawn when the
session ends. Only plain level reads are announced (patches with no locality region, read at a level's own
pixels from the TIFF fast path); the others read as before. Announcements are hints: a wrong or
missing one costs cache hits, never pixels.
"""

from __future__ import annotations

import logging
import threading
import weakref
from pathlib import Path

import numpy as np

from loader_service.dataset import SlideHandles, SlideRecord
from loader_service.sampling import EpochPlan, Sample, SampleRun, group_by_slide, reads_by_mpp
from loader_service.slides import TileCache

__all__ = ["TileForecast"]

log = logging.getLogger(__name__)

_Announced = list[tuple[np.ndarray, int]]  # (int64 keys, decoded bytes of one of their tiles) per slide and level


#: batches announced at most per call of ahead() (one call per batch built): the window grows by a few batches
#: per batch instead of being drawn all at once before the first batch, which would delay it
_BATCHES_PER_CALL = 4
_forecasting: weakref.WeakKeyDictionary[TileCache, int] = weakref.WeakKeyDictionary()  # cache -> sessions forecasting
_forecasting_lock = threading.Lock()


class _Chunk:
    """The tiles announced for a few consecutive batches, withdrawn once all of them are built."""

    def __init__(self, announced: _Announced, batches: int) -> None:
        self.announced = announced
        self.left = batches  # batches of the chunk not built yet
        self.nbytes = sum(len(keys) * nbytes for keys, nbytes in announced)

    def withdraw(self, cache: TileCache) -> None:
        for keys, nbytes in self.announced:
            cache.expected_done(keys, nbytes)


class TileForecast:
    """The announced tiles of one session's coming batches. Thread-safe: :meth:`ahead` runs on the session's
    thread, :meth:`done` on the batch threads."""

    def __init__(self, plan: EpochPlan, handles: SlideHandles, cache: TileCache, batch_size: int, *,
                 max_batches: int = 64, share: float = 0.9) -> None:
        if max_batches < 1:
            raise ValueError(f"max_batches must be >= 1, got {max_batches}")
        if not 0.0 < share <= 1.0:
            raise ValueError(f"share must be in (0, 1], got {share}")
        self._plan, self._handles, self._cache = plan, handles, cache
        self._batch_size, self._max_batches = batch_size, max_batches
        self._room = int(share * cache.capacity)
        self._next = 0  # shard index of the first sample not announced yet
        self._announced: dict[int, _Chunk] = {}  # batch start -> the chunk announced with it
        self._bytes = 0  # decoded bytes announced by this session (a tile once per chunk that reads it)
        self._per_batch = 0  # bytes the last chunk announced per batch: what the next one's batches will add
        self._lock = threading.Lock()
        self._closed = False
        with _forecasting_lock:
            _forecasting[cache] = _forecasting.get(cache, 0) + 1

    def ahead(self, start: int) -> None:
        """The batch starting at shard index ``start`` is next: announce it and the ones after it while the cache
        has room (batches before ``start`` that were never announced are not announced any more).

        Up to :data:`_BATCHES_PER_CALL` batches are announced together, as one chunk: their tiles are worked out
        and announced in one call per slide, and withdrawn together once the last of them is built. The Python
        cost of a forecast is per slide and call, so chunks make it a quarter of what it is batch by batch."""
        with self._lock:
            if self._closed:
                return
            self._next = max(self._next, start)
            stop = self._plan.shard_length
            sessions = _forecasting.get(self._cache, 1)
            starts: list[int] = []
            drawn: list[list[Sample]] = []  # each batch's samples
            for _ in range(_BATCHES_PER_CALL):
                pending = len(starts) * self._per_batch  # the chunk's bytes, estimated from the last one
                if not (self._next < stop and len(self._announced) + len(starts) < self._max_batches
                        and self._cache.expected_bytes + pending < self._room
                        and (sessions == 1 or self._bytes + pending < self._room // sessions)):
                    break
                count = min(self._batch_size, stop - self._next)
                try:
                    drawn.append(self._plan.samples_ahead(self._next, self._next + count))
                except Exception as err:  # noqa: BLE001 - the batch's own draw reports it; stop forecasting
                    log.debug("forecast stopped at shard index %d: %s", self._next, err)
                    self._next = stop
                    break
                starts.append(self._next)
                self._next += count
            if not starts:
                return
            chunk = _Chunk(self._announce(drawn), len(starts))
            self._per_batch = chunk.nbytes // len(starts)
            self._bytes += chunk.nbytes
            for batch in starts:
                self._announced[batch] = chunk

    def done(self, start: int) -> None:
        """The batch starting at ``start`` was built (or failed): withdraw its chunk's reads once it is the last."""
        with self._lock:
            chunk = self._announced.pop(start, None)
            if chunk is None:
                return
            chunk.left -= 1
            if chunk.left:
                return
            self._bytes -= chunk.nbytes
        chunk.withdraw(self._cache)

    def close(self) -> None:
        """Withdraw everything still announced; later calls do nothing."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            announced, self._announced = self._announced, {}
            self._bytes = 0
        with _forecasting_lock:
            left = _forecasting.get(self._cache, 1) - 1
            if left > 0:
                _forecasting[self._cache] = left
            else:
                _forecasting.pop(self._cache, None)
        for chunk in {id(c): c for c in announced.values()}.values():
            chunk.withdraw(self._cache)

    @property
    def batches_ahead(self) -> int:
        """Batches announced and not built yet."""
        with self._lock:
            return len(self._announced)

    def _announce(self, batches: list[list[Sample]]) -> _Announced:
        announced: _Announced = []
        for record, level, width, height, xs, ys in _level_reads(batches):
            try:
                slide = self._handles.for_record(record)
                tile_keys = getattr(slide, "tile_keys", None)
                if tile_keys is None:  # not the TIFF fast path: its reads are not batched either
                    continue
                keys, nbytes = tile_keys(level, xs, ys, width, height)
            except Exception as err:  # noqa: BLE001 - a hint only: the read itself reports the failure
                log.debug("no forecast for %s: %s", record.slide_id, err)
                continue
            self._cache.expect(keys, nbytes)
            announced.append((keys, nbytes))
        return announced


def _level_reads(batches: list[list[Sample]]) -> list[tuple[SlideRecord, int, int, int, np.ndarray, np.ndarray]]:
    """The plain level reads of the batches' samples, per slide, level and size: ``(record, level, width,
    height, xs, ys)``. Grouped with arrays when every batch is a :class:`SampleRun`, sample by sample otherwise."""
    if batches and all(isinstance(b, SampleRun) for b in batches):
        runs: list[SampleRun] = batches  # type: ignore[assignment]
        slide = np.concatenate([r.slide for r in runs])
        xs, ys = np.concatenate([r.x for r in runs]), np.concatenate([r.y for r in runs])
        fields = {k: v for r in runs for k, v in r.fields.items()}
        grouped = group_by_slide(slide)
        out = []
        for g, s in enumerate(grouped.slides):
            rows = grouped.rows(g)
            out.append((fields[s]["record"], fields[s]["level"], runs[0].width, runs[0].height, xs[rows], ys[rows]))
        return out
    groups: dict[tuple[Path, int, int, int], tuple[SlideRecord, list[int], list[int]]] = {}
    for batch in batches:
        for s in batch:
            if s.region is None and not reads_by_mpp(s):
                _, gx, gy = groups.setdefault((s.record.path, s.level, s.width, s.height), (s.record, [], []))
                gx.append(s.x)
                gy.append(s.y)
    return [(record, level, width, height, np.asarray(gx, np.int64), np.asarray(gy, np.int64))
            for (_, level, width, height), (record, gx, gy) in groups.items()]
