"""Differentiable communication for spatial decomposition: halo exchange, synced batch norm, global pool.

Every function here is a ``torch.autograd.Function`` whose backward is the exact adjoint of its
forward: halo rows are copies of a neighbour's rows, so their gradients are sent back and added
to the owner's; batch-norm statistics are sums over the group, so the backward all-reduces the
two per-channel sums the input gradient needs; the global average pool all-reduces partial sums
and its output is *replicated* (every rank computes the same head and loss), so its backward is
the identity scatter of the upstream gradient.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from trainer_client.decomposed.geometry import AxisExchange

__all__ = [
    "HaloSpec",
    "Link",
    "HaloStash",
    "all_reduce_",
    "global_avg_pool",
    "halo_exchange",
    "rebuild_from_stash",
    "save_extended_as_stash",
    "sync_batch_norm",
]


@dataclass(frozen=True)
class Link:
    """A process group, its size and the bound on every wait; size 1 means no communication."""

    group: dist.ProcessGroup | None = field(compare=False)
    size: int
    timeout: datetime.timedelta

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError("group size must be >= 1")
        if self.timeout.total_seconds() <= 0:
            raise ValueError("timeout must be positive")


def all_reduce_(t: Tensor, link: Link) -> Tensor:
    """In-place sum all-reduce with a bounded wait (a no-op for a group of one)."""
    if link.size == 1:
        return t
    work = dist.all_reduce(t, group=link.group, async_op=True)
    assert work is not None
    work.wait(link.timeout)
    return t


def _p2p(
    sends: list[tuple[Tensor, int]],
    recvs: list[tuple[Tensor, int]],
    link: Link,
) -> None:
    works = [dist.isend(t, dst, group=link.group) for t, dst in sends]
    works += [dist.irecv(t, src, group=link.group) for t, src in recvs]
    for w in works:
        if w is not None:
            w.wait(link.timeout)


@dataclass(frozen=True)
class HaloSpec:
    """A rank's exchange before one layer: per-axis extents and neighbour global ranks."""

    row: AxisExchange
    col: AxisExchange
    row_prev: int | None
    row_next: int | None
    col_prev: int | None
    col_next: int | None
    fill: float = 0.0

    def __post_init__(self) -> None:
        for ex, prev, nxt, axis in ((self.row, self.row_prev, self.row_next, "row"),
                                    (self.col, self.col_prev, self.col_next, "col")):
            if (ex.recv_lo or ex.send_lo) and prev is None:
                raise ValueError(f"{axis} exchange needs a previous neighbour")
            if (ex.recv_hi or ex.send_hi) and nxt is None:
                raise ValueError(f"{axis} exchange needs a next neighbour")


class HaloStash:
    """The received halo slabs of one exchange, kept so the extended input can be rebuilt in backward."""

    __slots__ = ("slabs",)

    def __init__(self) -> None:
        self.slabs: list[tuple[Tensor | None, Tensor | None]] = []


def _assemble(x: Tensor, ex: AxisExchange, dim: int, lo: Tensor | None, hi: Tensor | None, fill: float) -> Tensor:
    pieces: list[Tensor] = []

    def pad(n: int) -> None:
        if n:
            shape = list(x.shape)
            shape[dim] = n
            pieces.append(torch.full(shape, fill, dtype=x.dtype, device=x.device))

    pad(ex.pad_lo)
    if lo is not None:
        pieces.append(lo)
    pieces.append(x.narrow(dim, ex.crop_lo, ex.size - ex.crop_lo - ex.crop_hi))
    if hi is not None:
        pieces.append(hi)
    pad(ex.pad_hi)
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim)


def _exchange_axis(
    x: Tensor, ex: AxisExchange, dim: int, prev: int | None, nxt: int | None,
    link: Link,
) -> tuple[Tensor | None, Tensor | None]:
    sends: list[tuple[Tensor, int]] = []
    recvs: list[tuple[Tensor, int]] = []
    lo = hi = None
    if ex.send_lo:
        assert prev is not None
        sends.append((x.narrow(dim, 0, ex.send_lo).contiguous(), prev))
    if ex.send_hi:
        assert nxt is not None
        sends.append((x.narrow(dim, ex.size - ex.send_hi, ex.send_hi).contiguous(), nxt))
    if ex.recv_lo:
        assert prev is not None
        shape = list(x.shape)
        shape[dim] = ex.recv_lo
        lo = torch.empty(shape, dtype=x.dtype, device=x.device)
        recvs.append((lo, prev))
    if ex.recv_hi:
        assert nxt is not None
        shape = list(x.shape)
        shape[dim] = ex.recv_hi
        hi = torch.empty(shape, dtype=x.dtype, device=x.device)
        recvs.append((hi, nxt))
    if sends or recvs:
        _p2p(sends, recvs, link)
    return lo, hi


