"""CUDA IPC wired into the service and the client: fallback, configuration, and the whole session.

On CPU: a cuda_ipc request to a CPU service falls back (with its reason) and delivers the gRPC transport's
pixels; the whole wiring (session pool, CudaRef batches, receiver, release and reuse, pool closed at the end)
runs against a fake CUDA runtime over host memory. Marked ``gpu``: a real service on ``cuda`` and a trainer in
a spawned process receiving batches that stay on the service's GPU (skipped without CUDA and a CUDA binding).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing as mp
import queue
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import loader_service.server as server_module
import loader_service.transport.cuda_ipc as server_cuda
import trainer_client.client as client_module
import trainer_client.cuda_ipc as client_cuda
from loader_service.requests import parse_open
from loader_service.server import LoaderServer
from tests.conftest import make_config
from tests.cuda_fakes import FakeStream as _FakeStream, HostView as _HostView, fake_event_type
from trainer_client import InvalidRequestError, LoaderClient, StreamConfig
from wsi_loader.v1 import loader_pb2 as pb


def cuda_config(**kw: Any) -> StreamConfig:
    values: dict[str, Any] = dict(dataset="train", batch_size=8, patch_size=64, samples_per_epoch=48, seed=3,
                                  transport="cuda_ipc", timeout_s=60)
    values.update(kw)
    return StreamConfig(**values)


def wait_for(predicate: Any, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return bool(predicate())


def pixels(client: LoaderClient, config: StreamConfig) -> tuple[list[torch.Tensor], str, str]:
    """Every batch's images (copied to the CPU while the batch is held), and the transport used and why."""
    out = []
    with client.stream(config) as stream:
        for batch in stream:
            out.append(batch["images"].cpu().clone())
            del batch
    return out, stream.transport, stream.transport_reason


# --- configuration -----------------------------------------------------------------------------------------
def test_stream_config_accepts_cuda_ipc_and_rejects_unknown_transports() -> None:
    assert cuda_config().transport == "cuda_ipc"
    assert StreamConfig(dataset="train").transport == "auto"  # auto never means CUDA IPC
    for wrong in ("cuda", "CUDA_IPC", "cuda-ipc", "ipc", ""):
        with pytest.raises(ValueError, match="transport must be one of .*cuda_ipc"):
            cuda_config(transport=wrong)


# --- fallback from a CPU service ---------------------------------------------------------------------------
def test_cuda_ipc_from_a_cpu_service_falls_back_to_shm_with_the_reason(
        client: LoaderClient, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="trainer_client.client")
    got, transport, reason = pixels(client, cuda_config())
    assert transport == "shm"  # this node shares /dev/shm with the service
    assert "CUDA IPC not used" in reason and "service has no CUDA device" in reason, reason
    assert "CUDA IPC not granted" in caplog.text
    expected, grpc_transport, _ = pixels(client, cuda_config(transport="grpc"))
    assert grpc_transport == "grpc" and len(got) == len(expected) == 6
    assert all(a.device.type == "cpu" and torch.equal(a, b) for a, b in zip(got, expected))


def test_cuda_ipc_without_shared_memory_falls_back_to_grpc_bytes(
        client: LoaderClient, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client_module, "shm_supported", lambda: False)  # no probe segment is sent
    got, transport, reason = pixels(client, cuda_config())
    assert transport == "grpc"
    assert "service has no CUDA device" in reason and "no shared-memory probe" in reason, reason
    expected, _, _ = pixels(client, cuda_config(transport="grpc"))
    assert len(got) == 6 and all(torch.equal(a, b) for a, b in zip(got, expected))


def test_variable_size_batches_go_as_grpc_bytes(server: LoaderServer) -> None:
    view = pb.ViewSpec(view=pb.IMAGE, whole_slide=True)
    message = pb.OpenSession(dataset="train", batch_size=1, level=2, transport=pb.CUDA_IPC, view=view)
    request = parse_open(message, server.config.max_batch_bytes, server.config.max_region_pixels)
    session = _NoPoolSession()
    transport, reason, pool = server.open_transport(request, session)  # type: ignore[arg-type]
    assert (transport, pool) == (pb.GRPC, None) and "differ in size" in reason


