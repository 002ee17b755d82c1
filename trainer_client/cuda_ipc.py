"""The client's side of the GPU data plane: open the server's slot memory by CUDA IPC, wrap it, release it.

The server owns the memory (one raw allocation per session, cut into slots) and one interprocess event per
slot. A batch arrives as a ``CudaRef``; :meth:`CudaReceiver.tensor` opens the allocation once (cached by its
handle), makes the *current* torch stream wait on the slot's event (so kernels queued on it never read before
the server's copy completed; the host never blocks), and returns a zero-copy tensor over the slot.

The slot goes back to the server when that tensor and every view of it is freed, or on :meth:`release`. The
trainer's kernels may still be reading at that moment, so an event is recorded on the current stream (and
on the stream the tensor was made on, if different) and a background thread hands the slot back only once
those events completed. Events are torch's (``torch.cuda.Event.from_ipc_handle``, ``Stream.wait_event``); opening
the server's memory needs NVIDIA's ``cuda-bindings`` or CuPy, through the shim shared with the service
(:mod:`wsi_loader.cuda_runtime`, imported lazily; ``WSI_LOADER_CUDA_BACKEND=cupy|cuda-bindings`` forces one):
this module imports without CUDA.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from wsi_loader.cuda_runtime import HANDLE_BYTES as _HANDLE_BYTES
from wsi_loader.cuda_runtime import cuda_ipc_available, device_uuid
from wsi_loader.cuda_runtime import load_runtime as _load_backend
from wsi_loader.v1 import loader_pb2 as pb

__all__ = ["CudaReceiver", "cuda_ipc_available", "device_uuid"]

log = logging.getLogger(__name__)

_DTYPES: dict[str, torch.dtype] = {
    "uint8": torch.uint8, "int8": torch.int8, "int16": torch.int16, "int32": torch.int32, "int64": torch.int64,
    "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64,
    "bool": torch.bool,
}


class _SlotMemory:
    """Owner of one slot's bytes: torch keeps it alive for as long as any tensor views them."""

    def __init__(self, ptr: int, nbytes: int) -> None:
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (ptr, False),
                                         "strides": None, "version": 2}


@dataclass(eq=False)
class _Mapping:
    """One opened server allocation."""

    handle: bytes
    ptr: int
    device: torch.device
    views: int = 0            # owners (batch tensors) alive over it
    closed: bool = False


@dataclass(eq=False)
class _Lease:
    """One batch tensor over one slot."""

    slot: int
    mapping: _Mapping
    stream: torch.cuda.Stream  # the stream that waited on the server's event (the tensor's first user)
    returned: bool = False     # handed to the release thread (or released at close)
    alive: bool = True         # the owner (and so some view) still exists


@dataclass(eq=False)
class _Job:
    """For the release thread: once ``events`` completed, give ``slot`` back and/or close an unused mapping."""

    events: list[tuple[torch.device, torch.cuda.Event]]
    slot: int | None
    mapping: _Mapping | None
    queued_at: float = field(default_factory=time.monotonic)


