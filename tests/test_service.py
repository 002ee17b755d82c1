"""The service end to end, against a real gRPC server on loopback."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loader_service.server import LoaderServer
from tests.conftest import make_config
from trainer_client import (
    InvalidRequestError,
    LoaderClient,
    NotFoundError,
    ResourceExhaustedError,
    StreamConfig,
    WSIStream,
)
from wsi_loader.v1 import loader_pb2 as pb
from wsi_loader.v1 import loader_pb2_grpc as pb_grpc


def collect(stream: WSIStream, limit: int | None = None) -> list[dict]:
    out = []
    for batch in stream:
        out.append(batch)
        if limit is not None and len(out) >= limit:
            break
    return out


def coords(batches: list[dict]) -> list[tuple[str, int, int]]:
    return [(s, int(x), int(y)) for b in batches for s, x, y in zip(b["slide_id"], b["x"], b["y"])]


def small(**kw: object) -> StreamConfig:
    values: dict[str, object] = dict(dataset="train", batch_size=8, patch_size=64, samples_per_epoch=48, seed=3,
                                     level=0, timeout_s=60, transport="grpc")
    values.update(kw)
    return StreamConfig(**values)  # type: ignore[arg-type]


def test_datasets_are_indexed_and_bad_slides_left_out(client: LoaderClient, server: LoaderServer) -> None:
    by_name = {d.name: d for d in client.datasets()}
    assert by_name["train"].slides == 4 and by_name["train"].failed_slides == 0
    assert by_name["mixed"].slides == 4 and by_name["mixed"].failed_slides == 3
    info = client.describe("mixed")
    errors = {s.slide_id: s.error for s in info.slides if s.error}
    assert any("outside the data roots" in e for e in errors.values())
    assert any("corrupt.tiff" in sid for sid in errors) and any("notes.tiff" in sid for sid in errors)
    assert server.metrics.sample("wsi_loader_slides_failed_total", {"reason": "outside_roots"}) >= 1
    assert server.metrics.sample("wsi_loader_slides_failed_total", {"reason": "unreadable"}) >= 2
    good = next(s for s in info.slides if not s.error)
    assert good.levels[0].width == 2048 and len(good.levels) >= 2 and 0 < good.tissue_fraction < 1


def test_batches_have_shape_dtype_labels_and_metadata(client: LoaderClient) -> None:
    with client.stream(small(dtype="float32", mean=(0.5,) * 3, std=(0.25,) * 3)) as stream:
        batches = collect(stream)
    assert len(batches) == 6
    first = batches[0]
    assert first["images"].shape == (8, 3, 64, 64) and first["images"].dtype == torch.float32
    assert first["labels"].dtype == torch.int64 and set(first["labels"].tolist()) <= {0, 1}
    assert len(first["slide_id"]) == 8 and (first["x"] >= 0).all()
    assert stream.labels == sorted(stream.labels) and len(stream.labels) == 2


def test_same_seed_same_pixels_whatever_the_thread_count(client: LoaderClient, dataset_dir: Path) -> None:
    with client.stream(small()) as stream:
        a = collect(stream)
    with LoaderServer(make_config(dataset_dir, workers=1, tile_cache_bytes=0)) as other:
        with LoaderClient(f"127.0.0.1:{other.port}") as c2, c2.stream(small()) as stream:
            b = collect(stream)
    assert coords(a) == coords(b)
    for x, y in zip(a, b):
        assert torch.equal(x["images"], y["images"])
    with client.stream(small(seed=4)) as stream:
        c = collect(stream)
    assert coords(c) != coords(a)


def test_ranks_get_disjoint_equal_shards_whose_union_is_the_epoch(client: LoaderClient) -> None:
    with client.stream(small(samples_per_epoch=60), rank=0, world_size=1) as stream:
        whole = coords(collect(stream))
    shards = []
    for rank in range(3):
        with client.stream(small(samples_per_epoch=60), rank=rank, world_size=3) as stream:
            shards.append(coords(collect(stream)))
    assert [len(s) for s in shards] == [20, 20, 20]
    interleaved = [shards[i % 3][i // 3] for i in range(60)]
    assert interleaved == whole  # each global sample belongs to exactly one rank, unchanged by sharding


def test_grid_mode_covers_tissue_once_with_flagged_padding(client: LoaderClient) -> None:
    cfg = small(mode="grid", patch_size=256, batch_size=16, augment=False)
    with client.stream(cfg) as stream:
        whole = collect(stream)
    cells = coords(whole)
    assert len(cells) == len(set(cells)) > 0
    ranks = []
    for rank in range(2):
        with client.stream(cfg, rank=rank, world_size=2) as stream:
            ranks.append(collect(stream))
    lengths = [sum(len(b["slide_id"]) for b in r) for r in ranks]
    assert lengths[0] == lengths[1]
    real = {c for r in ranks for b in r for c, pad in zip(coords([b]), b["padding"].tolist()) if not pad}
    assert real == set(cells)


def test_resume_from_state_dict_repeats_nothing_and_skips_nothing(client: LoaderClient) -> None:
    with client.stream(small()) as stream:
        full = collect(stream)
    with client.stream(small()) as stream:
        head = collect(stream, limit=2)
        state = stream.state_dict()
    assert state["cursor"] == 16 and state["epoch"] == 0
    with client.stream(small()) as resumed:
        resumed.load_state_dict(state)
        tail = collect(resumed)
        assert resumed.state_dict()["epoch"] == 1 and resumed.state_dict()["cursor"] == 0
    assert coords(head + tail) == coords(full)
    for x, y in zip(head + tail, full):
        assert torch.equal(x["images"], y["images"])


def test_state_dict_refuses_another_configuration(client: LoaderClient) -> None:
    with client.stream(small()) as stream:
        state = stream.state_dict()
    with client.stream(small(seed=99)) as other, pytest.raises(ValueError, match="seed"):
        other.load_state_dict(state)


def test_slow_client_leaves_server_memory_bounded(client: LoaderClient, server: LoaderServer) -> None:
    decoded_before = server.metrics.sample("wsi_loader_samples_decoded_total")
    cfg = small(samples_per_epoch=4000, credits=2, batch_size=8)
    with client.stream(cfg) as stream:
        it = iter(stream)
        next(it)  # one batch read, then the trainer stalls
        time.sleep(2.0)
        decoded = server.metrics.sample("wsi_loader_samples_decoded_total") - decoded_before
        in_flight = server.metrics.sample("wsi_loader_batches_in_flight")
        # credits=2 granted up front, +1 after the batch we read: at most 3 batches ever built.
        assert decoded <= 3 * 8, decoded
        assert in_flight <= 2
        time.sleep(1.0)
        assert server.metrics.sample("wsi_loader_samples_decoded_total") - decoded_before == decoded
        it.close()


@pytest.mark.parametrize(
    ("config", "error", "fragment"),
    [
        (dict(dataset="nope"), NotFoundError, "not served here"),
        (dict(patch_size=4), InvalidRequestError, "patch_size"),
        (dict(level=9), InvalidRequestError, "level 9 does not exist"),
        (dict(batch_size=4096, patch_size=2048), InvalidRequestError, "over the server's limit"),
        (dict(tissue_threshold=1.5), InvalidRequestError, "tissue_threshold"),
        (dict(mpp=0.01), InvalidRequestError, "finer than"),
    ],
)
def test_bad_stream_requests_get_clear_errors(client: LoaderClient, server: LoaderServer, config: dict,
                                               error: type, fragment: str) -> None:
    kind = "not_found" if error is NotFoundError else "invalid_argument"
    before = server.metrics.sample("wsi_loader_errors_total", {"kind": kind})
    with client.stream(small(**config)) as stream, pytest.raises(error, match=fragment):
        next(iter(stream))
    assert server.metrics.sample("wsi_loader_errors_total", {"kind": kind}) == before + 1


def test_bad_region_requests(client: LoaderClient, server: LoaderServer) -> None:
    slide = next(s.slide_id for s in client.describe("train").slides)
    pixels = client.read_region("train", slide, 100, 200, 64, 48)
    assert pixels.shape == (48, 64, 3) and pixels.dtype == torch.uint8
    with pytest.raises(NotFoundError, match="not in dataset"):
        client.read_region("train", "../../etc/passwd", 0, 0, 8, 8)
    with pytest.raises(NotFoundError, match="left out"):
        client.read_region("mixed", "corrupt.tiff", 0, 0, 8, 8)
    with pytest.raises(ResourceExhaustedError, match="limit"):
        client.read_region("train", slide, 0, 0, 20000, 20000)
    with pytest.raises(InvalidRequestError, match="level 7 does not exist"):
        client.read_region("train", slide, 0, 0, 8, 8, level=7)
    assert server.metrics.sample("wsi_loader_errors_total", {"kind": "resource_exhausted"}) >= 1


def test_malformed_stream_and_vanishing_client(server: LoaderServer, client: LoaderClient) -> None:
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    stub = pb_grpc.LoaderStub(channel)
    # First message is not `open`.
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Stream(iter([pb.StreamRequest(credit=pb.Credit(batches=1))]), timeout=30))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "first message" in info.value.details()
    # A client that opens, takes one batch and vanishes.
    gone_before = server.metrics.sample("wsi_loader_errors_total", {"kind": "client_gone"})
    open_msg = small(samples_per_epoch=4000).open_message(0, 0, 1, 0, pb.GRPC)
    release = threading.Event()

    def requests():
        yield pb.StreamRequest(open=open_msg)
        yield pb.StreamRequest(credit=pb.Credit(batches=4))
        release.wait(30)

    call = stub.Stream(requests())
    assert next(call).WhichOneof("kind") == "opened"
    assert next(call).WhichOneof("kind") == "batch"
    call.cancel()
    channel.close()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and (
        server.metrics.sample("wsi_loader_errors_total", {"kind": "client_gone"}) == gone_before
        or server.metrics.sample("wsi_loader_active_sessions") > 0
    ):
        time.sleep(0.1)
    # only now does the request iterator end: set at once, its end could reach the server before the cancel and
    # make the session a half-close (client_closed) on a loaded machine, which is not what this test is about
    release.set()
    assert server.metrics.sample("wsi_loader_errors_total", {"kind": "client_gone"}) == gone_before + 1
    assert server.metrics.sample("wsi_loader_active_sessions") == 0
    # ... and everyone else is still served.
    with client.stream(small()) as stream:
        assert len(collect(stream)) == 6


def test_health_service_reports_serving(server: LoaderServer) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "wsi_loader.v1.Loader"):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_dataloader_with_batch_size_none(client: LoaderClient) -> None:
    loader = torch.utils.data.DataLoader(client.stream(small()), batch_size=None, num_workers=0)
    seen = [b["images"].shape[0] for b in loader]
    assert seen == [8] * 6


def test_augmentation_changes_pixels_but_not_coordinates(client: LoaderClient) -> None:
    with client.stream(small(augment=False)) as stream:
        plain = collect(stream)
    with client.stream(small(augment=True)) as stream:
        augmented = collect(stream)
    assert coords(plain) == coords(augmented)
    changed = sum(not torch.equal(a["images"], b["images"]) for a, b in zip(plain, augmented))
    assert changed == len(plain)
    raw = plain[0]
    region = client.read_region("train", raw["slide_id"][0], int(raw["x"][0]), int(raw["y"][0]), 64, 64)
    assert np.array_equal(region.permute(2, 0, 1).numpy(), raw["images"][0].numpy())
