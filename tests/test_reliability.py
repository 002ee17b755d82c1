"""Issue #13 (part B): memory in flight is bounded for all sessions together, control RPCs stay reachable
whatever the streams do, reads by mpp are bounded, and the smaller defects stay fixed."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from loader_service.budget import MemoryBudget
from loader_service.server import LoaderServer
from tests.conftest import make_config
from trainer_client import InvalidRequestError, LoaderClient, StreamConfig
from wsi_loader.v1 import loader_pb2 as pb
from wsi_loader.v1 import loader_pb2_grpc as pb_grpc


def wait_for(predicate, timeout: float = 20.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def open_message(**kw: object) -> pb.OpenSession:
    values: dict[str, object] = dict(dataset="train", batch_size=4, patch_size=64, samples_per_epoch=64, seed=1)
    values.update(kw)
    return StreamConfig(**values).open_message(0, 0, 1, 0, pb.GRPC)  # type: ignore[arg-type]


def stream_error(stub: pb_grpc.LoaderStub, message: pb.OpenSession) -> grpc.RpcError:
    """Open a stream with ``message`` and return the error it ends with (before or after `opened`)."""
    def requests() -> Iterator[pb.StreamRequest]:
        yield pb.StreamRequest(open=message)
        yield pb.StreamRequest(credit=pb.Credit(batches=4))
        time.sleep(30)

    call = stub.Stream(requests(), timeout=60)
    with pytest.raises(grpc.RpcError) as info:
        for _ in call:
            pass
    return info.value


@pytest.fixture()
def stub(server: LoaderServer) -> Iterator[pb_grpc.LoaderStub]:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield pb_grpc.LoaderStub(channel)


# --- the memory budget ------------------------------------------------------------------------------------------

def test_budget_keeps_one_batch_per_session_and_shares_half() -> None:
    seen: list[int] = []
    budget = MemoryBudget(100, on_change=seen.append)
    woken = threading.Event()
    a = budget.open_account(floor=10)
    b = budget.open_account(woken.set, floor=10)
    assert a is not None and b is not None and budget.used == 20
    assert a.try_reserve(10) and budget.used == 20  # within its floor: nothing more
    assert a.try_reserve(25) and not a.try_reserve(1)  # floor + half of the budget over 2 sessions
    assert b.try_reserve(35) and budget.used == 70 and seen[-1] == 70
    assert budget.open_account(floor=40) is None  # would not fit: refused, not starved later
    c = budget.open_account(floor=30)
    assert c is not None and budget.used == 100
    assert not c.try_reserve(31, within_share=False)  # over the whole budget
    assert c.try_reserve(30)  # its floor is always there
    a.release(35)
    assert woken.is_set() and budget.used == 75
    b.close()
    c.close()
    assert budget.used == 10 and budget.share() == 50  # a's floor
    a.close()
    assert budget.used == 0 and budget.accounts == 0


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _scrape(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {s.name + (json.dumps(s.labels, sort_keys=True) if s.labels else ""): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_clients_that_never_read_hold_at_most_the_budget() -> None:
    """Four sessions of 1024² batches grant 16 credits each and never read: unbounded, that is over 1.5 GiB of
    tensors and messages; the service's RSS stays under its idle RSS plus the 256 MiB budget."""
    budget_mb = 256
    cmd = [sys.executable, "-m", "loader_service.cli", "serve", "--synthetic", "--listen", "127.0.0.1:0",
           "--metrics-port", "0", "--workers", "2", "--device", "cpu", "--max-inflight-mb", str(budget_mb)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    channels: list[grpc.Channel] = []
    try:
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline())
        address = f"127.0.0.1:{info['port']}"
        config = StreamConfig(dataset="synthetic", batch_size=4, patch_size=1024, samples_per_epoch=4096,
                              augment=False, transport="grpc", credits=16, timeout_s=60)
        with LoaderClient(address) as client, client.stream(
                StreamConfig(**{**config.__dict__, "samples_per_epoch": 16})) as warm:
            assert sum(1 for _ in warm) == 4  # the process as it is after serving: its idle RSS
        time.sleep(1.0)
        idle = _rss(proc.pid)
        release = threading.Event()
        calls = []
        for _ in range(4):
            channel = grpc.insecure_channel(address)
            channels.append(channel)

            def requests() -> Iterator[pb.StreamRequest]:
                yield pb.StreamRequest(open=config.open_message(0, 0, 1, 0, pb.GRPC))
                yield pb.StreamRequest(credit=pb.Credit(batches=16))
                release.wait(120)

            call = pb_grpc.LoaderStub(channel).Stream(requests())
            assert next(call).WhichOneof("kind") == "opened"  # ... and then never read again
            calls.append(call)
        peak, held = 0, 0.0
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            peak = max(peak, _rss(proc.pid))
            held = max(held, _scrape(info["metrics"])["wsi_loader_inflight_bytes"])
            time.sleep(0.2)
        metrics = _scrape(info["metrics"])
        assert metrics["wsi_loader_inflight_budget_bytes"] == budget_mb * 2**20
        assert 0 < held <= budget_mb * 2**20
        # A client that reads is still served while the others hold their share.
        with LoaderClient(address) as client, client.stream(
                StreamConfig(**{**config.__dict__, "samples_per_epoch": 32, "credits": 2})) as reader:
            assert sum(1 for _ in reader) == 8
        peak = max(peak, _rss(proc.pid))
        slack = 64 * 2**20  # gRPC's copy of the message it is sending, allocator pages
        assert peak - idle < budget_mb * 2**20 + slack, (
            f"RSS grew {(peak - idle) / 2**20:.0f} MiB over idle {idle / 2**20:.0f} MiB; budget {budget_mb} MiB")
        release.set()
        for call in calls:
            call.cancel()
    finally:
        for channel in channels:
            channel.close()
        proc.kill()
        proc.wait()


