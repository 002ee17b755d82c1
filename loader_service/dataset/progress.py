"""Progress of indexing a dataset, as periodic log lines (slides done, rate, ETA) that `kubectl logs` shows.

A progress bar (tqdm) only draws on a terminal; a container's log is not one. This reporter writes one
line at most every ``interval_s`` seconds as slides finish, and a last line when the dataset is done. It
also calls ``on_update(done, total)`` on every slide, for the health reason and the metrics.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

__all__ = ["IndexProgress", "format_eta"]

log = logging.getLogger("loader_service.dataset.index")


def format_eta(seconds: float) -> str:
    """'42 s', '3 min 05 s', '2 h 04 min': short and readable in a log line."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class IndexProgress:
    """Counts finished slides of one dataset; logs rate and ETA every ``interval_s`` seconds."""

    def __init__(self, dataset: str, total: int, interval_s: float,
                 on_update: Callable[[int, int], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if interval_s <= 0:
            raise ValueError(f"progress interval must be > 0 seconds, got {interval_s}")
        self.dataset = dataset
        self.total = total
        self.done = 0
        self._interval = interval_s
        self._on_update = on_update
        self._clock = clock
        self._start = clock()
        self._last_line = self._start
        self._lock = threading.Lock()
        log.info("indexing %s: %d slides", dataset, total)
        if on_update is not None:
            on_update(0, total)

    def line(self) -> str:
        elapsed = max(self._clock() - self._start, 1e-9)
        rate = self.done / elapsed
        text = f"indexing {self.dataset}: {self.done}/{self.total} slides"
        if self.total:
            text += f" ({100 * self.done / self.total:.0f}%)"
        text += f", {rate:.2f} slides/s"
        if self.done < self.total and rate > 0:
            text += f", ETA {format_eta((self.total - self.done) / rate)}"
        return text

    def advance(self, n: int = 1) -> None:
        with self._lock:
            self.done += n
            now = self._clock()
            due = now - self._last_line >= self._interval and self.done < self.total
            if due:
                self._last_line = now
            done, text = self.done, self.line() if due else ""
        if text:
            log.info("%s", text)
        if self._on_update is not None:
            self._on_update(done, self.total)

    def finish(self) -> None:
        elapsed = self._clock() - self._start
        log.info("indexed %s: %d slides in %s", self.dataset, self.done, format_eta(elapsed))
