"""Training starts before the image is whole: RowFeed, the progressive streamed forward, and TileFeeder."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn
from torchvision.models.resnet import BasicBlock

from trainer_client import LoaderClient, StreamConfig
from trainer_client.streaming import FeedStalledError, RowFeed, StreamingModule, streaming_step
from trainer_client.views import TileFeeder, stitch_tiles


def small_front() -> nn.Sequential:
    torch.manual_seed(0)
    down = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16))
    return nn.Sequential(nn.Conv2d(3, 8, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.MaxPool2d(3, 2, 1), BasicBlock(8, 8), BasicBlock(8, 16, stride=2, downsample=down))


def test_row_feed_waits_times_out_and_fails() -> None:
    feed = RowFeed(100, timeout_s=0.2)
    feed.mark(40)
    feed.wait(40)  # already there
    feed.mark(10)  # never goes back
    assert feed.rows == 40
    with pytest.raises(FeedStalledError, match="rows 40..41 of 100 did not arrive"):
        feed.wait(41)
    feed.fail(OSError("disk gone"))
    with pytest.raises(RuntimeError, match="producer") as info:
        feed.wait(100)
    assert isinstance(info.value.__cause__, OSError)
    with pytest.raises(ValueError):
        RowFeed(0)


def test_progressive_forward_starts_early_and_equals_the_whole_image() -> None:
    """The producer writes the top band, then holds the rest back until the forward has computed on it and
    asks for more rows: so the first tiles ran before the image was whole. Results are bit for bit equal."""
    front, head = small_front(), nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 3))
    image = torch.randn(1, 3, 333, 301)
    y = torch.tensor([2])
    streamer = StreamingModule(front, tile_size=96, split_at=(4,))
    ref = streaming_step(streamer, head, nn.functional.cross_entropy, image, y)
    ref_grads = [p.grad.clone() for p in [*front.parameters(), *head.parameters()]]  # type: ignore[union-attr]
    for p in [*front.parameters(), *head.parameters()]:
        p.grad = None

    x = torch.full_like(image, float("nan"))  # anything read too early would poison the result
    feed = RowFeed(x.shape[-2], timeout_s=60)
    waited: list[tuple[int, int]] = []  # (rows asked, rows final) at each wait
    asked_for_more = threading.Event()
    original_wait = feed.wait

    def wait(rows: int) -> None:
        waited.append((rows, feed.rows))
        if rows > 120:  # beyond the first band: the tiles of the first tile row are done
            asked_for_more.set()
        original_wait(rows)

    feed.wait = wait  # type: ignore[method-assign]

    def produce() -> None:
        x[..., :120, :] = image[..., :120, :]
        feed.mark(120)
        assert asked_for_more.wait(30)
        for top in range(120, x.shape[-2], 50):
            x[..., top:top + 50, :] = image[..., top:top + 50, :]
            feed.mark(top + 50)

    producer = threading.Thread(target=produce)
    producer.start()
    out = streaming_step(streamer, head, nn.functional.cross_entropy, x, y, feed=feed)
    producer.join()
    computed_early = [rows for rows, final in waited if rows <= final < x.shape[-2]]
    assert computed_early, waited  # some tiles ran while rows were still missing
    assert torch.equal(out.loss, ref.loss) and torch.equal(out.output, ref.output)
    for p, g in zip([*front.parameters(), *head.parameters()], ref_grads):
        assert torch.equal(p.grad, g)  # type: ignore[arg-type]


def test_tile_feeder_fills_images_equal_to_stitched_tiles(client: LoaderClient) -> None:
    config = StreamConfig(dataset="train", batch_size=1, view="tiles", region_width=300, region_height=220,
                          tile_size=64, overlap=8, samples_per_epoch=3, seed=5, transport="grpc", timeout_s=60,
                          tissue_threshold=0.2)
    with client.stream(config) as stream:
        stitched = [b["images"] for b in stitch_tiles(stream)]
    with client.stream(config) as stream:
        feeder = TileFeeder(stream, "cpu", state=stream.state_dict)
        seen = []
        for arriving in feeder:
            arriving.feed.wait(arriving.feed.height)  # the whole image
            seen.append((arriving.images.clone(), arriving.loader_state, int(arriving.sample["labels"][0])))
        feeder.close()
    assert len(seen) == 3
    for (img, state, _), ref in zip(seen, stitched):
        assert torch.equal(img, ref)
    assert [s["cursor"] for _, s, _ in seen] == [1, 2, 3]  # type: ignore[index]


def test_tile_feeder_reports_a_wrong_view(client: LoaderClient) -> None:
    config = StreamConfig(dataset="train", batch_size=2, patch_size=64, samples_per_epoch=4, transport="grpc",
                          timeout_s=60)
    with client.stream(config) as stream:
        with pytest.raises(RuntimeError, match="tiles view") as info:
            list(TileFeeder(stream))
    assert isinstance(info.value.__cause__, ValueError)
