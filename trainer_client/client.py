"""The trainer's side of the service: unary calls and the batch stream as an ``IterableDataset``."""

from __future__ import annotations

import atexit
import dataclasses
import logging
import os
import queue
import sys
import threading
import time
import weakref
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from trainer_client.channel import ConnectionConfig, open_channel
from trainer_client.config import StreamConfig
from trainer_client.cuda_ipc import CudaReceiver
from trainer_client.elastic import Stages, stages_for, wire
from trainer_client.errors import InvalidRequestError, LoaderError, StalledError, UnavailableError, raise_from_rpc
from trainer_client.shm import ShmProbe, ShmReceiver, shm_supported
from wsi_loader.v1 import loader_pb2 as pb
from wsi_loader.v1 import loader_pb2_grpc as pb_grpc

__all__ = ["LoaderClient", "StreamStats", "WSIStream", "decode_tensor", "distributed_rank"]

log = logging.getLogger(__name__)
_END = object()
_CLOSE_WAIT_S = 2.0  # how long close() waits for the service to end a half-closed stream before cancelling
_WIRE = {"grpc": pb.GRPC, "shm": pb.SHM, "cuda_ipc": pb.CUDA_IPC}
_NAMES = {pb.SHM: "shm", pb.CUDA_IPC: "cuda_ipc"}  # anything else: gRPC bytes
_FALLBACK_HINT = "use transport='shm' or 'grpc'"
_OPEN_CALLS: weakref.WeakSet[_Call] = weakref.WeakSet()  # closed by LoaderClient.close and at exit


def decode_tensor(message: pb.Tensor, pin_memory: bool = False) -> torch.Tensor:
    """A tensor from inline bytes: one copy into a writable (optionally pinned) tensor."""
    dtype = np.dtype(message.dtype)
    shape = tuple(message.shape)
    out = torch.empty(shape, dtype=torch.from_numpy(np.empty(0, dtype)).dtype, pin_memory=pin_memory)
    if out.numel():
        out.numpy().reshape(-1)[:] = np.frombuffer(message.data, dtype=dtype)
    return out


def distributed_rank() -> tuple[int, int]:
    """(rank, world_size) from torch.distributed when initialised, else from RANK/WORLD_SIZE, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def resolve_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """The given (rank, world_size), each defaulting to :func:`distributed_rank`'s; checked."""
    auto_rank, auto_world = distributed_rank()
    rank = auto_rank if rank is None else rank
    world_size = auto_world if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} must be in 0..world_size-1 (world_size {world_size})")
    return rank, world_size


def _piece(meta: pb.SampleMeta) -> dict[str, Any]:
    p = meta.piece
    return {"image_hw": (p.image_height, p.image_width), "rect": (p.y, p.x, p.height, p.width),
            "core": (p.core_y, p.core_x, p.core_height, p.core_width), "index": p.index, "count": p.count}


def _cuda_tensor(receiver: CudaReceiver, message: pb.Tensor) -> torch.Tensor:
    """A zero-copy CUDA tensor over the server's slot; the client's error family when this process cannot."""
    try:
        receiver.device_for(message.cuda.device_uuid)
    except ValueError as err:
        raise InvalidRequestError(f"CUDA IPC: {err}; {_FALLBACK_HINT}") from err
    try:
        return receiver.tensor(message)
    except (RuntimeError, ValueError) as err:  # cudaIpcOpenMemHandle refused (containers without --ipc=host, ...)
        raise InvalidRequestError(f"CUDA IPC: cannot use the server's GPU slot {message.cuda.slot} ({err}); "
                                  f"{_FALLBACK_HINT}") from err


