"""The few CUDA runtime calls the CUDA IPC data plane needs that torch has no public API for: one shim for both sides.

The service (``loader_service.transport.cuda_ipc``) allocates raw device memory and exports it by IPC handle;
the trainer (``trainer_client.cuda_ipc``) opens that handle. torch's caching allocator cannot do this (an IPC
memory handle names the base of a ``cudaMalloc``, and torch's blocks are carved out of larger segments, exported
only through private storage methods), so these calls go through NVIDIA's ``cuda-bindings``
(``cuda.bindings.runtime``, installed with torch's CUDA wheels) or, failing that, CuPy's runtime module.
Both are imported lazily: this module imports on machines without CUDA.

``WSI_LOADER_CUDA_BACKEND=cupy|cuda-bindings`` forces one of them.
"""

from __future__ import annotations

import ctypes
import os
from typing import Any, Protocol

import torch

__all__ = ["BACKEND_ENV", "HANDLE_BYTES", "CudaRuntime", "load_runtime", "cuda_ipc_available", "device_uuid"]

HANDLE_BYTES = 64               # sizeof(cudaIpcMemHandle_t) (and of cudaIpcEventHandle_t)
BACKEND_ENV = "WSI_LOADER_CUDA_BACKEND"
_INSTALL_HINT = ("cuda-bindings comes with torch's CUDA wheels (else `pip install cuda-bindings` for your "
                 "CUDA major version); CuPy (`pip install cupy-cuda13x`, the `gpu` extra) also works")


class CudaRuntime(Protocol):
    """What both sides call; pointers are ints. (Events need no shim: ``torch.cuda.Event`` is interprocess-capable.)"""

    name: str

    def malloc(self, nbytes: int) -> int: ...
    def free(self, ptr: int) -> None: ...
    def mem_handle(self, ptr: int) -> bytes: ...
    def open_mem(self, handle: bytes) -> int: ...
    def close_mem(self, ptr: int) -> None: ...


class _CudaBindings:
    """The calls through NVIDIA's cuda-bindings (``cuda.bindings.runtime``)."""

    name = "cuda-bindings"

    def __init__(self) -> None:
        try:
            from cuda.bindings import runtime as rt
        except ImportError:  # cuda-python < 12.6 spelled it cuda.cudart
            from cuda import cudart as rt  # type: ignore[no-redef]
        self.rt: Any = rt

    def _check(self, result: Any, what: str) -> Any:
        err, *rest = result if isinstance(result, tuple) else (result,)
        if int(err) != 0:
            name = self.rt.cudaGetErrorName(err)[1]
            name = name.decode() if isinstance(name, bytes) else str(name)
            raise RuntimeError(f"{what} failed: {name} ({int(err)})")
        return rest[0] if len(rest) == 1 else rest

    def malloc(self, nbytes: int) -> int:
        return int(self._check(self.rt.cudaMalloc(nbytes), f"cudaMalloc({nbytes})"))

    def free(self, ptr: int) -> None:
        self._check(self.rt.cudaFree(ptr), "cudaFree")

    def mem_handle(self, ptr: int) -> bytes:
        handle = self._check(self.rt.cudaIpcGetMemHandle(ptr), "cudaIpcGetMemHandle")
        return ctypes.string_at(handle.getPtr(), HANDLE_BYTES)

    def open_mem(self, handle: bytes) -> int:
        raw = self.rt.cudaIpcMemHandle_t()
        ctypes.memmove(raw.getPtr(), handle, HANDLE_BYTES)
        flags = self.rt.cudaIpcMemLazyEnablePeerAccess
        return int(self._check(self.rt.cudaIpcOpenMemHandle(raw, flags), "cudaIpcOpenMemHandle"))

    def close_mem(self, ptr: int) -> None:
        self._check(self.rt.cudaIpcCloseMemHandle(ptr), "cudaIpcCloseMemHandle")


class _CuPy:
    """The same calls through CuPy's runtime module (which raises on errors itself)."""

    name = "cupy"

    def __init__(self) -> None:
        from cupy.cuda import runtime as rt
        self.rt: Any = rt

    def malloc(self, nbytes: int) -> int:
        return int(self.rt.malloc(nbytes))

    def free(self, ptr: int) -> None:
        self.rt.free(ptr)

    def mem_handle(self, ptr: int) -> bytes:
        return bytes(self.rt.ipcGetMemHandle(ptr))

    def open_mem(self, handle: bytes) -> int:
        return int(self.rt.ipcOpenMemHandle(handle, self.rt.cudaIpcMemLazyEnablePeerAccess))

    def close_mem(self, ptr: int) -> None:
        self.rt.ipcCloseMemHandle(ptr)


def load_runtime() -> CudaRuntime:
    """cuda-bindings, else CuPy (or the one ``WSI_LOADER_CUDA_BACKEND`` names); ImportError with the reasons."""
    wanted = os.environ.get(BACKEND_ENV, "").strip().lower()
    choices: list[type[_CudaBindings] | type[_CuPy]] = [_CudaBindings, _CuPy]
    if wanted:
        choices = [c for c in choices if c.name == wanted]
        if not choices:
            raise ImportError(f"{BACKEND_ENV}={wanted!r}: expected 'cuda-bindings' or 'cupy'")
    reasons = []
    for choice in choices:
        try:
            return choice()
        except Exception as err:  # noqa: BLE001 - ImportError, or a CuPy built for another CUDA
            reasons.append(f"{choice.name}: {err}")
    raise ImportError(f"no CUDA runtime binding for CUDA IPC ({_INSTALL_HINT}): " + "; ".join(reasons))


def cuda_ipc_available() -> tuple[bool, str]:
    """Whether this process can use CUDA IPC: (True, backend name) or (False, why not)."""
    if not torch.cuda.is_available():
        return False, "torch sees no CUDA device"
    try:
        runtime = load_runtime()
    except ImportError as err:
        return False, str(err)
    return True, runtime.name


def device_uuid(device: torch.device | int) -> str:
    """The GPU's UUID as ``GPU-xxxxxxxx-...`` (the same under any CUDA_VISIBLE_DEVICES numbering)."""
    raw = str(torch.cuda.get_device_properties(device).uuid).strip().lower()
    return raw if raw.startswith("gpu-") else f"GPU-{raw}"
