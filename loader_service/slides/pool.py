"""A thread pool for tile decoding.

The codecs used (libjpeg-turbo through imagecodecs/PIL, OpenJPEG, zlib/libdeflate, LZW) release
the GIL while decoding and ``os.pread`` releases it while reading, so threads scale with cores.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from types import TracebackType
from typing import TypeVar

from .batched import BatchedJpegDecoder, JpegBackendChoice, JpegBackendSelector
from .codecs import TileDecoder

__all__ = ["DecodePool", "available_cores"]

T = TypeVar("T")

_local = threading.local()


def available_cores() -> int:
    """Cores this process may run on (``os.sched_getaffinity`` where available)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def _mark_worker() -> None:
    _local.in_decode_pool = True


class DecodePool:
    """A fixed-size pool of decode threads, sized to the cores given (default: all available).

    Safe to share between slides and threads. Work submitted from inside one of the pool's own
    threads runs inline (see :meth:`run_all`) so nested use cannot deadlock.

    ``jpeg_backend`` (see ``batched.JPEG_BACKENDS``) says how full-resolution JPEG tiles are
    decoded: 'cpu' (default) per tile on these threads; 'nvjpeg' batched per region read on the
    GPU (``jpeg_device``: 'cuda', 'cuda:N', or the service's 'auto'/'cpu' device setting);
    'auto' nvjpeg when a CUDA device is there and it measures faster on the first JPEG slide
    opened with this pool (else 'cpu'); 'batched-cpu' the batched code on the CPU.
    """

    def __init__(self, threads: int | None = None, *, jpeg_backend: str = "cpu", jpeg_device: str = "auto") -> None:
        if threads is None:
            threads = available_cores()
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.threads = int(threads)
        self._jpeg = JpegBackendSelector(jpeg_backend, jpeg_device, self.threads)
        self._executor = ThreadPoolExecutor(
            max_workers=self.threads, thread_name_prefix="tile-decode", initializer=_mark_worker
        )
        self._closed = False

    @staticmethod
    def in_worker() -> bool:
        """True when called from a decode-pool thread (of any pool)."""
        return bool(getattr(_local, "in_decode_pool", False))

    @staticmethod
    @contextmanager
    def inline() -> Iterator[None]:
        """Within this block, this thread's reads decode their tiles themselves (as inside a pool thread):
        for callers that already spread their work over threads, e.g. a batch split into one chunk of
        samples per read thread, where handing each patch's 2-4 tiles to the pool costs more GIL-held
        time than it saves."""
        before = getattr(_local, "in_decode_pool", False)
        _local.in_decode_pool = True
        try:
            yield
        finally:
            _local.in_decode_pool = before

    @property
    def jpeg_choice(self) -> JpegBackendChoice | None:
        """How JPEG tiles are decoded (with the measured rates for 'auto'); None until 'auto' on a
        CUDA machine has seen its first JPEG slide."""
        return self._jpeg.choice

    @property
    def batched_jpeg(self) -> BatchedJpegDecoder | None:
        """The batched JPEG decoder in use, or None for per-tile decode on the pool."""
        return self._jpeg.batched

    def choose_jpeg_backend(self, decoder: TileDecoder, tiles: list[bytes]) -> JpegBackendChoice:
        """Resolve ``jpeg_backend='auto'`` by timing both backends on these raw tiles (once)."""
        return self._jpeg.probe(decoder, tiles)

    def submit(self, fn: Callable[..., T], /, *args: object) -> Future[T]:
        if self._closed:
            raise RuntimeError("DecodePool is closed")
        return self._executor.submit(fn, *args)

    def run_all(self, tasks: Iterable[Callable[[], T]]) -> list[T]:
        """Run the callables in parallel on the pool and return their results in order.

        A single task, or any call made from inside a pool thread, runs inline in the calling
        thread (no hand-off, no nested-pool deadlock). Every task is waited for; then the first
        exception, if any, is raised.
        """
        tasks = list(tasks)
        if len(tasks) <= 1 or self.in_worker():
            return [t() for t in tasks]
        futures = [self.submit(t) for t in tasks]
        results: list[T] = []
        first_error: BaseException | None = None
        for f in futures:
            try:
                results.append(f.result())
            except BaseException as err:  # noqa: BLE001 - re-raised after all tasks finished
                if first_error is None:
                    first_error = err
        if first_error is not None:
            raise first_error
        return results

    def map(self, fn: Callable[..., T], *iterables: Iterable[object]) -> list[T]:
        """``list(executor.map(fn, ...))`` on the pool (inline inside a pool thread)."""
        if self.in_worker():
            return [fn(*args) for args in zip(*iterables)]
        if self._closed:
            raise RuntimeError("DecodePool is closed")
        return list(self._executor.map(fn, *iterables))

    def close(self) -> None:
        """Wait for running work and stop the threads. Idempotent."""
        if not self._closed:
            self._closed = True
            self._executor.shutdown(wait=True)

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        choice = self._jpeg.choice
        jpeg = "auto (pending)" if choice is None else choice.backend
        return f"DecodePool(threads={self.threads}, jpeg={jpeg}{', closed' if self._closed else ''})"
