"""The CUDA IPC data plane, with real processes: a server process owning a CudaSlotPool and a trainer process
using a CudaReceiver, exchanging serialized ``Tensor{cuda: CudaRef}`` messages over a multiprocessing pipe.

Self-contained on purpose (no conftest, no server imports): it runs on a GPU machine that has only torch,
protobuf and cuda-bindings/CuPy. ``python3 -m tests.test_cuda_ipc`` runs the hand-off benchmark instead.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import importlib
import importlib.util
import json
import multiprocessing as mp
import os
import queue
import statistics
import sys
import threading
import time
import traceback
from multiprocessing.connection import Connection
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch

from tests.cuda_fakes import FakeStream as _FakeStream, HostView as _HostView, fake_event_type
from wsi_loader.v1 import loader_pb2 as pb

BACKEND_ENV = "WSI_LOADER_CUDA_BACKEND"
SHAPE = (4, 3, 64, 64)          # uint8 batches of the functional test
ROUNDS = 10
SLOTS = 2
SLEEP_CYCLES = 600_000_000      # torch.cuda._sleep: ~0.3 s on an H100, far longer than a pipe message
EXPLICIT_ROUND = 5              # after this round the trainer releases explicitly and keeps a view
GPU_WORK_ROUND = 2              # after this round the trainer queues long GPU work on the tensor, then frees it
STEP_TIMEOUT_S = 60.0


ROOT = Path(__file__).resolve().parents[1]


def _module(name: str) -> ModuleType:
    """Import ``name``; if its package's __init__ needs what this machine lacks (grpc on a bare GPU box),
    load the file alone (both modules need only torch, protobuf and a CUDA binding)."""
    try:
        return importlib.import_module(name)
    except ImportError:
        if name in sys.modules:
            return sys.modules[name]
        spec = importlib.util.spec_from_file_location(name, ROOT / (name.replace(".", "/") + ".py"))
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module


def _backends() -> list[str]:
    found = []
    if importlib.util.find_spec("cuda") is not None and (
            importlib.util.find_spec("cuda.bindings") is not None or importlib.util.find_spec("cuda.cudart")):
        found.append("cuda-bindings")
    if importlib.util.find_spec("cupy") is not None:
        found.append("cupy")
    return found


def _gpu_skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device visible to torch"
    if not _backends():
        return "neither cuda-bindings nor cupy is installed"
    return None


_SKIP = _gpu_skip_reason()
gpu = pytest.mark.skipif(_SKIP is not None, reason=f"CUDA IPC needs a GPU: {_SKIP}")


# --- runs everywhere -----------------------------------------------------------------------------------------
def test_modules_import_without_cuda() -> None:
    server = _module("loader_service.transport.cuda_ipc")
    client = _module("trainer_client.cuda_ipc")
    assert set(server.__all__) >= {"CudaSlotPool", "cuda_ipc_available"}
    assert set(client.__all__) >= {"CudaReceiver", "cuda_ipc_available"}
    for module in (server, client):
        ok, reason = module.cuda_ipc_available()
        assert isinstance(ok, bool) and isinstance(reason, str) and reason
    ok, reason = server.cuda_ipc_available()
    if not ok:
        with pytest.raises(RuntimeError, match="unavailable"):
            server.CudaSlotPool(2, 1024, threading.Condition(), torch.device("cuda"))
        with pytest.raises(RuntimeError, match="unavailable"):
            client.CudaReceiver(lambda slots: None, 2)
    with pytest.raises(ValueError):
        server.CudaSlotPool(0, 1024, threading.Condition(), torch.device("cuda"))


def test_one_cuda_runtime_shim_for_both_sides(monkeypatch: pytest.MonkeyPatch) -> None:
    shim = importlib.import_module("wsi_loader.cuda_runtime")
    for name in ("loader_service.transport.cuda_ipc", "trainer_client.cuda_ipc"):
        module = _module(name)
        assert module._load_backend is shim.load_runtime and module.device_uuid is shim.device_uuid
    monkeypatch.setenv(BACKEND_ENV, "opencl")
    with pytest.raises(ImportError, match="expected 'cuda-bindings' or 'cupy'"):
        shim.load_runtime()
    if importlib.util.find_spec("cupy") is None:
        monkeypatch.setenv(BACKEND_ENV, "cupy")
        with pytest.raises(ImportError, match="cupy-cuda13x") as caught:
            shim.load_runtime()
        assert "cupy-cuda12x" not in str(caught.value) and "torch's CUDA wheels" in str(caught.value)


def test_pool_rejects_cpu_device() -> None:
    pool_cls = _module("loader_service.transport.cuda_ipc").CudaSlotPool
    with pytest.raises((ValueError, RuntimeError)):
        pool_cls(2, 1024, threading.Condition(), torch.device("cpu"))


# --- the receiver's slot bookkeeping, on CPU, with a fake CUDA runtime -----------------------------------------
class _FakeCuda:
    """Stands in for the CUDA binding: host buffers as 'device' memory, events that complete on demand."""

    name = "fake"

    def __init__(self) -> None:
        self.buffers: dict[bytes, Any] = {}
        self.closed: list[int] = []
        self.waits: list[Any] = []
        self.gpu_done = threading.Event()

    def open_mem(self, handle: bytes) -> int:
        buf = self.buffers[handle] = (ctypes.c_uint8 * 4096)()
        return ctypes.addressof(buf)

    def close_mem(self, ptr: int) -> None:
        self.closed.append(ptr)



@pytest.fixture
def fake_receiver(monkeypatch: pytest.MonkeyPatch) -> Any:
    module = _module("trainer_client.cuda_ipc")
    fake = _FakeCuda()
    stream = _FakeStream(fake.waits)
    monkeypatch.setattr(torch.cuda, "Event", fake_event_type(fake.gpu_done))
    monkeypatch.setattr(module, "_load_backend", lambda: fake)
    monkeypatch.setattr(module, "cuda_ipc_available", lambda: (True, "fake"))
    monkeypatch.setattr(module, "device_uuid", lambda device: "GPU-fake")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: stream)
    real_as_tensor = torch.as_tensor
    monkeypatch.setattr(torch, "as_tensor", lambda obj, device=None: torch.from_numpy(np.asarray(_HostView(obj)))
                        if hasattr(obj, "__cuda_array_interface__") else real_as_tensor(obj, device=device))
    released: list[list[int]] = []
    receiver = module.CudaReceiver(released.append, keep=2)
    yield receiver, fake, released
    fake.gpu_done.set()
    receiver.close(timeout=5)


def _ref(slot: int, handle: bytes = b"H" * 64, uuid: str = "GPU-fake") -> pb.Tensor:
    cuda = pb.CudaRef(mem_handle=handle, offset=slot * 1024, nbytes=48, slot=slot, event_handle=bytes([slot]) * 64,
                      device_uuid=uuid)
    return pb.Tensor(dtype="uint8", shape=[4, 3, 4], cuda=cuda)


def _eventually(check: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_receiver_bookkeeping_with_fake_cuda(fake_receiver: Any) -> None:
    receiver, fake, released = fake_receiver
    tensor = receiver.tensor(_ref(0))
    base = receiver.base_pointer(b"H" * 64)
    assert base and tensor.data_ptr() == base and tuple(tensor.shape) == (4, 3, 4)
    assert [(e.opened, e.handle) for e in fake.waits] == [(True, bytes([0]) * 64)]  # waited on the slot's event
    view = tensor[1:]
    del tensor
    gc.collect()
    assert receiver.held == 1 and released == []                    # a view keeps the slot
    del view                                                         # freed while the 'GPU' still reads it
    time.sleep(0.2)
    assert released == [] and receiver.held == 1                     # not back before the GPU work completed
    fake.gpu_done.set()
    receiver.flush(timeout=5)
    assert released == [[0]] and receiver.held == 0

    kept = receiver.tensor(_ref(1))
    receiver.release(1)                                              # explicit: back now, tensor still alive
    receiver.flush(timeout=5)
    assert released == [[0], [1]] and receiver.held == 0
    del kept
    gc.collect()
    time.sleep(0.05)
    assert released == [[0], [1]]                                    # no second release when it dies

    first, second = receiver.tensor(_ref(0)), receiver.tensor(_ref(1))
    assert receiver.held == 2
    third = receiver.tensor(_ref(2))                                 # beyond keep=2: a private copy
    receiver.flush(timeout=5)
    assert [2] in released and not (base <= third.data_ptr() < base + 4096) and receiver.held == 2
    with pytest.raises(ValueError, match="not visible"):
        receiver.tensor(_ref(3, uuid="GPU-elsewhere"))
    receiver.close(timeout=5)
    assert fake.closed == []                                         # still viewed: stays mapped
    del first, second, third
    gc.collect()
    assert _eventually(lambda: fake.closed == [base])                # unmapped with its last view
    assert [0] not in released[2:] and [1] not in released[2:]       # nothing given back after close


class _FakePoolCuda:
    """The server side's CUDA calls over a host buffer; events complete on demand."""

    name = "fake"

    def __init__(self) -> None:
        self.buffers: list[Any] = []
        self.freed: list[int] = []
        self.gpu_done = threading.Event()

    def malloc(self, nbytes: int) -> int:
        self.buffers.append((ctypes.c_uint8 * nbytes)())
        return ctypes.addressof(self.buffers[-1])

    def free(self, ptr: int) -> None:
        self.freed.append(ptr)

    def mem_handle(self, ptr: int) -> bytes:
        return ptr.to_bytes(8, "little") * 8



