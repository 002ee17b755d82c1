"""An input image that arrives row band by row band, so that the streamed forward starts before it is whole.

The producer (for example a thread writing the service's tiles into the input tensor) calls
:meth:`RowFeed.mark` whenever the first ``rows`` rows are final; the first stage of a
:class:`~trainer_client.streaming.StreamingModule` waits, tile row by tile row, for the input rows its
next tile reads. Results are bit for bit those of the same forward on the finished image.
"""

from __future__ import annotations

import threading
import time

__all__ = ["RowFeed", "FeedStalledError"]


class FeedStalledError(TimeoutError):
    """The rows a tile needs did not arrive in time."""


class RowFeed:
    """How many leading rows of an input of ``height`` rows are final; waits have a timeout."""

    def __init__(self, height: int, timeout_s: float = 300.0) -> None:
        if height < 1:
            raise ValueError(f"height must be >= 1, got {height}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0 seconds, got {timeout_s}")
        self.height, self.timeout_s = height, timeout_s
        self._rows = 0
        self._error: BaseException | None = None
        self._cond = threading.Condition()

    @property
    def rows(self) -> int:
        """Leading rows that are final."""
        with self._cond:
            return self._rows

    def mark(self, rows: int) -> None:
        """Rows ``[0, rows)`` are final (never goes back)."""
        with self._cond:
            self._rows = max(self._rows, min(int(rows), self.height))
            self._cond.notify_all()

    def fail(self, error: BaseException) -> None:
        """The producer failed: waiting consumers raise ``RuntimeError`` from ``error``."""
        with self._cond:
            self._error = error
            self._cond.notify_all()

    def wait(self, rows: int) -> None:
        """Block until rows ``[0, rows)`` are final."""
        rows = min(rows, self.height)
        deadline = time.monotonic() + self.timeout_s
        with self._cond:
            while self._rows < rows and self._error is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise FeedStalledError(
                        f"input rows {self._rows}..{rows} of {self.height} did not arrive within {self.timeout_s:g} s: "
                        "the producer filling the image (the tile stream) stalled")
                self._cond.wait(remaining)
            if self._error is not None:
                raise RuntimeError("the producer filling the streamed input failed") from self._error
