"""Automatic stages and tiles (``plan_streaming``): exact results, budgets met, clear errors."""

from __future__ import annotations

import pytest
import torch
import torchvision

from tests.test_streaming import check_equivalence, make_resnet_front, tiny_front
from trainer_client.streaming import StreamingConfig, StreamingModule, plan_streaming, resnet_front
from trainer_client.streaming.planner import MEMORY_SLACK

MiB = 1 << 20


def _flat(depth: int, width: int) -> torch.nn.Sequential:
    front = make_resnet_front(depth, width=width)
    return torch.nn.Sequential(*front[:4], *[block for layer in front[4:] for block in layer])


def test_default_plans_stages_and_tiles_and_is_exact() -> None:
    front = _flat(34, 4)
    streamer = check_equivalence(front, (300, 280), torch.float64)
    plan = streamer.plan
    assert plan is not None and list(plan.tile_sizes) == streamer.tile_sizes
    assert len(plan.split_at) >= 1 and plan.time_factor <= 1.5
    assert "split_at=" in plan.describe() and "time x" in plan.describe()


def test_budget_gives_fastest_plan_that_fits_and_is_exact() -> None:
    front = _flat(18, 4).double()
    loose = plan_streaming(front, (2, 3, 320, 320), dtype=torch.float64, step_memory_budget_bytes=64 * MiB)
    tight = plan_streaming(front, (2, 3, 320, 320), dtype=torch.float64, step_memory_budget_bytes=20 * MiB)
    assert tight.step_bytes <= 20 * MiB < loose.step_bytes <= 64 * MiB
    assert tight.time_factor >= loose.time_factor
    streamer = check_equivalence(_flat(18, 4), (320, 320), torch.float64, batch=2, step_memory_budget_bytes=20 * MiB)
    assert streamer.plan == tight


def test_smaller_time_factor_costs_memory() -> None:
    front = resnet_front(torchvision.models.resnet34(weights=None), flatten_blocks=True)
    fast = plan_streaming(front, (1, 3, 2048, 2048), max_time_factor=1.4, max_stages=4)
    small = plan_streaming(front, (1, 3, 2048, 2048), max_time_factor=2.0, max_stages=4)
    assert len(fast.split_at) <= 3 and len(small.split_at) <= 3
    assert fast.time_factor <= 1.4 and small.time_factor <= 2.0
    assert small.step_bytes < fast.step_bytes < fast.conventional_bytes


def test_time_model_counts_the_step_footprint() -> None:
    """A conventional step on a large image costs more per multiply-accumulate (its footprint), a streamed
    one hardly: the default plan at 4096² may use smaller tiles than at 2048², and says why."""
    front = resnet_front(torchvision.models.resnet34(weights=None), flatten_blocks=True)
    small = plan_streaming(front, (1, 3, 2048, 2048))
    large = plan_streaming(front, (1, 3, 4096, 4096))
    assert 1.0 < small.conventional_footprint_factor < large.conventional_footprint_factor
    assert large.streaming_footprint_factor < 1.1 < large.conventional_footprint_factor
    assert small.time_factor <= 1.5 and large.time_factor <= 1.5
    assert large.memory_factor < 0.07 < small.memory_factor
    assert large.step_bytes < 2 * small.step_bytes  # four times the pixels, less than twice the memory
    assert f"conventional x{large.conventional_footprint_factor:.2f}" in large.describe()
    tiny = plan_streaming(front, (1, 3, 256, 256))
    assert tiny.conventional_footprint_factor < 1.02  # weights and their gradients only


def test_default_takes_the_fastest_plan_near_the_smallest() -> None:
    """Near the memory floor a few MiB less can cost much more recompute: with a time goal the plan is the
    fastest of those within MEMORY_SLACK of the smallest estimate, never faster-but-larger beyond it."""
    front = resnet_front(torchvision.models.resnet34(weights=None), flatten_blocks=True)
    shape = (1, 3, 2048, 2048)
    chosen = plan_streaming(front, shape)
    smallest = plan_streaming(front, shape, memory_slack=0.0)
    assert smallest.step_bytes <= chosen.step_bytes <= smallest.step_bytes * (1 + MEMORY_SLACK)
    assert chosen.time_factor <= smallest.time_factor <= 1.5
    assert chosen.time_factor < smallest.time_factor or chosen == smallest


def test_fixed_split_plans_only_tiles() -> None:
    front = _flat(18, 4)
    streamer = check_equivalence(front, (256, 256), torch.float64, split_at=(4, 8))
    assert streamer.plan is not None and streamer.plan.split_at == (4, 8) and len(streamer.tile_sizes) == 3


def test_unreachable_requests_are_clear_errors() -> None:
    front = tiny_front()
    with pytest.raises(ValueError, match="raise the budget"):
        plan_streaming(front, (1, 3, 256, 256), step_memory_budget_bytes=1000)
    with pytest.raises(ValueError, match="raise max_time_factor"):
        plan_streaming(front, (1, 3, 256, 256), max_time_factor=1.05)
    with pytest.raises(ValueError, match="tile_size or memory_budget_bytes"):
        StreamingConfig(tile_size=64, step_memory_budget_bytes=MiB)
    with pytest.raises(ValueError, match="must be > 1"):
        StreamingConfig(max_time_factor=1.0)


def test_plan_per_input_shape() -> None:
    front = _flat(18, 4).double().eval()
    streamer = StreamingModule(front)
    streamer(torch.randn(1, 3, 64, 64, dtype=torch.float64))
    small = streamer.plan
    assert small is not None and small.time_factor <= 1.5
    streamer(torch.randn(1, 3, 480, 480, dtype=torch.float64))
    assert streamer.plan is not None and small is not None and streamer.plan != small


def test_train_streaming_arguments_choose_the_plan() -> None:
    import argparse

    from trainer_client.train_streaming import _streaming_config, add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    auto = _streaming_config(parser.parse_args([]), amp=False)
    assert auto.automatic and auto.step_memory_budget_bytes is None
    budget = _streaming_config(parser.parse_args(["--memory-budget-mb", "900", "--max-time-factor", "2"]), amp=False)
    assert budget.step_memory_budget_bytes == 900 * MiB and budget.max_time_factor == 2.0
    fixed = _streaming_config(parser.parse_args(["--tile-size", "448"]), amp=False)
    assert not fixed.automatic and fixed.tile_size == 448
    with pytest.raises(ValueError, match="give one kind"):
        _streaming_config(parser.parse_args(["--tile-size", "448", "--memory-budget-mb", "900"]), amp=False)