def test_pool_bookkeeping_with_fake_cuda(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    module = _module("loader_service.transport.cuda_ipc")
    fake = _FakePoolCuda()
    events = fake_event_type(fake.gpu_done)
    monkeypatch.setattr(torch.cuda, "Event", events)
    monkeypatch.setattr(module, "_load_backend", lambda: fake)
    monkeypatch.setattr(module, "cuda_ipc_available", lambda: (True, "fake"))
    monkeypatch.setattr(module, "device_uuid", lambda device: "GPU-fake")
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _FakeStream())
    real_as_tensor = torch.as_tensor
    monkeypatch.setattr(torch, "as_tensor", lambda obj, device=None: torch.from_numpy(np.asarray(_HostView(obj)))
                        if hasattr(obj, "__cuda_array_interface__") else real_as_tensor(obj, device=device))
    cond = threading.Condition()
    pool = module.CudaSlotPool(2, 5000, cond, torch.device("cuda", 0))
    assert pool.slot_bytes == 8192 and pool.count == 2 and pool.name.startswith("wsi-cuda-")
    with cond:
        first, second = pool.take(), pool.take()
        assert pool.free_slots() == 0 and pool.held == 2
    batch = torch.arange(48, dtype=torch.int16).reshape(2, 24)
    ref = pool.write(second, batch)
    assert (ref.slot, ref.offset, ref.nbytes, ref.device_uuid) == (second, 8192, 96, "GPU-fake")
    assert ref.mem_handle == pool.mem_handle and ref.event_handle == pool._events[second].ipc_handle()
    assert all(e.interprocess for e in pool._events) and len(events.created) == 2
    assert events.records == [pool._events[second]]                  # the slot's own event, after the copy
    assert torch.equal(pool.slot_tensor(second)[:96].view(torch.int16), batch.reshape(-1))
    with pytest.raises(ValueError, match="does not fit"):
        pool.write(first, torch.zeros(9000, dtype=torch.uint8))
    with cond:
        assert pool.give_back([second, second, 7]) == 1 and pool.free_slots() == 1
    caplog.set_level("ERROR")
    pool.close(timeout=0.2)                                          # the copy never completes: leak, not free
    assert fake.freed == [] and "did not complete" in caplog.text
    pool2 = module.CudaSlotPool(1, 10, cond, torch.device("cuda", 0))
    with cond:
        pool2.write(pool2.take(), torch.ones(10, dtype=torch.uint8))
    fake.gpu_done.set()
    pool2.close()
    assert len(fake.freed) == 1 and pool2._events == [] and pool2._ptr == 0  # synchronized, then freed
    pool2.close()                                                    # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        pool2.write(0, torch.ones(1, dtype=torch.uint8))


