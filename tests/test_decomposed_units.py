"""Single-process tests of the decomposition's planning, layout and error messages."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torchvision

from trainer_client.decomposed import (
    SpatialGroup,
    check_supported,
    decompose,
    expected_shard_shape,
    parse_grid,
    partition,
    plan_axis,
    plan_layout,
    shard_batch,
)


def fake_group(rows: int, cols: int, index: int = 0) -> SpatialGroup:
    """A SpatialGroup for planning only (no process group is touched)."""
    return SpatialGroup(rows, cols, index, tuple(range(rows * cols)))


def test_partition_covers_and_balances() -> None:
    assert partition(97, 2) == ((0, 48), (48, 97))
    for n in (1, 7, 97, 123):
        for p in (1, 2, 3, 4):
            parts = partition(n, p)
            assert parts[0][0] == 0 and parts[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
            assert max(b - a for a, b in parts) - min(b - a for a, b in parts) <= 1


@pytest.mark.parametrize(("n", "k", "s", "p", "d"), [(97, 7, 2, 3, 1), (49, 3, 2, 1, 1), (25, 1, 2, 0, 1),
                                                     (123, 3, 1, 1, 1), (31, 3, 2, 2, 2), (13, 3, 2, 1, 1)])
@pytest.mark.parametrize("parts", [1, 2, 3])
def test_plan_axis_interval_arithmetic(n: int, k: int, s: int, p: int, d: int, parts: int) -> None:
    """Rebuild each rank's extended input from the global padded row list and check it is exactly
    the rows the conventional layer reads for that rank's output rows."""
    n_out = (n + 2 * p - d * (k - 1) - 1) // s + 1
    plan = plan_axis("layer", "row", n, n_out, parts, k, s, p, d)
    own_in, own_out = partition(n, parts), partition(n_out, parts)
    for i, ex in enumerate(plan):
        a, b = own_in[i]
        rows = [None] * ex.pad_lo
        rows += list(range(a - ex.recv_lo, a)) + list(range(a + ex.crop_lo, b - ex.crop_hi))
        rows += list(range(b, b + ex.recv_hi)) + [None] * ex.pad_hi
        o0, o1 = own_out[i]
        want = [r if 0 <= r < n else None for r in range(o0 * s - p, (o1 - 1) * s - p + d * (k - 1) + 1)]
        assert rows == want
        if i > 0:
            assert ex.send_lo == plan[i - 1].recv_hi
        if i < parts - 1:
            assert ex.send_hi == plan[i + 1].recv_lo


def test_thin_shard_error_names_layer() -> None:
    with pytest.raises(ValueError, match=r"conv: .*smaller than the layer's halo.*fewer grid rows"):
        plan_axis("conv", "row", 8, 8, 4, 7, 1, 3, 1)


def test_thin_shard_error_from_decompose() -> None:
    model = torchvision.models.resnet18(weights=None)
    net = decompose(model, fake_group(4, 1))
    with pytest.raises(ValueError, match=r"^layer\d\.\d\.\w+: .*use a larger image or fewer grid rows"):
        net.plan_for((40, 64), 3)
    assert net.plan_for((256, 64), 3).image_hw == (256, 64)  # fine at a larger size


def test_unsupported_layer_error_names_layer() -> None:
    model = torchvision.models.resnet18(weights=None)
    model.layer2[0].conv1 = nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(64, 128, 3, 2, 1))
    with pytest.raises(ValueError, match=r"^layer2\.0\.conv1\.0: nn\.Upsample is not supported"):
        decompose(model, fake_group(1, 2))
    with pytest.raises(ValueError, match=r"^c: nn\.Conv2d padding_mode='reflect' is not supported"):
        check_supported(_named("c", nn.Conv2d(3, 3, 3, padding_mode="reflect")))
    with pytest.raises(ValueError, match=r"^pool: nn\.AdaptiveAvgPool2d output_size=2"):
        check_supported(_named("pool", nn.AdaptiveAvgPool2d(2)))
    with pytest.raises(ValueError, match=r"^gn: nn\.GroupNorm is not supported"):
        check_supported(_named("gn", nn.GroupNorm(2, 4)))


def _named(name: str, m: nn.Module) -> nn.Module:
    root = nn.Module()
    root.add_module(name, m)
    return root


def test_linear_before_global_pool_is_rejected() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 16 * 16, 2))
    net = decompose(model, fake_group(1, 2))
    with pytest.raises(ValueError, match=r"^1: nn\.Flatten applied to a spatially sharded feature map"):
        net.plan_for((16, 16), 3)


def test_grid_mismatch_errors() -> None:
    with pytest.raises(ValueError, match=r"grid 2x2 needs 4 ranks .* has 3"):
        SpatialGroup(2, 2, 0, (0, 1, 2))
    with pytest.raises(ValueError, match=r"needs world_size 8 but world_size is 6"):
        plan_layout(6, 2, 2, 2)
    with pytest.raises(ValueError, match="RxC"):
        parse_grid("2by2")


def test_layout_is_replica_major() -> None:
    lay = plan_layout(8, 2, 2, 2)
    assert lay.spatial_groups == ((0, 1, 2, 3), (4, 5, 6, 7))
    assert lay.data_parallel_groups == ((0, 4), (1, 5), (2, 6), (3, 7))
    assert lay.position(6) == (1, 2)


def test_shard_batch_matches_partition() -> None:
    images = torch.arange(2 * 3 * 97 * 123, dtype=torch.float64).view(2, 3, 97, 123)
    pieces = []
    for idx in range(4):
        g = fake_group(2, 2, idx)
        shard = shard_batch(images, g)
        assert tuple(shard.shape[2:]) == expected_shard_shape((97, 123), g)
        pieces.append(shard)
    top = torch.cat(pieces[:2], dim=3)
    bottom = torch.cat(pieces[2:], dim=3)
    assert torch.equal(torch.cat([top, bottom], dim=2), images)


def test_state_dict_keys_unchanged() -> None:
    model = torchvision.models.resnet18(weights=None)
    net = decompose(model, fake_group(1, 2))
    assert list(net.module.state_dict()) == list(model.state_dict())
    assert isinstance(net.module.conv1, nn.Conv2d)
    torchvision.models.resnet18(weights=None).load_state_dict(net.module.state_dict())
