"""The GPU data plane: batch slots in one raw allocation of the server's GPU, shared by CUDA IPC.

One pool per session: a single ``cudaMalloc`` cut into fixed-size slots, and one interprocess event per
slot. ``write`` copies a batch into its slot on the current torch stream and records the slot's event on
that stream; the ``CudaRef`` it returns names the allocation (IPC memory handle), the slot's place in it and
the event (IPC event handle). The client opens the memory handle once, makes its stream wait on the event
(so it never reads before the copy finished, with no host synchronisation on either side), and releases the
slot only after its own work on it completed. Same slot bookkeeping as :class:`~.shm.SlotPool`.

The memory is a raw ``cudaMalloc``, not torch's caching allocator: an IPC memory handle refers to the base
of an allocation, and torch's blocks are carved out of larger segments. That allocation needs NVIDIA's
``cuda-bindings`` (``cuda.bindings.runtime``) or CuPy, through the shim shared with the trainer
(:mod:`wsi_loader.cuda_runtime`, imported lazily: this module imports on machines without CUDA). The events
are torch's own (``torch.cuda.Event(interprocess=True)`` and its ``ipc_handle()``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid

import torch

from loader_service.transport.shm import SlotBook
from wsi_loader.cuda_runtime import cuda_ipc_available, device_uuid
from wsi_loader.cuda_runtime import load_runtime as _load_backend
from wsi_loader.v1 import loader_pb2 as pb

__all__ = ["CudaSlotPool", "cuda_ipc_available", "device_uuid"]

log = logging.getLogger(__name__)

_CLOSE_TIMEOUT_S = 60.0         # close(): how long the slots' last copies may still run


class _Raw:
    """A ``__cuda_array_interface__`` over raw device bytes, so that torch wraps them without a copy."""

    def __init__(self, ptr: int, nbytes: int) -> None:
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (ptr, False),
                                         "strides": None, "version": 2}


class CudaSlotPool(SlotBook):
    """``count`` slots of ``slot_bytes`` in one raw allocation on ``device``. Guarded by ``cond`` like SlotPool."""

    def __init__(self, count: int, slot_bytes: int, cond: threading.Condition, device: torch.device) -> None:
        super().__init__(count, slot_bytes, cond)
        ok, reason = cuda_ipc_available()
        if not ok:
            raise RuntimeError(f"CUDA IPC slot pool unavailable: {reason}")
        device = torch.device(device)
        if device.type != "cuda":
            raise ValueError(f"a CUDA slot pool needs a CUDA device, not {device}")
        self.device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
        self._cuda = _load_backend()
        self.name = f"wsi-cuda-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self.device_uuid = device_uuid(self.device)
        self._events: list[torch.cuda.Event] = []
        self._ptr = 0
        with torch.cuda.device(self.device):
            try:
                self._ptr = self._cuda.malloc(self.slot_bytes * count)
                self.mem_handle = self._cuda.mem_handle(self._ptr)
                for _ in range(count):  # torch's public API for interprocess events (timing disabled)
                    self._events.append(torch.cuda.Event(interprocess=True))
                self._event_handles = [bytes(event.ipc_handle()) for event in self._events]
            except BaseException:
                self._release_cuda()
                raise
        self._buffer: torch.Tensor | None = torch.as_tensor(_Raw(self._ptr, self.slot_bytes * count),
                                                            device=self.device)
        if self._buffer.data_ptr() != self._ptr:
            raise RuntimeError("torch did not wrap the slot pool's memory in place")
        self._written = [False] * count
        self._lock = threading.Lock()  # write() vs close()

    @property
    def backend(self) -> str:
        return self._cuda.name


    def write(self, slot: int, tensor: torch.Tensor) -> pb.CudaRef:
        """Copy a batch into a slot on the current stream, record the slot's event, and return its reference.

        Nothing waits on the host: the client's stream waits on the event. ``tensor`` should already be on
        this pool's GPU (a CPU or other-GPU tensor works, through torch's copy). As everywhere in torch, the
        caller makes sure ``tensor`` was produced on (or synchronised with) the current stream.
        """
        if not 0 <= slot < self.count:
            raise ValueError(f"slot {slot} outside this pool's {self.count} slots")
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes > self.slot_bytes:
            raise ValueError(f"batch of {nbytes} bytes does not fit a {self.slot_bytes}-byte slot")
        with self._lock:
            if self._buffer is None:
                raise RuntimeError(f"CUDA slot pool {self.name} is closed")
            start = slot * self.slot_bytes
            with torch.cuda.device(self.device):
                stream = torch.cuda.current_stream(self.device)
                if nbytes:
                    flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
                    self._buffer[start:start + nbytes].copy_(flat, non_blocking=True)
                self._events[slot].record(stream)
            self._written[slot] = True
        return pb.CudaRef(mem_handle=self.mem_handle, offset=start, nbytes=nbytes, slot=slot,
                          event_handle=self._event_handles[slot], device_uuid=self.device_uuid)

    def slot_tensor(self, slot: int) -> torch.Tensor:
        """The slot's bytes as a uint8 CUDA tensor (a view of the pool; for tests and diagnostics)."""
        if self._buffer is None:
            raise RuntimeError(f"CUDA slot pool {self.name} is closed")
        return self._buffer[slot * self.slot_bytes:(slot + 1) * self.slot_bytes]

    def synchronize(self, timeout: float = _CLOSE_TIMEOUT_S) -> None:
        """Wait (polling, at most ``timeout`` s) until every slot's last copy completed; TimeoutError if not."""
        deadline = time.monotonic() + timeout
        pause = 1e-5
        for slot, event in enumerate(self._events):
            if not self._written[slot]:
                continue
            while not event.query():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"CUDA slot pool {self.name}: the copy into slot {slot} did not complete "
                                       f"within {timeout:.0f}s (is the GPU hung or the stream blocked?)")
                time.sleep(pause)
                pause = min(pause * 2, 1e-3)

    def close(self, timeout: float = _CLOSE_TIMEOUT_S) -> None:
        """Wait for the pending copies, then free the memory and destroy the events (idempotent).

        Clients that still map the allocation keep reading whatever the driver leaves there: end sessions
        after the client released its slots (the client's ``close`` unmaps). If the copies do not complete
        within ``timeout`` s, the memory is deliberately leaked (freeing it under a running copy is worse).
        """
        with self._lock:
            if self._buffer is None:
                return
            self._buffer = None
            try:
                with torch.cuda.device(self.device):
                    self.synchronize(timeout)
            except TimeoutError as err:
                log.error("%s; leaking its %d bytes of GPU memory", err, self.slot_bytes * self.count)
                return
            self._release_cuda()

    def _release_cuda(self) -> None:
        with torch.cuda.device(self.device):
            self._events = []  # torch destroys the events with their last reference
            if self._ptr:
                try:
                    self._cuda.free(self._ptr)
                except Exception as err:  # noqa: BLE001
                    log.warning("CUDA slot pool %s: cudaFree failed: %s", self.name, err)
                self._ptr = 0

    def __repr__(self) -> str:
        return (f"CudaSlotPool({self.name}, {self.count}x{self.slot_bytes} B on {self.device} "
                f"[{self.device_uuid}], free={len(self._free)})")
