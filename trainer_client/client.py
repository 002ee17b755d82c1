"""The trainer's side of the service: unary calls and the batch stream as an ``IterableDataset``."""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from trainer_client.channel import ConnectionConfig, open_channel
from trainer_client.config import StreamConfig
from trainer_client.cuda_ipc import CudaReceiver
from trainer_client.errors import InvalidRequestError, LoaderError, StalledError, UnavailableError, raise_from_rpc
from trainer_client.shm import ShmProbe, ShmReceiver, shm_supported
from wsi_loader.v1 import loader_pb2 as pb
from wsi_loader.v1 import loader_pb2_grpc as pb_grpc

__all__ = ["LoaderClient", "WSIStream", "decode_tensor", "distributed_rank"]

log = logging.getLogger(__name__)
_END = object()
_WIRE = {"grpc": pb.GRPC, "shm": pb.SHM, "cuda_ipc": pb.CUDA_IPC}
_NAMES = {pb.SHM: "shm", pb.CUDA_IPC: "cuda_ipc"}  # anything else: gRPC bytes
_FALLBACK_HINT = "use transport='shm' or 'grpc'"


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

    def wait_ready(self, timeout_s: float | None = None) -> None:
        timeout = self.connection.timeout_s if timeout_s is None else timeout_s
        try:
            grpc.channel_ready_future(self.channel).result(timeout=timeout)
        except grpc.FutureTimeoutError as err:
            raise UnavailableError(f"service at {self.connection.endpoint} not reachable within {timeout:.0f}s") from err

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
        self.channel.close()

    def __enter__(self) -> LoaderClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Call:
    """One Stream RPC: a request queue feeding gRPC, and a reader thread filling a bounded batch queue."""

    def __init__(self, client: LoaderClient, open_message: pb.OpenSession, credits: int) -> None:
        self._requests: queue.Queue[pb.StreamRequest | object] = queue.Queue()
        self._requests.put(pb.StreamRequest(open=open_message))  # credits follow once `opened` is handled
        self.responses: queue.Queue[Any] = queue.Queue(maxsize=credits + 2)
        self.receiver: ShmReceiver | CudaReceiver | None = None
        self._call = client.stub.Stream(self._request_iter(), metadata=client.connection.metadata())
        self._reader = threading.Thread(target=self._read, daemon=True, name="loader-stream")
        self._reader.start()

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
        self._requests.put(_END)
        self._call.cancel()
        self._reader.join(timeout=5)
        if self.receiver is not None:
            self.receiver.close()


class WSIStream(IterableDataset):  # type: ignore[type-arg]
    """Batches of augmented patches as dicts of tensors; one pass of ``iter()`` is one epoch of this rank.

    Usable directly (``for batch in stream``) or in ``DataLoader(stream, batch_size=None)`` with
    ``num_workers=0`` (the service does the parallel work). ``state_dict()`` taken after a batch resumes right
    after it: nothing repeated, nothing skipped.
    """

    def __init__(self, config: StreamConfig, *, client: LoaderClient | None = None, endpoint: str | None = None,
                 rank: int | None = None, world_size: int | None = None, epoch: int = 0, **connection: Any) -> None:
        if (client is None) == (endpoint is None):
            raise ValueError("pass exactly one of client= or endpoint=")
        self.config = config
        self._owns_client = client is None
        self.client = client or LoaderClient(endpoint, **connection)  # type: ignore[arg-type]
        auto_rank, auto_world = distributed_rank()
        self.rank = auto_rank if rank is None else rank
        self.world_size = auto_world if world_size is None else world_size
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} must be in 0..world_size-1 (world_size {self.world_size})")
        self.epoch = epoch
        self.cursor = 0
        self.labels: list[str] = []
        self.shard_length = 0
        self.transport = ""          # the transport the service chose: grpc | shm | cuda_ipc
        self.transport_reason = ""   # the service's reason when that is not the one asked for
        self.skipped_slides: list[str] = []  # slides the service left out of the last session, with why
        self.stain_target: tuple[float, ...] = ()  # the stain normalisation target the last session used
        self._call: _Call | None = None

    # --- state ---------------------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.cursor = epoch, 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "cursor": self.cursor, "rank": self.rank, "world_size": self.world_size,
                "seed": self.config.seed, "dataset": self.config.dataset}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, mine in (("world_size", self.world_size), ("seed", self.config.seed), ("dataset", self.config.dataset)):
            if state.get(key) != mine:
                raise ValueError(f"state_dict was saved with {key}={state.get(key)!r}, this stream has {mine!r}; "
                                 "resume with the same configuration")
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])

    # --- iteration -----------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        if info is not None and info.num_workers > 1:
            raise InvalidRequestError("use DataLoader(stream, batch_size=None, num_workers=0): the service decodes "
                                      "in parallel already, and several workers would read the same shard")
        self.close_stream()
        asked = self.config.transport
        # CUDA IPC sends a shared-memory probe too: the service falls back to shared memory when it cannot.
        want_shm = asked == "shm" or (asked in ("auto", "cuda_ipc") and shm_supported())
        probe = ShmProbe() if want_shm else None
        wire = _WIRE[asked] if asked != "auto" else _WIRE["shm" if want_shm else "grpc"]
        message = self.config.open_message(self.epoch, self.rank, self.world_size, self.cursor, wire,
                                           probe.name if probe else "")
        message.shm_slots = self.config.credits + self.config.shm_keep
        call = self._call = _Call(self.client, message, self.config.credits)
        try:
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
            self.stain_target = tuple(opened.stain_target)
            if self.skipped_slides:
                log.warning("the service left %d slides out of this session: %s", len(self.skipped_slides),
                            "; ".join(self.skipped_slides[:5]))
            self._check_transport(want_shm)
            call.receiver = self._receiver(call, opened)  # ready before any batch can be sent
            call.grant(self.config.credits)
            while True:
                response = self._next(call)
                kind = response.WhichOneof("kind")
                if kind == "end":
                    self.epoch, self.cursor = self.epoch + 1, 0
                    return
                batch = self._to_dict(response.batch, call.receiver)
                self.cursor = response.batch.cursor_after
                call.grant(1)
                yield batch
        finally:
            self.close_stream()

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
                f"no batch from {self.client.connection.endpoint} for {self.config.timeout_s:.0f}s "
                f"(dataset {self.config.dataset}, epoch {self.epoch}, cursor {self.cursor})"
            ) from err
        if isinstance(item, grpc.RpcError):
            what = f"stream from {self.client.connection.endpoint}"
            if item.code() == grpc.StatusCode.UNAVAILABLE:  # the client's own cursor: right however it died
                what += f" (this rank can resume from cursor {self.cursor} of epoch {self.epoch}: stream.state_dict())"
            raise_from_rpc(item, what)
        if item is _END:
            raise UnavailableError(f"stream from {self.client.connection.endpoint} ended without end-of-epoch; "
                                   f"resume from cursor {self.cursor}")
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
        if self._owns_client:
            self.client.close()

    def __enter__(self) -> WSIStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
