"""Streaming CNN: equivalence with conventional full-image back-propagation.

Every test compares the loss, the output, every named parameter gradient (front
and head) and, where asked, the input gradient of a streamed step against a
conventional step on the same weights and input, with the front in eval mode in
both. Relative error per tensor: max|a-b| / max(max|b|, tiny).
"""

from __future__ import annotations

from typing import Callable, Iterator

import pytest
import torch
import torchvision
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from trainer_client.streaming import (
    StreamingConfig,
    StreamingModule,
    choose_tile_size,
    geometry_of,
    min_tile_size,
    plan_axis,
    resnet_front,
    streaming_step,
)

TOL = {torch.float64: 1e-9, torch.float32: 1e-4}


@pytest.fixture(autouse=True)
def _threads() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    yield
    torch.set_num_threads(before)


def rel(a: Tensor, b: Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / max(float(b.abs().max()), 1e-300))


def _norm(bn: bool) -> Callable[[int], nn.Module]:
    return nn.BatchNorm2d if bn else (lambda c: nn.Identity())


def _randomise(module: nn.Module, bn_bias: bool = True) -> None:
    """Non-trivial batch-norm statistics/affine parameters, and conv biases when there is no norm."""
    gen = torch.Generator().manual_seed(1)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=gen) * 0.2 - 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=gen) * 0.2 - 0.1)
        elif isinstance(m, nn.Conv2d) and m.bias is None and bn_bias:
            m.bias = nn.Parameter(torch.rand(m.out_channels, generator=gen) * 0.2 - 0.1)


def make_resnet_front(depth: int, width: int = 64, bn: bool = True) -> nn.Sequential:
    """A torchvision-structured ResNet front (torchvision's own blocks) with base width ``width``."""
    block, layers = {18: (BasicBlock, [2, 2, 2, 2]), 34: (BasicBlock, [3, 4, 6, 3]), 50: (Bottleneck, [3, 4, 6, 3])}[
        depth
    ]
    norm = _norm(bn)
    parts: list[nn.Module] = [nn.Conv2d(3, width, 7, 2, 3, bias=False), norm(width), nn.ReLU(inplace=True)]
    parts.append(nn.MaxPool2d(3, 2, 1))
    inplanes = width
    for i, count in enumerate(layers):
        planes = width * 2**i
        stride = 1 if i == 0 else 2
        blocks: list[nn.Module] = []
        for j in range(count):
            down = None
            if j == 0 and (stride != 1 or inplanes != planes * block.expansion):
                down = nn.Sequential(
                    nn.Conv2d(inplanes, planes * block.expansion, 1, stride, bias=False), norm(planes * block.expansion)
                )
            blocks.append(block(inplanes, planes, stride if j == 0 else 1, down, norm_layer=norm))
            inplanes = planes * block.expansion
        parts.append(nn.Sequential(*blocks))
    front = nn.Sequential(*parts)
    _randomise(front, bn_bias=not bn)
    return front


def tiny_front(bn: bool = True, width: int = 4) -> nn.Sequential:
    """Small front with every supported geometry: stride, padding, dilation, max/avg pool, residual blocks."""
    norm = _norm(bn)
    w = width
    front = nn.Sequential(
        nn.Conv2d(3, w, 5, 2, 2, bias=not bn),
        norm(w),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, 2, 1),
        nn.Conv2d(w, w, 3, 1, 2, dilation=2),
        nn.LeakyReLU(0.1),
        nn.AvgPool2d(3, 1, 1),
        BasicBlock(w, 2 * w, 2, nn.Sequential(nn.Conv2d(w, 2 * w, 1, 2, bias=False), norm(2 * w)), norm_layer=norm),
        Bottleneck(2 * w, w, 1, nn.Sequential(nn.Conv2d(2 * w, 4 * w, 1, bias=False), norm(4 * w)), norm_layer=norm),
        nn.Conv2d(4 * w, 3 * w, (3, 1), 1, (1, 0)),
    )  # fmt: skip
    _randomise(front, bn_bias=not bn)
    return front


def make_head(channels: int) -> nn.Module:
    """Head with a spatially varying gradient on the feature map."""
    return nn.Sequential(
        nn.Conv2d(channels, 4, 1), nn.AdaptiveAvgPool2d((3, 3)), nn.Flatten(), nn.Linear(36, 3)
    )  # fmt: skip


