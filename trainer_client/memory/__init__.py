"""Memory strategies for training on one GPU: activation offload with prefetch, grouped recompute,
and caching-allocator settings.  Each strategy gives the same gradients as plain training."""

from trainer_client.memory.allocator import ENV_VAR, AllocatorConfig, apply_allocator_config
from trainer_client.memory.blocks import BlockChain, activation_bytes, plan_groups, sequential_blocks
from trainer_client.memory.offload import ActivationOffload, OffloadConfig
from trainer_client.memory.recompute import GroupedRecompute, RecomputeConfig

__all__ = [
    "ENV_VAR",
    "ActivationOffload",
    "AllocatorConfig",
    "BlockChain",
    "GroupedRecompute",
    "OffloadConfig",
    "RecomputeConfig",
    "activation_bytes",
    "apply_allocator_config",
    "plan_groups",
    "sequential_blocks",
]
