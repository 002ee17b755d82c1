"""The shared-memory data plane with real processes: zero copy, release and reuse, crashes, fallback."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from loader_service.server import LoaderServer
from tests.conftest import make_config
from trainer_client import InvalidRequestError, LoaderClient, StreamConfig

pytestmark = pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="needs Linux /dev/shm")


def segments(pid: int | None = None) -> set[str]:
    prefix = "wsi-loader-" + (f"{pid}-" if pid is not None else "")
    return {p.name for p in Path("/dev/shm").iterdir() if p.name.startswith(prefix)}


def wait_for(predicate, timeout: float = 15.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


def shm_config(**kw: object) -> StreamConfig:
    values: dict[str, object] = dict(dataset="train", batch_size=8, patch_size=64, samples_per_epoch=48, seed=3,
                                     transport="shm", timeout_s=60)
    values.update(kw)
    return StreamConfig(**values)  # type: ignore[arg-type]


def mapped_ranges(name: str) -> list[tuple[int, int]]:
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.rstrip().endswith(f"/dev/shm/{name}"):
            lo, hi = line.split()[0].split("-")
            ranges.append((int(lo, 16), int(hi, 16)))
    return ranges


def test_a_trainer_keeping_every_batch_gets_copies_not_a_deadlock(client: LoaderClient) -> None:
    with client.stream(shm_config(credits=2, shm_keep=1)) as stream:
        batches = list(stream)  # keeps all 6: only the first stays zero-copy
    assert len(batches) == 6 and [b["slot"] >= 0 for b in batches].count(True) == 6
    with client.stream(shm_config(transport="grpc")) as stream:
        expected = list(stream)
    assert all(torch.equal(a["images"], b["images"]) for a, b in zip(batches, expected))


def test_zero_copy_tensor_is_a_view_of_the_segment(client: LoaderClient) -> None:
    with client.stream(shm_config()) as stream:
        it = iter(stream)
        batch = next(it)
        assert stream.transport == "shm"
        names = segments(os.getpid())
        assert len(names) == 1
        ranges = mapped_ranges(next(iter(names)))  # the server's mapping and the client's (same process here)
        ptr = batch["images"].data_ptr()
        assert any(lo <= ptr and ptr + batch["images"].numel() <= hi for lo, hi in ranges)
        assert batch["images"].shape == (8, 3, 64, 64)
    with client.stream(shm_config(transport="grpc")) as stream:
        same = next(iter(stream))
    assert torch.equal(same["images"], batch["images"])  # same pixels as over gRPC bytes


def test_slots_are_released_and_reused(client: LoaderClient, server: LoaderServer) -> None:
    cfg = shm_config(credits=2, shm_keep=2, samples_per_epoch=80)  # 4 slots for 10 batches
    with client.stream(cfg) as stream:
        it = iter(stream)
        held = [next(it), next(it)]
        # The client holds 2 slots, the server filled the other 2 with the next batches and must now wait.
        assert wait_for(lambda: server.metrics.sample("wsi_loader_shm_slots", {"state": "free"}) == 0)
        assert server.metrics.sample("wsi_loader_shm_slots", {"state": "in_use"}) == 4
        stream.release(held[0])  # explicit
        del held[1]  # implicit: the tensor is freed
        del held
        slots = []
        for batch in it:  # a normal loop: each batch is freed when the next replaces it
            slots.append(batch["slot"])
        assert len(slots) == 8 and set(slots) <= {0, 1, 2, 3} and all(s >= 0 for s in slots)
    assert wait_for(lambda: server.metrics.sample("wsi_loader_shm_slots", {"state": "in_use"}) == 0)


def test_synthetic_and_shm_match_grpc_throughput_path(dataset_dir: Path) -> None:
    with LoaderServer(make_config(dataset_dir, synthetic=True)) as srv, LoaderClient(f"127.0.0.1:{srv.port}") as c:
        assert "synthetic" in {d.name for d in c.datasets()}
        for transport in ("grpc", "shm"):
            with c.stream(shm_config(dataset="synthetic", transport=transport, patch_size=512)) as stream:
                batches = list(stream)
            assert stream.transport == transport
            assert len(batches) == 6 and batches[0]["images"].shape == (8, 3, 512, 512)
        assert srv.metrics.sample("wsi_loader_samples_decoded_total") == 0


CLIENT = textwrap.dedent("""
    import sys, time
    from trainer_client import LoaderClient, StreamConfig
    cfg = StreamConfig(dataset=sys.argv[2], batch_size=8, patch_size=64, samples_per_epoch=100000,
                       transport=sys.argv[3], timeout_s=60)
    client = LoaderClient(sys.argv[1])
    stream = client.stream(cfg)
    it = iter(stream)
    held = [next(it), next(it)]
    print(stream.transport, held[0]["images"].shape[0], flush=True)
    if sys.argv[4] == "hold":
        time.sleep(600)
    elif sys.argv[4] == "exit":
        client.close()
    # "leave": neither the stream nor the client closed; the exit hook of trainer_client ends the stream