# --- control stays reachable --------------------------------------------------------------------------------

def test_idle_streams_never_starve_control_and_are_closed_after_the_open_timeout(dataset_dir: Path) -> None:
    config = make_config(dataset_dir, open_timeout_s=4.0, max_streams=256, max_streams_per_peer=256)
    with LoaderServer(config) as srv, grpc.insecure_channel(f"127.0.0.1:{srv.port}") as channel, \
            grpc.insecure_channel(f"127.0.0.1:{srv.port}") as control:
        hold = threading.Event()

        def silent() -> Iterator[pb.StreamRequest]:
            hold.wait(60)
            return
            yield  # never sends anything

        stub = pb_grpc.LoaderStub(channel)
        calls = [stub.Stream(silent()) for _ in range(200)]
        errors: list[grpc.RpcError] = []

        def drain(call: grpc.Future) -> None:  # type: ignore[type-arg]
            try:
                for _ in call:
                    pass
            except grpc.RpcError as err:
                errors.append(err)

        readers = [threading.Thread(target=drain, args=(c,), daemon=True) for c in calls]
        for r in readers:
            r.start()
        assert wait_for(lambda: srv.admission.open_streams == 200, 10)
        health = health_pb2_grpc.HealthStub(control)
        loader = pb_grpc.LoaderStub(control)
        slowest = 0.0
        while srv.admission.open_streams == 200:
            t0 = time.perf_counter()
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=1.0).status == \
                health_pb2.HealthCheckResponse.SERVING
            assert {d.name for d in loader.ListDatasets(pb.ListDatasetsRequest(), timeout=1.0).datasets} >= {"train"}
            assert loader.DescribeDataset(pb.DescribeDatasetRequest(dataset="train"), timeout=1.0).slides
            slowest = max(slowest, time.perf_counter() - t0)
            time.sleep(0.1)
        assert slowest < 1.0
        for r in readers:
            r.join(10)
        hold.set()
        assert len(errors) == 200
        assert {e.code() for e in errors} == {grpc.StatusCode.DEADLINE_EXCEEDED}
        assert "no `open` message within 4 s" in errors[0].details() and "open_timeout_s" in errors[0].details()
        assert srv.metrics.sample("wsi_loader_streams_refused_total", {"reason": "open_timeout"}) == 200
        assert wait_for(lambda: srv.admission.open_streams == 0)


def test_streams_beyond_the_per_peer_cap_are_refused_and_control_still_answers(dataset_dir: Path) -> None:
    config = make_config(dataset_dir, open_timeout_s=30.0, max_streams_per_peer=2)
    with LoaderServer(config) as srv, grpc.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
        hold = threading.Event()

        def silent() -> Iterator[pb.StreamRequest]:
            hold.wait(60)
            return
            yield

        stub = pb_grpc.LoaderStub(channel)
        held = [stub.Stream(silent()) for _ in range(2)]
        assert wait_for(lambda: srv.admission.open_streams == 2)
        with pytest.raises(grpc.RpcError) as info:
            next(stub.Stream(silent(), timeout=10))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_streams_per_peer" in info.value.details()
        assert srv.metrics.sample("wsi_loader_streams_refused_total", {"reason": "max_streams_per_peer"}) == 1
        assert pb_grpc.LoaderStub(channel).ListDatasets(pb.ListDatasetsRequest(), timeout=1.0).datasets
        hold.set()
        for call in held:
            call.cancel()
        assert wait_for(lambda: srv.admission.open_streams == 0)


