"""Decomposed ResNets on real gloo processes (loopback) against one process, in float64.

One 4-process job (``trainer_client.decomposed.verify``) runs: a 2x2 grid over all ranks, then a
1x2 grid (ranks 0-1) beside a 2x1 grid (ranks 2-3), then 2 data-parallel replicas of a 1x2 grid,
the halo-exchange adjoint check and the grid-size error.  Images are 97x123 (not divisible by
the grid or by ResNet's total stride 32) and 67x45 for the real-width ResNet-50.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from trainer_client.decomposed.verify import CASES, SUITE, launch, reference

TOL = 1e-9


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    scale = float(b.abs().max())
    err = float((a - b).abs().max())
    return err / scale if scale > 0 else err


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out: Path = tmp_path_factory.mktemp("decomposed")
    launch(4, out, timeout_s=400)
    merged: dict[str, Any] = {}
    for r in range(4):
        merged.update(torch.load(out / f"rank{r}.pt", weights_only=False))
    return merged


@pytest.fixture(scope="module")
def references() -> dict[str, dict[str, Any]]:
    return {}


def _ref(references: dict[str, dict[str, Any]], name: str, replica: int = 0) -> dict[str, Any]:
    key = f"{name}/{replica}"
    if key not in references:
        references[key] = reference(CASES[name], replica)
    return references[key]


def _compare(got: dict[str, Any], ref: dict[str, Any], input_grad: bool = True) -> None:
    assert rel(got["out"], ref["out"]) < TOL, "output"
    assert rel(got["loss"], ref["loss"]) < TOL, "loss"
    assert got["grads"].keys() == ref["grads"].keys()
    bad = {n: rel(got["grads"][n], g) for n, g in ref["grads"].items() if rel(got["grads"][n], g) >= TOL}
    assert not bad, f"parameter gradients differ: {bad}"
    if input_grad:
        assert rel(got["input_grad"], ref["input_grad"]) < TOL, "input gradient"
    for n, b in ref["buffers"].items():  # running mean / var / num_batches_tracked
        assert rel(got["buffers"][n], b) < TOL, f"buffer {n}"
    assert rel(got["eval_out"], ref["eval_out"]) < TOL, "eval-mode output"


PARAMS = [(grid, name) for grid, names in SUITE.items() for name in names]


@pytest.mark.parametrize(("grid", "name"), PARAMS, ids=[f"{g}-{n}" for g, n in PARAMS])
def test_matches_single_rank(results: dict[str, Any], references: dict[str, dict[str, Any]],
                             grid: str, name: str) -> None:
    _compare(results[f"{grid}/{name}"], _ref(references, name))


def test_data_parallel_over_spatial(results: dict[str, Any], references: dict[str, dict[str, Any]]) -> None:
    """2 replicas x 1x2 grid: gradients are the mean of each replica's single-rank gradients."""
    r0, r1 = _ref(references, "dp_r18", 0), _ref(references, "dp_r18", 1)
    ref = dict(r0, grads={n: (g + r1["grads"][n]) / 2 for n, g in r0["grads"].items()})
    _compare(results["dp2x1x2/dp_r18"], ref, input_grad=False)


def test_halo_exchange_is_adjoint(results: dict[str, Any]) -> None:
    adj = results["adjoint"]
    for key, value in adj.items():
        if key.startswith("rebuild_"):
            assert value == 0.0, f"{key}: rebuilt extended input differs by {value}"
        else:
            assert value < 1e-12, f"{key}: <Ax,y> vs <x,A^T y> relative difference {value}"


def test_grid_mismatch_error_in_process_group(results: dict[str, Any]) -> None:
    msg = results["errors"]["grid"]
    assert "grid 3x1 needs 3 ranks" in msg and "has 4" in msg
