"""Interval arithmetic for spatially decomposed convolution and pooling (pure, no communication).

Along one spatial axis a layer with kernel ``k``, stride ``s``, padding ``p`` and dilation ``d``
computes output row ``o`` from input rows ``o*s - p + d*j`` (``j < k``).  Every feature map of
``n`` rows is split over the grid with :func:`~trainer_client.decomposed.groups.partition`, so
grid index ``i`` owns output rows ``[o0, o1)`` and must see input rows

    [o0*s - p,  (o1-1)*s - p + d*(k-1) + 1)

It owns input rows ``[a, b)``; the rows it lacks are received from its two neighbours (never
further away: a thinner neighbour is an error), rows it owns but does not need are cropped, and
rows outside ``[0, n)`` are padding (which therefore only ever appears at the true image border).
Because every rank works in global coordinates, strided sampling grids stay aligned for any
image size, divisible or not.
"""

from __future__ import annotations

from dataclasses import dataclass

from trainer_client.decomposed.groups import partition

__all__ = ["AxisExchange", "plan_axis"]


@dataclass(frozen=True)
class AxisExchange:
    """What one grid index does along one axis before a layer.

    The extended input is ``pad_lo | recv_lo rows from prev | own[crop_lo : size-crop_hi] |
    recv_hi rows from next | pad_hi``; ``send_lo`` first own rows go to ``prev`` and ``send_hi``
    last own rows go to ``next`` (they are the neighbours' ``recv_hi`` / ``recv_lo``).
    """

    size: int
    crop_lo: int
    crop_hi: int
    recv_lo: int
    recv_hi: int
    send_lo: int
    send_hi: int
    pad_lo: int
    pad_hi: int

    def __post_init__(self) -> None:
        values = (self.size, self.crop_lo, self.crop_hi, self.recv_lo, self.recv_hi,
                  self.send_lo, self.send_hi, self.pad_lo, self.pad_hi)
        if min(values) < 0:
            raise ValueError(f"negative extent in {self}")
        if self.crop_lo + self.crop_hi > self.size or max(self.send_lo, self.send_hi) > self.size:
            raise ValueError(f"inconsistent exchange {self}")

    @property
    def extended(self) -> int:
        """Length of the extended input along this axis."""
        return self.pad_lo + self.recv_lo + self.size - self.crop_lo - self.crop_hi + self.recv_hi + self.pad_hi

    @property
    def is_identity(self) -> bool:
        return not any((self.crop_lo, self.crop_hi, self.recv_lo, self.recv_hi,
                        self.send_lo, self.send_hi, self.pad_lo, self.pad_hi))

    @property
    def needs_comm(self) -> bool:
        return bool(self.recv_lo or self.recv_hi or self.send_lo or self.send_hi)


def _axis_error(name: str, axis: str, msg: str) -> ValueError:
    fix = "grid rows" if axis == "row" else "grid columns"
    return ValueError(f"{name}: {msg}; use a larger image or fewer {fix}")


def plan_axis(
    name: str,
    axis: str,
    n_in: int,
    n_out: int,
    parts: int,
    kernel: int,
    stride: int,
    padding: int,
    dilation: int,
) -> tuple[AxisExchange, ...]:
    """Exchanges for every grid index along one axis (``axis`` is ``"row"`` or ``"col"``, for messages).

    Raises ``ValueError`` naming the layer when a grid index would own no rows or would need
    rows beyond its immediate neighbours (a shard thinner than the layer's halo).
    """
    own_in = partition(n_in, parts)
    own_out = partition(n_out, parts)
    need: list[tuple[int, int]] = []
    for i, ((a, b), (o0, o1)) in enumerate(zip(own_in, own_out)):
        if b <= a:
            raise _axis_error(name, axis, f"grid {axis} {i} owns no input {axis}s "
                              f"(the input has {n_in} {axis}s for {parts} grid {axis}s)")
        if o1 <= o0:
            raise _axis_error(name, axis, f"grid {axis} {i} owns no output {axis}s "
                              f"(the output has {n_out} {axis}s for {parts} grid {axis}s)")
        need.append((o0 * stride - padding, (o1 - 1) * stride - padding + dilation * (kernel - 1) + 1))

    recv: list[tuple[int, int]] = []
    crops: list[tuple[int, int]] = []
    for i, ((a, b), (lo, hi)) in enumerate(zip(own_in, need)):
        f_lo, f_hi = max(lo, 0), min(hi, n_in)
        r_lo, r_hi = max(0, a - f_lo), max(0, f_hi - b)
        halo = f"{kernel}-wide kernel, stride {stride}, padding {padding}, dilation {dilation}"
        if f_lo > b or f_hi < a:
            raise _axis_error(name, axis, f"grid {axis} {i} owns {axis}s [{a}, {b}) but needs [{lo}, {hi}) "
                              f"({halo}): its shard is smaller than the layer's halo")
        if r_lo and (i == 0 or r_lo > own_in[i - 1][1] - own_in[i - 1][0]):
            prev = own_in[i - 1] if i else (0, 0)
            raise _axis_error(name, axis, f"grid {axis} {i} needs {r_lo} halo {axis}s from grid {axis} {i - 1} "
                              f"which owns only {prev[1] - prev[0]} ({halo}): a shard is smaller than "
                              "the layer's halo")
        if r_hi and (i == parts - 1 or r_hi > own_in[i + 1][1] - own_in[i + 1][0]):
            nxt = own_in[i + 1] if i < parts - 1 else (0, 0)
            raise _axis_error(name, axis, f"grid {axis} {i} needs {r_hi} halo {axis}s from grid {axis} {i + 1} "
                              f"which owns only {nxt[1] - nxt[0]} ({halo}): a shard is smaller than "
                              "the layer's halo")
        recv.append((r_lo, r_hi))
        crops.append((max(0, f_lo - a), max(0, b - f_hi)))

    out: list[AxisExchange] = []
    for i, ((a, b), (lo, hi)) in enumerate(zip(own_in, need)):
        send_lo = recv[i - 1][1] if i > 0 else 0
        send_hi = recv[i + 1][0] if i < parts - 1 else 0
        ex = AxisExchange(
            size=b - a,
            crop_lo=crops[i][0],
            crop_hi=crops[i][1],
            recv_lo=recv[i][0],
            recv_hi=recv[i][1],
            send_lo=send_lo,
            send_hi=send_hi,
            pad_lo=max(0, -lo),
            pad_hi=max(0, hi - n_in),
        )
        if ex.extended != hi - lo:  # internal invariant
            raise AssertionError(f"{name}: extended length {ex.extended} != {hi - lo}")
        out.append(ex)
    return tuple(out)