# --- bounded reads by mpp -----------------------------------------------------------------------------------

def _slide(stub: pb_grpc.LoaderStub) -> pb.SlideSummary:
    return next(s for s in stub.DescribeDataset(pb.DescribeDatasetRequest(dataset="train")).slides if s.levels)


def test_read_region_by_mpp_is_bounded_by_the_pyramid(stub: pb_grpc.LoaderStub, server: LoaderServer) -> None:
    slide = _slide(stub)
    coarsest = slide.mpp * slide.levels[-1].downsample

    def read(mpp: float, size: int = 8) -> pb.Tensor:
        return stub.ReadRegion(pb.ReadRegionRequest(dataset="train", slide_id=slide.slide_id, mpp=mpp, x=0, y=0,
                                                    width=size, height=size), timeout=30)

    assert list(read(coarsest * 3).shape) == [8, 8, 3]  # within MAX_READ_FACTOR of the coarsest level
    before = server.metrics.sample("wsi_loader_errors_total", {"kind": "out_of_range"})
    t0 = time.perf_counter()
    with pytest.raises(grpc.RpcError) as info:
        read(coarsest * 1000)
    assert time.perf_counter() - t0 < 2.0  # refused before reading anything
    assert info.value.code() == grpc.StatusCode.OUT_OF_RANGE
    assert "MAX_READ_FACTOR" in info.value.details() and "serves mpp up to" in info.value.details()
    assert server.metrics.sample("wsi_loader_errors_total", {"kind": "out_of_range"}) == before + 1
    with pytest.raises(grpc.RpcError) as info:  # a fine level within the factor, but too many source pixels
        read(slide.mpp * 3, size=11000)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_region_pixels" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:  # finer than level 0: the client's error, not DATA_LOSS
        read(slide.mpp / 4)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "finer than" in info.value.details()


