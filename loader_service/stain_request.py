"""A session's stain normalisation: the request parsed at open, its target fitted (reference or dataset)."""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass

import numpy as np
import torch

from loader_service.augment.stain import STAIN_METHODS, StainConfig, fit_target
from loader_service.errors import InvalidRequest
from loader_service.failures import FailureBudget, Quarantine
from loader_service.sampling import EpochPlan, SamplingSpec
from wsi_loader.v1 import loader_pb2 as pb

__all__ = ["StainRequest", "parse_stain", "StainFitter", "DEFAULT_FIT_SAMPLES", "FIT_SEED"]

DEFAULT_FIT_SAMPLES = 64
MAX_FIT_SAMPLES = 4096
MAX_REFERENCE_PIXELS = 1 << 24
#: Fits to a dataset draw their tissue patches from this seed (epoch 0): the same target for every session.
FIT_SEED = 0x57A1


@dataclass(frozen=True)
class StainRequest:
    """What the client asked: exactly one of a given ``target``, a ``reference`` image, or a dataset fit."""

    method: str
    target: tuple[float, ...] = ()
    reference: np.ndarray | None = dataclasses.field(default=None, compare=False)
    fit_samples: int = DEFAULT_FIT_SAMPLES


def parse_stain(msg: pb.StainNorm) -> StainRequest | None:
    """None when off; raises ValueError (the caller's InvalidRequest) saying what to fix."""
    if not msg.method:
        if msg.target or msg.HasField("reference") or msg.fit_samples:
            raise ValueError("stain.method is empty but stain options are set; set method to 'macenko' or 'reinhard'")
        return None
    if msg.method not in STAIN_METHODS:
        raise ValueError(f"stain.method must be one of {STAIN_METHODS} (got {msg.method!r})")
    if msg.target:
        StainConfig(msg.method, tuple(msg.target))  # validates
        return StainRequest(msg.method, tuple(msg.target))
    if not msg.fit_samples <= MAX_FIT_SAMPLES:
        raise ValueError(f"stain.fit_samples must be 0..{MAX_FIT_SAMPLES} (got {msg.fit_samples})")
    if msg.HasField("reference"):
        ref = msg.reference
        shape = tuple(ref.shape)
        if ref.dtype != "uint8" or len(shape) != 3 or shape[2] != 3 or not shape[0] * shape[1]:
            raise ValueError(f"stain.reference must be a uint8 HWC RGB image (got {ref.dtype} {shape})")
        if shape[0] * shape[1] > MAX_REFERENCE_PIXELS:
            raise ValueError(f"stain.reference has {shape[0] * shape[1]} pixels; send at most {MAX_REFERENCE_PIXELS}")
        if len(ref.data) != shape[0] * shape[1] * 3:
            raise ValueError(f"stain.reference carries {len(ref.data)} bytes for shape {shape}; send the pixels inline")
        image = np.frombuffer(ref.data, dtype=np.uint8).reshape(shape)
        return StainRequest(msg.method, reference=image)
    return StainRequest(msg.method, fit_samples=msg.fit_samples or DEFAULT_FIT_SAMPLES)


class StainFitter:
    """Fits targets; dataset fits are cached per (dataset, method, level, mpp, patch, threshold, samples)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cache: dict[tuple[object, ...], StainConfig] = {}

    def config(self, request: StainRequest, dataset: object, spec: SamplingSpec, candidates: object,
               read: object, quarantine: Quarantine | None = None) -> StainConfig:
        """The session's target: given, fitted to the reference, or fitted to ``fit_samples`` tissue patches of
        the dataset (a random-mode plan of seed ``FIT_SEED``, read with ``read(samples, None, failures) -> uint8
        NHWC``). With ``quarantine``, quarantined slides are avoided and a failed read is counted and replaced by
        its substitute (on_error=skip), so a damaged tile cannot make every fitted session fail at open."""
        try:
            if request.target:
                return StainConfig(request.method, request.target)
            if request.reference is not None:
                return fit_target(request.method, torch.from_numpy(request.reference.copy())[None])
        except ValueError as err:
            raise InvalidRequest(f"stain normalisation: {err}") from err
        key = (getattr(dataset, "name", ""), request.method, spec.level, spec.mpp, spec.patch_size, spec.height,
               spec.tissue_threshold, spec.split, request.fit_samples)
        with self._lock:
            found = self._cache.get(key)
            if found is not None:
                return found
            fit_spec = SamplingSpec(patch_size=spec.patch_size, patch_height=spec.patch_height, level=spec.level,
                                    mpp=spec.mpp, mode="random", tissue_threshold=spec.tissue_threshold,
                                    samples_per_epoch=request.fit_samples, split=spec.split, seed=FIT_SEED)
            avoid = quarantine.snapshot() if quarantine is not None else ()
            plan = EpochPlan(dataset, fit_spec, 0, 0, 1, candidates, avoid=avoid)  # type: ignore[arg-type]
            failures = (FailureBudget("skip", quarantine, plan.substitute, plan.label_index)
                        if quarantine is not None else None)
            samples = [plan.sample(i) for i in range(plan.shard_length)]
            pixels = torch.cat([read(samples[i:i + 16], None, failures)  # type: ignore[operator]
                                for i in range(0, len(samples), 16)])
            try:
                config = fit_target(request.method, pixels)
            except ValueError as err:
                raise InvalidRequest(f"stain normalisation fitted to dataset {key[0]}: {err}") from err
            self._cache[key] = config
            return config
