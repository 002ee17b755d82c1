"""Streaming CNN with in-place layers at every split point: exact, and the caller's input untouched.

A stage's tiles are views of the stored input map (the caller's image for the first stage). These
tests split the flattened torchvision ResNet-18/34 fronts at every child boundary, with torchvision's
``ReLU(inplace=True)`` and with ``LeakyReLU(inplace=True)`` (not idempotent: applied twice to an
overlapping tile it changes the result) swapped in everywhere, and compare a streamed step with
conventional autograd in float64: output, every parameter gradient (conv weights, batch-norm
affine weight and bias, head) and the input gradient within 1e-9 relative; the caller's input
bit for bit unchanged. Images are small (80-96 px) so that the whole file runs in CI on 2 cores;
tiles are ~60 % of each stage's input so that every stage that can be tiled has overlapping tiles.
"""

from __future__ import annotations

from typing import Iterator

import pytest
import torch
import torchvision
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock

from trainer_client.streaming import StreamingModule, geometry_of, min_tile_size, resnet_front, streaming_step
from trainer_client.streaming.inplace import mutates_input

TOL = 1e-9
WIDTH = 8  # base width of the ResNet fronts (torchvision: 64); see torchvision_front
SIZE = (90, 84)  # multiples of neither the total stride (32) nor the tiles


@pytest.fixture(autouse=True)
def _threads() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(min(2, before))
    yield
    torch.set_num_threads(before)


def rel(a: Tensor, b: Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / max(float(b.abs().max()), 1e-300))


class InplaceScale(nn.Identity):
    """A custom point-wise layer that writes into its input (``x.mul_``), as custom blocks do."""

    def forward(self, x: Tensor) -> Tensor:
        return x.mul_(1.5).add_(0.25)


