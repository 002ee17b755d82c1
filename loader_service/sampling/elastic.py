"""Which global indices of an epoch a rank owns: plain round-robin shards, or the rest of an epoch re-sharded.

Plain (no resume stages): rank ``r`` of ``W`` owns global indices ``r, r + W, r + 2W, ...`` of an epoch of
``epoch_length`` (a multiple of ``W``).

Elastic resume: the epoch was partly read in stages. Stage 0 had ``W0`` ranks sharding the whole epoch as
above, rank ``r`` having read the first ``c0[r]`` indices of its shard. What it left unread, in ascending
global index, is the sequence stage 1 shards round-robin over its ``W1`` ranks (position ``p`` of the sequence
to rank ``p % W1``), and so on. The session shards what the last stage left the same way over its own ranks:
every unread index goes to exactly one rank, shards differ in length by at most one sample. The epoch's
length stays the one stage 0 computed (``epoch_length`` depends on the world size in random and grid mode).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from loader_service.errors import InvalidRequest

__all__ = ["ResumeStages", "ShardMap", "MAX_ELASTIC_EPOCH"]

MAX_ELASTIC_EPOCH = 1 << 24  # an elastic resume keeps the unread indices in memory: 8 bytes each

Stage = tuple[int, tuple[int, ...]]  # (world size, cursor of every rank)


@dataclass(frozen=True)
class ResumeStages:
    """The stages an epoch was read in before this session (empty: a plain session)."""

    stages: tuple[Stage, ...] = ()

    @classmethod
    def from_wire(cls, world_sizes: list[int], cursors: list[int]) -> ResumeStages:
        if sum(world_sizes) != len(cursors):
            raise InvalidRequest(f"open.resume_cursors has {len(cursors)} values, but resume_world_sizes "
                                 f"{list(world_sizes)} need {sum(world_sizes)} (one cursor per rank of every stage)")
        stages, start = [], 0
        for world in world_sizes:
            if world < 1:
                raise InvalidRequest("open.resume_world_sizes must all be >= 1")
            stages.append((int(world), tuple(int(c) for c in cursors[start:start + world])))
            start += world
        return cls(tuple(stages))

    @property
    def base_world(self) -> int | None:
        """The world size that laid the epoch out (stage 0's), None for a plain session."""
        return self.stages[0][0] if self.stages else None


class ShardMap:
    """Rank ``rank`` of ``world_size``: its shard's length and the global index of each of its positions."""

    def __init__(self, epoch_length: int, rank: int, world_size: int, resume: ResumeStages | None = None) -> None:
        self.rank, self.world_size = rank, world_size
        self._unread: np.ndarray | None = None
        self._one_shard: tuple[int, int, int] | None = None  # (rank, first position, world) of stage 0
        if resume is None or not resume.stages:
            self.shard_length = epoch_length // world_size
            return
        one = _one_shard_left(epoch_length, resume)
        if one is not None:  # a pool's sub-shard: one rank's shard split further, in closed form (no array)
            self._one_shard = one
            left = epoch_length // one[2] - one[1]
            self.shard_length = max(0, -(-(left - rank) // world_size))
            return
        if epoch_length > MAX_ELASTIC_EPOCH:
            raise InvalidRequest(f"an elastic resume supports epochs of up to {MAX_ELASTIC_EPOCH} samples "
                                 f"(this one has {epoch_length}); resume at the world size of the checkpoint")
        unread = np.arange(epoch_length, dtype=np.int64)
        for number, (world, cursors) in enumerate(resume.stages):
            position = np.arange(len(unread), dtype=np.int64)
            owner, index = position % world, position // world
            lengths = np.bincount(owner, minlength=world)
            for r, cursor in enumerate(cursors):
                if cursor > lengths[r]:
                    raise InvalidRequest(
                        f"resume stage {number}: rank {r}'s cursor {cursor} is past its shard of {lengths[r]} "
                        "samples; was the checkpoint saved with another samples_per_epoch, dataset or seed?")
            unread = unread[index >= np.asarray(cursors, dtype=np.int64)[owner]]
        self._unread = unread
        self.shard_length = max(0, -(-(len(unread) - rank) // world_size))

    def global_index(self, shard_index: int) -> int:
        position = self.rank + shard_index * self.world_size
        if self._one_shard is not None:
            owner, first, world = self._one_shard
            return owner + (first + position) * world
        return position if self._unread is None else int(self._unread[position])

    def global_indices(self, start: int, stop: int) -> np.ndarray:
        """:meth:`global_index` of shard indices ``start..stop-1``, as one int64 array."""
        position = self.rank + np.arange(start, stop, dtype=np.int64) * self.world_size
        if self._one_shard is not None:
            owner, first, world = self._one_shard
            return owner + (first + position) * world
        return position if self._unread is None else self._unread[position]


def _one_shard_left(epoch_length: int, resume: ResumeStages) -> tuple[int, int, int] | None:
    """(rank, cursor, world) when the stages left one rank's shard only: a single stage in which every other
    rank read its whole shard (trainer_client's PoolStream opens its sub-shards so). None otherwise."""
    if len(resume.stages) != 1:
        return None
    world, cursors = resume.stages[0]
    full = epoch_length // world
    if epoch_length % world or len(cursors) != world:
        return None
    short = [r for r, cursor in enumerate(cursors) if cursor != full]
    if len(short) != 1 or not 0 <= cursors[short[0]] <= full:
        return None
    return short[0], cursors[short[0]], world
