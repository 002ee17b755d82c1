"""Stand-ins for CUDA objects, for tests that drive the CUDA IPC code over host memory on a CPU-only machine."""

from __future__ import annotations

import threading
from typing import Any


class HostView:
    """What ``torch.as_tensor`` wraps on CPU: the owner's bytes through ``__array_interface__``, holding the owner."""

    def __init__(self, owner: Any) -> None:
        cai = owner.__cuda_array_interface__
        self.owner = owner
        self.__array_interface__ = {"shape": cai["shape"], "typestr": "|u1", "data": cai["data"], "version": 3}


class FakeStream:
    """``torch.cuda.current_stream()`` as the CUDA IPC code uses it: the raw handle, and ``wait_event``."""

    cuda_stream = 0

    def __init__(self, waits: list[Any] | None = None) -> None:
        self.waits = waits if waits is not None else []

    def wait_event(self, event: Any) -> None:
        self.waits.append(event)


def fake_event_type(gpu_done: threading.Event | None = None) -> type:
    """A ``torch.cuda.Event`` stand-in: events complete when ``gpu_done`` is set (at once without it).

    The returned class lists in ``records`` every event recorded (in order) and in ``created`` every event made.
    """

    class FakeEvent:
        records: list[Any] = []
        created: list[Any] = []

        def __init__(self, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False,
                     handle: bytes | None = None) -> None:
            self.interprocess = interprocess
            self.handle = handle if handle is not None else id(self).to_bytes(8, "little") + bytes(56)
            self.opened = handle is not None
            FakeEvent.created.append(self)

        @classmethod
        def from_ipc_handle(cls, device: Any, handle: bytes) -> FakeEvent:
            assert len(handle) == 64
            return cls(interprocess=True, handle=bytes(handle))

        def ipc_handle(self) -> bytes:
            assert self.interprocess, "only interprocess events have IPC handles"
            return self.handle

        def record(self, stream: Any = None) -> None:
            FakeEvent.records.append(self)

        def query(self) -> bool:
            return gpu_done is None or gpu_done.is_set()

    return FakeEvent
