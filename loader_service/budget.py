"""One memory budget for everything the service holds in flight, across all sessions.

Built batches, their serialized messages and the shared-memory or CUDA slot pools all reserve bytes here
before they exist and give them back once gRPC took the message (or the pool closed). A session may hold at
most its fair share (the budget over the sessions open now, and always one batch); a session that does not
read therefore holds its share and waits, and all sessions together never hold more than the budget.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

__all__ = ["MemoryBudget", "BudgetAccount", "default_inflight_bytes"]


def _cgroup_limit() -> int | None:
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:
            return int(text)
    return None


def default_inflight_bytes() -> int:
    """A quarter of the memory this process may use (the machine's RAM, or its cgroup limit), 256 MiB..16 GiB."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        total = 8 * 1024**3
    limit = _cgroup_limit()
    if limit is not None:
        total = min(total, limit)
    return max(256 * 1024**2, min(16 * 1024**3, total // 4))


class MemoryBudget:
    """Bytes in flight, shared by every session. ``accounts`` are per session; waiters are told of releases."""

    def __init__(self, total_bytes: int, on_change: Callable[[int], None] | None = None) -> None:
        if total_bytes < 1:
            raise ValueError(f"the in-flight memory budget must be positive, got {total_bytes} bytes")
        self.total = total_bytes
        self._used = 0
        self._lock = threading.Lock()
        self._accounts: set[BudgetAccount] = set()
        self._on_change = on_change

    @property
    def used(self) -> int:
        with self._lock:
            return self._used

    def open_account(self, wake: Callable[[], None] | None = None) -> BudgetAccount:
        account = BudgetAccount(self, wake)
        with self._lock:
            self._accounts.add(account)
        return account

    def share(self) -> int:
        """The most one session may hold now: the budget over the open sessions."""
        with self._lock:
            return self.total // max(1, len(self._accounts))

    def _fits_locked(self, account: BudgetAccount, nbytes: int, whole_share: bool) -> bool:
        if self._used + nbytes > self.total:
            return False
        share = self.total // max(1, len(self._accounts))
        return not (whole_share and account.held and account.held + nbytes > share)  # always one batch

    def fits(self, account: BudgetAccount, nbytes: int, within_share: bool = True) -> bool:
        """Whether ``account`` could reserve ``nbytes`` now (nothing reserved)."""
        with self._lock:
            return self._fits_locked(account, nbytes, within_share)

    def _try(self, account: BudgetAccount, nbytes: int, *, whole_share: bool) -> bool:
        with self._lock:
            if not self._fits_locked(account, nbytes, whole_share):
                return False
            self._used += nbytes
            account.held += nbytes
            used = self._used
        if self._on_change is not None:
            self._on_change(used)
        return True

    def _give_back(self, account: BudgetAccount, nbytes: int) -> None:
        with self._lock:
            nbytes = min(nbytes, account.held)
            self._used -= nbytes
            account.held -= nbytes
            used = self._used
            wakes = [a.wake for a in self._accounts if a.wake is not None and a is not account]
        if self._on_change is not None:
            self._on_change(used)
        for wake in wakes:  # outside the lock: a wake takes the session's own condition
            wake()

    def _close(self, account: BudgetAccount) -> None:
        held = account.held
        if held:
            self._give_back(account, held)
        with self._lock:
            self._accounts.discard(account)


class BudgetAccount:
    """One session's part of the budget. Thread-safe; ``close()`` gives back whatever it still holds."""

    def __init__(self, budget: MemoryBudget, wake: Callable[[], None] | None) -> None:
        self.budget = budget
        self.wake = wake
        self.held = 0  # guarded by the budget's lock

    def try_reserve(self, nbytes: int, *, within_share: bool = True) -> bool:
        """Reserve ``nbytes`` now, or return False: the budget is full, or this session holds its share."""
        return self.budget._try(self, nbytes, whole_share=within_share)

    def release(self, nbytes: int) -> None:
        self.budget._give_back(self, nbytes)

    def close(self) -> None:
        self.budget._close(self)

    def __hash__(self) -> int:
        return id(self)

    def __eq__(self, other: object) -> bool:
        return self is other
