"""A run's sample metadata written as wire bytes (``transport._meta_kernel``) equals the messages made field by field."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from loader_service.pipeline import BuiltBatch
from loader_service.sampling import SampleRun
from loader_service.transport.grpc_bytes import add_sample_meta
from wsi_loader.v1 import loader_pb2 as pb


def _run(seed: int, n: int) -> SampleRun:
    rng = np.random.default_rng(seed)
    records = [SimpleNamespace(slide_id=name) for name in ("a", "slide-β", "")]
    fields = {k: {"record": records[k], "level": k, "mpp": [0.25, 0.0, 1.0 / 3][k], "width": 224, "height": 160,
                  "padding": False, "region": None, "substituted": "", "attempt": 0} for k in range(3)}
    slide = rng.integers(0, 3, n)
    xs = rng.choice([0, 1, 127, 128, 16383, 2**40, -1, -300], n)
    ys = rng.choice([0, 5, 2**31, -2**62], n)
    return SampleRun(int(rng.choice([0, 1, 2**35])), slide, rng.integers(0, 2**40, n), xs, ys,
                     np.array([0, 2, 1])[slide], fields, 224, 160)  # type: ignore[arg-type]


@pytest.mark.parametrize("seed", range(5))
def test_run_meta_bytes_equal_field_by_field_messages(seed: int) -> None:
    run = _run(seed, [1, 7, 64][seed % 3])
    labels = torch.from_numpy(run.label.copy())
    fast, slow = pb.Batch(), pb.Batch()
    fast.sequence = slow.sequence = 3  # fields set before stay as they are
    add_sample_meta(fast, BuiltBatch(torch.empty(0), labels, run), ["tumour", "", "stroma"])  # type: ignore[arg-type]
    add_sample_meta(slow, BuiltBatch(torch.empty(0), labels, list(run)), ["tumour", "", "stroma"])
    assert len(fast.samples) == len(run) and fast == slow
    assert [m.x for m in fast.samples] == run.x.tolist() and fast.samples[0].index == run.start