# --- child processes -----------------------------------------------------------------------------------------
def _child(role: str, target: Any, conn: Connection, backend: str, results: Any, *args: Any) -> None:
    os.environ[BACKEND_ENV] = backend
    try:
        results.put((role, "ok", target(conn, *args)))
    except BaseException:  # noqa: BLE001 - everything goes back to the test
        results.put((role, "error", traceback.format_exc()))


def _server(conn: Connection) -> dict[str, Any]:
    CudaSlotPool = _module("loader_service.transport.cuda_ipc").CudaSlotPool

    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    cond = threading.Condition()
    nbytes = 1
    for n in SHAPE:
        nbytes *= n
    pool = CudaSlotPool(SLOTS, nbytes, cond, device)
    inbox: queue.Queue[tuple[Any, ...]] = queue.Queue()
    releases: list[tuple[float, list[int]]] = []

    def read() -> None:
        while True:
            if not conn.poll(STEP_TIMEOUT_S * 2):
                inbox.put(("reader-timeout",))
                return
            message = conn.recv()
            if message[0] == "release":
                with cond:
                    releases.append((time.monotonic(), list(message[1])))
                    pool.give_back(list(message[1]))
            else:
                inbox.put(message)
                if message[0] == "bye":
                    return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    a = torch.randn(8192, 8192, device=device)
    records: list[dict[str, Any]] = []
    for r in range(ROUNDS):
        with cond:
            if not cond.wait_for(lambda: pool.free_slots() > 0, timeout=STEP_TIMEOUT_S):
                raise TimeoutError(f"round {r}: no slot came back within {STEP_TIMEOUT_S}s (held {pool.held})")
            slot = pool.take()
        # A long kernel chain on the current stream, then the batch (which depends on it), then the copy.
        torch.cuda._sleep(SLEEP_CYCLES)
        product = a @ a
        batch = torch.full(SHAPE, r + 1, dtype=torch.uint8, device=device) + (product[0, 0] * 0).to(torch.uint8)
        ref = pool.write(slot, batch)
        message = pb.Tensor(dtype="uint8", shape=list(SHAPE), cuda=ref)
        conn.send(("batch", r, message.SerializeToString()))
        copy_pending_at_send = not pool._events[slot].query()
        del batch, product
        reply = inbox.get(timeout=STEP_TIMEOUT_S)
        if reply[0] != "checked":
            raise RuntimeError(f"round {r}: unexpected reply {reply!r}")
        with cond:
            records.append({"round": r, "slot": slot, "free_after_check": pool.free_slots(),
                            "held_after_check": pool.held, "copy_pending_at_send": copy_pending_at_send,
                            "client": reply[2]})
        conn.send(("next", r))
    conn.send(("end",))
    bye = inbox.get(timeout=STEP_TIMEOUT_S)
    with cond:
        cond.wait_for(lambda: pool.held == 0, timeout=STEP_TIMEOUT_S)
        final_free = pool.free_slots()
    reader.join(timeout=STEP_TIMEOUT_S)
    pool.close()
    return {"records": records, "bye": bye, "final_free": final_free,
            "released": sorted(s for _, slots in releases for s in slots), "backend": pool.backend}