def _p2p_slabs(
    sends: list[tuple[Tensor | None, int | None]],
    recv_shapes: list[tuple[list[int] | None, int | None]],
    like: Tensor, link: Link,
) -> list[Tensor | None]:
    """Send non-empty slabs and receive buffers of the given shapes (``None``: nothing)."""
    out: list[Tensor | None] = []
    recvs: list[tuple[Tensor, int]] = []
    for shape, src in recv_shapes:
        if shape is None or src is None:
            out.append(None)
            continue
        buf = torch.empty(shape, dtype=like.dtype, device=like.device)
        recvs.append((buf, src))
        out.append(buf)
    real_sends = [(t.contiguous(), dst) for t, dst in sends if t is not None and dst is not None]
    if real_sends or recvs:
        _p2p(real_sends, recvs, link)
    return out


def _spans(ex: AxisExchange) -> tuple[int, int]:
    """(offset of the kept own rows in the extended axis, number of kept own rows)."""
    return ex.pad_lo + ex.recv_lo, ex.size - ex.crop_lo - ex.crop_hi


def _fill_extended(x: Tensor, spec: HaloSpec, slabs: list[tuple[Tensor | None, Tensor | None]]) -> Tensor:
    """The extended input in one allocation: own block, row slabs, column slabs (with corners), padding."""
    rw, cl = spec.row, spec.col
    (r_lo, r_hi), (c_lo, c_hi) = slabs
    r0, rk = _spans(rw)
    c0, ck = _spans(cl)
    out = torch.empty((*x.shape[:2], rw.extended, cl.extended), dtype=x.dtype, device=x.device)
    if rw.pad_lo:
        out[:, :, : rw.pad_lo].fill_(spec.fill)
    if rw.pad_hi:
        out[:, :, rw.extended - rw.pad_hi:].fill_(spec.fill)
    if cl.pad_lo:
        out[..., : cl.pad_lo].fill_(spec.fill)
    if cl.pad_hi:
        out[..., cl.extended - cl.pad_hi:].fill_(spec.fill)
    out[:, :, r0:r0 + rk, c0:c0 + ck] = x[:, :, rw.crop_lo:rw.crop_lo + rk, cl.crop_lo:cl.crop_lo + ck]
    if r_lo is not None:
        out[:, :, rw.pad_lo:r0, c0:c0 + ck] = r_lo[..., cl.crop_lo:cl.crop_lo + ck]
    if r_hi is not None:
        out[:, :, r0 + rk:r0 + rk + rw.recv_hi, c0:c0 + ck] = r_hi[..., cl.crop_lo:cl.crop_lo + ck]
    if c_lo is not None:
        out[..., cl.pad_lo:c0] = c_lo
    if c_hi is not None:
        out[..., c0 + ck:c0 + ck + cl.recv_hi] = c_hi
    return out