def _out_channels(front: nn.Module) -> int:
    return [m for m in front.modules() if isinstance(m, nn.Conv2d)][-1].out_channels


def check_equivalence(
    front: nn.Module,
    size: tuple[int, int],
    dtype: torch.dtype,
    batch: int = 1,
    input_grad: bool = True,
    **streaming: object,
) -> StreamingModule:
    """Conventional vs streamed step on the same weights; asserts every tensor within TOL[dtype]."""
    torch.manual_seed(0)
    front = front.to(dtype).eval()
    head = make_head(_out_channels(front)).to(dtype)
    x = torch.randn(batch, 3, *size, dtype=dtype)
    y = torch.arange(batch) % 3
    loss_fn = nn.CrossEntropyLoss()
    named = [(f"front.{n}", p) for n, p in front.named_parameters()] + [
        (f"head.{n}", p) for n, p in head.named_parameters()
    ]
    xr = x.clone().requires_grad_(input_grad)
    out_ref = head(front(xr))
    loss_ref = loss_fn(out_ref, y)
    loss_ref.backward()
    grads_ref = {n: p.grad.clone() for n, p in named if p.grad is not None}
    assert len(grads_ref) == len(named)
    for _, p in named:
        p.grad = None

    streamer = StreamingModule(front, **streaming)  # type: ignore[arg-type]
    result = streaming_step(streamer, head, loss_fn, x, y, input_grad=input_grad)
    tol = TOL[dtype]
    assert result.output.shape == out_ref.shape
    assert rel(result.loss, loss_ref) < tol
    assert rel(result.output, out_ref) < tol
    errors = {n: rel(p.grad, grads_ref[n]) for n, p in named}  # type: ignore[arg-type]
    worst = max(errors, key=errors.__getitem__)
    assert errors[worst] < tol, f"{worst}: relative error {errors[worst]:.3g}"
    if input_grad:
        assert result.input_grad is not None and xr.grad is not None
        assert rel(result.input_grad, xr.grad) < tol
    else:
        assert result.input_grad is None
    return streamer


# ---------------------------------------------------------------- small, fast edge cases


@pytest.mark.parametrize("size", [(200, 200), (251, 263), (300, 217)])
@pytest.mark.parametrize("tile", [100, 131, 170])
def test_tiny_front_float64_tiles_not_dividing_image(size: tuple[int, int], tile: int) -> None:
    check_equivalence(tiny_front(), size, torch.float64, tile_size=tile)


@pytest.mark.parametrize("bn", [True, False])
def test_tiny_front_batch2_with_and_without_batchnorm(bn: bool) -> None:
    check_equivalence(tiny_front(bn=bn), (240, 256), torch.float64, batch=2, tile_size=110)


def test_tiny_front_float32() -> None:
    check_equivalence(tiny_front(width=8), (256, 256), torch.float32, tile_size=120)


def test_stages_with_per_stage_tiles() -> None:
    streamer = check_equivalence(tiny_front(), (280, 230), torch.float64, tile_size=(70, 20, 30), split_at=(4, 7))
    assert streamer.tile_sizes == [70, 20, 30]


def test_single_int_tile_is_scaled_per_stage() -> None:
    streamer = check_equivalence(tiny_front(), (256, 256), torch.float64, tile_size=96, split_at=(4, 7))
    assert streamer.tile_sizes == [96, 96 // 4, 96 // 4]


def test_memory_budget_picks_tile() -> None:
    front = tiny_front().double()
    tile = choose_tile_size(front, 4 << 20, dtype=torch.float64)
    assert min_tile_size(geometry_of(front, 0)) <= tile < 256
    assert choose_tile_size(front, 16 << 20, dtype=torch.float64) > tile
    streamer = check_equivalence(tiny_front(), (256, 256), torch.float64, memory_budget_bytes=4 << 20)
    assert streamer.tile_sizes == [tile]


def test_budget_too_small_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="raise the budget"):
        choose_tile_size(tiny_front(), 1000)


def test_tile_smaller_than_halo_is_a_clear_error() -> None:
    front = tiny_front().double().eval()
    smallest = min_tile_size(geometry_of(front, 0))
    streamer = StreamingModule(front, tile_size=smallest - 1)
    with pytest.raises(ValueError, match=f"use tile_size >= {smallest}"):
        streamer(torch.randn(1, 3, 200, 200, dtype=torch.float64))
    StreamingModule(front, tile_size=smallest)(torch.randn(1, 3, 200, 200, dtype=torch.float64))


