"""Compiled kernels of a batch read: list the tile pieces of many patches, then copy them all without the GIL.

A 256² patch on 256² tiles is four rectangular pieces of four tiles. Copied with numpy, each piece is a
Python statement that builds two views and holds the GIL for part of the strided copy (measured: 40 % of a
4-piece copy's time, ~12 µs per patch in the service). Here the pieces of a whole chunk of patches are
described by two integer arrays, and the copying runs in compiled code without the GIL.

The tiles are separate arrays (the decoded-tile cache holds them one by one), so the kernel receives their
data addresses (``TileCache`` keeps each cached tile's address) and copies each row of a piece with memcpy
(a numba slice assignment of uint8 rows measured 35x slower than numpy). The caller keeps every tile
referenced for the duration of the call; :func:`copy_pieces` checks every piece against its tile and the
buffer first, so the raw copies stay inside both.
"""

from __future__ import annotations

import numpy as np

from loader_service._numba_jit import eager_jit

__all__ = ["copy_pieces", "plan_pieces", "PIECE_FIELDS"]

#: the columns of ``pieces``: destination patch, tile height, tile width, source row and column in the tile,
#: destination row and column in the patch, piece height and width (pixels of 3 bytes)
PIECE_FIELDS = ("patch", "tile_h", "tile_w", "sy", "sx", "dy", "dx", "h", "w")


def _memcpy_intrinsic():  # type: ignore[no-untyped-def]
    from numba import types
    from numba.core import cgutils
    from numba.extending import intrinsic

    @intrinsic  # memcpy(dst address, src address, bytes): LLVM's memcpy, i.e. libc's, from compiled code
    def memcpy(typingctx, dst, src, nbytes):  # type: ignore[no-untyped-def]
        sig = types.void(types.int64, types.int64, types.int64)

        def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
            d, s_, n = args
            cgutils.raw_memcpy(builder, builder.inttoptr(d, cgutils.voidptr_t), builder.inttoptr(s_, cgutils.voidptr_t),
                               n, 1)
            return context.get_dummy_value()

        return sig, codegen

    return memcpy


_memcpy = _memcpy_intrinsic()


@eager_jit("int64(int64, int64, int64, int64, int64[::1], int64[:, ::1])")
def _copy(out_address, patches, height, width, addresses, pieces):  # type: ignore[no-untyped-def]
    """Every piece checked first (returns the first bad one's index, nothing copied), then copied (-1)."""
    for k in range(pieces.shape[0]):
        patch, th, tw, sy, sx, dy, dx, h, w = (pieces[k, 0], pieces[k, 1], pieces[k, 2], pieces[k, 3],
                                               pieces[k, 4], pieces[k, 5], pieces[k, 6], pieces[k, 7], pieces[k, 8])
        if not (0 <= patch < patches and h >= 0 and w >= 0 and sy >= 0 and sx >= 0 and sy + h <= th
                and sx + w <= tw and dy >= 0 and dx >= 0 and dy + h <= height and dx + w <= width
                and addresses[k] != 0):
            return k
    for k in range(pieces.shape[0]):
        patch, tw, sy, sx, dy, dx, h, w = (pieces[k, 0], pieces[k, 2], pieces[k, 3], pieces[k, 4],
                                           pieces[k, 5], pieces[k, 6], pieces[k, 7], pieces[k, 8])
        src = addresses[k] + (sy * tw + sx) * 3
        dst = out_address + ((patch * height + dy) * width + dx) * 3
        for _ in range(h):
            _memcpy(dst, src, w * 3)
            src += tw * 3
            dst += width * 3
    return -1


@eager_jit("Tuple((int64[:, ::1], int64[::1], int64[::1], int64[::1]))(int64[::1], int64[::1], int64[::1], int64, "
           "int64, int64, int64, int64, int64, int64)")
