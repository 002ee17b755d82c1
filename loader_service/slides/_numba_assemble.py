"""The numba kernel behind ``slides.assemble`` (imported on first use: importing numba costs ~0.5 s).

Explicit signature: compiled, or loaded from numba's cache, once at import (``_numba_jit``).
"""

from __future__ import annotations

from typing import Any

import numba
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from .._numba_jit import eager_jit

__all__ = ["assemble_kernel"]


@intrinsic
def _as_u8_pointer(typingctx: Any, address: Any) -> Any:
    """An integer address (a live numpy array's data pointer) as a uint8 pointer."""
    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.inttoptr(args[0], ir.PointerType(ir.IntType(8)))
    return types.CPointer(types.uint8)(types.int64), codegen


@eager_jit("void(int64[:, ::1], int64, int64, int64, int64, int64, int64, int64, int64, uint8[:, :, ::1])")
def assemble_kernel(addresses: Any, th: int, tw: int, x: int, y: int, ix0: int, iy0: int, ix1: int, iy1: int,
                    out: Any) -> None:
    """Copy every tile whose address is not 0 into ``out`` (the region at ``x, y``), clipped to ``[ix0, ix1) x
    [iy0, iy1)``. ``addresses[r, c]`` is the data of tile row ``iy0 // th + r``, column ``ix0 // tw + c``: a
    C-contiguous (th, tw, 3) uint8 array the caller keeps alive. Unsigned flat indices: no wrap-around checks,
    so LLVM vectorises the row copies."""
    flat_out = out.reshape(-1)
    out_row = numba.uint64(out.shape[1] * 3)
    tile_row = numba.uint64(tw * 3)
    ty0, tx0 = iy0 // th, ix0 // tw
    for r in range(addresses.shape[0]):
        py = (ty0 + r) * th
        sy0, sy1 = max(iy0, py), min(iy1, py + th)
        for c in range(addresses.shape[1]):
            address = addresses[r, c]
            if address == 0:
                continue
            tile = numba.carray(_as_u8_pointer(address), (th * tw * 3,))
            px = (tx0 + c) * tw
            sx0, sx1 = max(ix0, px), min(ix1, px + tw)
            n = numba.uint64((sx1 - sx0) * 3)
            so = numba.uint64(sy0 - py) * tile_row + numba.uint64((sx0 - px) * 3)
            do = numba.uint64(sy0 - y) * out_row + numba.uint64((sx0 - x) * 3)
            for _ in range(sy1 - sy0):
                for i in range(n):
                    flat_out[do + i] = tile[so + i]
                so += tile_row
                do += out_row
