"""Failure budgets: a sample that cannot be read is replaced, a slide that keeps failing is set aside.

A failure is a fact about one sample or one slide, never the end of a session (DESIGN.md). With the
``skip`` policy a sample whose read fails is replaced by the next draw of its own ``(seed, epoch, index)``
stream (:meth:`EpochPlan.substitute`), so the batch stays full and the epoch reproducible. Every failed
sample is counted against its slide; after ``quarantine_after`` of them (at once when the slide now lies
outside the data roots) the slide is quarantined for the life of the service: sessions opened afterwards
never read it. Damaged tiles are remembered by the slide layer (:class:`~loader_service.slides.BadTiles`),
so no read touches them twice.

Determinism: within a session the samples a batch holds depend only on ``(seed, epoch, index)``, on which
tiles are damaged, and on the quarantine as it stood when the session opened (a snapshot: slides
quarantined mid-session keep being sampled by it, their damaged tiles failing without being read), never on
thread timing.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from loader_service.dataset import SlideOutsideRoots, SlideRecord
from loader_service.dataset.index import client_text
from loader_service.errors import SlideFailure
from loader_service.metrics import Metrics
from loader_service.sampling import Sample
from loader_service.slides import SlideError, SlideReadError

__all__ = ["ON_ERROR", "FAILURE_REASONS", "SampleFailed", "Quarantine", "FailureBudget", "failure_reason"]

log = logging.getLogger(__name__)

ON_ERROR = ("skip", "fail")
#: reasons of wsi_loader_samples_failed_total: read = the read or decode failed; known_bad_tile = it needs a
#: tile an earlier read found damaged (not read again); outside_roots = the slide now resolves outside the data
#: roots; quarantined = its slide is quarantined (not read)
FAILURE_REASONS = ("read", "known_bad_tile", "outside_roots", "quarantined")


class SampleFailed(SlideFailure):
    """One sample could not be read. ``reason`` is one of :data:`FAILURE_REASONS`; the text names the slide by id."""

    def __init__(self, record: SlideRecord, reason: str, detail: str, tile: str = "") -> None:
        super().__init__(f"slide {record.slide_id}: {detail}")
        self.record, self.reason, self.detail, self.tile = record, reason, detail, tile


def failure_reason(err: SlideError) -> str:
    if isinstance(err, SlideOutsideRoots):
        return "outside_roots"
    if isinstance(err, SlideReadError) and err.known:
        return "known_bad_tile"
    return "read"


def sample_failed(record: SlideRecord, err: SlideError) -> SampleFailed:
    """The failure of a read of ``record``, in words a client may see (no server paths)."""
    tile = ""
    if isinstance(err, SlideReadError) and err.tile is not None:
        tile = f"tile {err.tile} of level {err.level}"
    return SampleFailed(record, failure_reason(err), client_text(err.reason, record.path, record.entry), tile)


class Quarantine:
    """Failed samples per slide and the slides set aside, for the life of the service. Thread-safe."""

    def __init__(self, after: int, metrics: Metrics) -> None:
        if after < 1:
            raise ValueError(f"quarantine_after must be >= 1 failed samples, got {after}")
        self.after = after
        self._metrics = metrics
        self._failures: dict[Path, int] = {}
        self._quarantined: dict[Path, str] = {}  # path -> why (for logs and SessionOpened.skipped_slides)
        self._lock = threading.Lock()

    def snapshot(self) -> dict[Path, str]:
        """The quarantined slides now (what a session opening now leaves out)."""
        with self._lock:
            return dict(self._quarantined)

    def __contains__(self, path: object) -> bool:
        with self._lock:
            return path in self._quarantined

    def set_aside(self, record: SlideRecord, why: str) -> None:
        """Quarantine ``record`` now, whatever its count (a failure that cannot be substituted)."""
        with self._lock:
            if record.path in self._quarantined:
                return
            self._quarantined[record.path] = f"quarantined: {why}"
        self._metrics.slides_quarantined.inc()
        log.error("slide %s quarantined for the life of the service: %s", record.slide_id, why)

    def failed(self, failure: SampleFailed) -> None:
        """Count one failed sample: metrics, a log line naming slide and tile, quarantine past the budget."""
        record = failure.record
        self._metrics.samples_failed.labels(reason=failure.reason).inc()
        if failure.reason == "quarantined":
            return
        where = f" ({failure.tile})" if failure.tile else ""
        with self._lock:
            if record.path in self._quarantined:
                return
            count = self._failures.get(record.path, 0) + 1
            self._failures[record.path] = count
            now = count >= self.after or failure.reason == "outside_roots"
            if now:
                self._quarantined[record.path] = f"quarantined after {count} failed samples: {failure.detail}"
        log.log(logging.DEBUG if failure.reason == "known_bad_tile" else logging.WARNING,
                "slide %s: sample failed%s: %s [%s]", record.slide_id, where, failure.detail, failure.reason)
        if now:
            self._metrics.slides_quarantined.inc()
            log.error("slide %s quarantined for the life of the service after %d failed samples (last%s: %s)",
                      record.slide_id, count, where, failure.detail)


@dataclass(frozen=True)
class FailureBudget:
    """A session's failure policy, given to the batch builder.

    ``draw(sample, attempt, reason)`` is the plan's first substitute draw for a sample from ``attempt`` on, on
    a slide not quarantined when the session opened (:meth:`EpochPlan.substitute`); ``label_of`` the label
    index of a slide.
    """

    on_error: str
    quarantine: Quarantine
    draw: Callable[[Sample, int, str], Sample]
    label_of: Callable[[SlideRecord], int]
    max_attempts: int = 32

    def __post_init__(self) -> None:
        if self.on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {self.on_error!r}")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
