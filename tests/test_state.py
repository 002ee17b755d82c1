"""One generic save/load round trip, run against every stateful part (samplers and client iterators)."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from loader_service.sampling import CandidateCache, EpochPlan, SamplingSpec, ShardCursor
from loader_service.server import LoaderServer
from trainer_client import LoaderClient, StreamConfig


class Stateful:
    """Adapter: make an object, advance it, and read what it produces next."""

    def __init__(self, make: Callable[[], Any], advance: Callable[[Any, int], None],
                 upcoming: Callable[[Any, int], list[Any]]) -> None:
        self.make, self.advance, self.upcoming = make, advance, upcoming


def _cursor(server: LoaderServer) -> Stateful:
    ds = server.datasets["train"]
    spec = SamplingSpec(patch_size=64, samples_per_epoch=40, seed=5)
    cache = CandidateCache()

    def make() -> ShardCursor:
        return ShardCursor(EpochPlan(ds, spec, epoch=2, rank=1, world_size=2, candidates=cache), batch_size=4)

    def advance(obj: ShardCursor, n: int) -> None:
        for _ in range(n):
            obj.next_batch()

    def upcoming(obj: ShardCursor, n: int) -> list[Any]:
        out = []
        for _ in range(n):
            batch = obj.next_batch() or []
            out.append([(s.record.slide_id, s.x, s.y) for s in batch])
        return out

    return Stateful(make, advance, upcoming)


def _stream(server: LoaderServer) -> Stateful:
    endpoint = f"127.0.0.1:{server.port}"
    cfg = StreamConfig(dataset="train", batch_size=4, patch_size=64, samples_per_epoch=40, seed=5, transport="grpc")
    iters: dict[int, Iterator[dict[str, Any]]] = {}

    def make() -> Any:
        return LoaderClient(endpoint).stream(cfg, rank=1, world_size=2)

    def advance(obj: Any, n: int) -> None:
        it = iters.setdefault(id(obj), iter(obj))
        for _ in range(n):
            next(it)

    def upcoming(obj: Any, n: int) -> list[Any]:
        it = iters.setdefault(id(obj), iter(obj))
        return [(next(it)["x"].tolist(), ) for _ in range(n)]

    return Stateful(make, advance, upcoming)


@pytest.mark.parametrize("factory", [_cursor, _stream], ids=["ShardCursor", "WSIStream"])
def test_state_dict_round_trip(server: LoaderServer, factory: Callable[[LoaderServer], Stateful]) -> None:
    part = factory(server)
    original = part.make()
    part.advance(original, 2)
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)  # what a checkpoint does
    expected = part.upcoming(original, 2)
    restored = part.make()
    restored.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    assert part.upcoming(restored, 2) == expected
    for obj in (original, restored):
        if hasattr(obj, "close"):
            obj.close()
