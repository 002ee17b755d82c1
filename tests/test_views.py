"""Whole-image samples and their views: tiles and shards stitched back equal the image view exactly."""

from __future__ import annotations

import pytest
import torch

from trainer_client import InvalidRequestError, LoaderClient, ResourceExhaustedError, StreamConfig
from trainer_client.views import crop_core, stitch_tiles

AUGMENT = {"blur_prob": 1.0, "blur_sigma": [0.5, 1.5]}  # blur on every image: pieces need their halo


def cfg(**kw: object) -> StreamConfig:
    values: dict[str, object] = dict(dataset="train", batch_size=1, view="image", region_width=300,
                                     region_height=220, samples_per_epoch=3, seed=11, transport="grpc",
                                     augment_config=AUGMENT, timeout_s=60, tissue_threshold=0.2)
    values.update(kw)
    return StreamConfig(**values)  # type: ignore[arg-type]


def images(client: LoaderClient, config: StreamConfig) -> list[torch.Tensor]:
    with client.stream(config) as stream:
        return [b["images"] for b in stream]


@pytest.mark.parametrize(("tile", "overlap"), [(64, 0), (96, 16), (128, 7)])
def test_tiles_stitch_to_the_image_view(client: LoaderClient, tile: int, overlap: int) -> None:
    whole = images(client, cfg())
    with client.stream(cfg(view="tiles", tile_size=tile, overlap=overlap)) as stream:
        pieces = list(stream)
        stitched = [b["images"] for b in stitch_tiles(pieces)]
    assert len(whole) == len(stitched) == 3
    for a, b in zip(whole, stitched):
        assert a.shape == b.shape and a.shape[2:] in ((220, 300), (300, 220))  # rot90 swaps
        assert torch.equal(a, b)
    # Overlap regions are real context, identical to the image's pixels there.
    for batch in pieces[:4]:
        y, x, h, w = batch["piece"]["rect"]
        assert torch.equal(batch["images"], whole[0][..., y:y + h, x:x + w])


@pytest.mark.parametrize("order", ["column-major", "serpentine"])
def test_tile_orders(client: LoaderClient, order: str) -> None:
    """Tiles come in the asked order (piece index = position), and stitch to the image view in any order."""
    whole = images(client, cfg(samples_per_epoch=1))
    with client.stream(cfg(samples_per_epoch=1, view="tiles", tile_size=64, tile_order=order)) as stream:
        pieces = list(stream)
    corners = [(b["piece"]["core"][0], b["piece"]["core"][1]) for b in pieces]
    assert [b["piece"]["index"] for b in pieces] == list(range(len(pieces)))
    ys, xs = sorted({y for y, _ in corners}), sorted({x for _, x in corners})
    if order == "column-major":
        assert corners == [(y, x) for x in xs for y in ys]
    else:
        assert corners == [(y, x) for i, y in enumerate(ys) for x in (xs if i % 2 == 0 else xs[::-1])]
    stitched = [b["images"] for b in stitch_tiles(pieces)]
    assert len(stitched) == 1 and torch.equal(stitched[0], whole[0])


def test_shards_with_halo_are_crops_of_the_image_view(client: LoaderClient) -> None:
    whole = images(client, cfg())
    rows, cols = 2, 3
    canvas = [torch.zeros_like(w) for w in whole]
    for r in range(rows):
        for c in range(cols):
            with client.stream(cfg(view="shard", grid=(rows, cols), shard=(r, c), halo=9, align=4)) as stream:
                for i, batch in enumerate(stream):
                    y, x, h, w = batch["piece"]["rect"]
                    assert torch.equal(batch["images"], whole[i][..., y:y + h, x:x + w])
                    cy, cx, ch, cw = batch["piece"]["core"]
                    assert cy % 4 == 0 and cx % 4 == 0
                    canvas[i][..., cy:cy + ch, cx:cx + cw] = crop_core(batch)
    for a, b in zip(whole, canvas):
        assert torch.equal(a, b)



def stitch_shards(client: LoaderClient, whole: list[torch.Tensor], configs: list[StreamConfig]) -> list[torch.Tensor]:
    """The images rebuilt from the cores of the shards ``configs`` stream; each piece (with its halo) is
    checked to be a crop of ``whole``."""
    canvas = [torch.zeros_like(w) for w in whole]
    for config in configs:
        with client.stream(config) as stream:
            for i, batch in enumerate(stream):
                y, x, h, w = batch["piece"]["rect"]
                assert torch.equal(batch["images"], whole[i][..., y:y + h, x:x + w])
                cy, cx, ch, cw = batch["piece"]["core"]
                canvas[i][..., cy:cy + ch, cx:cx + cw] = crop_core(batch)
    return canvas


