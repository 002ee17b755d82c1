"""The shared-memory data plane: batch slots in segments the server owns.

One segment per session, cut into fixed-size slots. The server creates, writes and unlinks every segment;
clients only attach (open + mmap) and close. Only the segment name and ``(offset, nbytes, dtype, shape)``
cross processes. A segment's name carries its owner's pid and start time, so the next server can prove a
dead predecessor's segments orphaned before unlinking them.
"""

from __future__ import annotations

import logging
import mmap
import os
import threading
import uuid
from pathlib import Path

import numpy as np
import torch

__all__ = ["SHM_DIR", "SEGMENT_PREFIX", "SlotBook", "SlotPool", "ShmRegistry", "probe_is_visible", "reclaim_orphans",
           "process_start_ticks"]

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
SEGMENT_PREFIX = "wsi-loader-"
_ALIGN = 4096


def process_start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat); None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def _owner_alive(pid: int, ticks: int) -> bool:
    return process_start_ticks(pid) == ticks


class SlotBook:
    """Which of ``count`` fixed-size slots are free or held by the client; shared by every slot pool.

    ``free_slots``, ``take``, ``give_back`` and ``held`` are called with ``cond`` held by the caller.
    """

    def __init__(self, count: int, slot_bytes: int, cond: threading.Condition) -> None:
        if count < 1 or slot_bytes < 1:
            raise ValueError("a slot pool needs at least one slot of at least one byte")
        self.slot_bytes = -(-slot_bytes // _ALIGN) * _ALIGN
        self.count = count
        self.cond = cond
        self._free = list(range(count - 1, -1, -1))
        self._held: set[int] = set()  # written and sent, not yet released by the client

    def free_slots(self) -> int:
        return len(self._free)

    def take(self) -> int:
        slot = self._free.pop()
        self._held.add(slot)
        return slot

    def give_back(self, slots: list[int]) -> int:
        """Return slots to the pool; unknown or already-free ids are ignored. Returns how many came back."""
        returned = 0
        for slot in slots:
            if slot in self._held:
                self._held.remove(slot)
                self._free.append(slot)
                returned += 1
        if returned:
            self.cond.notify_all()
        return returned

    @property
    def held(self) -> int:
        return len(self._held)

    def offset(self, slot: int) -> int:
        return slot * self.slot_bytes


class SlotPool(SlotBook):
    """``count`` slots of ``slot_bytes`` in one shared-memory segment. Acquire and release are guarded by ``cond``."""

    def __init__(self, count: int, slot_bytes: int, cond: threading.Condition) -> None:
        super().__init__(count, slot_bytes, cond)
        me = os.getpid()
        self.name = f"{SEGMENT_PREFIX}{me}-{process_start_ticks(me)}-{uuid.uuid4().hex[:12]}"
        self._path = SHM_DIR / self.name
        fd = os.open(self._path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, self.slot_bytes * count)
            self._mmap: mmap.mmap | None = mmap.mmap(fd, self.slot_bytes * count)
        except OSError:
            os.unlink(self._path)
            raise
        finally:
            os.close(fd)
    def write(self, slot: int, tensor: torch.Tensor) -> int:
        """Copy a CPU tensor into a slot (the only copy on this data plane); returns its byte size."""
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes > self.slot_bytes:
            raise ValueError(f"batch of {nbytes} bytes does not fit a {self.slot_bytes}-byte slot")
        assert self._mmap is not None
        view = np.frombuffer(self._mmap, dtype=np.uint8, count=nbytes, offset=slot * self.slot_bytes)
        torch.from_numpy(view).copy_(tensor.contiguous().view(torch.uint8).reshape(-1))
        del view
        return nbytes

    def close(self) -> None:
        """Unlink the segment (the creator's job) and unmap it. Attached clients keep their mappings."""
        try:
            os.unlink(self._path)
        except FileNotFoundError:
            pass
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:  # a view is still alive somewhere; the mapping goes with it
                pass
            self._mmap = None


class ShmRegistry:
    """Every live slot pool of one kind (shared memory, or CUDA IPC) of this server, for metrics."""

    def __init__(self) -> None:
        self._pools: set[SlotBook] = set()
        self._lock = threading.Lock()

    def add(self, pool: SlotBook) -> None:
        with self._lock:
            self._pools.add(pool)

    def remove(self, pool: SlotBook) -> None:
        with self._lock:
            self._pools.discard(pool)

    def slots(self) -> tuple[int, int]:
        """(in use, free) over all pools."""
        with self._lock:
            pools = list(self._pools)
        in_use = sum(p.count - p.free_slots() for p in pools)
        return in_use, sum(p.count for p in pools) - in_use


def probe_is_visible(name: str) -> tuple[bool, str]:
    """Whether the client's probe segment is visible here with the content it promised (its own name)."""
    if not name.startswith("wsi-probe-") or "/" in name or len(name) > 200:
        return False, f"probe name {name!r} is malformed"
    try:
        content = (SHM_DIR / name).read_bytes()
    except OSError as err:
        return False, f"the client's probe segment is not visible here ({err.strerror}): separate /dev/shm (containers?)"
    if content[: len(name)] != name.encode():
        return False, "the probe segment's content does not match: a different /dev/shm with the same name"
    return True, ""


def reclaim_orphans() -> int:
    """Unlink segments whose owning server process is provably dead. Returns how many were reclaimed."""
    reclaimed = 0
    try:
        entries = list(SHM_DIR.iterdir())
    except OSError:
        return 0
    for entry in entries:
        if not entry.name.startswith(SEGMENT_PREFIX):
            continue
        parts = entry.name[len(SEGMENT_PREFIX):].split("-")
        if len(parts) != 3 or not parts[0].isdigit() or not parts[1].isdigit():
            continue
        pid, ticks = int(parts[0]), int(parts[1])
        if _owner_alive(pid, ticks):
            continue
        try:
            entry.unlink()
            reclaimed += 1
            log.info("reclaimed shared-memory segment %s of dead server pid %d", entry.name, pid)
        except OSError as err:
            log.warning("could not reclaim %s: %s", entry, err)
    return reclaimed