def _plan(xs, ys, rows, width, height, th, tw, across, level_w, level_h):  # type: ignore[no-untyped-def]
    n = xs.shape[0]
    inside = np.zeros(n, np.bool_)
    total = 0
    for p in range(n):
        x, y = xs[p], ys[p]
        if x >= 0 and y >= 0 and x + width <= level_w and y + height <= level_h:
            inside[p] = True
            total += ((x + width - 1) // tw - x // tw + 1) * ((y + height - 1) // th - y // th + 1)
    pieces = np.empty((total, 9), np.int64)
    tiles = np.empty(total, np.int64)
    outside = np.empty(n - inside.sum(), np.int64)
    k = j = 0
    for p in range(n):
        if not inside[p]:
            outside[j] = p
            j += 1
            continue
        x, y = xs[p], ys[p]
        for ty in range(y // th, (y + height - 1) // th + 1):
            y0, y1 = max(y, ty * th), min(y + height, ty * th + th)
            for tx in range(x // tw, (x + width - 1) // tw + 1):
                x0, x1 = max(x, tx * tw), min(x + width, tx * tw + tw)
                pieces[k, 0], pieces[k, 1], pieces[k, 2] = rows[p], th, tw
                pieces[k, 3], pieces[k, 4], pieces[k, 5], pieces[k, 6] = y0 - ty * th, x0 - tx * tw, y0 - y, x0 - x
                pieces[k, 7], pieces[k, 8] = y1 - y0, x1 - x0
                tiles[k] = ty * across + tx
                k += 1
    order = np.argsort(tiles)
    unique = np.empty(total, np.int64)
    which = np.empty(total, np.int64)  # piece -> its tile's position in unique
    u = -1
    for i in range(total):
        t = tiles[order[i]]
        if u < 0 or unique[u] != t:
            u += 1
            unique[u] = t
        which[order[i]] = u
    return pieces, unique[:u + 1].copy(), which, outside


def plan_pieces(xs: np.ndarray, ys: np.ndarray, rows: np.ndarray, width: int, height: int, tile: tuple[int, int],
                across: int, level: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The pieces (:data:`PIECE_FIELDS`, patch = its row) of patches of ``width`` x ``height`` at ``(xs, ys)``
    on a grid of ``tile`` (height, width) tiles ``across`` tiles wide; the distinct tile indices they touch
    (sorted); for each piece the position of its tile in those; and the indices of the patches that reach
    outside the ``level`` (width, height): those have no pieces."""
    return _plan(np.ascontiguousarray(xs, np.int64), np.ascontiguousarray(ys, np.int64),
                 np.ascontiguousarray(rows, np.int64), width, height, tile[0], tile[1], across, level[0], level[1])


def copy_pieces(out: np.ndarray, addresses: np.ndarray, pieces: np.ndarray) -> None:
    """Copy tile pieces into ``out``: a C-contiguous, writable uint8 (patches, height, width, 3) buffer.

    ``addresses[k]``: the data address of piece k's tile, a C-contiguous uint8 (tile_h, tile_w, 3) array the
    caller keeps alive; ``pieces[k]``: the fields of :data:`PIECE_FIELDS`. Raises ValueError (nothing copied)
    when a piece reaches outside its tile or its patch.
    """
    if out.dtype != np.uint8 or out.ndim != 4 or out.shape[3] != 3 or not out.flags.c_contiguous \
            or not out.flags.writeable:
        raise ValueError(f"out must be a C-contiguous, writable uint8 (n, h, w, 3) array, got {out.dtype} {out.shape}")
    pieces = np.ascontiguousarray(pieces, dtype=np.int64)
    addresses = np.ascontiguousarray(addresses, dtype=np.int64)
    if pieces.ndim != 2 or pieces.shape[1] != len(PIECE_FIELDS) or addresses.shape != (pieces.shape[0],):
        raise ValueError(f"pieces must be (k, {len(PIECE_FIELDS)}) with one address each")
    n, height, width = out.shape[:3]
    bad = _copy(int(out.ctypes.data), n, height, width, addresses, pieces)
    if bad >= 0:
        raise ValueError(f"piece {bad} {dict(zip(PIECE_FIELDS, pieces[bad].tolist()))} reaches outside its tile "
                         f"or its {height}x{width} patch (or has no tile)")