@pytest.mark.parametrize("mpp", [math.nan, math.inf, -math.inf, -1.0])
def test_non_finite_or_negative_mpp_is_rejected_everywhere(stub: pb_grpc.LoaderStub, mpp: float) -> None:
    slide = _slide(stub)
    with pytest.raises(grpc.RpcError) as info:
        stub.ReadRegion(pb.ReadRegionRequest(dataset="train", slide_id=slide.slide_id, mpp=mpp, x=0, y=0, width=8,
                                             height=8), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "mpp" in info.value.details()
    message = open_message()
    message.mpp = mpp
    err = stream_error(stub, message)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "mpp" in err.details()
    with pytest.raises(ValueError, match="mpp must be a finite number"):  # and the client says so first
        StreamConfig(dataset="train", mpp=mpp)


def test_session_by_mpp_is_bounded_too(stub: pb_grpc.LoaderStub) -> None:
    slide = _slide(stub)
    err = stream_error(stub, open_message(mpp=slide.mpp * slide.levels[-1].downsample * 1000))
    assert err.code() == grpc.StatusCode.OUT_OF_RANGE and "MAX_READ_FACTOR" in err.details()
    err = stream_error(stub, open_message(mpp=slide.mpp / 4))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "finer than" in err.details()


# --- smaller defects ----------------------------------------------------------------------------------------

def test_patch_size_zero_is_an_error_not_256(stub: pb_grpc.LoaderStub) -> None:
    message = open_message()
    message.patch_size = 0
    err = stream_error(stub, message)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "patch_size is 0" in err.details()


def test_too_large_shard_grid_is_refused_at_open(stub: pb_grpc.LoaderStub) -> None:
    message = open_message(view="shard", batch_size=1, region_width=128, grid=(500, 2), shard=(3, 1))
    saw_opened = False

    def requests() -> Iterator[pb.StreamRequest]:
        yield pb.StreamRequest(open=message)
        yield pb.StreamRequest(credit=pb.Credit(batches=2))
        time.sleep(30)

    with pytest.raises(grpc.RpcError) as info:
        for response in stub.Stream(requests(), timeout=60):
            saw_opened = saw_opened or response.WhichOneof("kind") == "opened"
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "shard grid 500×2" in info.value.details()
    assert not saw_opened
    message = open_message(view="shard", batch_size=1, region_width=128, grid=(100000, 1))
    assert stream_error(stub, message).code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_normal_close_is_not_an_error(client: LoaderClient, server: LoaderServer) -> None:
    gone = server.metrics.sample("wsi_loader_errors_total", {"kind": "client_gone"})
    closed = server.metrics.sample("wsi_loader_sessions_ended_total", {"reason": "client_closed"})
    with client.stream(StreamConfig(dataset="train", batch_size=4, patch_size=64, samples_per_epoch=4000,
                                    credits=4)) as stream:
        it = iter(stream)
        next(it)
        next(it)
    assert wait_for(lambda: server.metrics.sample("wsi_loader_active_sessions") == 0)
    assert server.metrics.sample("wsi_loader_sessions_ended_total", {"reason": "client_closed"}) == closed + 1
    assert server.metrics.sample("wsi_loader_errors_total", {"kind": "client_gone"}) == gone
    assert wait_for(lambda: server.metrics.sample("wsi_loader_inflight_bytes") == 0)


def test_credits_granted_after_a_session_ended_do_not_show_as_available(stub: pb_grpc.LoaderStub,
                                                                          server: LoaderServer) -> None:
    """Credits that arrive after the end (the client keeps granting while the epoch finishes) left the gauge
    drifting upward; sessions that end abruptly must leave it where it was."""
    before = server.metrics.sample("wsi_loader_credits_available")
    for abrupt in (False, True, False, True):
        ended = threading.Event()

        def requests() -> Iterator[pb.StreamRequest]:
            yield pb.StreamRequest(open=open_message(samples_per_epoch=8))
            yield pb.StreamRequest(credit=pb.Credit(batches=4))
            ended.wait(30)
            for _ in range(5):
                yield pb.StreamRequest(credit=pb.Credit(batches=16))
                time.sleep(0.02)

        call = stub.Stream(requests(), timeout=60)
        kinds = []
        for response in call:
            kinds.append(response.WhichOneof("kind"))
            if kinds[-1] == "end" or (abrupt and kinds[-1] == "batch"):
                break
        ended.set()
        time.sleep(0.3)
        call.cancel()
    assert wait_for(lambda: server.metrics.sample("wsi_loader_active_sessions") == 0)
    time.sleep(0.3)
    assert server.metrics.sample("wsi_loader_credits_available") == before


def test_one_batch_larger_than_the_budget_is_refused(dataset_dir: Path) -> None:
    with LoaderServer(make_config(dataset_dir, max_inflight_mb=1)) as srv, \
            LoaderClient(f"127.0.0.1:{srv.port}", timeout_s=30) as client:
        with pytest.raises(Exception) as info:
            with client.stream(StreamConfig(dataset="train", batch_size=8, patch_size=256)) as stream:
                next(iter(stream))
        assert "max_inflight_mb" in str(info.value)
        with client.stream(StreamConfig(dataset="train", batch_size=2, patch_size=64, samples_per_epoch=8)) as ok:
            assert sum(1 for _ in ok) == 4


def test_client_maps_out_of_range_to_invalid_request(client: LoaderClient, stub: pb_grpc.LoaderStub) -> None:
    slide = _slide(stub)
    with pytest.raises(InvalidRequestError, match="MAX_READ_FACTOR"):
        client.read_region("train", slide.slide_id, 0, 0, 8, 8, mpp=slide.mpp * 1e5)


def test_slide_refuses_an_mpp_read_past_the_factor_before_reading(tmp_path: Path) -> None:
    from loader_service.slides import MAX_READ_FACTOR, MppOutOfRange, open_slide
    from loader_service.synthetic import write_synthetic_slide

    single = write_synthetic_slide(tmp_path / "single.tiff", 1024, 768, seed=4, pyramid=False, quality=85)
    with open_slide(single) as slide:
        assert slide.info.level_count == 1 and slide.info.mpp == pytest.approx(0.5)
        level, scale, factor = slide.read_plan(0.5 * 8 * MAX_READ_FACTOR)  # DCT 1/8, then 4× by area
        assert (level, scale) == (0, 8) and factor == pytest.approx(MAX_READ_FACTOR)
        assert slide.read_region_mpp(0.5 * 8 * MAX_READ_FACTOR, 0, 0, 8, 8).shape == (8, 8, 3)
        t0 = time.perf_counter()
        with pytest.raises(MppOutOfRange, match="MAX_READ_FACTOR"):
            slide.read_region_mpp(0.5 * 8 * MAX_READ_FACTOR * 3, 0, 0, 8, 8)
        assert time.perf_counter() - t0 < 0.5


def test_a_grant_after_the_gate_closed_is_not_counted() -> None:
    """The drift's cause: a credit message handled after the session's gate closed (the client kept granting
    while the epoch ended, or while it cancelled) was added to the gauge and never taken off."""
    from loader_service.metrics import Metrics
    from loader_service.session import Gate

    metrics = Metrics()
    gate = Gate(16, metrics)
    gate.grant(4)
    assert metrics.sample("wsi_loader_credits_available") == 4
    gate.close()
    gate.grant(16)
    assert metrics.sample("wsi_loader_credits_available") == 0
    assert gate.try_take() is None