class ScaledBlock(BasicBlock):
    """A BasicBlock subclass that scales its input in place before the usual block."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.mul_(0.5))


def _swap_relu(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.ReLU):
            setattr(module, name, nn.LeakyReLU(0.1, inplace=True))
        else:
            _swap_relu(child)


def _randomise(front: nn.Module) -> None:
    gen = torch.Generator().manual_seed(1)
    for m in front.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=gen) * 0.2 - 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=gen) * 0.2 - 0.1)


def torchvision_front(depth: int, act: str, width: int = WIDTH) -> nn.Sequential:
    """Flattened torchvision ResNet front: torchvision's ``ResNet`` and blocks, base width ``width``.

    The real layout (stem conv/bn/in-place ReLU/max-pool, then every BasicBlock a child); only the
    widths are narrower than 64, so that float64 at every split point fits a 2-core CI budget.
    """
    torch.manual_seed(depth)
    layers = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3]}[depth]
    model = torchvision.models.ResNet(BasicBlock, layers)
    if width != 64:
        model = _narrow(model, layers, width)
    front = resnet_front(model, flatten_blocks=True)
    if act == "leaky":
        _swap_relu(front)
    _randomise(front)
    return front.double().eval()


def _narrow(model: nn.Module, layers: list[int], width: int) -> nn.Module:
    """Rebuild ``model``'s stem and layers with base width ``width`` (torchvision's own ``_make_layer``)."""
    model.inplanes = width
    model.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
    model.bn1 = nn.BatchNorm2d(width)
    for i, count in enumerate(layers):
        setattr(model, f"layer{i + 1}", model._make_layer(BasicBlock, width * 2**i, count, stride=1 if i == 0 else 2))
    return model


def stage_tiles(front: nn.Sequential, split_at: tuple[int, ...], size: tuple[int, int]) -> tuple[int, ...]:
    """Per stage, a tile that covers ~60 % of the stage's output: two overlapping tiles per axis where
    the stage's receptive field leaves room, one tile where it does not."""
    bounds = [0, *split_at, len(front)]
    h, w = size
    tiles = []
    for a, b in zip(bounds, bounds[1:]):
        stage = front[a:b]
        geom = (geometry_of(stage, 0), geometry_of(stage, 1))
        smallest = max(min_tile_size(geom[0]), min_tile_size(geom[1]))
        n_out = min(geom[0].out_size(h), geom[1].out_size(w))
        tiles.append(smallest + geom[0].stride * max(0, -(-6 * n_out // 10) - 1))
        h, w = geom[0].out_size(h), geom[1].out_size(w)
    return tuple(tiles)


def check(front: nn.Module, size: tuple[int, int], batch: int = 1, **streaming: object) -> StreamingModule:
    """Conventional vs streamed step; every tensor within TOL, the caller's input unchanged bit for bit."""
    torch.manual_seed(0)
    head = nn.Sequential(nn.Conv2d(_out_channels(front), 4, 1), nn.AdaptiveAvgPool2d((2, 2)), nn.Flatten(),
                         nn.Linear(16, 3)).double()
    x = torch.randn(batch, 3, *size, dtype=torch.float64)
    y = torch.arange(batch) % 3
    loss_fn = nn.CrossEntropyLoss()
    named = [(f"front.{n}", p) for n, p in front.named_parameters()] + [
        (f"head.{n}", p) for n, p in head.named_parameters()
    ]
    front.zero_grad(set_to_none=True)
    head.zero_grad(set_to_none=True)
    xr = x.clone().requires_grad_(True)
    out_ref = head(front(xr * 1))  # ``* 1``: an in-place first layer must not write into the leaf
    loss_fn(out_ref, y).backward()
    grads_ref = {n: p.grad.clone() for n, p in named if p.grad is not None}
    assert len(grads_ref) == len(named)
    front.zero_grad(set_to_none=True)
    head.zero_grad(set_to_none=True)

    original = x.clone()
    streamer = StreamingModule(front, **streaming)  # type: ignore[arg-type]
    result = streaming_step(streamer, head, loss_fn, x, y, input_grad=True)
    assert torch.equal(x, original), "the caller's input was modified"
    assert rel(result.output, out_ref) < TOL
    errors = {n: rel(p.grad, grads_ref[n]) for n, p in named}  # type: ignore[arg-type]
    worst = max(errors, key=errors.__getitem__)
    assert errors[worst] < TOL, f"{worst}: relative error {errors[worst]:.3g}"
    assert result.input_grad is not None and xr.grad is not None
    assert rel(result.input_grad, xr.grad) < TOL
    return streamer


def _out_channels(front: nn.Module) -> int:
    return [m for m in front.modules() if isinstance(m, nn.Conv2d)][-1].out_channels


def _split_cases() -> list[object]:
    cases = []
    for depth, children in ((18, 12), (34, 20)):
        for act in ("relu", "leaky"):
            for k in range(1, children):
                cases.append(pytest.param(depth, act, k, id=f"r{depth}-{act}-split{k}"))
    return cases


@pytest.mark.parametrize(("depth", "act", "k"), _split_cases())
def test_every_split_point_of_resnet_fronts(depth: int, act: str, k: int) -> None:
    front = torchvision_front(depth, act)
    split = (k,)
    streamer = check(front, SIZE, split_at=split, tile_size=stage_tiles(front, split, SIZE))
    # Only a stage starting at the stem's in-place activation (child 2) copies its tiles.
    assert streamer.tile_copies == [False, k == 2]


@pytest.mark.parametrize("depth", [18, 34])
@pytest.mark.parametrize("act", ["relu", "leaky"])
def test_every_child_its_own_stage_batch2(depth: int, act: str) -> None:
    """All boundaries at once: every stage is one child, tiled into overlapping tiles, batch 2."""
    front = torchvision_front(depth, act)
    split = tuple(range(1, len(front)))
    check(front, (96, 88), batch=2, split_at=split, tile_size=stage_tiles(front, split, (96, 88)))


@pytest.mark.parametrize(
    ("split", "copies"),
    [((), [True]), ((1,), [True, True]), ((2,), [True, False]), ((1, 2, 3), [True, True, False, False]),
     ((4,), [True, True]), ((3, 7), [True, False, True])],
)
def test_inplace_first_layers_leave_caller_input_and_maps_untouched(split: tuple[int, ...], copies: list[bool]) -> None:
    """Non-idempotent in-place layers first in the front and first in later stages, custom block included."""
    torch.manual_seed(3)
    front = nn.Sequential(
        InplaceScale(),
        nn.LeakyReLU(0.2, inplace=True),
        nn.Identity(),
        nn.Conv2d(3, 6, 3, 1, 1),
        InplaceScale(),
        nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(6, 8, 3, 2, 1),
        ScaledBlock(8, 8),
    ).double().eval()  # fmt: skip
    streamer = check(front, (70, 61), batch=2, split_at=split, tile_size=stage_tiles(front, split, (70, 61)))
    assert streamer.tile_copies == copies  # copies exactly where a stage starts with a layer that writes


def test_stored_maps_equal_conventional_intermediates() -> None:
    """The stored stage-boundary maps are what the conventional front computes there, not maps
    an in-place layer at the start of the next stage has written into."""
    front = torchvision_front(18, "leaky")
    split = (2, 3)
    streamer = StreamingModule(front, tile_size=stage_tiles(front, split, SIZE), split_at=split)
    x = torch.randn(1, 3, *SIZE, dtype=torch.float64)
    fm = streamer(x)
    assert streamer._saved is not None
    with torch.no_grad():
        for k, stored in zip(split, streamer._saved[1]):
            assert rel(stored, front[:k](x)) < 1e-12
        assert rel(fm, front(x)) < 1e-12
    assert torch.equal(streamer(x), fm)


def test_mutates_input_is_conservative() -> None:
    front = resnet_front(torchvision.models.resnet18(weights=None), flatten_blocks=True)
    assert [mutates_input(child) for child in front] == [False, False, True] + [False] * 9
    assert torchvision_front(18, "relu", width=64)[2].inplace  # torchvision's stem ReLU is in place
    assert mutates_input(nn.Sequential(nn.Identity(), nn.ReLU(inplace=True), nn.Conv2d(3, 3, 1)))
    assert not mutates_input(nn.Sequential(nn.Identity(), nn.Dropout(), nn.ReLU(), nn.ReLU(inplace=True)))
    assert mutates_input(InplaceScale())  # a subclass may do anything
    assert mutates_input(ScaledBlock(4, 4))
    assert mutates_input(nn.Dropout(inplace=True))
    assert not mutates_input(nn.Sequential())