def _client(conn: Connection) -> dict[str, Any]:
    CudaReceiver = _module("trainer_client.cuda_ipc").CudaReceiver

    torch.cuda.set_device(0)
    send_lock = threading.Lock()
    release_times: list[tuple[float, list[int]]] = []

    def release(slots: list[int]) -> None:
        release_times.append((time.monotonic(), list(slots)))
        with send_lock:
            conn.send(("release", slots))

    def send(message: tuple[Any, ...]) -> None:
        with send_lock:
            conn.send(message)

    receiver = CudaReceiver(release, keep=SLOTS)
    side = torch.cuda.Stream()
    kept: list[tuple[int, int, torch.Tensor]] = []   # (round, slot, a view of the batch)
    stale: tuple[int, int, torch.Tensor] | None = None  # explicitly released, still viewed
    gpu_work: dict[str, Any] = {}
    facts: dict[str, Any] = {"visible_after_reuse": None}
    while True:
        if not conn.poll(STEP_TIMEOUT_S):
            raise TimeoutError(f"no message from the server within {STEP_TIMEOUT_S}s")
        message = conn.recv()
        if message[0] == "batch":
            r, raw = message[1], message[2]
            msg = pb.Tensor.FromString(raw)
            tensor = receiver.tensor(msg)
            # Control: a stream that did NOT wait on the server's event sees the slot before the copy.
            with torch.cuda.stream(side):
                control = int(tensor[0, 0, 0, 0].item())
            # The real read, on the current stream, with no explicit synchronize.
            values = tensor.unique().tolist()
            base = receiver.base_pointer(msg.cuda.mem_handle)
            info = {"values": values, "control": control, "slot": int(msg.cuda.slot),
                    "zero_copy": base != 0 and tensor.data_ptr() == base + msg.cuda.offset,
                    "held": receiver.held, "device": str(tensor.device), "dtype": str(tensor.dtype),
                    "shape": list(tensor.shape)}
            if stale is not None and stale[1] == msg.cuda.slot:
                # The slot came back to the server, was rewritten: the old view sees the new batch (same memory).
                facts["visible_after_reuse"] = {"old_round": stale[0], "new_round": r,
                                                "old_view_values": stale[2].unique().tolist(),
                                                "same_ptr": stale[2].data_ptr() == tensor[1:].data_ptr()}
                stale = None
            kept.append((r, int(msg.cuda.slot), tensor[1:]))  # only a view survives this iteration
            del tensor
            info["held_after_del_base"] = receiver.held
            send(("checked", r, info))
        elif message[0] == "next":
            r = message[1]
            if len(kept) == SLOTS:
                old_round, old_slot, view = kept.pop(0)
                if r == EXPLICIT_ROUND:
                    receiver.release(old_slot)
                    stale = (old_round, old_slot, view)
                elif r == GPU_WORK_ROUND:
                    torch.cuda._sleep(SLEEP_CYCLES)  # the trainer's kernels still run when Python frees the view
                    gpu_work["sum"] = view.float().sum()
                    gpu_work["dropped_at"] = time.monotonic()
                    gpu_work["slot"] = old_slot
                del view
        elif message[0] == "end":
            kept.clear()
            stale = None
            gpu_work.pop("sum", None)
            receiver.flush(timeout=STEP_TIMEOUT_S)
            facts["held_at_end"] = receiver.held
            send(("bye", receiver.held))
            receiver.close()
            break
        else:
            raise RuntimeError(f"unexpected message {message!r}")
    drop = gpu_work.get("dropped_at")
    later = [t for t, slots in release_times if drop is not None and t >= drop and gpu_work["slot"] in slots]
    facts["release_delay_after_gpu_work_s"] = (later[0] - drop) if later else None
    facts["stalled"] = receiver.stalled
    return facts