@pytest.mark.parametrize("method", ["reinhard", "macenko"])
def test_stain_normalised_tiles_and_shards_stitch_to_the_image_view(client: LoaderClient, method: str) -> None:
    """Stain normalisation is fitted to the whole image before it is cut: stitched tiles and shards (with
    blur, so halos matter) equal the normalised image view exactly, and the normalisation changes the pixels."""
    plain = images(client, cfg(samples_per_epoch=2))
    with client.stream(cfg(samples_per_epoch=2, stain=method, stain_fit_samples=8)) as stream:
        whole = [b["images"] for b in stream]
        target = stream.stain_target
    assert len(whole) == 2 and any(not torch.equal(a, b) for a, b in zip(whole, plain))
    stained = {"samples_per_epoch": 2, "stain": method, "stain_target": target}
    for transport in ("grpc", "shm"):
        with client.stream(cfg(view="tiles", tile_size=96, overlap=16, transport=transport, **stained)) as stream:
            stitched = [b["images"] for b in stitch_tiles(list(stream))]
            assert stream.transport == transport
        assert len(stitched) == 2 and all(torch.equal(a, b) for a, b in zip(whole, stitched))
    canvas = stitch_shards(client, whole, [cfg(view="shard", grid=(2, 1), shard=(r, 0), halo=5, **stained)
                                           for r in range(2)])
    assert all(torch.equal(a, b) for a, b in zip(whole, canvas))


def test_image_level_scale_and_crop_in_every_view(client: LoaderClient) -> None:
    """Random zoom and crop are image-level: the tiles and shards of a zoomed image still stitch to its
    image view exactly, and the zoom really changes the pixels (context comes from the slide around)."""
    scaled = {**AUGMENT, "scale": 0.4, "crop": 0.15}
    whole = images(client, cfg(augment_config=scaled))
    plain = images(client, cfg())
    assert len(whole) == 3 and not any(torch.equal(a, b) for a, b in zip(whole, plain) if a.shape == b.shape)
    with client.stream(cfg(augment_config=scaled, view="tiles", tile_size=80, overlap=5)) as stream:
        stitched = [b["images"] for b in stitch_tiles(stream)]
    assert all(torch.equal(a, b) for a, b in zip(whole, stitched))
    canvas = stitch_shards(client, whole, [cfg(augment_config=scaled, view="shard", grid=(1, 2), shard=(0, c),
                                               halo=6) for c in range(2)])
    assert all(torch.equal(a, b) for a, b in zip(whole, canvas))


def test_every_rank_of_a_spatial_group_gets_the_same_sample(client: LoaderClient) -> None:
    seen = []
    for col in range(2):
        with client.stream(cfg(view="shard", grid=(1, 2), shard=(0, col))) as stream:
            seen.append([(b["slide_id"][0], int(b["x"][0]), int(b["y"][0])) for b in stream])
    assert seen[0] == seen[1]


def test_non_square_regions_and_pieces_over_shared_memory(client: LoaderClient) -> None:
    whole = images(client, cfg())
    over_shm = images(client, cfg(transport="shm"))  # 300×220: the slot is sized width × height
    assert len(over_shm) == 3 and all(torch.equal(a, b) for a, b in zip(whole, over_shm))
    with client.stream(cfg(transport="shm", view="tiles", tile_size=96, overlap=16)) as stream:
        stitched = [b["images"].clone() for b in stitch_tiles(stream)]
        assert stream.transport == "shm"
    assert all(torch.equal(a, b) for a, b in zip(whole, stitched))
    with client.stream(cfg(transport="auto", whole_slide=True, level=2, samples_per_epoch=1)) as stream:
        assert len(list(stream)) == 4 and stream.transport == "grpc"  # sizes differ per slide: gRPC bytes


def test_whole_slide_at_a_coarse_level(client: LoaderClient) -> None:
    info = {s.slide_id: s for s in client.describe("train").slides}
    with client.stream(cfg(whole_slide=True, level=2, samples_per_epoch=1, augment=False)) as stream:
        batches = list(stream)
    assert len(batches) == len(info)
    for b in batches:
        level = info[b["slide_id"][0]].levels[2]
        assert b["images"].shape == (1, 3, level.height, level.width)


def test_view_errors(client: LoaderClient) -> None:
    with client.stream(cfg(view="tiles", tile_size=64, batch_size=2)) as s, pytest.raises(InvalidRequestError, match="batch_size=1"):
        next(iter(s))
    with client.stream(cfg(region_width=20000, region_height=20000)) as s, pytest.raises(ResourceExhaustedError):
        next(iter(s))
    with client.stream(cfg(view="shard", grid=(2, 2), shard=(2, 0))) as s, pytest.raises(InvalidRequestError, match="outside"):
        next(iter(s))