def test_plan_tiles_output_exactly_once() -> None:
    geom = geometry_of(make_resnet_front(18, width=2), 0)
    for size in (443, 500, 1000, 1001, 2240):
        for tile in (442, 512, 700, 1024):
            spans = plan_axis(geom, size, tile)
            assert spans[0].out_lo == 0 and spans[-1].out_hi == geom.out_size(size)
            assert all(a.out_hi == b.out_lo for a, b in zip(spans, spans[1:]))
            assert all(s.in_hi - s.in_lo <= tile and s.in_lo % geom.stride == 0 for s in spans)


def test_output_size_matches_conventional_for_odd_sizes() -> None:
    front = tiny_front().double().eval()
    geom = (geometry_of(front, 0), geometry_of(front, 1))
    for h, w in [(97, 130), (129, 161), (203, 77)]:
        with torch.no_grad():
            out = front(torch.zeros(1, 3, h, w, dtype=torch.float64))
        assert out.shape[-2:] == (geom[0].out_size(h), geom[1].out_size(w))


def test_backward_without_forward_recomputes_and_frozen_parameters() -> None:
    front = tiny_front().double().eval()
    for p in front[0].parameters():
        p.requires_grad_(False)
    x = torch.randn(1, 3, 200, 200, dtype=torch.float64)
    with torch.no_grad():
        fm_ref = front(x)
    streamer = StreamingModule(front, tile_size=110)
    fm = streamer(x)
    assert fm.is_leaf and fm.requires_grad and rel(fm.detach(), fm_ref) < 1e-12
    grad = torch.randn_like(fm)
    streamer.backward(x, grad)
    first = {n: p.grad.clone() for n, p in front.named_parameters() if p.requires_grad}
    front.zero_grad(set_to_none=True)
    streamer.backward(x.clone(), grad)  # another tensor: stage inputs recomputed
    for n, p in front.named_parameters():
        if p.requires_grad:
            assert rel(p.grad, first[n]) < 1e-12
        else:
            assert p.grad is None


def test_training_flags_restored() -> None:
    front = tiny_front().double().train()
    streamer = StreamingModule(front, tile_size=110)
    x = torch.randn(1, 3, 160, 160, dtype=torch.float64)
    streamer.backward(x, torch.ones_like(streamer(x)))
    assert all(m.training for m in front.modules())


def test_autocast_runs_and_is_close() -> None:
    front = tiny_front(width=8).eval()
    x = torch.randn(1, 3, 192, 192)
    streamer = StreamingModule(front, tile_size=120, amp=True, amp_dtype=torch.bfloat16)
    fm = streamer(x)
    assert fm.dtype == torch.bfloat16
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref = front(x)
    assert rel(fm.detach().float(), ref.float()) < 0.05
    streamer.backward(x, torch.ones_like(fm))
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in front.parameters())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tile_size": 0}, "positive int"),
        ({"tile_size": (64, 32)}, "one per stage"),
        ({"tile_size": 64, "memory_budget_bytes": 1 << 20}, "not both"),
        ({"memory_budget_bytes": -1}, "must be positive"),
        ({"split_at": (3, 2)}, "strictly increasing"),
        ({"amp_dtype": torch.float32}, "float16 or torch.bfloat16"),
    ],
)
def test_config_validation(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        StreamingConfig(**kwargs)  # type: ignore[arg-type]


def test_unsupported_layer_is_named() -> None:
    with pytest.raises(TypeError, match="GroupNorm"):
        StreamingModule(nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4)), tile_size=64)
    with pytest.raises(TypeError, match="resnet_front"):
        StreamingModule(torchvision.models.resnet18(weights=None), tile_size=512)


# ---------------------------------------------------------------- ResNet fronts, large images


