"""Jobs: the ranks of one training job (same ``job_id``) must agree on what the epoch is.

Every rank of a job reads its shard through the server's one pipeline (shared read and decode pools,
decoded-tile cache, candidate cache), so each sample is decoded once, for the one rank that owns it. The
registry catches the classic DDP mistake of ranks opened with different seeds, sizes or world sizes.
"""

from __future__ import annotations

import threading
from collections import Counter

from loader_service.errors import InvalidRequest
from loader_service.requests import SessionRequest

__all__ = ["JobRegistry"]


def _fingerprint(request: SessionRequest) -> tuple[object, ...]:
    a = request.annotations
    return (request.dataset, request.spec, request.world_size, request.batch_size, request.augment, request.output,
            request.unservable, (a.region, a.classes, a.exclude, a.proportions), request.stain, request.context)


class JobRegistry:
    def __init__(self) -> None:
        self._jobs: dict[tuple[str, int], tuple[object, ...]] = {}  # (job, epoch): ranks may straddle epochs
        self._members: Counter[tuple[str, int]] = Counter()
        self._lock = threading.Lock()

    def join(self, request: SessionRequest) -> None:
        if not request.job_id:
            return
        mine, key = _fingerprint(request), (request.job_id, request.epoch)
        with self._lock:
            theirs = self._jobs.setdefault(key, mine)
            if theirs != mine:
                fields = ("dataset", "sampling", "world_size", "batch_size", "augment", "output", "unservable",
                          "annotations", "stain", "context")
                differ = [f for f, a, b in zip(fields, mine, theirs) if a != b]
                raise InvalidRequest(
                    f"rank {request.rank} of job {request.job_id!r} disagrees with the job's other ranks on "
                    f"{differ}; every rank must open the same dataset, seed and sizes"
                )
            self._members[key] += 1

    def leave(self, request: SessionRequest) -> None:
        if not request.job_id:
            return
        key = (request.job_id, request.epoch)
        with self._lock:
            self._members[key] -= 1
            if self._members[key] <= 0:
                del self._members[key]
                self._jobs.pop(key, None)