""")


def run_client(endpoint: str, dataset: str, transport: str, mode: str, *, unshare: bool = False) -> subprocess.Popen:
    cmd = [sys.executable, "-c", CLIENT, endpoint, dataset, transport, mode]
    if unshare:
        script = "mount -t tmpfs tmpfs /dev/shm && exec " + " ".join(f"'{c}'" for c in cmd)
        cmd = ["unshare", "--mount", "sh", "-c", script]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[1])


def test_client_killed_mid_stream_gives_its_slots_back(server: LoaderServer) -> None:
    before = segments(os.getpid())
    reclaimed = server.metrics.sample("wsi_loader_shm_slots_reclaimed_total")
    proc = run_client(f"127.0.0.1:{server.port}", "train", "shm", "hold")
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        assert line.startswith("shm 8"), proc.stderr.read()  # type: ignore[union-attr]
        assert len(segments(os.getpid()) - before) == 1
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        assert wait_for(lambda: segments(os.getpid()) == before)
        assert wait_for(lambda: server.metrics.sample("wsi_loader_active_sessions") == 0)
        assert server.metrics.sample("wsi_loader_shm_slots_reclaimed_total") >= reclaimed + 2
        assert server.metrics.sample("wsi_loader_shm_slots", {"state": "in_use"}) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_service_killed_its_segments_are_reclaimed_by_the_next(dataset_dir: Path) -> None:
    cmd = [sys.executable, "-m", "loader_service.cli", "serve", "--synthetic", "--listen", "127.0.0.1:0",
           "--metrics-port", "-1", "--workers", "1", "--device", "cpu"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        port = json.loads(proc.stdout.readline())["port"]  # type: ignore[union-attr]
        with LoaderClient(f"127.0.0.1:{port}") as client:
            stream = client.stream(shm_config(dataset="synthetic", samples_per_epoch=10**5))
            it = iter(stream)
            next(it)
            left = segments(proc.pid)
            assert len(left) == 1
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
            assert segments(proc.pid) == left  # a dead owner cannot unlink: the leak is real
            with LoaderServer(make_config(dataset_dir, synthetic=True, datasets=())) as fresh:
                assert segments(proc.pid) == set()
                assert fresh.metrics.sample("wsi_loader_shm_slots_reclaimed_total") >= 1
            stream.close()
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize(("transport", "mode"), [("grpc", "exit"), ("shm", "exit"), ("grpc", "leave"), ("shm", "leave")])
def test_a_process_that_exits_with_its_stream_open_ends_it_cleanly(server: LoaderServer, transport: str,
                                                                    mode: str) -> None:
    # The stream is closed by client.close() or by the client's exit hook while gRPC's threads still run (a
    # half-close the service counts as a normal close), not by the iterator's finally during finalization,
    # which could wait for ever on a lock a frozen daemon thread holds.
    closed = server.metrics.sample("wsi_loader_sessions_ended_total", {"reason": "client_closed"})
    gone = server.metrics.sample("wsi_loader_errors_total", {"kind": "client_gone"})
    proc = run_client(f"127.0.0.1:{server.port}", "train", transport, mode)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and out.startswith(f"{transport} 8"), err
    assert wait_for(lambda: server.metrics.sample("wsi_loader_active_sessions") == 0)
    assert server.metrics.sample("wsi_loader_sessions_ended_total", {"reason": "client_closed"}) == closed + 1
    assert server.metrics.sample("wsi_loader_errors_total", {"kind": "client_gone"}) == gone


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare(1) for a private /dev/shm")
def test_falls_back_to_grpc_when_shm_is_not_shared(server: LoaderServer) -> None:
    endpoint = f"127.0.0.1:{server.port}"
    proc = run_client(endpoint, "train", "auto", "exit", unshare=True)
    out, err = proc.communicate(timeout=120)
    if proc.returncode != 0 and "unshare" in err and "Operation not permitted" in err:
        pytest.skip("this sandbox does not allow mount namespaces")
    assert proc.returncode == 0, err
    assert out.startswith("grpc 8")
    strict = run_client(endpoint, "train", "shm", "exit", unshare=True)
    out, err = strict.communicate(timeout=120)
    assert strict.returncode != 0 and "InvalidRequestError" in err and "not visible" in err


def test_ranks_of_one_job_share_the_pipeline_and_decode_once(client: LoaderClient, server: LoaderServer) -> None:
    assert wait_for(lambda: server.metrics.sample("wsi_loader_batches_in_flight") == 0)
    decoded = server.metrics.sample("wsi_loader_samples_decoded_total")
    seen = []
    streams = [client.stream(shm_config(job_id="job-a", samples_per_epoch=64), rank=r, world_size=2) for r in range(2)]
    iters = [iter(s) for s in streams]
    for _ in range(4):  # interleaved, as DDP ranks read
        for it in iters:
            b = next(it)
            seen += list(zip(b["slide_id"], b["x"].tolist(), b["y"].tolist()))
    for s in streams:
        s.close()
    assert len(seen) == 64
    assert server.metrics.sample("wsi_loader_samples_decoded_total") - decoded == 64  # decoded once each
    # an epoch far longer than the credits: rank 0's session stays open however fast the service is
    long = dict(job_id="job-b", samples_per_epoch=48_000)
    with client.stream(shm_config(**long), rank=0, world_size=2) as a, client.stream(shm_config(**long, seed=9),
                                                                                     rank=1, world_size=2) as b:
        first = iter(a)  # keep the iterator alive: its session stays open
        next(first)
        with pytest.raises(InvalidRequestError, match="disagrees"):
            next(iter(b))