class CudaReceiver:
    """Opens the server allocations a session's batches name, and turns slot references into CUDA tensors.

    ``release(slots)`` sends slots back to the server (called from a background thread); ``keep`` is how many
    batches the trainer may hold at once: beyond that, batches are copied and their slot freed at once.
    """

    def __init__(self, release: Callable[[list[int]], None], keep: int, *, release_timeout_s: float = 120.0,
                 max_queued: int = 4096) -> None:
        self._release = release
        self._keep = keep
        self._release_timeout_s = release_timeout_s
        ok, reason = cuda_ipc_available()
        if not ok:
            raise RuntimeError(f"CUDA IPC receiver unavailable: {reason}")
        self._cuda = _load_backend()
        self._lock = threading.RLock()    # RLock: a finalizer may run inside a locked region (GC)
        self._idle = threading.Condition(self._lock)
        self._mappings: dict[bytes, _Mapping] = {}
        self._events: dict[bytes, torch.cuda.Event] = {}  # opened IPC events, by handle
        self._spare: list[tuple[torch.device, torch.cuda.Event]] = []
        self._leases: dict[int, _Lease] = {}        # slot -> the trainer's tensor over it
        self._returning: set[int] = set()           # waiting for the trainer's GPU work before going back
        self._stalled: set[int] = set()             # that work never completed within release_timeout_s
        self._devices: dict[str, int] = {}
        self._jobs: queue.Queue[_Job] = queue.Queue(maxsize=max_queued)
        self._thread: threading.Thread | None = None
        self._closed = False
        self._warned = False

    # --- batches in ---------------------------------------------------------------------------------------
    def device_for(self, uuid: str) -> torch.device:
        """The local CUDA device with that UUID; ValueError if this process does not see it."""
        want = uuid.strip().lower().removeprefix("gpu-")
        if not self._devices:
            for index in range(torch.cuda.device_count()):
                self._devices[device_uuid(index).lower().removeprefix("gpu-")] = index
        if want not in self._devices:
            raise ValueError(f"the server's GPU {uuid} is not visible to this process (it sees "
                             f"{sorted(self._devices) or 'no GPU'}; check CUDA_VISIBLE_DEVICES or fall back "
                             "to shared memory)")
        return torch.device("cuda", self._devices[want])

    def tensor(self, message: pb.Tensor) -> torch.Tensor:
        """A zero-copy CUDA tensor over the slot, readable by kernels queued on the current stream."""
        ref = message.cuda
        if message.dtype not in _DTYPES:
            raise ValueError(f"slot {ref.slot}: unsupported dtype {message.dtype!r}")
        dtype = _DTYPES[message.dtype]
        shape = tuple(int(n) for n in message.shape)
        count = 1
        for n in shape:
            count *= n
        itemsize = torch.empty((), dtype=dtype).element_size()
        if count * itemsize != ref.nbytes:
            raise ValueError(f"slot {ref.slot}: {ref.nbytes} bytes do not hold {message.dtype}{list(shape)}")
        if len(ref.mem_handle) != _HANDLE_BYTES or len(ref.event_handle) != _HANDLE_BYTES:
            raise ValueError(f"slot {ref.slot}: malformed CUDA IPC handles")
        if self._closed:
            raise RuntimeError("this CudaReceiver is closed")
        device = self.device_for(ref.device_uuid)
        slot = int(ref.slot)
        with torch.cuda.device(device), self._lock:
            mapping = self._map(bytes(ref.mem_handle), device)
            stream = torch.cuda.current_stream(device)
            stream.wait_event(self._event(bytes(ref.event_handle), device))
            if ref.nbytes == 0:
                self._release([slot])
                return torch.empty(shape, dtype=dtype, device=device)
            owner = _SlotMemory(mapping.ptr + int(ref.offset), int(ref.nbytes))
            flat = torch.as_tensor(owner, device=device)
            if flat.data_ptr() != mapping.ptr + int(ref.offset):
                raise RuntimeError("torch did not wrap the slot in place")
            lease = _Lease(slot, mapping, stream)
            mapping.views += 1
            finalizer = weakref.finalize(owner, self._owner_gone, lease)
            finalizer.atexit = False
            del owner
            held = sum(1 for held_lease in self._leases.values() if not held_lease.returned)
            self._leases[slot] = lease
            tensor = flat.view(dtype).view(shape)
            del flat
            if held < self._keep:
                return tensor
            # The trainer keeps more batches than it promised (keep): hand this one over as a private copy
            # and free its slot now (after the copy, on the GPU), so the server never starves for slots.
            if not self._warned:
                log.warning("the trainer holds %d CUDA IPC batches (keep=%d); copying further ones. "
                            "Raise StreamConfig.shm_keep to keep them zero-copy", held, self._keep)
                self._warned = True
            copied = tensor.clone()
            self.release(slot)
            return copied

    def _map(self, handle: bytes, device: torch.device) -> _Mapping:
        mapping = self._mappings.get(handle)
        if mapping is None:
            mapping = _Mapping(handle, self._cuda.open_mem(handle), device)
            self._mappings[handle] = mapping
        return mapping

    def _event(self, handle: bytes, device: torch.device) -> torch.cuda.Event:
        event = self._events.get(handle)
        if event is None:  # torch's public API for interprocess events
            event = self._events[handle] = torch.cuda.Event.from_ipc_handle(device, handle)
        return event

    def base_pointer(self, mem_handle: bytes) -> int:
        """Where this process mapped the server allocation ``mem_handle`` (0 if not mapped); for checks."""
        with self._lock:
            mapping = self._mappings.get(bytes(mem_handle))
            return mapping.ptr if mapping is not None and not mapping.closed else 0

    # --- slots back ---------------------------------------------------------------------------------------
    def release(self, slot: int) -> None:
        """Hand a slot back once the GPU work queued so far on it completed. Do not use its tensor afterwards."""
        with self._lock:
            lease = self._leases.get(slot)
            if lease is None or lease.returned:
                return
            self._return(lease)

    def _owner_gone(self, lease: _Lease) -> None:
        """The batch tensor and all its views were freed (a finalizer: runs on whichever thread freed it)."""
        with self._lock:
            lease.alive = False
            lease.mapping.views -= 1
            if not lease.returned and not self._closed:
                self._return(lease)
            elif self._closed and lease.mapping.views == 0 and not lease.mapping.closed:
                # The session is over and this was the mapping's last tensor: unmap once the work queued so
                # far (which may still read it) completed.
                self._submit(_Job(self._record(lease), None, lease.mapping))

    def _return(self, lease: _Lease) -> None:
        """Record the trainer's streams and queue the slot for the release thread. With ``_lock`` held."""
        lease.returned = True
        if self._leases.get(lease.slot) is lease:
            del self._leases[lease.slot]
        self._returning.add(lease.slot)
        self._submit(_Job(self._record(lease), lease.slot, None))

    def _record(self, lease: _Lease) -> list[tuple[torch.device, torch.cuda.Event]]:
        """Events on the current stream (the releasing thread's) and on the tensor's own stream if different."""
        device = lease.mapping.device
        recorded: list[tuple[torch.device, torch.cuda.Event]] = []
        with torch.cuda.device(device):
            streams = [torch.cuda.current_stream(device)]
            if lease.stream != streams[0]:
                streams.append(lease.stream)
            for stream in streams:
                event = self._spare_event(device)
                event.record(stream)
                recorded.append((device, event))
        return recorded

    def _spare_event(self, device: torch.device) -> torch.cuda.Event:
        for i, (spare_device, event) in enumerate(self._spare):
            if spare_device == device:
                del self._spare[i]
                return event
        return torch.cuda.Event()  # timing disabled; created on the device of the stream it is recorded on

    def _submit(self, job: _Job) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="cuda-ipc-release", daemon=True)
            self._thread.start()
        try:  # never blocks with _lock held: more jobs than slots + mappings means the thread is stuck
            self._jobs.put_nowait(job)
        except queue.Full:
            raise RuntimeError(f"CUDA IPC release queue full ({self._jobs.maxsize} jobs waiting for the "
                               "trainer's GPU work): the release thread stalled") from None

    def _run(self) -> None:
        """The release thread: wait (polling, bounded) for each job's events, then give its slot back."""
        while True:
            try:
                job = self._jobs.get(timeout=1.0)
            except queue.Empty:
                with self._lock:
                    if self._closed and not self._returning and all(m.closed or m.views for m in
                                                                    self._mappings.values()):
                        self._thread = None
                        return
                continue
            done = self._wait(job)
            with self._lock:
                if done and not self._closed:
                    self._spare.extend(job.events)  # else dropped: torch destroys an event with its last reference
                if job.slot is not None:
                    self._returning.discard(job.slot)
                    if not done:
                        self._stalled.add(job.slot)
                if done and job.mapping is not None:
                    self._close_mapping(job.mapping)
                self._idle.notify_all()
            if done and job.slot is not None:
                try:
                    self._release([job.slot])
                except Exception:  # noqa: BLE001 - the stream may be gone; the server frees the pool anyway
                    log.exception("handing CUDA IPC slot %d back failed", job.slot)

    def _wait(self, job: _Job) -> bool:
        pause = 2e-5
        for _, event in job.events:
            while not event.query():
                if time.monotonic() - job.queued_at > self._release_timeout_s:
                    what = f"slot {job.slot}" if job.slot is not None else "an unused mapping"
                    log.error("CUDA IPC %s: the trainer's GPU work on it did not complete within %.0fs; "
                              "not handing it back (the server will report the session starved)",
                              what, self._release_timeout_s)
                    return False
                time.sleep(pause)
                pause = min(pause * 2, 1e-3)
        return True

    def flush(self, timeout: float = 60.0) -> None:
        """Wait until every released slot was handed back; TimeoutError naming those still waiting."""
        with self._lock:
            if not self._idle.wait_for(lambda: not self._returning, timeout=timeout):
                raise TimeoutError(f"CUDA IPC slots {sorted(self._returning)} still wait for the trainer's GPU "
                                   f"work after {timeout:.0f}s")

    @property
    def held(self) -> int:
        """Slots not handed back yet: those the trainer holds and those waiting for its GPU work."""
        with self._lock:
            return sum(1 for lease in self._leases.values() if not lease.returned) + len(self._returning)

    @property
    def stalled(self) -> list[int]:
        """Slots never handed back because the trainer's work on them did not complete in time."""
        with self._lock:
            return sorted(self._stalled)

    # --- shutdown -----------------------------------------------------------------------------------------
    def close(self, timeout: float = 60.0) -> None:
        """Stop giving slots back; unmap every allocation no tensor views (the rest when their last view dies).

        Waits (at most ``timeout`` s) for slots already released to go back first.
        """
        try:
            self.flush(timeout)
        except TimeoutError as err:
            log.error("closing the CUDA IPC receiver: %s", err)
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for lease in self._leases.values():  # alive tensors keep their mapping; their slots stay with them
                lease.returned = True
            self._leases.clear()
            for mapping in self._mappings.values():
                if mapping.views == 0:
                    self._close_mapping(mapping)
            self._events.clear()  # torch destroys the events with their last reference
            self._spare.clear()

    def _close_mapping(self, mapping: _Mapping) -> None:
        if mapping.closed:
            return
        mapping.closed = True
        with torch.cuda.device(mapping.device):
            try:
                self._cuda.close_mem(mapping.ptr)
            except Exception as err:  # noqa: BLE001
                log.warning("cudaIpcCloseMemHandle failed: %s", err)