class _NoPoolSession:
    """Just what open_transport reads; a session that must not get a pool."""

    def __init__(self) -> None:
        self.gate = type("Gate", (), {"cond": threading.Condition()})()

    def use_cuda(self, pool: Any) -> None:
        raise AssertionError("variable-size batches got a slot pool")

    use_shm = use_cuda


# --- the whole wiring over a fake CUDA runtime (CPU) -------------------------------------------------------
class _SameProcessCuda:
    """Both sides' CUDA calls over host memory in this one process: a memory 'IPC handle' is the pointer."""

    name = "fake"

    def __init__(self) -> None:
        self.buffers: dict[int, Any] = {}
        self.freed: list[int] = []
        self.opened: list[int] = []
        self.waits: list[Any] = []

    def malloc(self, nbytes: int) -> int:
        buffer = (ctypes.c_uint8 * nbytes)()
        self.buffers[ctypes.addressof(buffer)] = buffer
        return ctypes.addressof(buffer)

    def free(self, ptr: int) -> None:
        self.freed.append(ptr)  # the bytes stay: a trainer's tensor may still view them

    def mem_handle(self, ptr: int) -> bytes:
        return ptr.to_bytes(8, "little") + bytes(56)

    def open_mem(self, handle: bytes) -> int:
        self.opened.append(int.from_bytes(handle[:8], "little"))
        return self.opened[-1]

    def close_mem(self, ptr: int) -> None:
        pass


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> Iterator[_SameProcessCuda]:
    fake = _SameProcessCuda()
    stream = _FakeStream(fake.waits)
    monkeypatch.setattr(torch.cuda, "Event", fake_event_type())
    for module in (server_cuda, client_cuda):
        monkeypatch.setattr(module, "_load_backend", lambda: fake)
        monkeypatch.setattr(module, "cuda_ipc_available", lambda: (True, "fake"))
        monkeypatch.setattr(module, "device_uuid", lambda device: "GPU-fake")
    monkeypatch.setattr(server_module, "cuda_ipc_available", lambda: (True, "fake"))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: stream)
    real_as_tensor = torch.as_tensor

    def as_tensor(obj: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        if hasattr(obj, "__cuda_array_interface__"):
            return torch.from_numpy(np.asarray(_HostView(obj)))
        return real_as_tensor(obj, *args, **kwargs)

    monkeypatch.setattr(torch, "as_tensor", as_tensor)
    yield fake


def test_session_over_fake_cuda_ipc_zero_copy_release_reuse_and_close(
        dataset_dir: Path, fake_cuda: _SameProcessCuda) -> None:
    with LoaderServer(make_config(dataset_dir)) as srv, LoaderClient(f"127.0.0.1:{srv.port}", timeout_s=30) as c:
        srv.device = torch.device("cuda", 0)  # what the session sees; the builder keeps building on the CPU
        expected, _, _ = pixels(c, cuda_config(transport="grpc", samples_per_epoch=80))
        assert pixels(c, cuda_config(transport="auto"))[1] == "shm"  # auto never picks CUDA IPC
        assert not fake_cuda.buffers
        config = cuda_config(credits=2, shm_keep=2, samples_per_epoch=80)  # 4 slots for 10 batches
        slots: list[int] = []
        got: list[torch.Tensor] = []
        with c.stream(config) as stream:
            it = iter(stream)
            held = [next(it), next(it)]
            assert stream.transport == "cuda_ipc" and stream.transport_reason == ""
            (base,) = fake_cuda.buffers  # the session's one allocation, opened by the receiver
            assert fake_cuda.opened == [base] and len(fake_cuda.waits) == 2
            slot_bytes = 8 * 3 * 64 * 64
            for batch in held:
                assert batch["images"].data_ptr() == base + batch["slot"] * slot_bytes  # zero copy, right slot
            # The trainer holds 2 slots, the service filled the other 2 and must now wait for a release.
            assert wait_for(lambda: srv.metrics.sample("wsi_loader_cuda_slots", {"state": "free"}) == 0)
            assert srv.metrics.sample("wsi_loader_cuda_slots", {"state": "in_use"}) == 4
            got += [b["images"].clone() for b in held]
            slots += [b["slot"] for b in held]
            stream.release(held[0])  # explicit
            del held  # implicit: the tensors are freed
            for batch in it:
                got.append(batch["images"].clone())
                slots.append(batch["slot"])
                del batch
        assert len(got) == 10 and set(slots) <= {0, 1, 2, 3} and all(s >= 0 for s in slots)  # reused
        assert all(torch.equal(a, b) for a, b in zip(got, expected))  # the gRPC transport's pixels
        assert wait_for(lambda: fake_cuda.freed == [base])  # the pool was closed with the session
        assert srv.metrics.sample("wsi_loader_cuda_slots", {"state": "in_use"}) == 0
        assert srv.metrics.sample("wsi_loader_cuda_slots", {"state": "free"}) == 0
        assert wait_for(lambda: srv.metrics.sample("wsi_loader_active_sessions") == 0)
        assert srv.metrics.sample("wsi_loader_batches_total", {"transport": "cuda_ipc"}) == 10


def test_context_over_fake_cuda_ipc_equals_grpc_in_the_image_and_tiles_views(
        dataset_dir: Path, fake_cuda: _SameProcessCuda) -> None:
    """Multi-scale context travels inline beside CUDA IPC images (built on_device), in every view."""
    with LoaderServer(make_config(dataset_dir)) as srv, LoaderClient(f"127.0.0.1:{srv.port}", timeout_s=30) as c:
        srv.device = torch.device("cuda", 0)
        region = dict(batch_size=1, region_width=96, region_height=64, samples_per_epoch=3, augment=True,
                      context=((2.0, 32), (4.0, 16)))
        for view in (dict(view="image"), dict(view="tiles", tile_size=32), dict(view="shard", grid=(2, 1))):
            got: dict[str, list[tuple[torch.Tensor, list[torch.Tensor]]]] = {}
            for transport in ("grpc", "cuda_ipc"):
                with c.stream(cuda_config(transport=transport, **region, **view)) as stream:
                    got[transport] = [(b["images"].cpu().clone(), [t.clone() for t in b["context"]]) for b in stream]
                    assert stream.transport == transport
            assert len(got["grpc"]) == len(got["cuda_ipc"]) >= 3
            for (ga, gc), (ca, cc) in zip(got["grpc"], got["cuda_ipc"]):
                assert len(gc) == len(cc) == 2 and torch.equal(ga, ca)
                assert all(torch.equal(x, y) for x, y in zip(gc, cc))


def test_invisible_gpu_is_the_clients_error_with_a_fix(dataset_dir: Path, fake_cuda: _SameProcessCuda,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server_cuda, "device_uuid", lambda device: "GPU-elsewhere")
    with LoaderServer(make_config(dataset_dir)) as srv, LoaderClient(f"127.0.0.1:{srv.port}", timeout_s=30) as c:
        srv.device = torch.device("cuda", 0)
        with c.stream(cuda_config()) as stream:
            with pytest.raises(InvalidRequestError, match="not visible.*transport='shm' or 'grpc'") as info:
                next(iter(stream))
        assert isinstance(info.value.__cause__, ValueError)


def test_no_cuda_binding_in_the_trainer_is_the_clients_error_with_a_fix(
        dataset_dir: Path, fake_cuda: _SameProcessCuda, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client_cuda, "cuda_ipc_available", lambda: (False, "torch sees no CUDA device"))
    with LoaderServer(make_config(dataset_dir)) as srv, LoaderClient(f"127.0.0.1:{srv.port}", timeout_s=30) as c:
        srv.device = torch.device("cuda", 0)
        with c.stream(cuda_config()) as stream:
            with pytest.raises(InvalidRequestError, match="cannot open CUDA IPC.*transport='shm' or 'grpc'") as info:
                next(iter(stream))
        assert isinstance(info.value.__cause__, RuntimeError)
        assert wait_for(lambda: fake_cuda.freed == list(fake_cuda.buffers))  # the session's pool was closed


# --- on a GPU: a real service on cuda, a trainer in another process -----------------------------------------
def _gpu_skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device visible to torch"
    ok, why = server_cuda.cuda_ipc_available()
    return None if ok else why


_GPU_SKIP = _gpu_skip_reason()
needs_cuda_ipc = pytest.mark.skipif(_GPU_SKIP is not None, reason=f"CUDA IPC needs a GPU: {_GPU_SKIP}")


def _trainer(endpoint: str, config: dict[str, Any], results: Any) -> None:
    """A trainer process: stream with transport cuda_ipc, report per batch what it saw (pixels copied back)."""
    try:
        results.put(("ok", _trainer_run(endpoint, config)))
    except BaseException:  # noqa: BLE001 - everything goes back to the test
        results.put(("error", traceback.format_exc()))


def _trainer_run(endpoint: str, config: dict[str, Any]) -> dict[str, Any]:
    refs: list[tuple[bytes, int, int, int]] = []
    real_tensor = client_cuda.CudaReceiver.tensor

    def tensor(self: client_cuda.CudaReceiver, message: Any) -> torch.Tensor:
        refs.append((bytes(message.cuda.mem_handle), int(message.cuda.offset), int(message.cuda.nbytes),
                     int(message.cuda.slot)))
        return real_tensor(self, message)

    client_cuda.CudaReceiver.tensor = tensor  # type: ignore[method-assign]  # this process only
    seen: list[dict[str, Any]] = []
    with LoaderClient(endpoint, timeout_s=60) as client, client.stream(StreamConfig(**config)) as stream:
        kept = None
        for i, batch in enumerate(stream):
            images = batch["images"]
            receiver = stream._call.receiver if stream._call is not None else None
            handle, offset, nbytes, slot = refs[-1]
            base = receiver.base_pointer(handle) if isinstance(receiver, client_cuda.CudaReceiver) else 0
            seen.append({"slot": batch["slot"], "ref_slot": slot, "device": str(images.device),
                         "is_cuda": images.is_cuda, "in_mapping": base != 0 and images.data_ptr() == base + offset
                         and nbytes == images.numel() * images.element_size(),
                         "pixels": images.cpu().numpy().copy(), "held": receiver.held if receiver else -1})
            if i == 1:
                stream.release(batch)  # explicit
            elif i == 2:
                kept = images[1:]  # a view keeps its slot for a while
            elif i == 5:
                kept = None
            del batch, images
        result = {"transport": stream.transport, "reason": stream.transport_reason, "batches": seen}
    result["stalled"] = receiver.stalled if isinstance(receiver, client_cuda.CudaReceiver) else None
    return result


def _run_trainer(endpoint: str, config: dict[str, Any], timeout: float = 300.0) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    proc = ctx.Process(target=_trainer, args=(endpoint, config, results), daemon=True)
    proc.start()
    try:
        status, payload = results.get(timeout=timeout)
    except queue.Empty:
        raise AssertionError(f"the trainer process did not finish within {timeout}s") from None
    finally:
        proc.join(timeout=60)
        if proc.is_alive():
            proc.kill()
    assert status == "ok", f"the trainer process failed:\n{payload}"
    assert proc.exitcode == 0, f"the trainer process exited with {proc.exitcode}"
    return payload


@needs_cuda_ipc
@pytest.mark.gpu
@pytest.mark.parametrize("dataset", ["train", "synthetic"])
def test_gpu_batches_stay_on_the_services_gpu(dataset_dir: Path, dataset: str) -> None:
    config = dict(dataset=dataset, batch_size=8, patch_size=64, samples_per_epoch=80, seed=3, timeout_s=120,
                  credits=2, shm_keep=3)  # 5 slots for 10 batches
    with LoaderServer(make_config(dataset_dir, device="cuda", synthetic=True)) as srv, \
            LoaderClient(f"127.0.0.1:{srv.port}", timeout_s=60) as client:
        gone = srv.metrics.sample("wsi_loader_errors_total", {"kind": "client_gone"})
        expected, transport, _ = pixels(client, StreamConfig(**{**config, "transport": "grpc"}))
        assert transport == "grpc" and len(expected) == 10
        got = _run_trainer(f"127.0.0.1:{srv.port}", {**config, "transport": "cuda_ipc"})
        assert got["transport"] == "cuda_ipc" and got["reason"] == "", got["reason"]
        batches = got["batches"]
        assert len(batches) == 10
        for b, want in zip(batches, expected):
            assert b["is_cuda"] and b["device"].startswith("cuda"), b["device"]
            assert b["in_mapping"], "the tensor is not a view of the server's slot in the IPC mapping"
            assert b["slot"] == b["ref_slot"] and 0 <= b["slot"] < 5
            assert torch.equal(torch.from_numpy(b["pixels"]), want)  # the gRPC transport's pixels
            assert b["held"] >= 1
        assert len({b["slot"] for b in batches}) <= 5  # 10 batches through 5 slots: released and reused
        assert got["stalled"] == []
        assert wait_for(lambda: srv.metrics.sample("wsi_loader_active_sessions") == 0)
        assert srv.metrics.sample("wsi_loader_cuda_slots", {"state": "in_use"}) == 0  # the pool was closed
        assert srv.metrics.sample("wsi_loader_cuda_slots", {"state": "free"}) == 0
        assert srv.metrics.sample("wsi_loader_batches_total", {"transport": "cuda_ipc"}) == 10
        assert srv.metrics.sample("wsi_loader_errors_total", {"kind": "client_gone"}) == gone
        assert srv.metrics.sample("wsi_loader_errors_total", {"kind": "internal"}) == 0


def _holder(endpoint: str, config: dict[str, Any], ready: Any) -> None:
    """A trainer that takes batches, keeps them (their slots held), reports, and waits to be killed."""
    try:
        with LoaderClient(endpoint, timeout_s=60) as client, client.stream(StreamConfig(**config)) as stream:
            batches = iter(stream)
            held = [next(batches)["images"] for _ in range(3)]
            torch.cuda.synchronize()
            ready.put(("ok", [str(t.device) for t in held]))
            time.sleep(300)  # killed with SIGKILL long before: no close, no release, no goodbye
    except BaseException:  # noqa: BLE001
        ready.put(("error", traceback.format_exc()))


@needs_cuda_ipc
@pytest.mark.gpu
def test_slots_come_back_after_the_trainer_is_killed(dataset_dir: Path) -> None:
    """kill -9 of a trainer holding CUDA IPC batches: the session ends, its pool is freed, the service serves on."""
    config = dict(dataset="synthetic", batch_size=8, patch_size=64, samples_per_epoch=4000, seed=3, timeout_s=120,
                  credits=2, shm_keep=4, transport="cuda_ipc")
    with LoaderServer(make_config(dataset_dir, device="cuda", synthetic=True)) as srv:
        ctx = mp.get_context("spawn")
        ready = ctx.Queue()
        proc = ctx.Process(target=_holder, args=(f"127.0.0.1:{srv.port}", config, ready), daemon=True)
        proc.start()
        try:
            status, payload = ready.get(timeout=180)
            assert status == "ok", payload
            assert all(d.startswith("cuda") for d in payload)
            assert srv.metrics.sample("wsi_loader_cuda_slots", {"state": "in_use"}) >= 3  # the trainer holds them
            proc.kill()  # SIGKILL
            proc.join(timeout=30)
            assert proc.exitcode == -9
        finally:
            if proc.is_alive():
                proc.kill()
        assert wait_for(lambda: srv.metrics.sample("wsi_loader_active_sessions") == 0, timeout=60), \
            "the killed trainer's session never ended"
        assert wait_for(lambda: srv.metrics.sample("wsi_loader_cuda_slots", {"state": "in_use"}) == 0
                        and srv.metrics.sample("wsi_loader_cuda_slots", {"state": "free"}) == 0, timeout=60), \
            "the killed trainer's CUDA slot pool was not freed"
        assert srv.metrics.sample("wsi_loader_errors_total", {"kind": "internal"}) == 0
        got = _run_trainer(f"127.0.0.1:{srv.port}", {**config, "samples_per_epoch": 80, "shm_keep": 3})
        assert got["transport"] == "cuda_ipc" and len(got["batches"]) == 10 and got["stalled"] == []
