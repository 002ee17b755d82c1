"""Multi-scale context in the image, tiles and shard views: the same patches as the patches view would read,
augmented with the sample's geometry, over gRPC bytes and shared memory; stitched pieces carry the image view's."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from trainer_client import InvalidRequestError, LoaderClient, StreamConfig
from trainer_client.views import TileFeeder, crop_core, stitch_tiles

SCALES = ((2.0, 48), (4.0, 32), (3.0, 40))  # levels 1 and 2; 3× is no level: resampled to 3× the level-0 mpp
GEOMETRY = {"preset": "none", "flip": True, "rot90": True}  # flips and rot90 only: the context is exactly turned
AUGMENT = {"blur_prob": 1.0, "blur_sigma": [0.5, 1.5]}  # the pathology preset, blur on every image
TRANSPORTS = ["grpc", "shm"]


def cfg(**kw: Any) -> StreamConfig:
    values: dict[str, Any] = dict(dataset="train", batch_size=1, view="image", region_width=96, region_height=64,
                                  mode="random", level=0, samples_per_epoch=4, seed=23,
                                  transport="grpc", augment=False, context=SCALES, timeout_s=60,
                                  tissue_threshold=0.5)
    values.update(kw)
    return StreamConfig(**values)


def stream(client: LoaderClient, config: StreamConfig, n: int = 4) -> list[dict[str, Any]]:
    if config.transport == "shm":
        from trainer_client.shm import shm_supported

        if not shm_supported():
            pytest.skip("no shared /dev/shm here")
    with client.stream(config) as s:
        batches = [b for _, b in zip(range(n), s)]
        for b in batches:  # shared-memory images are views of a slot: copy before the slot goes back
            b["images"] = b["images"].clone()
        return batches


def reread(client: LoaderClient, slide_id: str, place: tuple[int, float, int, int, int]) -> torch.Tensor:
    """The context patch at ``place`` read directly, CHW uint8."""
    level, mpp, x, y, size = place
    return client.read_region("train", slide_id, x, y, size, size, level=level, mpp=mpp).permute(2, 0, 1)


def params_of(batch: dict[str, Any], j: int, config: dict[str, Any], seed: int = 23) -> Any:
    from loader_service.augment import AugmentConfig, draw_params

    return draw_params(AugmentConfig.from_dict(config), seed, 0, int(batch["index"][j]))


def check_context_is_read_at_its_level(client: LoaderClient, batch: dict[str, Any]) -> None:
    assert len(batch["context"]) == len(SCALES)
    n = batch["labels"].shape[0]
    for (factor, size), tensor, places in zip(SCALES, batch["context"], batch["context_place"]):
        assert tensor.shape == (n, 3, size, size) and tensor.dtype == torch.uint8
        for j, place in enumerate(places):
            level, mpp, x, y, _ = place
            assert (level, mpp > 0) == ({4.0: 2, 2.0: 1}.get(factor, 0), factor == 3.0)
            centre = (int(batch["x"][j]) + 48, int(batch["y"][j]) + 32)  # the region's centre at level 0
            assert abs((x + size / 2) * factor - centre[0]) < factor
            assert abs((y + size / 2) * factor - centre[1]) < factor
            assert torch.equal(tensor[j], reread(client, batch["slide_id"][j], place))


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_image_view_context_equals_direct_reads_at_each_level(client: LoaderClient, transport: str) -> None:
    batches = stream(client, cfg(transport=transport, batch_size=2), n=2)
    assert len(batches) == 2
    for batch in batches:
        assert batch["images"].shape == (2, 3, 64, 96)
        check_context_is_read_at_its_level(client, batch)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_image_view_context_is_turned_with_the_image(client: LoaderClient, transport: str) -> None:
    from loader_service.augment.geometry import apply_geometry

    plain = stream(client, cfg(transport=transport))  # batches of one: rot90 turns a non-square region
    turned = stream(client, cfg(transport=transport, augment=True, augment_config=GEOMETRY))
    keys = [params_of(b, 0, GEOMETRY).geometry_key for b in turned]
    assert len(set(keys)) > 1 and any(k[2] % 2 for k in keys)  # the epoch mixes geometries, some turn by 90°
    for p, t, key in zip(plain, turned, keys):
        assert torch.equal(t["images"][0], apply_geometry(p["images"][0], *key))
        for scale in range(len(SCALES)):
            assert t["context_place"][scale] == p["context_place"][scale]
            assert torch.equal(t["context"][scale][0], apply_geometry(p["context"][scale][0], *key))


def test_image_view_context_gets_the_whole_augmentation(client: LoaderClient) -> None:
    from loader_service.augment import augment_image

    for batch in stream(client, cfg(augment=True, augment_config=AUGMENT), n=3):
        p = params_of(batch, 0, AUGMENT)
        for scale in range(len(SCALES)):
            raw = reread(client, batch["slide_id"][0], batch["context_place"][scale][0]).permute(1, 2, 0)
            assert torch.equal(batch["context"][scale][0], augment_image(raw, p))


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_stitched_tiles_carry_the_image_views_context(client: LoaderClient, transport: str) -> None:
    whole = stream(client, cfg(augment=True, augment_config=AUGMENT))
    tiles = stream(client, cfg(view="tiles", tile_size=32, overlap=8, transport=transport, augment=True,
                               augment_config=AUGMENT), n=10**6)
    for b in tiles:
        assert len(b["context"]) == len(SCALES), "every tile exposes its sample's context"
    by_sample: dict[int, list[dict[str, Any]]] = {}
    for b in tiles:
        by_sample.setdefault(int(b["index"][0]), []).append(b)
    for pieces in by_sample.values():  # the later tiles carry the very tensors of the first
        assert all(p["context"][s] is pieces[0]["context"][s] for p in pieces for s in range(len(SCALES)))
    stitched = list(stitch_tiles(tiles))
    assert len(stitched) == len(whole) == 4
    for a, b in zip(whole, stitched):
        assert torch.equal(a["images"], b["images"])
        assert a["context_place"] == b["context_place"]
        for ca, cb in zip(a["context"], b["context"]):
            assert torch.equal(ca, cb)


def test_tile_feeder_hands_over_the_context(client: LoaderClient) -> None:
    whole = stream(client, cfg(augment=True, augment_config=GEOMETRY), n=2)
    with client.stream(cfg(view="tiles", tile_size=32, augment=True, augment_config=GEOMETRY,
                           samples_per_epoch=2)) as s:
        arriving = []
        for image in TileFeeder(s, ahead=1, timeout_s=60):
            image.feed.wait(image.feed.height)
            arriving.append((image.images.clone(), image.sample["context"]))
    assert len(arriving) == 2
    for a, (images, context) in zip(whole, arriving):
        assert torch.equal(a["images"], images)
        assert all(torch.equal(x, y) for x, y in zip(a["context"], context))


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_every_shard_carries_the_image_views_context(client: LoaderClient, transport: str) -> None:
    whole = stream(client, cfg(augment=True, augment_config=AUGMENT))
    canvas = [torch.zeros_like(w["images"]) for w in whole]
    for row in range(2):
        for col in range(2):
            shards = stream(client, cfg(view="shard", grid=(2, 2), shard=(row, col), halo=4, transport=transport,
                                        augment=True, augment_config=AUGMENT))
            assert len(shards) == 4
            for i, (a, b) in enumerate(zip(whole, shards)):
                assert b["piece"]["count"] == 1 and a["context_place"] == b["context_place"]
                for ca, cb in zip(a["context"], b["context"]):
                    assert torch.equal(ca, cb)
                cy, cx, ch, cw = b["piece"]["core"]
                canvas[i][..., cy:cy + ch, cx:cx + cw] = crop_core(b)
    for a, c in zip(whole, canvas):
        assert torch.equal(a["images"], c)


def test_a_resumed_tiles_stream_restarts_the_sample_with_its_context(client: LoaderClient) -> None:
    config = cfg(view="tiles", tile_size=32, augment=True, augment_config=GEOMETRY, samples_per_epoch=3)
    with client.stream(config) as s:
        everything = [b for b in s]
    count = everything[0]["piece"]["count"]
    with client.stream(config) as s:
        it = iter(s)
        for _ in range(count + 2):  # the first sample and two tiles of the second
            next(it)
        state = s.state_dict()
    with client.stream(config) as resumed:
        resumed.load_state_dict(state)
        rest = list(resumed)
    assert rest[0]["piece"]["index"] == 0 and len(rest) == len(everything) - count
    for a, b in zip(everything[count:], rest):
        assert torch.equal(a["images"], b["images"]) and a["context_place"] == b["context_place"]
        assert all(torch.equal(x, y) for x, y in zip(a["context"], b["context"]))


def test_whole_slides_refuse_context_and_say_why(client: LoaderClient) -> None:
    with pytest.raises(InvalidRequestError, match="whole slide has none") as info:
        stream(client, cfg(whole_slide=True, level=2, samples_per_epoch=1), n=1)
    assert "region_width" in str(info.value)
    with pytest.raises(InvalidRequestError, match="at most 4 scales"):
        stream(client, cfg(context=SCALES + ((8.0, 16), (16.0, 16))), n=1)


def test_on_the_wire_a_tiles_sample_sends_its_context_once(server: Any) -> None:
    """Only the first tile of a sample carries the context bytes (and their places); the others carry none."""
    import threading
    from collections.abc import Iterator

    import grpc

    from wsi_loader.v1 import loader_pb2 as pb
    from wsi_loader.v1 import loader_pb2_grpc as pb_grpc

    done = threading.Event()
    message = cfg(view="tiles", tile_size=32, samples_per_epoch=2).open_message(0, 0, 1, 0, pb.GRPC)

    def requests() -> Iterator[pb.StreamRequest]:
        yield pb.StreamRequest(open=message)
        yield pb.StreamRequest(credit=pb.Credit(batches=64))
        done.wait(60)

    seen = []
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        try:
            for response in pb_grpc.LoaderStub(channel).Stream(requests(), timeout=60):
                if response.WhichOneof("kind") == "end":
                    break
                if response.WhichOneof("kind") == "batch":
                    b = response.batch
                    seen.append((b.samples[0].piece.index, len(b.context), len(b.samples[0].context)))
        finally:
            done.set()
    assert len(seen) == 12  # two samples of 3×2 tiles
    assert all((n, m) == ((3, 3) if index == 0 else (0, 0)) for index, n, m in seen)
