"""Checkpoints of a whole job: every rank's stream state merged into one that resumes at any world size.

A rank's ``WSIStream.state_dict()`` resumes that rank at the same world size. To resume a job on another
number of ranks, gather every rank's state (``torch.distributed.all_gather_object``), merge them with
``merge_state_dicts`` and load the merged state on every new rank: the samples the old ranks had not read
are re-sharded over the new ranks, each served exactly once (docs/architecture.md, "Elastic resume").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["merge_state_dicts", "Stages"]

Stages = list[list[Any]]  # [[world_size, [cursor of rank 0, 1, ...]], ...]: torch.load(weights_only=True)-safe


def _where(state: Mapping[str, Any], epoch: int) -> tuple[int, Stages]:
    """(cursor, stages) of one rank in ``epoch``: a rank already past it read its whole shard."""
    if state["epoch"] == epoch:
        return int(state["cursor"]), [list(s) for s in state.get("resume", [])]
    ended = state.get("ended")
    if state["epoch"] == epoch + 1 and state["cursor"] == 0 and ended and ended["epoch"] == epoch:
        return int(ended["shard_length"]), [list(s) for s in ended.get("resume", [])]
    raise ValueError(f"rank {state['rank']} is at epoch {state['epoch']} cursor {state['cursor']}, the job's "
                     f"slowest rank at epoch {epoch}: states to merge must be taken at one step of the job")


def merge_state_dicts(states: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One job-wide state from the ``state_dict()`` of every rank of one job, taken at the same step.

    The result loads into a ``WSIStream`` of any world size (``load_state_dict``), and into the new ranks
    of a job that grew or shrank. Raises ``ValueError`` when ranks are missing, repeated or disagree.
    """
    if not states:
        raise ValueError("merge_state_dicts needs the state_dict() of every rank, got none")
    if any(s.get("merged") for s in states):
        raise ValueError("merge the per-rank state_dict()s of one job, not already merged states")
    first = states[0]
    world = int(first["world_size"])
    for key in ("world_size", "seed", "dataset"):
        values = {repr(s[key]) for s in states}
        if len(values) > 1:
            raise ValueError(f"the ranks' states disagree on {key}: {sorted(values)}; merge states of one job")
    ranks = sorted(int(s["rank"]) for s in states)
    if ranks != list(range(world)):
        raise ValueError(f"merge_state_dicts needs exactly one state of each rank 0..{world - 1}, got ranks {ranks}")
    epoch = min(int(s["epoch"]) for s in states)
    cursors = [0] * world
    earlier: Stages | None = None
    for state in states:
        cursor, stages = _where(state, epoch)
        if earlier is not None and stages != earlier:
            raise ValueError("the ranks' states come from different elastic resumes; merge states of one step")
        earlier, cursors[int(state["rank"])] = stages, cursor
    stages = list(earlier or [])
    if any(cursors):
        stages.append([world, cursors])
    return {"merged": True, "epoch": epoch, "seed": first["seed"], "dataset": first["dataset"], "resume": stages}


def stages_for(state: Mapping[str, Any], rank: int, world_size: int) -> tuple[int, Stages]:
    """(cursor, resume stages) for ``rank`` of ``world_size`` from a merged state."""
    stages = [list(s) for s in state.get("resume", [])]
    if not stages:
        return 0, []
    if len(stages) == 1 and stages[0][0] == world_size:  # same world: every rank continues its own shard
        return int(stages[0][1][rank]), []
    return 0, stages


def wire(stages: Stages) -> tuple[list[int], list[int]]:
    """The stages as OpenSession's resume_world_sizes and resume_cursors."""
    worlds = [int(world) for world, _ in stages]
    cursors = [int(c) for _, cs in stages for c in cs]
    return worlds, cursors
