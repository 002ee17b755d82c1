"""One run of every GPU path of the project, each part capped in time, results as one JSON summary.

    bash scripts/gpu_check.sh OUT_DIR            # what to run on the GPU machine (docs/cuda_ipc.md)
    python -m bench.gpu_check OUT_DIR [--quick] [--skip-gpu]

Parts (each in its own process group, with its own time cap; a failing or overrunning part is recorded
as data and the next one runs): ``gpu_tests``, ``jpeg_decode``, ``augment``, ``cuda_ipc``, ``end_to_end``,
``streaming``, ``memory``. Without a CUDA device every GPU part is reported as ``skipped: <reason>`` and
the CPU sides (CPU decode, CPU kernels, CPU augmentation + shared memory) still run.
"""

from .driver import PARTS, main, run_check

__all__ = ["PARTS", "main", "run_check"]
