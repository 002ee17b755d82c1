"""Name -> function of every part, in the order the driver runs them (see driver.PARTS)."""

from __future__ import annotations

from collections.abc import Callable

from .part import PartContext
from .parts_data import augment, end_to_end, jpeg_decode
from .parts_gpu import cuda_ipc, gpu_tests, memory, streaming

__all__ = ["PART_FUNCTIONS"]

PART_FUNCTIONS: dict[str, Callable[[PartContext], None]] = {
    "gpu_tests": gpu_tests,
    "jpeg_decode": jpeg_decode,
    "augment": augment,
    "cuda_ipc": cuda_ipc,
    "end_to_end": end_to_end,
    "streaming": streaming,
    "memory": memory,
}
