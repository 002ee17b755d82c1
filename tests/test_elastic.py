"""Elastic resume: a checkpoint of every rank at world size N resumes at world size M, the rest of the epoch
served exactly once across the new ranks (docs/architecture.md, "Elastic resume")."""

from __future__ import annotations

import io
import random
from collections import Counter
from typing import Any

import pytest
import torch

from trainer_client import InvalidRequestError, LoaderClient, StreamConfig, WSIStream, merge_state_dicts

CFG = StreamConfig(dataset="train", batch_size=4, patch_size=64, samples_per_epoch=48, seed=11, transport="grpc",
                   augment=False)
Key = tuple[str, int, int]


def _read(stream: WSIStream, batches: int | None) -> list[Key]:
    """``batches`` batches of the stream (None: to the end of its epoch), as (slide_id, x, y)."""
    keys: list[Key] = []
    it = iter(stream)
    for i, batch in enumerate(it):
        keys += zip(batch["slide_id"], batch["x"].tolist(), batch["y"].tolist())
        if batches is not None and i + 1 == batches:
            break
    return keys


def _checkpoint(states: list[dict[str, Any]]) -> dict[str, Any]:
    """Merged, saved and loaded as a trainer's checkpoint would be."""
    buffer = io.BytesIO()
    torch.save(merge_state_dicts(states), buffer)
    return torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)


def _stage(client: LoaderClient, world: int, reads: list[int | None], state: dict[str, Any] | None
           ) -> tuple[list[Key], list[dict[str, Any]], list[int]]:
    """Every rank of ``world`` loads ``state`` and reads its count of batches: (keys read, states, shard lengths)."""
    keys: list[Key] = []
    states, lengths = [], []
    for rank, batches in enumerate(reads):
        with client.stream(CFG, rank=rank, world_size=world) as stream:
            if state is not None:
                stream.load_state_dict(state)
            keys += _read(stream, batches)
            states.append(stream.state_dict())
            lengths.append(stream.shard_length)
    return keys, states, lengths


@pytest.fixture(scope="module")
def epoch(server: Any) -> list[Key]:
    """The whole epoch read by one rank: every sample is a function of (seed, epoch, global index)."""
    with LoaderClient(f"127.0.0.1:{server.port}") as client, client.stream(CFG, rank=0, world_size=1) as stream:
        keys = _read(stream, None)
    assert len(keys) == CFG.samples_per_epoch
    return keys


@pytest.mark.parametrize("new_world", [2, 3])
def test_four_ranks_resume_on_fewer_exactly_once(client: LoaderClient, epoch: list[Key], new_world: int) -> None:
    # rank 3 reads its whole shard (3 batches) and the end of the epoch; rank 2 nothing yet
    before, states, _ = _stage(client, 4, [1, 2, 0, None], None)
    assert states[3]["epoch"] == 1 and states[3]["cursor"] == 0
    merged = _checkpoint(states)
    assert merged["epoch"] == 0
    after, done, lengths = _stage(client, new_world, [None] * new_world, merged)
    assert Counter(before + after) == Counter(epoch)  # every sample exactly once
    assert len(before) + len(after) == len(epoch)
    assert max(lengths) - min(lengths) <= 1  # the rest is spread evenly
    assert all(s["epoch"] == 1 and s["cursor"] == 0 for s in done)


def test_resume_chains_across_two_resizes(client: LoaderClient, epoch: list[Key]) -> None:
    first, states, _ = _stage(client, 4, [2, 1, 1, 0], None)
    second, states, _ = _stage(client, 3, [1, 0, 2], _checkpoint(states))
    third, _, _ = _stage(client, 2, [None, None], _checkpoint(states))
    assert Counter(first + second + third) == Counter(epoch)
    assert len(first + second + third) == len(epoch)


def test_same_world_size_continues_every_rank_in_order(client: LoaderClient) -> None:
    """A merged checkpoint loaded at its own world size: each rank continues its own shard, same order."""
    straight, _, _ = _stage(client, 2, [None, None], None)
    before, states, _ = _stage(client, 2, [1, 2], None)
    after, _, _ = _stage(client, 2, [None, None], _checkpoint(states))
    shard = CFG.samples_per_epoch // 2
    assert before[:4] + after[:shard - 4] == straight[:shard]  # rank 0
    assert before[4:] + after[shard - 4:] == straight[shard:]  # rank 1


def test_mismatched_states_are_refused(client: LoaderClient) -> None:
    _, states, _ = _stage(client, 2, [1, 1], None)
    with client.stream(CFG, rank=0, world_size=3) as stream:
        with pytest.raises(ValueError, match="merge_state_dicts"):
            stream.load_state_dict(states[0])
    with client.stream(CFG, rank=1, world_size=2) as stream:
        with pytest.raises(ValueError, match="rank 0 of world_size 2, this stream is rank 1"):
            stream.load_state_dict(states[0])
    with pytest.raises(ValueError, match="exactly one state of each rank 0..1"):
        merge_state_dicts([states[0], states[0]])
    with pytest.raises(ValueError, match="not already merged"):
        merge_state_dicts([merge_state_dicts(states)])


def test_shard_map_serves_every_unread_index_once() -> None:
    """The service's layout alone, over chains of uneven cursors: read + unread = the epoch, exactly once."""
    from loader_service.sampling import ResumeStages, ShardMap

    rng = random.Random(4)
    for _ in range(50):
        length = rng.randrange(1, 200)
        worlds = [rng.randrange(1, 9) for _ in range(rng.randrange(1, 4))] + [rng.randrange(1, 9)]
        read: list[int] = []
        stages: tuple[tuple[int, tuple[int, ...]], ...] = ()
        for world in worlds[:-1]:
            maps = [ShardMap(length, r, world, ResumeStages(stages)) for r in range(world)]
            cursors = tuple(rng.randrange(0, m.shard_length + 1) for m in maps)
            read += [m.global_index(i) for m, c in zip(maps, cursors) for i in range(c)]
            stages += ((world, cursors),)
        final = [ShardMap(length, r, worlds[-1], ResumeStages(stages)) for r in range(worlds[-1])]
        rest = [m.global_index(i) for m in final for i in range(m.shard_length)]
        assert sorted(read + rest) == list(range(length))
        assert max(m.shard_length for m in final) - min(m.shard_length for m in final) <= 1


def test_a_resume_past_the_shard_is_refused_by_the_service(client: LoaderClient) -> None:
    bogus = {"merged": True, "epoch": 0, "seed": CFG.seed, "dataset": CFG.dataset, "resume": [[4, [100, 0, 0, 0]]]}
    with client.stream(CFG, rank=0, world_size=2) as stream:
        stream.load_state_dict(bogus)
        with pytest.raises(InvalidRequestError, match="rank 0's cursor 100 is past its shard of 12 samples"):
            next(iter(stream))
