"""Who may hold a stream: a cap on streams at once, a cap per client host, and a deadline for the `open` message.

Each Stream RPC holds a gRPC thread for its whole life. Capping them (below the server's thread count) keeps
threads free for ListDatasets, DescribeDataset and health, however many streams are open or idle.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TypeVar

from loader_service.errors import Stalled, TooLarge

__all__ = ["StreamAdmission", "Refused", "OpenTimeout", "peer_host", "first_message"]

T = TypeVar("T")


def peer_host(peer: str) -> str:
    """The client host of a gRPC peer string: 'ipv4:10.0.0.1:5000' -> 'ipv4:10.0.0.1', 'ipv6:[::1]:5000' -> 'ipv6:[::1]'."""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        host, sep, port = rest.rpartition(":")
        if sep and port.isdigit():
            return f"{kind}:{host}"
    return peer


class StreamAdmission:
    """Counts the streams held, in all and per client host; ``admit`` refuses beyond either cap."""

    def __init__(self, max_streams: int, max_per_peer: int) -> None:
        self.max_streams = max_streams
        self.max_per_peer = max_per_peer
        self._lock = threading.Lock()
        self._open = 0
        self._by_peer: Counter[str] = Counter()

    @property
    def open_streams(self) -> int:
        with self._lock:
            return self._open

    @contextmanager
    def admit(self, peer: str) -> Iterator[None]:
        """Hold one stream for ``peer`` for the block; raises TooLarge (RESOURCE_EXHAUSTED) with the cap named."""
        host = peer_host(peer)
        with self._lock:
            if self._open >= self.max_streams:
                raise Refused("max_streams", f"the server holds {self._open} streams, its limit (max_streams); "
                               "retry later or connect to another replica")
            if self._by_peer[host] >= self.max_per_peer:
                raise Refused("max_streams_per_peer",
                               f"{host} already holds {self._by_peer[host]} streams, the limit per client host "
                               "(max_streams_per_peer); close sessions you no longer read")
            self._open += 1
            self._by_peer[host] += 1
        try:
            yield
        finally:
            with self._lock:
                self._open -= 1
                self._by_peer[host] -= 1
                if not self._by_peer[host]:
                    del self._by_peer[host]


class Refused(TooLarge):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def first_message(requests: Iterator[T], timeout_s: float) -> T | None:
    """The stream's first message, read on a helper thread so the wait has a deadline.

    Raises Stalled (DEADLINE_EXCEEDED) when none came in ``timeout_s``; the helper ends when the RPC does.
    """
    box: list[T | None] = []
    done = threading.Event()

    def read() -> None:
        try:
            box.append(next(requests, None))
        except Exception:  # noqa: BLE001 - the stream broke before its first message
            box.append(None)
        done.set()

    threading.Thread(target=read, daemon=True, name="stream-open").start()
    if not done.wait(timeout_s):
        raise OpenTimeout(f"no `open` message within {timeout_s:g} s of the stream starting (open_timeout_s); "
                          "send OpenSession as the first message")
    return box[0]


class OpenTimeout(Stalled):
    """A stream sent nothing (or no `open`) within open_timeout_s."""