class _HaloExchange(torch.autograd.Function):
    """Rows first, then columns of the row-extended block (so corners come along), without ever
    materialising the row-extended block: only slab-sized pieces and the final tensor are allocated.
    The backward mirrors it: column-halo gradients go home, then row-halo gradients, and the input
    gradient is the only full-size allocation."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, spec: HaloSpec, link: Link, stash: HaloStash | None,
    ) -> Tensor:
        rw, cl = spec.row, spec.col
        r_lo, r_hi = _exchange_axis(x, rw, 2, spec.row_prev, spec.row_next, link)

        def xr_cols(start: int, count: int) -> Tensor | None:  # columns of the row-extended block
            if not count:
                return None
            return _assemble(x.narrow(3, start, count), rw, 2,
                             None if r_lo is None else r_lo.narrow(3, start, count),
                             None if r_hi is None else r_hi.narrow(3, start, count), spec.fill)

        def shape(n: int) -> list[int] | None:
            return [*x.shape[:2], rw.extended, n] if n else None

        c_lo, c_hi = _p2p_slabs(
            [(xr_cols(0, cl.send_lo), spec.col_prev), (xr_cols(cl.size - cl.send_hi, cl.send_hi), spec.col_next)],
            [(shape(cl.recv_lo), spec.col_prev), (shape(cl.recv_hi), spec.col_next)], x, link)
        slabs = [(r_lo, r_hi), (c_lo, c_hi)]
        out = _fill_extended(x, spec, slabs)
        if stash is not None:
            stash.slabs = slabs
        ctx.spec, ctx.link, ctx.x_shape = spec, link, x.shape
        return out

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, None, None, None]:  # type: ignore[override]
        spec: HaloSpec = ctx.spec
        rw, cl = spec.row, spec.col
        n, c = g.shape[:2]
        r0, rk = _spans(rw)
        c0, ck = _spans(cl)
        # 1. column halos (all extended rows) go home; receive the gradients of the columns we sent
        rc_lo, rc_hi = _p2p_slabs(
            [(g[..., cl.pad_lo:c0] if cl.recv_lo else None, spec.col_prev),
             (g[..., c0 + ck:c0 + ck + cl.recv_hi] if cl.recv_hi else None, spec.col_next)],
            [([n, c, rw.extended, cl.send_lo] if cl.send_lo else None, spec.col_prev),
             ([n, c, rw.extended, cl.send_hi] if cl.send_hi else None, spec.col_next)], g, ctx.link)

        def gr_rows(start: int, count: int) -> Tensor | None:  # rows of the row-extended block's gradient
            if not count:
                return None
            t = g.new_zeros((n, c, count, cl.size))
            t[..., cl.crop_lo:cl.crop_lo + ck] = g[:, :, start:start + count, c0:c0 + ck]
            if rc_lo is not None:
                t[..., : cl.send_lo] += rc_lo[:, :, start:start + count]
            if rc_hi is not None:
                t[..., cl.size - cl.send_hi:] += rc_hi[:, :, start:start + count]
            return t

        # 2. row halos go home; receive the gradients of the rows we sent
        rr_lo, rr_hi = _p2p_slabs(
            [(gr_rows(rw.pad_lo, rw.recv_lo), spec.row_prev), (gr_rows(r0 + rk, rw.recv_hi), spec.row_next)],
            [([n, c, rw.send_lo, cl.size] if rw.send_lo else None, spec.row_prev),
             ([n, c, rw.send_hi, cl.size] if rw.send_hi else None, spec.row_next)], g, ctx.link)
        # 3. the input gradient: own block plus everything that came back
        gx = g.new_zeros(ctx.x_shape)
        own = gx[:, :, rw.crop_lo:rw.crop_lo + rk]
        own[..., cl.crop_lo:cl.crop_lo + ck] = g[:, :, r0:r0 + rk, c0:c0 + ck]
        if rc_lo is not None:
            own[..., : cl.send_lo] += rc_lo[:, :, r0:r0 + rk]
        if rc_hi is not None:
            own[..., cl.size - cl.send_hi:] += rc_hi[:, :, r0:r0 + rk]
        if rr_lo is not None:
            gx[:, :, : rw.send_lo] += rr_lo
        if rr_hi is not None:
            gx[:, :, rw.size - rw.send_hi:] += rr_hi
        return gx, None, None, None


def halo_exchange(
    x: Tensor, spec: HaloSpec, link: Link, stash: HaloStash | None = None,
) -> Tensor:
    """Extend the local NCHW shard ``x`` by its halos (and border padding); differentiable."""
    if x.dim() != 4:
        raise ValueError(f"halo_exchange expects an NCHW tensor, got shape {tuple(x.shape)}")
    if x.shape[2] != spec.row.size or x.shape[3] != spec.col.size:
        raise ValueError(f"shard shape {tuple(x.shape[2:])} does not match the plan "
                         f"({spec.row.size}, {spec.col.size})")
    out: Tensor = _HaloExchange.apply(x, spec, link, stash)
    return out


def rebuild_from_stash(x: Tensor, spec: HaloSpec, stash: HaloStash) -> Tensor:
    """Recreate the extended input from ``x`` and the stashed halo slabs (no communication)."""
    return _fill_extended(x, spec, stash.slabs)


class _Rebuild:
    __slots__ = ("x", "spec", "stash")

    def __init__(self, x: Tensor, spec: HaloSpec, stash: HaloStash) -> None:
        self.x, self.spec, self.stash = x, spec, stash


@contextmanager
def save_extended_as_stash(x: Tensor, ext: Tensor, spec: HaloSpec, stash: HaloStash) -> Iterator[None]:
    """While active, an op saving ``ext`` for backward saves ``(x, halo slabs)`` instead.

    ``x`` is normally alive anyway (the previous op saved it), so a decomposed layer costs only
    its halo slabs on top of what the undecomposed layer keeps; the extended input is rebuilt,
    without communication, when the backward needs it.
    """
    key = (ext.untyped_storage().data_ptr(), ext.storage_offset(), tuple(ext.shape), ext.stride())

    def pack(t: Tensor) -> Any:
        if (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride()) == key:
            return _Rebuild(x.detach(), spec, stash)
        return t

    def unpack(obj: Any) -> Tensor:
        if isinstance(obj, _Rebuild):
            return rebuild_from_stash(obj.x, obj.spec, obj.stash)
        return obj  # type: ignore[no-any-return]

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


def _channel_dot(a: Tensor, b: Tensor, chunk: int = 1 << 18) -> Tensor:
    """Per-channel ``(a * b).sum((0, 2, 3))`` with temporaries of at most ``chunk`` elements."""
    n, c, h, w = a.shape
    rows = max(1, chunk // max(1, n * c * w))
    out = torch.zeros(c, dtype=a.dtype, device=a.device)
    for r in range(0, h, rows):
        out += (a[:, :, r:r + rows] * b[:, :, r:r + rows]).sum((0, 2, 3))
    return out


class _SyncBatchNorm(torch.autograd.Function):
    """Statistics: local Welford (``var_mean``), merged over the group with Chan's formula (two small
    all-reduces).  No full-size temporaries besides the output, in forward or backward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float,
        link: Link,
    ) -> tuple[Tensor, Tensor, Tensor]:
        c = x.shape[1]
        n_local = x.numel() // c
        var_l, mean_l = torch.var_mean(x, dim=(0, 2, 3), correction=0)
        first = torch.cat([mean_l * n_local, x.new_tensor([float(n_local)])])
        all_reduce_(first, link)
        n = float(first[c].item())
        if n <= 1:
            raise ValueError(f"expected more than 1 value per channel when training, got {int(n)}")
        mean = first[:c] / n
        m2 = var_l * n_local + n_local * (mean_l - mean) ** 2
        all_reduce_(m2, link)
        var = m2 / n
        invstd = torch.rsqrt(var + eps)
        scale = invstd if weight is None else invstd * weight
        y = x - mean.view(1, c, 1, 1)
        y.mul_(scale.view(1, c, 1, 1))
        if bias is not None:
            y.add_(bias.view(1, c, 1, 1))
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.n, ctx.link = n, link
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, g: Tensor, _gm: Tensor | None, _gv: Tensor | None
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, None, None]:
        x, weight, mean, invstd = ctx.saved_tensors
        c = x.shape[1]
        g = g.contiguous()
        sum_g = g.sum((0, 2, 3))
        sum_g_xc = _channel_dot(g, x) - mean * sum_g  # sum g * (x - mean)
        gw = gb = gx = None
        if ctx.needs_input_grad[1]:
            gw = sum_g_xc * invstd
        if ctx.needs_input_grad[2]:
            gb = sum_g.clone()
        if ctx.needs_input_grad[0]:
            red = torch.cat([sum_g, sum_g_xc])
            all_reduce_(red, ctx.link)
            mean_g = red[:c] / ctx.n
            proj = red[c:] / ctx.n * invstd * invstd
            scale = invstd if weight is None else invstd * weight
            # gx = (g - mean_g - (x - mean) * proj) * scale, as a per-channel affine map of g and x
            gx = g * scale.view(1, c, 1, 1)
            gx.addcmul_(x, (-proj * scale).view(1, c, 1, 1))
            gx.add_(((mean * proj - mean_g) * scale).view(1, c, 1, 1))
        return gx, gw, gb, None, None


def sync_batch_norm(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float,
    link: Link,
) -> tuple[Tensor, Tensor, Tensor]:
    """Training-mode batch norm with statistics over the whole group; returns ``(y, mean, biased var)``.

    Two small all-reduces in forward (means, then centred second moments: no cancellation) and
    one in backward.  Parameter gradients are the local partial sums (reduce them over the group).
    """
    y, mean, var = _SyncBatchNorm.apply(x, weight, bias, eps, link)
    return y, mean, var


class _GlobalAvgPool(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, total: int, link: Link
    ) -> Tensor:
        s = x.sum((2, 3), keepdim=True)
        all_reduce_(s, link)
        ctx.shape, ctx.total = x.shape, total
        return s / total

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        return (g / ctx.total).expand(ctx.shape).contiguous(), None, None


def global_avg_pool(
    x: Tensor, total: int, link: Link
) -> Tensor:
    """Mean over the whole image (``total`` = H*W); the result is replicated on every rank."""
    out: Tensor = _GlobalAvgPool.apply(x, total, link)
    return out