class LoaderClient:
    """A connection to one service. Thread-safe; close it (or use ``with``) when done."""

    def __init__(self, endpoint: str | ConnectionConfig, **connection: Any) -> None:
        self.connection = endpoint if isinstance(endpoint, ConnectionConfig) else ConnectionConfig(endpoint, **connection)
        self.channel = open_channel(self.connection)
        self.stub = pb_grpc.LoaderStub(self.channel)

    def _call(self, what: str, method: Any, request: Any) -> Any:
        try:
            return method(request, timeout=self.connection.timeout_s, metadata=self.connection.metadata())
        except grpc.RpcError as err:
            raise_from_rpc(err, f"{what} at {self.connection.endpoint}")

    def wait_ready(self, timeout_s: float | None = None, *, fail_fast: bool = False) -> None:
        """Wait until the service answers (``connect_timeout_s`` by default).

        Raises UnavailableError naming the endpoint and gRPC's reason (refused, unknown host, TLS...) when it
        does not; with ``fail_fast``, at the first failed connection attempt instead of retrying until then.
        """
        timeout = self.connection.connect_timeout_s if timeout_s is None else timeout_s
        endpoint = self.connection.endpoint
        deadline = time.monotonic() + timeout
        reason = self._probe(min(timeout, 5.0), wait=False)  # fails at once when the connection does
        if reason and not fail_fast and time.monotonic() < deadline:
            log.warning("cannot connect to the service at %s yet (%s); retrying for up to %.0fs "
                        "(connect_timeout_s)", endpoint, reason, timeout)
            reason = self._probe(max(0.0, deadline - time.monotonic()), wait=True)
        if reason:
            raise UnavailableError(f"cannot connect to the service at {endpoint} within {timeout:.1f}s: {reason}; "
                                   "check the endpoint (HOST:PORT) and that the service is running")

    def _probe(self, timeout: float, wait: bool) -> str:
        """'' when the service answers a call within ``timeout`` (waiting for a connection or not), else why not."""
        try:
            self.stub.ListDatasets(pb.ListDatasetsRequest(), timeout=timeout, wait_for_ready=wait,
                                   metadata=self.connection.metadata())
        except grpc.RpcError as err:
            code = err.code()  # type: ignore[attr-defined]
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                return f"{err.details()} [{code.name}]"  # type: ignore[attr-defined]
        return ""  # answered (an authorization error is an answer too: the call that needs it reports it)

    def datasets(self) -> list[pb.DatasetSummary]:
        return list(self._call("ListDatasets", self.stub.ListDatasets, pb.ListDatasetsRequest()).datasets)

    def describe(self, dataset: str) -> pb.DatasetInfo:
        return self._call("DescribeDataset", self.stub.DescribeDataset, pb.DescribeDatasetRequest(dataset=dataset))

    def read_region(self, dataset: str, slide_id: str, x: int, y: int, width: int, height: int, *, level: int = 0,
                    mpp: float = 0.0) -> torch.Tensor:
        """uint8 (height, width, 3) RGB pixels of one region, without augmentation."""
        request = pb.ReadRegionRequest(dataset=dataset, slide_id=slide_id, level=level, mpp=mpp, x=x, y=y,
                                       width=width, height=height)
        return decode_tensor(self._call("ReadRegion", self.stub.ReadRegion, request))

    def stream(self, config: StreamConfig, **kwargs: Any) -> WSIStream:
        return WSIStream(config, client=self, **kwargs)

    def close(self) -> None:
        """Close the streams still open on this client (a normal close for the service), then the channel."""
        for call in list(_OPEN_CALLS):
            if call.client is self:
                call.close()
        self.channel.close()

    def __enter__(self) -> LoaderClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Call:
    """One Stream RPC: a request queue feeding gRPC, and a reader thread filling a bounded batch queue."""

    def __init__(self, client: LoaderClient, open_message: pb.OpenSession, credits: int) -> None:
        self.client = client
        self._requests: queue.Queue[pb.StreamRequest | object] = queue.Queue()
        self._requests.put(pb.StreamRequest(open=open_message))  # credits follow once `opened` is handled
        self.responses: queue.Queue[Any] = queue.Queue(maxsize=credits + 2)
        self.receiver: ShmReceiver | CudaReceiver | None = None
        self._closed = False
        self._close_lock = threading.Lock()  # close() may come from the trainer, LoaderClient.close or exit
        self._call = client.stub.Stream(self._request_iter(), metadata=client.connection.metadata())
        self._reader = threading.Thread(target=self._read, daemon=True, name="loader-stream")
        self._reader.start()
        _OPEN_CALLS.add(self)

    def _request_iter(self) -> Iterator[pb.StreamRequest]:
        while True:
            item = self._requests.get()
            if item is _END:
                return
            assert isinstance(item, pb.StreamRequest)
            yield item

    def _read(self) -> None:
        try:
            for response in self._call:
                self.responses.put(response)
            self.responses.put(_END)
        except grpc.RpcError as err:
            self.responses.put(err)

    def grant(self, n: int = 1) -> None:
        self._requests.put(pb.StreamRequest(credit=pb.Credit(batches=n)))

    def release(self, slots: list[int]) -> None:
        """Called from tensor finalizers, on any thread: a queue put only."""
        self._requests.put(pb.StreamRequest(release=pb.Release(slots=slots)))

    def close(self) -> None:
        """End the call; idempotent. Half-close first: the service ends the session at once and counts a normal
        close, not a vanished client. Batches still arriving are dropped so the reader sees the end; cancel if
        it does not come."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        _OPEN_CALLS.discard(self)
        if sys.is_finalizing():
            # Daemon threads (gRPC's, this call's reader) are frozen now, perhaps holding the call's lock:
            # cancelling could wait forever. The process is ending; the service sees the connection drop.
            return
        self._requests.put(_END)
        deadline = time.monotonic() + _CLOSE_WAIT_S
        while self._reader.is_alive() and time.monotonic() < deadline:
            try:
                self.responses.get(timeout=0.05)
            except queue.Empty:
                pass
        self._call.cancel()
        self._reader.join(timeout=5)
        if self.receiver is not None:
            self.receiver.close()


@atexit.register
def _close_open_calls() -> None:
    """Close the streams still open when the interpreter exits, while gRPC's daemon threads still run.

    A stream left open (an iterator never exhausted nor closed) would otherwise be closed by its generator's
    ``finally`` during finalization, after those threads were frozen, and could wait on a lock one of them
    holds: the process would never exit."""
    for call in list(_OPEN_CALLS):
        call.close()


@dataclasses.dataclass
class StreamStats:
    """Counters of one stream over its life (every epoch): ``stream.stats``."""

    batches: int = 0  # batches handed to the trainer
    reconnects: int = 0  # sessions reopened at the cursor after the service went away
    reconnect_attempts: int = 0  # attempts, failed ones included
    last_break: str = ""  # why the last session broke


class WSIStream(IterableDataset):  # type: ignore[type-arg]
    """Batches of augmented patches as dicts of tensors; one pass of ``iter()`` is one epoch of this rank.

    Usable directly (``for batch in stream``) or in ``DataLoader(stream, batch_size=None)`` with
    ``num_workers=0`` (the service does the parallel work; worker processes are refused: their cursor would
    not be the one ``state_dict()`` saves). ``state_dict()`` taken after a batch resumes right after it:
    nothing repeated, nothing skipped. When the service goes away mid-epoch (drain, restart, rolling update)
    the stream reopens its session at the cursor, per ``config.reconnect``: the trainer sees no gap and no
    duplicate. A checkpoint of every rank (``merge_state_dicts``) resumes at another world size.
    """

    def __init__(self, config: StreamConfig, *, client: LoaderClient | None = None, endpoint: str | None = None,
                 rank: int | None = None, world_size: int | None = None, epoch: int = 0, **connection: Any) -> None:
        if (client is None) == (endpoint is None):
            raise ValueError("pass exactly one of client= or endpoint=")
        self.config = config
        self._owns_client = client is None
        self.client = client or LoaderClient(endpoint, **connection)  # type: ignore[arg-type]
        self.rank, self.world_size = resolve_rank(rank, world_size)
        self.epoch = epoch
        self.cursor = 0
        self.labels: list[str] = []
        self.shard_length = 0
        self.transport = ""          # the transport the service chose: grpc | shm | cuda_ipc
        self.transport_reason = ""   # the service's reason when that is not the one asked for
        self.skipped_slides: list[str] = []  # slides the service left out of the last session, with why
        self.stats = StreamStats()
        self.annotation_classes: list[str] = []  # class index -> name of batch["classes"] and ["masks"]
        self.stain_target: tuple[float, ...] = ()  # the stain normalisation target the last session used
        self._call: _Call | None = None
        self._resume: Stages = []  # elastic resume: how the epoch was read before (trainer_client/elastic.py)
        self._ended: dict[str, Any] | None = None  # the epoch this stream finished last, for merge_state_dicts
        self._pieces_seen = 0  # tiles/shard views: pieces of the sample at the cursor already yielded
        self._tile_context: tuple[int, list[Any], list[Any]] | None = None  # tiles view: the sample's context
        self._endpoints = (self.client.connection.endpoint, *config.reconnect.endpoints)
        self._endpoint_index = 0
        self._active = self.client  # the connection sessions open on: another one after a reconnect

    @property
    def endpoint(self) -> str:
        """The service this stream reads from now."""
        return self._active.connection.endpoint

    # --- state ---------------------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.cursor, self._resume, self._pieces_seen = epoch, 0, [], 0

    def state_dict(self) -> dict[str, Any]:
        state = {"epoch": self.epoch, "cursor": self.cursor, "rank": self.rank, "world_size": self.world_size,
                 "seed": self.config.seed, "dataset": self.config.dataset, "resume": self._resume}
        if self._ended is not None and self.cursor == 0 and self._ended["epoch"] == self.epoch - 1:
            state["ended"] = self._ended
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from this rank's own ``state_dict()``, or from ``merge_state_dicts`` of every rank's at any
        world size (the rest of the epoch re-sharded over this job's ranks)."""
        for key, mine in (("seed", self.config.seed), ("dataset", self.config.dataset)):
            if state.get(key) != mine:
                raise ValueError(f"state_dict was saved with {key}={state.get(key)!r}, this stream has {mine!r}; "
                                 "resume with the same configuration")
        if state.get("merged"):
            self.epoch = int(state["epoch"])
            self.cursor, self._resume = stages_for(state, self.rank, self.world_size)
            self._ended, self._pieces_seen = None, 0
            return
        if state.get("world_size") != self.world_size or state.get("rank", self.rank) != self.rank:
            raise ValueError(
                f"state_dict is rank {state.get('rank')} of world_size {state.get('world_size')}, this stream is rank "
                f"{self.rank} of {self.world_size}: load each rank's own state, or merge every rank's state with "
                "trainer_client.merge_state_dicts(...) and load the merged one on every rank of the new job")
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._resume = [list(s) for s in state.get("resume", [])]
        self._ended, self._pieces_seen = state.get("ended"), 0

    # --- iteration -----------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        if info is not None:
            raise InvalidRequestError(
                f"WSIStream cannot run in a DataLoader worker (num_workers={info.num_workers}): the worker's copy "
                f"would advance its own cursor while this process's state_dict() stays at epoch {self.epoch} cursor "
                f"{self.cursor}, so checkpoints would restart the epoch. Use DataLoader(stream, batch_size=None, "
                "num_workers=0) or iterate the stream directly: the service decodes in parallel already")
        self.close_stream()
        self._active.wait_ready()  # a wrong endpoint fails here, fast and by name
        attempt, broke_at = 0, 0.0
        try:
            while True:
                try:
                    if attempt:  # the endpoint that broke first, then the next ones in turn
                        turn = (self._endpoint_index + (attempt > 1)) % len(self._endpoints)
                        self._reconnect_to(self._endpoints[turn], broke_at)
                    call = self._open_session()
                    if attempt:
                        self.stats.reconnects += 1
                        log.warning("stream resumed on %s at epoch %d cursor %d (attempt %d)", self.endpoint,
                                    self.epoch, self.cursor, attempt)
                        attempt = 0
                    yield from self._batches(call)
                    return
                except UnavailableError as err:
                    self.close_stream()
                    broke_at = broke_at if attempt else time.monotonic()
                    attempt += 1
                    self._before_attempt(attempt, broke_at, err)
        finally:
            self.close_stream()

    def _before_attempt(self, attempt: int, broke_at: float, err: UnavailableError) -> None:
        """Give up (UnavailableError) when the policy says so, else wait the attempt's backoff."""
        policy = self.config.reconnect
        self.stats.last_break = str(err)
        elapsed = time.monotonic() - broke_at
        resume = f"resume from cursor {self.cursor} of epoch {self.epoch}: stream.state_dict()"
        if policy.attempts == 0:
            raise UnavailableError(f"{err} (reconnection off; {resume})") from err
        if attempt > policy.attempts or elapsed >= policy.deadline_s:
            raise UnavailableError(
                f"{err}; gave up reconnecting after {attempt - 1} attempt(s) in {elapsed:.1f}s "
                f"(ReconnectPolicy attempts={policy.attempts}, deadline_s={policy.deadline_s}); {resume}") from err
        delay = min(policy.delay(attempt), max(0.0, policy.deadline_s - elapsed))
        log.warning("stream broke at epoch %d cursor %d: %s; reconnect attempt %d/%d in %.1fs", self.epoch,
                    self.cursor, err, attempt, policy.attempts, delay)
        if delay:
            threading.Event().wait(delay)  # backoff: nothing to wait for but time

    def _reconnect_to(self, endpoint: str, broke_at: float) -> None:
        """A fresh channel to ``endpoint`` (none of gRPC's backoff from the old one), connected or UnavailableError."""
        policy = self.config.reconnect
        self.stats.reconnect_attempts += 1
        if self._active is not self.client:
            self._active.close()
        self._active = LoaderClient(dataclasses.replace(self.client.connection, endpoint=endpoint))
        self._endpoint_index = self._endpoints.index(endpoint)
        left = policy.deadline_s - (time.monotonic() - broke_at)
        self._active.wait_ready(max(0.1, min(policy.connect_timeout_s, left)), fail_fast=True)

    def _open_session(self) -> _Call:
        """Open a session at (epoch, cursor, resume stages), read its `opened`, grant the credits."""
        asked = self.config.transport
        # CUDA IPC sends a shared-memory probe too: the service falls back to shared memory when it cannot.
        want_shm = asked == "shm" or (asked in ("auto", "cuda_ipc") and shm_supported())
        probe = ShmProbe() if want_shm else None
        transport = _WIRE[asked] if asked != "auto" else _WIRE["shm" if want_shm else "grpc"]
        message = self.config.open_message(self.epoch, self.rank, self.world_size, self.cursor, transport,
                                           probe.name if probe else "", wire(self._resume))
        message.shm_slots = self.config.credits + self.config.shm_keep
        call = self._call = _Call(self._active, message, self.config.credits)
        try:
            opened = self._next(call).opened
        finally:
            if probe is not None:
                probe.close()
        self.labels = list(opened.labels)
        self.shard_length = opened.shard_length
        self.transport = _NAMES.get(opened.transport, "grpc")
        self.transport_reason = opened.transport_reason
        self.skipped_slides = list(opened.skipped_slides)  # "slide_id: why" left out of this session
        self.annotation_classes = list(opened.annotation_classes)
        self.stain_target = tuple(opened.stain_target)
        if self.skipped_slides:
            log.warning("the service left %d slides out of this session: %s", len(self.skipped_slides),
                        "; ".join(self.skipped_slides[:5]))
        self._check_transport(want_shm)
        call.receiver = self._receiver(call, opened)  # ready before any batch can be sent
        call.grant(self.config.credits)
        return call

    def _batches(self, call: _Call) -> Iterator[dict[str, Any]]:
        skip = self._pieces_seen  # a session reopened mid-sample sends its pieces from the first again
        while True:
            response = self._next(call)
            if response.WhichOneof("kind") == "end":
                self._ended = {"epoch": self.epoch, "shard_length": self.shard_length, "resume": self._resume}
                self.epoch, self.cursor, self._resume, self._pieces_seen = self.epoch + 1, 0, [], 0
                return
            batch = self._with_sample_context(self._to_dict(response.batch, call.receiver))
            call.grant(1)
            if skip:
                skip -= 1
                self.release(batch)
                continue
            after = response.batch.cursor_after
            self._pieces_seen = self._pieces_seen + 1 if after == self.cursor else 0
            self.cursor = after
            self.stats.batches += 1
            yield batch


    def _with_sample_context(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Tiles view: a sample's context arrives once, with its first tile; its later tiles get the same tensors
        here, so every batch of every view has its samples' ``context`` (a resent first tile refreshes them)."""
        piece = batch["piece"]
        if piece is None or piece["count"] == 1:
            return batch
        index = int(batch["index"][0])
        if piece["index"] == 0:
            self._tile_context = (index, batch["context"], batch["context_place"]) if batch["context"] else None
        elif not batch["context"] and self._tile_context is not None and self._tile_context[0] == index:
            batch["context"], batch["context_place"] = self._tile_context[1], self._tile_context[2]
        return batch

    def _check_transport(self, want_shm: bool) -> None:
        """Raise if the service did not grant a strict ``shm``; log any other fallback with its reason."""
        asked, got, reason = self.config.transport, self.transport, self.transport_reason
        log.info("transport: %s (asked %s)%s", got, asked, f": {reason}" if reason else "")
        if asked == "shm" and got != "shm":
            raise InvalidRequestError(f"transport=shm asked for, but {reason}; "
                                      "use transport='auto' to fall back to gRPC bytes")
        if asked == "cuda_ipc" and got != "cuda_ipc":
            log.warning("CUDA IPC not granted, batches arrive as CPU tensors over %s: %s", got, reason)
        elif asked == "auto" and want_shm and got != "shm":
            log.info("shared memory not usable, falling back to gRPC bytes: %s", reason)

    def _receiver(self, call: _Call, opened: pb.SessionOpened) -> ShmReceiver | CudaReceiver | None:
        """The receiver for the granted transport: the session's segment mapped, or CUDA IPC opened."""
        if self.transport == "shm":
            shm = ShmReceiver(call.release, self.config.shm_keep)
            shm.attach(opened.shm_segment)
            return shm
        if self.transport != "cuda_ipc":
            return None
        try:
            return CudaReceiver(call.release, self.config.shm_keep)
        except RuntimeError as err:
            raise InvalidRequestError(f"the service granted transport='cuda_ipc', but this process cannot open "
                                      f"CUDA IPC memory ({err}); {_FALLBACK_HINT}") from err

    def _next(self, call: _Call) -> pb.StreamResponse:
        try:
            item = call.responses.get(timeout=self.config.timeout_s)
        except queue.Empty as err:
            raise StalledError(
                f"no batch from {self.endpoint} for {self.config.timeout_s:.0f}s "
                f"(dataset {self.config.dataset}, epoch {self.epoch}, cursor {self.cursor})"
            ) from err
        if isinstance(item, grpc.RpcError):
            if item.code() == grpc.StatusCode.CANCELLED:  # not by this side (it stops reading first): the service
                raise UnavailableError(
                    f"stream from {self.endpoint} cancelled by the service: {item.details()}") from item
            raise_from_rpc(item, f"stream from {self.endpoint}")
        if item is _END:
            raise UnavailableError(f"stream from {self.endpoint} ended without end-of-epoch")
        return item

    def _to_dict(self, batch: pb.Batch, receiver: ShmReceiver | CudaReceiver | None) -> dict[str, Any]:
        pin = self.config.pin_memory and torch.cuda.is_available()
        samples = batch.samples
        slot = -1
        if batch.images.HasField("shm"):
            if not isinstance(receiver, ShmReceiver):
                raise LoaderError(f"protocol error: a shared-memory batch on a {self.transport} session")
            images = receiver.tensor(batch.images)
            slot = int(batch.images.shm.slot)
        elif batch.images.HasField("cuda"):
            if not isinstance(receiver, CudaReceiver):
                raise LoaderError(f"protocol error: a CUDA IPC batch on a {self.transport} session")
            images = _cuda_tensor(receiver, batch.images)
            slot = int(batch.images.cuda.slot)
        else:
            images = decode_tensor(batch.images, pin_memory=pin)
        return {
            "images": images,
            "slot": slot,
            "labels": decode_tensor(batch.labels, pin_memory=pin),
            "slide_id": [s.slide_id for s in samples],
            "x": torch.tensor([s.x for s in samples], dtype=torch.int64),
            "y": torch.tensor([s.y for s in samples], dtype=torch.int64),
            "level": torch.tensor([s.level for s in samples], dtype=torch.int64),
            "index": torch.tensor([s.index for s in samples], dtype=torch.int64),
            "padding": torch.tensor([s.padding for s in samples], dtype=torch.bool),
            "substituted": torch.tensor(list(batch.substituted), dtype=torch.int64),  # shard indices replaced
            "piece": _piece(samples[0]) if samples and samples[0].HasField("piece") else None,
            "classes": decode_tensor(batch.classes) if batch.HasField("classes") else None,  # class at centre
            "masks": decode_tensor(batch.masks) if batch.HasField("masks") else None,  # uint8 (N, H, W)
            # multi-scale context: one tensor per StreamConfig.context entry, and where each patch was read
            "context": [decode_tensor(t) for t in batch.context],
            "context_place": [[(p.level, p.mpp, p.x, p.y, p.size) for p in (s.context[i] for s in samples)]
                              for i in range(len(batch.context))],
        }

    def release(self, batch: dict[str, Any]) -> None:
        """Give a shared-memory or CUDA IPC batch's slot back now instead of when its tensor is freed.

        The batch's ``images`` must not be used afterwards (the server will write another batch there; with
        CUDA IPC, once the GPU work queued on it so far completed). A no-op for gRPC-bytes batches.
        """
        call = self._call
        if batch.get("slot", -1) >= 0 and call is not None and call.receiver is not None:
            call.receiver.release(int(batch["slot"]))

    def close_stream(self) -> None:
        if self._call is not None:
            self._call.close()
            self._call = None

    def close(self) -> None:
        self.close_stream()
        if self._active is not self.client:
            self._active.close()
            self._active = self.client
        if self._owns_client:
            self.client.close()

    def __enter__(self) -> WSIStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
