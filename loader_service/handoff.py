"""Hand-offs between the service's threads that do not stall the GIL.

Waking a thread through ``threading`` (a ``Condition.notify``, ``Future.set_result`` with a waiter,
``queue.put``) releases a lock while the waker holds the GIL. When every core is busy, the kernel often
preempts the waker right there in favour of the woken thread, which then cannot run either: it needs the
GIL the descheduled waker holds. ``py-spy record --gil`` shows this as the largest single entry of the
service on 2 cores (``Condition.notify``, up to 20 µs per patch with one hand-off per batch; see
``docs/benchmarks.md``, Scaling).

Here the wake-up is a byte written to a pipe and the wait is ``select``: CPython releases the GIL around
both system calls, so a waker preempted in ``write`` holds nothing, and the woken thread runs at once.

* :class:`Wakeup`: a level-triggered signal (set by any thread, waited for with a timeout by one).
* :class:`HandoffPool`: a ``concurrent.futures.Executor`` whose idle workers wait on such a pipe; its
  futures are plain ``concurrent.futures.Future`` objects (wait for them with a :class:`Wakeup` and
  ``add_done_callback`` to keep the completion side GIL-free too).
"""

from __future__ import annotations

import os
import select
import threading
import weakref
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any, TypeVar

__all__ = ["Wakeup", "HandoffPool"]

T = TypeVar("T")
_IDLE_WAIT_S = 5.0  # an idle worker re-checks the shutdown flag this often (it is woken at shutdown anyway)


def _close_pair(r: int, w: int) -> None:
    os.close(r)
    os.close(w)


class _Pipe:
    """A non-blocking pipe used only for wake-ups: one byte per wake, any byte drains one. Its descriptors are
    closed by :meth:`close` or, failing that, when the object is collected (``weakref.finalize``)."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe()
        os.set_blocking(self.r, False)
        os.set_blocking(self.w, False)
        self._lock = threading.Lock()
        self._close = weakref.finalize(self, _close_pair, self.r, self.w)

    def poke(self) -> None:
        with self._lock:  # never write to a closed descriptor: its number may name another file by now
            if not self._close.alive:
                return
            try:
                os.write(self.w, b"\0")  # the GIL is released around the system call
            except BlockingIOError:
                pass  # full of wake-ups already

    def wait(self, timeout: float | None, drain: int) -> bool:
        """Wait until a wake-up is pending (True) or ``timeout`` passed (False); consume up to ``drain``."""
        if not self._close.alive:
            return False
        try:
            ready, _, _ = select.select([self.r], [], [], timeout)
            if ready:
                os.read(self.r, drain)
        except (BlockingIOError, InterruptedError):
            return True  # another waiter took the byte: look again
        except (OSError, ValueError):
            return False  # closed
        return bool(ready)

    def close(self) -> None:
        with self._lock:
            self._close()


class Wakeup:
    """A signal one thread waits for with a timeout and others set, waking it through a pipe.

    ``set`` may be called any number of times before ``wait``; ``wait`` returns as soon as one is pending
    and consumes them all. Close it (or use it as a context manager) when done: it holds two descriptors."""

    def __init__(self) -> None:
        self._pipe = _Pipe()

    def set(self) -> None:
        self._pipe.poke()

    def wait(self, timeout: float) -> bool:
        """True if set since the last wait, False when ``timeout`` seconds passed first."""
        return self._pipe.wait(max(0.0, timeout), 4096)

    def close(self) -> None:
        self._pipe.close()

    def __enter__(self) -> Wakeup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class HandoffPool(Executor):
    """A fixed pool of worker threads fed through a deque, idle workers waiting on a pipe (see module doc).

    Work runs in submission order as workers become free. ``shutdown(cancel_futures=True)`` cancels what
    has not started; ``shutdown(wait=True)`` joins the workers."""

    def __init__(self, max_workers: int, thread_name_prefix: str = "handoff") -> None:
        if max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {max_workers}")
        self._items: deque[tuple[Future[Any], Callable[..., Any], tuple[Any, ...], dict[str, Any]]] = deque()
        self._lock = threading.Lock()
        self._pipe = _Pipe()
        self._shutdown = False
        self._alive = max_workers
        self._threads = [threading.Thread(target=self._work, name=f"{thread_name_prefix}_{i}", daemon=True)
                         for i in range(max_workers)]
        for thread in self._threads:
            thread.start()

    @property
    def max_workers(self) -> int:
        return len(self._threads)

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        future: Future[T] = Future()
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._items.append((future, fn, args, kwargs))
        self._pipe.poke()
        return future

    def _next(self) -> tuple[Future[Any], Callable[..., Any], tuple[Any, ...], dict[str, Any]] | None:
        """The next item; None once shut down and empty. Waits (GIL released) while there is nothing."""
        while True:
            with self._lock:
                if self._items:
                    return self._items.popleft()
                if self._shutdown:
                    return None
            self._pipe.wait(_IDLE_WAIT_S, 1)

    def _work(self) -> None:
        try:
            while (item := self._next()) is not None:
                future, fn, args, kwargs = item
                if not future.set_running_or_notify_cancel():
                    continue
                try:
                    result = fn(*args, **kwargs)
                except BaseException as err:  # noqa: BLE001 - handed to the future, as ThreadPoolExecutor does
                    future.set_exception(err)
                else:
                    future.set_result(result)
                del item, future, fn, args, kwargs
        finally:
            with self._lock:
                self._alive -= 1
                last = self._alive == 0
            if last:
                self._pipe.close()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shutdown = True
            cancelled = list(self._items) if cancel_futures else []
            if cancel_futures:
                self._items.clear()
        for future, *_ in cancelled:
            future.cancel()
        for _ in self._threads:
            self._pipe.poke()
        if wait:
            for thread in self._threads:
                if thread is not threading.current_thread():
                    thread.join()
