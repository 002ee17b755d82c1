"""Spatially decomposed networks: each rank of a rows x cols grid runs the model on its image shard.

See ``docs/decomposed.md``.  Typical use::

    layout = init_layout(replicas, rows, cols)
    net = decompose(torchvision.models.resnet50(weights=None), layout.spatial)
    logits = net(shard_batch(images, layout.spatial))      # replicated on the spatial group
    loss_fn(logits, labels).backward()
    net.reduce_gradients(layout.data_parallel, layout.replicas)
"""

from trainer_client.decomposed.data import SyntheticImages, gather_shards, shard_batch
from trainer_client.decomposed.geometry import AxisExchange, plan_axis
from trainer_client.decomposed.groups import (
    DEFAULT_TIMEOUT,
    LayoutPlan,
    ParallelLayout,
    SpatialGroup,
    init_layout,
    parse_grid,
    partition,
    plan_layout,
)
from trainer_client.decomposed.halo import HaloSpec, Link, global_avg_pool, halo_exchange, sync_batch_norm
from trainer_client.decomposed.model import DecomposedModule, check_supported, decompose, expected_shard_shape

__all__ = [
    "DEFAULT_TIMEOUT",
    "AxisExchange",
    "DecomposedModule",
    "HaloSpec",
    "LayoutPlan",
    "Link",
    "ParallelLayout",
    "SpatialGroup",
    "SyntheticImages",
    "check_supported",
    "decompose",
    "expected_shard_shape",
    "gather_shards",
    "global_avg_pool",
    "halo_exchange",
    "init_layout",
    "parse_grid",
    "partition",
    "plan_axis",
    "plan_layout",
    "shard_batch",
    "sync_batch_norm",
]
