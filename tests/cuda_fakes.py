"""Stand-ins for CUDA objects, for tests that drive the CUDA IPC code over host memory on a CPU-only machine."""

from __future__ import annotations

from typing import Any


class HostView:
    """What ``torch.as_tensor`` wraps on CPU: the owner's bytes through ``__array_interface__``, holding the owner."""

    def __init__(self, owner: Any) -> None:
        cai = owner.__cuda_array_interface__
        self.owner = owner
        self.__array_interface__ = {"shape": cai["shape"], "typestr": "|u1", "data": cai["data"], "version": 3}


class FakeStream:
    """``torch.cuda.current_stream()`` as the CUDA IPC code uses it: only the raw stream handle."""

    cuda_stream = 0