@pytest.mark.parametrize(
    ("depth", "size", "batch", "bn", "dtype", "stream"),
    [
        pytest.param(18, (1000, 1000), 1, True, torch.float64, {"tile_size": 777}, id="r18-1000-t777-bn"),
        pytest.param(18, (1120, 1120), 2, False, torch.float64, {"tile_size": 700}, id="r18-1120-t700-b2-nobn"),
        pytest.param(
            34, (1008, 1000), 1, True, torch.float64, {"tile_size": (300, 160, 60), "split_at": (5, 7)}, id="r34-split"
        ),
        pytest.param(50, (1000, 1000), 2, True, torch.float64, {"tile_size": 700}, id="r50-1000-t700-b2-bn"),
        pytest.param(18, (2240, 2240), 1, True, torch.float64, {"tile_size": 1200}, id="r18-2240-t1200"),
    ],
)
def test_resnet_front_narrow(
    depth: int, size: tuple[int, int], batch: int, bn: bool, dtype: torch.dtype, stream: dict[str, object]
) -> None:
    """torchvision ResNet structure and blocks, base width 4 instead of 64 so float64 fits a 2-core CPU budget."""
    check_equivalence(make_resnet_front(depth, width=4, bn=bn), size, dtype, batch=batch, **stream)


@pytest.mark.parametrize(
    ("name", "size", "dtype", "stream"),
    [
        pytest.param("resnet18", (1000, 1000), torch.float32, {"tile_size": 800}, id="resnet18-f32-t800"),
        pytest.param(
            "resnet34", (1000, 1000), torch.float32, {"tile_size": (400, 160, 60), "split_at": (5, 7)}, id="resnet34-f32"
        ),
        # Real-width ResNet-50 in float32: see test_torchvision_resnet50_real_width_float32 below.
        pytest.param(
            "resnet50", (640, 640), torch.float64, {"tile_size": (300, 80, 30), "split_at": (5, 7)}, id="resnet50-f64"
        ),
    ],
)
def test_torchvision_resnet_real_width(
    name: str, size: tuple[int, int], dtype: torch.dtype, stream: dict[str, object]
) -> None:
    model = getattr(torchvision.models, name)(weights=None)
    front = resnet_front(model)
    _randomise(front, bn_bias=False)
    check_equivalence(front, size, dtype, **stream)


def test_torchvision_resnet18_real_width_float64_flattened_blocks() -> None:
    front = resnet_front(torchvision.models.resnet18(weights=None), flatten_blocks=True)
    _randomise(front, bn_bias=False)
    check_equivalence(front, (512, 512), torch.float64, tile_size=(200, 64, 56), split_at=(5, 7))


def test_torchvision_resnet50_real_width_float32() -> None:
    """Real-width torchvision ResNet-50, float32, 1000x1000, tiles dividing no stage's input: TOL 1e-4.

    Both the conventional and the streamed step use PyTorch's reference convolution (im2col + GEMM),
    not oneDNN. Reason: oneDNN's 1x1 stride-2 convolutions (downsample of layer2-4 block 0) round
    differently for different input sizes, so a tile's forward is not bit-equal to the full image's.
    On ~1.9e8 ReLU inputs that flips a few dozen masks at near-zero pre-activations (44 when oneDNN is
    compared with the reference kernels, full image), and each flip's gradient spreads over whole
    tensors: streamed vs conventional float32 with oneDNN is 8.7e-4 (parameters) / 2.1e-2 (input
    gradient) max-based, 1.6e-3 / 2.7e-3 norm-based, the same size as conventional float32 against
    float64 (2.8e-3 / 2.1e-2 oneDNN, 2.6e-3 / 3.9e-2 reference kernels). The reference kernels'
    reduction order per output does not depend on the input's spatial size, so tiles reproduce the
    full image's forward bit for bit (output and loss equal), no mask can flip, and what is left is
    the summation order of the backward across tiles: 2.2e-6 measured. Metric and TOL as everywhere.
    A failure here after a PyTorch/BLAS change that breaks that bit-equality is rounding, not
    streaming: the float64 ResNet-50 cases above still check exactness.
    """
    front = resnet_front(torchvision.models.resnet50(weights=None), flatten_blocks=True)
    _randomise(front, bn_bias=False)
    # Stages stem | layer1 | layer2 | layer3.0 | layer3.1-5 | layer4.0 | layer4.1-2 (inputs 1000, 250, 250,
    # 125, 63, 63, 32): two overlapping tiles per axis in every stage, no tile dividing its stage's input.
    tiles = (510, 131, 140, 66, 42, 34, 20)
    with torch.backends.mkldnn.flags(enabled=False):
        streamer = check_equivalence(front, (1000, 1000), torch.float32, tile_size=tiles,
                                     split_at=(4, 7, 11, 12, 17, 18))
    assert streamer.tile_sizes == list(tiles)
