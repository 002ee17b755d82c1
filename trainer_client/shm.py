"""The client's side of the shared-memory data plane: attach, wrap with no copy, release.

The server owns every segment (creates, writes, unlinks); this side only opens and maps them. A batch
tensor is a view of its slot; the slot goes back to the server when the tensor (and every view of it) is
freed, or when ``release`` is called explicitly. Linux only (/dev/shm).
"""

from __future__ import annotations

import logging
import mmap
import os
import uuid
import weakref
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from wsi_loader.v1 import loader_pb2 as pb

__all__ = ["ShmProbe", "ShmReceiver", "shm_supported"]

SHM_DIR = Path("/dev/shm")
log = logging.getLogger(__name__)


def shm_supported() -> bool:
    return SHM_DIR.is_dir() and os.access(SHM_DIR, os.W_OK)


def _start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat); None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def reclaim_dead_probes() -> int:
    """Unlink probes whose creating process is provably gone (a trainer killed while opening a session)."""
    reclaimed = 0
    try:
        entries = list(SHM_DIR.glob("wsi-probe-*"))
    except OSError:
        return 0
    for entry in entries:
        parts = entry.name[len("wsi-probe-"):].split("-")
        if len(parts) != 3 or not parts[0].isdigit() or not parts[1].isdigit():
            continue
        if _start_ticks(int(parts[0])) == int(parts[1]):
            continue
        try:
            entry.unlink()
            reclaimed += 1
        except OSError:
            pass
    return reclaimed


class ShmProbe:
    """A tiny segment the client creates (and unlinks) to prove the server sees the same /dev/shm.

    Its name carries the creator's pid and start time, so that a later probe unlinks those of trainers killed
    before they could (``kill -9`` while a session opens)."""

    def __init__(self) -> None:
        reclaim_dead_probes()
        me = os.getpid()
        self.name = f"wsi-probe-{me}-{_start_ticks(me) or 0}-{uuid.uuid4().hex}"
        self._path = SHM_DIR / self.name
        fd = os.open(self._path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        try:
            os.write(fd, self.name.encode())
        finally:
            os.close(fd)
        self._finalizer = weakref.finalize(self, _unlink, self._path)

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> ShmProbe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


class ShmReceiver:
    """Maps the segments a session's batches name, and turns slot references into tensors."""

    def __init__(self, release: Callable[[list[int]], None], keep: int) -> None:
        self._release = release
        self._keep = keep
        self._warned = False
        self._maps: dict[str, mmap.mmap] = {}
        self._pending: dict[int, weakref.finalize] = {}

    def attach(self, segment: str) -> None:
        """Map the session's segment now: the server unlinks it when the session ends."""
        self._map(segment)

    def _map(self, segment: str) -> mmap.mmap:
        found = self._maps.get(segment)
        if found is None:
            if "/" in segment or not segment.startswith("wsi-loader-"):
                raise ValueError(f"refusing to map segment {segment!r}: not a loader segment name")
            fd = os.open(SHM_DIR / segment, os.O_RDWR)
            try:
                found = mmap.mmap(fd, 0)
            finally:
                os.close(fd)
            self._maps[segment] = found
        return found

    def tensor(self, message: pb.Tensor) -> torch.Tensor:
        """A zero-copy tensor over the slot; its storage is the shared segment."""
        ref = message.shm
        dtype = np.dtype(message.dtype)
        count = int(np.prod(message.shape))
        if count * dtype.itemsize != ref.nbytes:
            raise ValueError(f"slot {ref.slot}: {ref.nbytes} bytes do not hold {message.dtype}{list(message.shape)}")
        array = np.frombuffer(self._map(ref.segment), dtype=dtype, count=count, offset=ref.offset)
        array = array.reshape(tuple(message.shape))
        slot = int(ref.slot)
        if len(self._pending) >= self._keep:
            # The trainer keeps more batches than it promised (shm_keep): hand this one over as a private copy
            # and free its slot at once, so the server never starves for slots (no deadlock, just a copy).
            if not self._warned:
                log.warning("the trainer holds %d shared-memory batches (shm_keep=%d); copying further ones. "
                            "Raise StreamConfig.shm_keep to keep them zero-copy", len(self._pending), self._keep)
                self._warned = True
            copied = torch.from_numpy(array.copy())
            del array
            self._release([slot])
            return copied
        # The numpy array is the buffer torch keeps alive: when the last tensor view dies, so does the array,
        # and its finalizer hands the slot back.
        tensor = torch.from_numpy(array)
        self._pending[slot] = weakref.finalize(array, self._give_back, slot)
        return tensor

    def _give_back(self, slot: int) -> None:
        self._pending.pop(slot, None)
        self._release([slot])

    def release(self, slot: int) -> None:
        """Hand a slot back now. The tensor over it must not be used afterwards."""
        finalizer = self._pending.get(slot)
        if finalizer is not None:
            finalizer()

    @property
    def held(self) -> int:
        return len(self._pending)

    def close(self) -> None:
        """Forget the mappings; each closes once no tensor views it any more."""
        for finalizer in list(self._pending.values()):
            finalizer.detach()
        self._pending.clear()
        for mapped in self._maps.values():
            try:
                mapped.close()
            except BufferError:
                pass  # tensors still view it: the mapping is released with the last of them
        self._maps.clear()

