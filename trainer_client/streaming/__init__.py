"""Streaming CNN: exact tile-by-tile training of the convolutional front of a network on gigapixel inputs.

See ``docs/streaming.md``.
"""

from .feed import FeedStalledError, RowFeed
from .geometry import AxisGeometry, TileSpan, geometry_of, min_tile_size, plan_axis
from .memory import TileMemoryEstimate, choose_tile_size, estimate_tile_memory, frozen_eval
from .planner import StreamingPlan, plan_streaming
from .module import StepResult, StreamingConfig, StreamingModule, resnet_front, streaming_step

__all__ = [
    "AxisGeometry",
    "FeedStalledError",
    "RowFeed",
    "StepResult",
    "StreamingConfig",
    "StreamingModule",
    "StreamingPlan",
    "TileMemoryEstimate",
    "TileSpan",
    "choose_tile_size",
    "estimate_tile_memory",
    "frozen_eval",
    "geometry_of",
    "min_tile_size",
    "plan_streaming",
    "plan_axis",
    "resnet_front",
    "streaming_step",
]
