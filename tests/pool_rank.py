"""One trainer rank under torchrun for tests/test_pool_netns.py: pulls its epoch from a pool of services, reports
each batch's service on stdout (the test kills one mid-epoch) and writes what it received to a JSON file."""

from __future__ import annotations

import argparse
import json
import sys
import threading
from pathlib import Path

import torch.distributed as dist

from trainer_client import StreamConfig
from trainer_client.pool import PoolConfig, PoolStream


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--endpoints", required=True, help="comma-separated HOST:PORT or dns:///NAME:PORT")
    parser.add_argument("--samples", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--pace-s", type=float, default=0.0, help="seconds per batch (a trainer's step)")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    config = StreamConfig(dataset="train", batch_size=4, patch_size=32, samples_per_epoch=args.samples, seed=11,
                          credits=2, timeout_s=60, transport="grpc", augment=False)
    stream = PoolStream(config, PoolConfig(tuple(args.endpoints.split(",")), rejoin_interval_s=0.3),
                        rank=rank, world_size=world)
    keys, indices = [], []
    pace = threading.Event()
    for batch in stream:
        keys += [[s, x, y] for s, x, y in zip(batch["slide_id"], batch["x"].tolist(), batch["y"].tolist())]
        indices += batch["global_index"].tolist()
        # one write per line: both ranks share torchrun's stdout, and print() writes the text and its newline apart
        sys.stdout.write(f"BATCH rank={rank} sub={batch['sub_shard']} "
                         f"served={json.dumps(stream.stats.batches_by_endpoint)}\n")
        sys.stdout.flush()
        pace.wait(args.pace_s)
    everyone: list[object] = [None] * world
    dist.all_gather_object(everyone, len(indices))  # the ranks are one gloo job
    stats = stream.stats
    (args.out / f"rank{rank}.json").write_text(json.dumps({
        "keys": keys, "indices": indices, "counts": everyone, "failovers": stats.failovers,
        "by_endpoint": stats.batches_by_endpoint, "last_break": stats.last_break}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
