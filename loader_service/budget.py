"""One memory budget for everything the service holds in flight, across all sessions.

Built batches, their serialized messages and the shared-memory or CUDA slot pools all reserve bytes here
before they exist and give them back once gRPC took the message (or the pool closed). Each session keeps one
batch's bytes from open to close (so it always progresses) and may use at most its fair share (the budget over
the sessions open now); a session that does not read therefore holds its share and waits, and all sessions
together never hold more than the budget. A session whose one batch no longer fits is refused at open.
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
    """Bytes in flight, shared by every session. Each session opens an account that keeps one batch's bytes
    for it (its floor, so it always makes progress, however much others hold); beyond the floor it competes
    for the rest within its share. Accounts are told when another one gives bytes back."""

    def __init__(self, total_bytes: int, on_change: Callable[[int], None] | None = None) -> None:
        if total_bytes < 1:
            raise ValueError(f"the in-flight memory budget must be positive, got {total_bytes} bytes")
        self.total = total_bytes
        self._used = 0  # floors plus what accounts use beyond them
        self._beyond = 0  # what accounts use beyond their floors
        self._lock = threading.Lock()
        self._accounts: set[BudgetAccount] = set()
        self._on_change = on_change

    @property
    def used(self) -> int:
        with self._lock:
            return self._used

    @property
    def accounts(self) -> int:
        with self._lock:
            return len(self._accounts)

    def open_account(self, wake: Callable[[], None] | None = None, floor: int = 0) -> BudgetAccount | None:
        """A new account keeping ``floor`` bytes; None when the budget cannot keep them now."""
        account = BudgetAccount(self, wake, floor)
        with self._lock:
            if self._used + floor > self.total:
                return None
            self._accounts.add(account)
            self._used += floor
            self._changed(self._used)
        return account

    @property
    def shared(self) -> int:
        """Bytes sessions may use beyond their floors, all together: half the budget, so that half is always
        left for the floors of sessions opening later, however much the open ones hold."""
        return self.total // 2

    def share(self) -> int:
        """The most one session may use beyond its floor now: the shared half over the open accounts."""
        with self._lock:
            return self.shared // max(1, len(self._accounts))

    def _changed(self, used: int) -> None:
        """Report the bytes in use; called with the lock held, so reports never arrive out of order."""
        if self._on_change is not None:
            self._on_change(used)

    def _growth(self, account: BudgetAccount, nbytes: int, whole_share: bool) -> int | None:
        """Bytes the budget grows by if ``account`` uses ``nbytes`` more; None if it may not."""
        in_use = account.held + nbytes
        growth = max(0, in_use - account.floor) - max(0, account.held - account.floor)
        if growth == 0:
            return 0
        if self._used + growth > self.total:
            return None
        if whole_share and (self._beyond + growth > self.shared
                            or in_use > account.floor + self.shared // max(1, len(self._accounts))):
            return None
        return growth

    def fits(self, account: BudgetAccount, nbytes: int, within_share: bool = True) -> bool:
        """Whether ``account`` could reserve ``nbytes`` now (nothing reserved)."""
        with self._lock:
            return self._growth(account, nbytes, within_share) is not None

    def _try(self, account: BudgetAccount, nbytes: int, *, whole_share: bool) -> bool:
        with self._lock:
            growth = self._growth(account, nbytes, whole_share)
            if growth is None:
                return False
            self._used += growth
            self._beyond += growth
            account.held += nbytes
            self._changed(self._used)
        return True

    def _give_back(self, account: BudgetAccount, nbytes: int) -> None:
        with self._lock:
            nbytes = min(nbytes, account.held)
            before = max(0, account.held - account.floor)
            account.held -= nbytes
            shrink = before - max(0, account.held - account.floor)
            self._used -= shrink
            self._beyond -= shrink
            self._changed(self._used)
            wakes = [a.wake for a in self._accounts if a.wake is not None and a is not account] if shrink else []
        for wake in wakes:  # outside the lock: a wake takes the session's own condition
            wake()

    def _close(self, account: BudgetAccount) -> None:
        with self._lock:
            if account not in self._accounts:
                return
            self._accounts.discard(account)
            beyond = max(0, account.held - account.floor)
            freed = account.floor + beyond
            account.held = account.floor = 0
            self._used -= freed
            self._beyond -= beyond
            self._changed(self._used)
            wakes = [a.wake for a in self._accounts if a.wake is not None]
        for wake in wakes:
            wake()


class BudgetAccount:
    """One session's part of the budget. Thread-safe; ``close()`` gives back its floor and whatever it holds."""

    def __init__(self, budget: MemoryBudget, wake: Callable[[], None] | None, floor: int) -> None:
        self.budget = budget
        self.wake = wake
        self.floor = floor  # kept for this account from open to close
        self.held = 0  # bytes in use now (guarded by the budget's lock)

    def try_reserve(self, nbytes: int, *, within_share: bool = True) -> bool:
        """Use ``nbytes`` more now, or return False: the budget is full, or this session uses its share."""
        return self.budget._try(self, nbytes, whole_share=within_share)

    def release(self, nbytes: int) -> None:
        self.budget._give_back(self, nbytes)

    def close(self) -> None:
        self.budget._close(self)

    def __hash__(self) -> int:
        return id(self)

    def __eq__(self, other: object) -> bool:
        return self is other
