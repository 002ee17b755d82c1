"""One streaming session: credits in, batches out, never more in flight than the client granted.

With the shared-memory or CUDA IPC transport a batch also needs a free slot; slots come back when the client
releases them (or all at once when the session ends: the segment is unlinked, the GPU pool freed). CUDA IPC
sessions build their batches on the service's GPU and copy them into a slot there, never through the host.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future
from dataclasses import dataclass

import torch
from prometheus_client import Counter

from loader_service.budget import BudgetAccount
from loader_service.forecast import TileForecast
from loader_service.errors import InvalidRequest, Stalled, Unavailable
from loader_service.handoff import Wakeup
from loader_service.metrics import Metrics
from loader_service.pipeline import BuiltBatch
from loader_service.requests import SessionRequest
from loader_service.sampling import EpochPlan, Sample, SampleRun, ShardCursor
from loader_service.transport import batch_response
from loader_service.transport.cuda_ipc import CudaSlotPool
from loader_service.transport.shm import SlotBook, SlotPool
from loader_service.views import PieceSpec, view_pieces
from loader_service.augment import draw_params
from wsi_loader.v1 import loader_pb2 as pb

__all__ = ["Gate", "Session", "SessionLimits", "check_open"]

log = logging.getLogger(__name__)
_NO_PIXELS = torch.empty(0, dtype=torch.uint8)
_Pending = tuple[int, int, "Future[tuple[BuiltBatch, pb.StreamResponse, int]]"]

class Gate:
    """Credits the client granted (capped), room in the service's memory budget and, with shared memory or
    CUDA IPC, free slots; one condition for all three (the budget wakes it when another session frees memory)."""

    def __init__(self, cap: int, metrics: Metrics, account: BudgetAccount | None = None, cost: int = 0) -> None:
        self.cond = threading.Condition()
        self._cap = cap
        self._credits = 0
        self._closed = False
        self._metrics = metrics
        self.slots: SlotBook | None = None
        self.slot_kind = "shared-memory"
        self.account = account
        self.cost = cost  # bytes one batch holds in flight (reserved before it is built)
        self.within_share = True  # sessions with slots are bounded by their slots, not their share

    def notify(self) -> None:
        with self.cond:
            self.cond.notify_all()

    def _fits(self) -> bool:
        return self.account is None or self.account.budget.fits(self.account, self.cost, self.within_share)

    def grant(self, n: int) -> None:
        with self.cond:
            if self._closed:  # a credit arriving after the session ended must not show as available
                return
            before = self._credits
            self._credits = min(self._cap, self._credits + n)
            self._metrics.credits.inc(self._credits - before)
            self.cond.notify_all()

    def _ready(self) -> bool:
        return self._credits > 0 and (self.slots is None or self.slots.free_slots() > 0) and self._fits()

    def try_take(self) -> int | None:
        """Take one credit (one slot, ``cost`` bytes of the budget): the slot id, -1 without slots (gRPC bytes),
        None if not possible now."""
        with self.cond:
            if self._closed or not self._ready():
                return None
            if self.account is not None and not self.account.try_reserve(self.cost, within_share=self.within_share):
                return None
            self._credits -= 1
            self._metrics.credits.dec()
            return self.slots.take() if self.slots is not None else -1

    def wait(self, timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: self._ready() or self._closed, timeout=timeout) and not self._closed

    def release(self, slots: list[int]) -> None:
        if self.slots is not None:
            with self.cond:
                self.slots.give_back(slots)

    def close(self) -> None:
        with self.cond:
            self._metrics.credits.dec(self._credits)
            self._credits = 0
            self._closed = True
            self.cond.notify_all()

    def starved_reason(self) -> str:
        with self.cond:
            if self._credits == 0:
                return "client granted no credit"
            if not self._fits() and self.account is not None:
                budget = self.account.budget
                return (f"the service's in-flight memory budget is full ({budget.used / 2**20:.0f} of "
                        f"{budget.total / 2**20:.0f} MiB, max_inflight_mb; this session holds "
                        f"{self.account.held / 2**20:.0f} MiB, its share is one batch and {budget.share() / 2**20:.0f} MiB): "
                        "read the batches already sent")
            return (f"client holds all {self.slots.count if self.slots else 0} {self.slot_kind} slots "
                    "(release batches)")


@dataclass(frozen=True)
class SessionLimits:
    max_credits: int
    credit_timeout_s: float
    batch_timeout_s: float = 600.0


class Session:
    """Runs one Stream RPC after its `open` message was validated into ``request`` and ``plan``."""

    def __init__(self, request: SessionRequest, plan: EpochPlan, build: Callable[..., BuiltBatch],
                 batch_pool: Executor, metrics: Metrics, limits: SessionLimits,
                 draining: threading.Event, build_piece: Callable[..., BuiltBatch] | None = None,
                 account: BudgetAccount | None = None, batch_cost: int = 0,
                 forecast: TileForecast | None = None) -> None:
        self.id = uuid.uuid4().hex[:12]
        self.request = request
        self.plan = plan
        self.cursor = ShardCursor(plan, request.batch_size, request.cursor, request.drop_last)
        self.build = build
        self.build_piece = build_piece or build
        self._unit_iter = self._units()
        self._next_unit: tuple[int, int, list[Sample], list[int], PieceSpec | None] | None = None
        self.batch_pool = batch_pool
        self.metrics = metrics
        self.limits = limits
        self.draining = draining
        self.account = account
        self.gate = Gate(limits.max_credits, metrics, account, batch_cost)
        if account is not None:
            account.wake = self.gate.notify
        self.gone = threading.Event()
        self.client_closed = threading.Event()  # the client half-closed its requests: it wants nothing more
        self.transport = "grpc"
        self.pool: SlotPool | CudaSlotPool | None = None
        self.completed = False  # the end-of-epoch message was handed to gRPC
        self._built = Wakeup()  # set as each build ends (GIL-free hand-off, see loader_service.handoff)
        self.forecast = forecast  # announces the tiles of the coming batches to the tile cache
        self._counted: tuple[Counter, Counter, Counter] | None = None  # see _count

    def use_shm(self, pool: SlotPool) -> None:
        self.pool = self.gate.slots = pool
        self.gate.within_share = False
        self.transport = "shm"

    def use_cuda(self, pool: CudaSlotPool) -> None:
        """Batches stay on the service's GPU: built there, copied into ``pool``'s slots, sent as CudaRefs."""
        self.pool = self.gate.slots = pool
        self.gate.within_share = False
        self.gate.slot_kind = "CUDA IPC"
        self.transport = "cuda_ipc"

    # --- requests from the client ------------------------------------------------------------------------
    def consume_requests(self, requests: Iterator[pb.StreamRequest]) -> None:
        """Runs on its own thread: credits and releases until the client half-closes or vanishes."""
        try:
            for message in requests:
                kind = message.WhichOneof("kind")
                if kind == "credit":
                    self.gate.grant(message.credit.batches)
                elif kind == "release":
                    self.gate.release(list(message.release.slots))
                else:
                    log.warning("session %s: second `open` ignored; open a new stream for a new session", self.id)
        except Exception:  # noqa: BLE001 - the stream broke: the client is gone
            return
        # The client half-closed: it sends no more credits, so the session ends now (a normal close, not an error).
        self.client_closed.set()
        self.gate.close()

    def on_rpc_done(self) -> None:
        self.gone.set()
        self.gate.close()

    def close(self) -> None:
        """Give back the session's part of the memory budget (its slot pool was closed first) and withdraw the
        reads it announced to the tile cache."""
        if self.forecast is not None:
            self.forecast.close()
        if self.account is not None:
            self.account.close()

    # --- batches to the client ---------------------------------------------------------------------------
    def _make(self, samples: list[Sample], labels: list[int], slot: int, piece: PieceSpec | None, sequence: int,
              cursor_after: int) -> tuple[BuiltBatch, pb.StreamResponse, int]:
        """Build the batch and its whole message on a batch thread: the sending thread only yields it.

        Returns the batch without its pixels (they are in the message or the slot now, never held twice), the
        message, and the pixels' size in bytes."""
        try:
            built = self._build(samples, labels, piece)
        finally:
            if self.forecast is not None and piece is None:
                self.forecast.done(samples.start if isinstance(samples, SampleRun) else samples[0].index)
        nbytes = built.images.numel() * built.images.element_size()
        t0 = time.perf_counter()
        tensor: pb.Tensor | None = None  # None: the pixels travel as bytes in the message
        if slot >= 0:
            pool = self.pool
            assert pool is not None
            images = built.images
            dtype, shape = str(images.dtype).removeprefix("torch."), list(images.shape)
            if isinstance(pool, CudaSlotPool):
                tensor = pb.Tensor(dtype=dtype, shape=shape, cuda=pool.write(slot, images))
            else:
                nbytes = pool.write(slot, images)
                ref = pb.ShmRef(segment=pool.name, offset=pool.offset(slot), nbytes=nbytes, slot=slot)
                tensor = pb.Tensor(dtype=dtype, shape=shape, shm=ref)
        message = batch_response(built, sequence, cursor_after, self.plan.labels, tensor)
        built.timings["serialize"] = time.perf_counter() - t0
        built.images = _NO_PIXELS
        built.context, built.masks = [], None  # in the message now: never held twice
        return built, message, nbytes

    def _build(self, samples: list[Sample], labels: list[int], piece: PieceSpec | None) -> BuiltBatch:
        """Build on the batch thread; CUDA IPC batches stay on the device (``pool.write`` then copies them on
        this thread's current stream, the one they were made on)."""
        extra = {"on_device": True} if self.transport == "cuda_ipc" else {}
        if piece is None:
            return self.build(samples, labels, **extra)
        return self.build_piece(samples, labels, piece=piece, **extra)

    def _units(self) -> Iterator[tuple[int, int, list[Sample], list[int], PieceSpec | None]]:
        """(sequence, cursor after, samples, labels, piece) for every message still to send, lazily."""
        sequence = 0
        view, req = self.request.view, self.request
        while True:
            start = self.cursor.cursor
            samples = self.cursor.next_batch()
            if samples is None:
                return
            labels = samples.label if isinstance(samples, SampleRun) else [self.plan.label_index(s.record)
                                                                            for s in samples]
            if not view.pieces_per_sample:
                if self.forecast is not None:
                    self.forecast.ahead(start)
                yield sequence, self.cursor.cursor, samples, labels, None
                sequence += 1
                continue
            sample = samples[0]
            params = draw_params(req.augment, req.spec.seed, req.epoch, sample.global_index) if req.augment else None
            raw_hw = (sample.height, sample.width)
            pieces = view_pieces(view, params.output_size(*raw_hw) if params else raw_hw)
            for piece in pieces:  # a sample counts as consumed only with its last piece
                last = piece is pieces[-1]
                yield sequence, self.cursor.cursor if last else start, samples, labels, piece
                sequence += 1

    def _submit(self, slot: int, unit: tuple[int, int, list[Sample], list[int], PieceSpec | None]) -> _Pending:
        sequence, cursor_after, samples, labels, piece = unit
        future = self.batch_pool.submit(self._make, samples, labels, slot, piece, sequence, cursor_after)
        future.add_done_callback(self._wake)
        self.metrics.in_flight.inc()
        return sequence, cursor_after, future

    def _wake(self, _future: Future[tuple[BuiltBatch, pb.StreamResponse, int]]) -> None:
        self._built.set()

    def _result(self, sequence: int, future: Future[tuple[BuiltBatch, pb.StreamResponse, int]]
                ) -> tuple[BuiltBatch, pb.StreamResponse, int]:
        """The build's result, waiting on the session's Wakeup (not in ``future.result``, whose wake-up would
        hold the GIL on the build thread)."""
        deadline = time.monotonic() + self.limits.batch_timeout_s
        while not future.done():
            if not self._built.wait(deadline - time.monotonic()) and not future.done():
                raise Stalled(f"building batch {sequence} took over {self.limits.batch_timeout_s:.0f}s")
        return future.result()

    def _fill(self, pending: deque[_Pending]) -> bool:
        """Submit builds while credits (slots, budget) allow. Returns False once every unit was submitted."""
        while not self.draining.is_set() and not self.client_closed.is_set():
            if self._next_unit is None:
                try:
                    self._next_unit = next(self._unit_iter, None)
                except ValueError as err:  # the view cannot cut this sample (e.g. a shard grid finer than it)
                    raise InvalidRequest(f"sample cannot be served in the {self.request.view.view} view: {err}") from err
                if self._next_unit is None:
                    return False
            slot = self.gate.try_take()
            if slot is None:
                return True
            pending.append(self._submit(slot, self._next_unit))
            self._next_unit = None
        return True

    def _release(self, nbytes: int) -> None:
        if self.account is not None:
            self.account.release(nbytes)

    def batches(self) -> Iterator[pb.StreamResponse]:
        pending: deque[_Pending] = deque()
        handing_off = 0  # budget bytes of the message gRPC is taking now
        sent = substituted = 0
        sent_cursor = self.cursor.cursor  # the cursor after the last batch handed to gRPC
        try:
            while True:
                more = self._fill(pending)
                if not pending:
                    if not more:
                        break
                    if self.draining.is_set():  # every batch built was sent: resume after the last one
                        raise Unavailable(
                            f"server is shutting down; reconnect and resume from cursor {sent_cursor}"
                        )
                    if not self.gate.wait(self.limits.credit_timeout_s):
                        if self.gone.is_set() or self.client_closed.is_set():
                            return
                        raise Stalled(f"{self.gate.starved_reason()} for {self.limits.credit_timeout_s:.0f}s; "
                                      "read batches (or send Credit/Release) to keep the session alive")
                    continue
                sequence, cursor_after, future = pending[0]
                built, message, nbytes = self._result(sequence, future)
                pending.popleft()
                self.metrics.in_flight.dec()
                if self.client_closed.is_set():
                    self._release(self.gate.cost)
                    return
                t0 = time.perf_counter()
                handing_off = self.gate.cost
                del future
                yield message
                del message
                handing_off = 0
                self._release(self.gate.cost)  # gRPC has the bytes now
                sent_cursor = cursor_after
                sent_s = time.perf_counter() - t0
                if self.gone.is_set() or self.client_closed.is_set():
                    return
                self._count(built, nbytes, built.timings.get("serialize", 0.0), sent_s)
                sent += len(built.samples)
                if not isinstance(built.samples, SampleRun):  # a run has no substitutes
                    substituted += sum(1 for s in built.samples if s.substituted)
            self.completed = True  # before the yield: the client may hang up as soon as it sees the end
            yield pb.StreamResponse(end=pb.EndOfEpoch(samples=sent, cursor=self.cursor.cursor, substituted=substituted))
        finally:
            if handing_off:
                self._release(handing_off)
            cost = self.gate.cost
            for _, _, pending_future in pending:
                pending_future.cancel()  # a build already running gives its bytes back when it ends
                pending_future.add_done_callback(lambda _f: self._release(cost))
                self.metrics.in_flight.dec()
            pending.clear()
            self.gate.close()
            self._built.close()  # a build still running sets it later: a closed Wakeup ignores that

    def _count(self, built: BuiltBatch, nbytes: int, serialize_s: float, send_s: float) -> None:
        self.metrics.stage["serialize"].observe(serialize_s)
        self.metrics.stage["send"].observe(send_s)
        counted = self._counted
        if counted is None:  # the session's children of the labelled counters, looked up once
            m, transport = self.metrics, self.transport
            counted = self._counted = (m.patches.labels(dataset=self.request.dataset, transport=transport),
                                       m.bytes.labels(transport=transport), m.batches.labels(transport=transport))
        counted[0].inc(len(built.samples))
        counted[1].inc(nbytes)
        counted[2].inc()


def check_open(message: pb.StreamRequest | None) -> pb.OpenSession:
    if message is None:
        raise InvalidRequest("the stream closed before `open`: send OpenSession first")
    if message.WhichOneof("kind") != "open":
        raise InvalidRequest("the first message of a Stream must be `open` (OpenSession); send it before credits")
    return message.open