def _run_pair(backend: str, timeout: float = 240.0) -> tuple[dict[str, Any], dict[str, Any]]:
    ctx = mp.get_context("spawn")
    server_end, client_end = ctx.Pipe()
    results = ctx.Queue()
    procs = [ctx.Process(target=_child, args=("server", _server, server_end, backend, results), daemon=True),
             ctx.Process(target=_child, args=("client", _client, client_end, backend, results), daemon=True)]
    for proc in procs:
        proc.start()
    got: dict[str, Any] = {}
    try:
        deadline = time.monotonic() + timeout
        while len(got) < 2:
            try:
                role, status, payload = results.get(timeout=max(1.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"{backend}: processes did not finish within {timeout}s; got {sorted(got)}")
            if status != "ok":
                raise AssertionError(f"{backend}: the {role} process failed:\n{payload}")
            got[role] = payload
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    return got["server"], got["client"]


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("backend", _backends() or ["none"])
def test_handoff_between_processes(backend: str) -> None:
    server, client = _run_pair(backend)
    assert server["backend"] == backend
    records = server["records"]
    assert [rec["round"] for rec in records] == list(range(ROUNDS))  # 10 rounds through 2 slots
    for rec in records:
        info = rec["client"]
        # ordering: the copy was still queued behind the long kernels when the ref went out, and the trainer
        # read the right values anyway, without synchronizing
        assert rec["copy_pending_at_send"], rec
        assert info["values"] == [rec["round"] + 1], rec
        # zero-copy: the trainer's tensor lies in the opened allocation, at the slot's offset
        assert info["zero_copy"], rec
        assert info["slot"] == rec["slot"]
        assert info["device"].startswith("cuda") and info["dtype"] == "torch.uint8" and info["shape"] == list(SHAPE)
        # release: while the trainer holds a view of each earlier batch, its slot does not come back
        expected_held = min(rec["round"] + 1, SLOTS)
        assert rec["held_after_check"] == expected_held, rec
        assert info["held_after_del_base"] == expected_held, rec  # a view keeps the slot
    # the control reader (a stream that did not wait on the event) saw stale bytes at least once: the test
    # would catch a receiver that forgot cudaStreamWaitEvent
    assert any(rec["client"]["control"] != rec["round"] + 1 for rec in records)
    # explicit release, then the server reused the slot: the old view shows the new batch (shared memory)
    seen = client["visible_after_reuse"]
    assert seen is not None and seen["same_ptr"], seen
    assert seen["old_view_values"] == [seen["new_round"] + 1], seen
    # the slot of a tensor freed while the trainer's kernels still read it came back only after those kernels
    delay = client["release_delay_after_gpu_work_s"]
    assert delay is not None and delay > 0.1, client
    # every slot came back exactly once per batch; nothing held at the end
    assert len(server["released"]) == ROUNDS and server["final_free"] == SLOTS and server["bye"][1] == 0
    assert client["stalled"] == [] and client["held_at_end"] == 0


@gpu
@pytest.mark.gpu
def test_unknown_device_uuid_is_a_value_error() -> None:
    CudaReceiver = _module("trainer_client.cuda_ipc").CudaReceiver

    receiver = CudaReceiver(lambda slots: None, 2)
    ref = pb.CudaRef(mem_handle=bytes(64), offset=0, nbytes=4, slot=0, event_handle=bytes(64),
                     device_uuid="GPU-00000000-0000-0000-0000-000000000000")
    with pytest.raises(ValueError, match="not visible"):
        receiver.tensor(pb.Tensor(dtype="uint8", shape=[4], cuda=ref))
    receiver.close()


# --- benchmark: python3 -m tests.test_cuda_ipc ------------------------------------------------------------
BENCH_SHAPE = (64, 3, 256, 256)
BENCH_N = 200


def _bench_server(conn: Connection, dtype_name: str, slots: int, pingpong: bool) -> dict[str, Any]:
    CudaSlotPool = _module("loader_service.transport.cuda_ipc").CudaSlotPool

    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    dtype = getattr(torch, dtype_name)
    src = torch.randint(0, 255, BENCH_SHAPE, device=device).to(dtype)
    nbytes = src.numel() * src.element_size()
    cond = threading.Condition()
    pool = CudaSlotPool(slots, nbytes, cond, device)
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            if not conn.poll(STEP_TIMEOUT_S):
                return
            message = conn.recv()
            if message[0] == "release":
                with cond:
                    pool.give_back(message[1])
            elif message[0] == "bye":
                done.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    torch.cuda.synchronize()
    lat: list[float] = []
    t0 = time.perf_counter()
    for i in range(BENCH_N + 10):
        if i == 10:
            t0 = time.perf_counter()
        with cond:
            if not cond.wait_for(lambda: pool.free_slots() == slots if pingpong else pool.free_slots() > 0,
                                 timeout=STEP_TIMEOUT_S):
                raise TimeoutError(f"bench batch {i}: no slot came back")
            slot = pool.take()
        start = time.perf_counter()
        ref = pool.write(slot, src)
        conn.send(("batch", start, pb.Tensor(dtype=dtype_name, shape=list(BENCH_SHAPE),
                                             cuda=ref).SerializeToString()))
        if pingpong:
            with cond:
                cond.wait_for(lambda: pool.free_slots() == slots, timeout=STEP_TIMEOUT_S)
            if i >= 10:
                lat.append(time.perf_counter() - start)
    with cond:
        cond.wait_for(lambda: pool.free_slots() == slots, timeout=STEP_TIMEOUT_S)
    elapsed = time.perf_counter() - t0
    conn.send(("end",))
    done.wait(timeout=STEP_TIMEOUT_S)
    pool.close()
    out: dict[str, Any] = {"nbytes": nbytes, "batches": BENCH_N, "elapsed_s": elapsed}
    if pingpong:
        out["roundtrip_p50_us"] = statistics.median(lat) * 1e6
        out["roundtrip_p90_us"] = sorted(lat)[int(len(lat) * 0.9)] * 1e6
    return out


def _bench_client(conn: Connection) -> dict[str, Any]:
    CudaReceiver = _module("trainer_client.cuda_ipc").CudaReceiver

    torch.cuda.set_device(0)
    lock = threading.Lock()

    def release(slots: list[int]) -> None:
        with lock:
            conn.send(("release", slots))

    receiver = CudaReceiver(release, keep=8)
    ready: list[float] = []
    checksum = 0.0
    while True:
        if not conn.poll(STEP_TIMEOUT_S):
            raise TimeoutError("bench client: no batch")
        message = conn.recv()
        if message[0] == "end":
            break
        tensor = receiver.tensor(pb.Tensor.FromString(message[2]))
        torch.cuda.current_stream().synchronize()  # the batch is usable: measure time-to-ready
        ready.append(time.perf_counter() - message[1])
        checksum += float(tensor.view(-1)[:1].float().item())
        del tensor
    receiver.flush(timeout=STEP_TIMEOUT_S)
    with lock:
        conn.send(("bye",))
    receiver.close()
    return {"ready_p50_us": statistics.median(ready) * 1e6}


def _bench_copy_roundtrip(dtype_name: str) -> dict[str, float]:
    """Device -> host -> device in one process: what the SHM/gRPC planes cost a GPU-resident batch at least."""
    device = torch.device("cuda", 0)
    src = torch.randint(0, 255, BENCH_SHAPE, device=device).to(getattr(torch, dtype_name))
    nbytes = src.numel() * src.element_size()
    dst = torch.empty_like(src)
    pinned = torch.empty(src.shape, dtype=src.dtype, pin_memory=True)
    out: dict[str, float] = {}
    for name, step in {
        "d2d_copy": lambda: dst.copy_(src),
        "d2h2d_pageable": lambda: dst.copy_(src.cpu()),
        "d2h2d_pinned": lambda: (pinned.copy_(src), dst.copy_(pinned, non_blocking=True)),
    }.items():
        for _ in range(5):
            step()
        torch.cuda.synchronize()
        n = 50
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        torch.cuda.synchronize()
        per = (time.perf_counter() - t0) / n
        out[f"{name}_us"] = per * 1e6
        out[f"{name}_GBps"] = nbytes / per / 1e9
    return out


def _bench() -> None:
    backend = (_backends() or ["cuda-bindings"])[0]
    ctx = mp.get_context("spawn")
    report: dict[str, Any] = {"backend": backend, "device": torch.cuda.get_device_name(0), "shape": BENCH_SHAPE}
    for dtype_name in ("uint8", "float32"):
        for mode, slots, pingpong in (("pingpong", 1, True), ("pipelined", 4, False)):
            server_end, client_end = ctx.Pipe()
            results = ctx.Queue()
            procs = [ctx.Process(target=_child, args=("server", _bench_server, server_end, backend, results,
                                                      dtype_name, slots, pingpong)),
                     ctx.Process(target=_child, args=("client", _bench_client, client_end, backend, results))]
            for proc in procs:
                proc.start()
            got = {}
            for _ in procs:
                role, status, payload = results.get(timeout=180)
                if status != "ok":
                    raise RuntimeError(f"{role}: {payload}")
                got[role] = payload
            for proc in procs:
                proc.join(timeout=30)
            server = got["server"]
            per = server["elapsed_s"] / server["batches"]
            entry = {"per_batch_us": per * 1e6, "GBps": server["nbytes"] / per / 1e9, **got["client"]}
            entry.update({k: v for k, v in server.items() if k.startswith("roundtrip")})
            report[f"ipc_{dtype_name}_{mode}"] = entry
        report[f"copy_{dtype_name}"] = _bench_copy_roundtrip(dtype_name)
    print(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    sys.exit(_bench())
