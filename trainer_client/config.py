"""What a trainer asks the service for: a frozen, validated description of one stream."""

from __future__ import annotations

import json
import math

import numpy as np
from dataclasses import dataclass, field
from typing import Any

from wsi_loader.v1 import loader_pb2 as pb

__all__ = ["ReconnectPolicy", "StreamConfig"]

_MODES = {"random": pb.RANDOM, "grid": pb.GRID}
_BALANCES = {"area": pb.BY_AREA, "slide": pb.BY_SLIDE, "label": pb.BY_LABEL}
_TRANSPORTS = ("auto", "grpc", "shm", "cuda_ipc")
_VIEWS = {"patches": pb.PATCHES, "image": pb.IMAGE, "tiles": pb.TILES, "shard": pb.SHARD}
_ON_ERROR = {"skip": pb.ON_ERROR_SKIP, "fail": pb.ON_ERROR_FAIL}
_UNSERVABLE = {"skip": pb.UNSERVABLE_SKIP, "fallback": pb.UNSERVABLE_FALLBACK}
_TILE_ORDERS = {"row-major": pb.ROW_MAJOR, "column-major": pb.COLUMN_MAJOR, "serpentine": pb.SERPENTINE}
_REGIONS = {"tissue": pb.REGION_TISSUE, "annotated": pb.REGION_ANNOTATED, "balanced": pb.REGION_BALANCED,
            "tissue_minus": pb.REGION_TISSUE_MINUS}


@dataclass(frozen=True)
class ReconnectPolicy:
    """What a stream does when its service goes away mid-epoch (drain, restart, rolling update).

    The stream reopens its session at the rank's cursor, on its endpoint then on ``endpoints`` in turn, the
    waits between attempts growing from ``backoff_s`` to ``max_backoff_s``; it gives up (UnavailableError) after
    ``attempts`` failed attempts in a row or ``deadline_s`` since the break. ``attempts=0`` turns reconnection
    off: the break raises UnavailableError with the cursor to resume from.
    """

    attempts: int = 20
    backoff_s: float = 0.2
    max_backoff_s: float = 5.0
    deadline_s: float = 120.0
    connect_timeout_s: float = 5.0  # per attempt: how long to wait for the service to accept the connection
    endpoints: tuple[str, ...] = ()  # other replicas (HOST:PORT), tried after the stream's own endpoint

    def __post_init__(self) -> None:
        if self.attempts < 0:
            raise ValueError(f"reconnect attempts must be >= 0 (0 = off), got {self.attempts}")
        if not 0 <= self.backoff_s <= self.max_backoff_s:
            raise ValueError(f"reconnect backoff must satisfy 0 <= backoff_s ({self.backoff_s}) <= max_backoff_s "
                             f"({self.max_backoff_s})")
        if self.deadline_s <= 0 or self.connect_timeout_s <= 0:
            raise ValueError(f"reconnect deadline_s ({self.deadline_s}) and connect_timeout_s "
                             f"({self.connect_timeout_s}) must be > 0")
        object.__setattr__(self, "endpoints", tuple(self.endpoints))
        for endpoint in self.endpoints:
            host, sep, port = endpoint.rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ValueError(f"reconnect endpoint {endpoint!r} must be HOST:PORT, e.g. 10.0.0.2:50051")

    def delay(self, attempt: int) -> float:
        """Seconds to wait before reconnection attempt ``attempt`` (1-based): none before the first."""
        return 0.0 if attempt <= 1 else min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 2))


@dataclass(frozen=True)
class StreamConfig:
    dataset: str
    batch_size: int = 32
    patch_size: int = 256
    level: int = 0
    mpp: float = 0.0  # > 0: sample at this resolution (µm/px) instead of a level
    mode: str = "random"  # random | grid
    balance: str = "area"  # area | slide | label
    tissue_threshold: float = 0.5
    samples_per_epoch: int = 4096
    grid_stride: int = 0
    split: str = ""
    seed: int = 0
    # Locality (random mode): patches cut from one region, shuffled across a window of regions (docs/architecture.md)
    patches_per_region: int = 1  # 1 = independent patches
    locality_window: int = 16  # regions whose patches are shuffled together
    locality_region_size: int = 0  # region side in sample pixels; 0 = ceil(sqrt(patches_per_region)) patches
    augment: bool = True
    augment_config: dict[str, Any] = field(default_factory=dict)  # AugmentConfig fields; empty = server default
    dtype: str = "uint8"  # uint8 | float16 | float32
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    channels_last: bool = False
    drop_last: bool = False
    credits: int = 4  # batches in flight between server and client
    # auto (shared memory if the service sees this node's /dev/shm, else gRPC bytes) | grpc | shm | cuda_ipc
    # (batches stay on the service's GPU: same node and GPU visible here; the service falls back to shm/grpc)
    transport: str = "auto"
    shm_keep: int = 2  # SHM/CUDA IPC: batches the trainer may hold zero-copy at once; further ones arrive as copies
    pin_memory: bool = False
    timeout_s: float = 120.0  # longest wait for the next batch before StalledError
    reconnect: ReconnectPolicy = field(default_factory=ReconnectPolicy)  # on UNAVAILABLE mid-epoch
    job_id: str = ""
    # Views (DESIGN.md): patches (default) | image | tiles | shard. Regions for the other views:
    view: str = "patches"
    region_width: int = 0  # 0 = patch_size
    region_height: int = 0
    whole_slide: bool = False  # one sample per slide: the whole level
    tile_size: int = 0  # tiles view
    overlap: int = 0
    tile_order: str = "row-major"  # tiles view: row-major | column-major | serpentine
    grid: tuple[int, int] = (1, 1)  # shard view: (rows, cols) of the spatial group
    shard: tuple[int, int] = (0, 0)  # shard view: this rank's (row, col)
    halo: int = 0
    align: int = 1
    # A sample whose read fails: skip = replaced deterministically (batch["substituted"] lists the indices),
    # fail = the stream ends with SlideReadError (docs/failures.md)
    on_error: str = "skip"
    # Slides that cannot serve the level/mpp (mixed datasets): skip = left out (the service logs why),
    # fallback = read at their nearest resolution and resampled
    unservable: str = "skip"
    # Annotations (manifest column `annotation`, docs/annotations.md): where patches come from — tissue |
    # annotated | balanced (by class, with class_proportions) | tissue_minus (minus exclude_classes); masks=True
    # adds batch["masks"] (uint8 (N, H, W) class indices aligned with images). batch["classes"]: class at centre.
    annotation_region: str = "tissue"
    annotation_classes: tuple[str, ...] = ()
    exclude_classes: tuple[str, ...] = ()
    class_proportions: dict[str, float] = field(default_factory=dict)
    masks: bool = False
    # Stain normalisation before augmentation (every view but whole_slide; docs/pathology.md): "" | macenko |
    # reinhard, fitted to stain_target (a SessionOpened/WSIStream.stain_target of an earlier session), else to
    # stain_reference (uint8 HWC RGB numpy array), else to stain_fit_samples tissue patches of the dataset (0 = the
    # service's default)
    stain: str = ""
    stain_target: tuple[float, ...] = ()
    stain_reference: Any = field(default=None, compare=False)
    stain_fit_samples: int = 0
    # Multi-scale context (every view but whole_slide): (factor, size) pairs; each adds batch["context"][i], size²
    # patches at factor× coarser resolution centred on each sample, with the same augmentation (size 0 = patch_size).
    # Tiles view: the sample's whole context comes with its first tile, and every later tile carries the same tensors;
    # shard view: with each shard (docs/pathology.md)
    context: tuple[tuple[float, int], ...] = ()

    def __post_init__(self) -> None:
        if not self.dataset:
            raise ValueError("dataset is required: one of the names `trainer-client datasets` lists")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.mode not in _MODES:
            raise ValueError(f"mode must be one of {sorted(_MODES)}, got {self.mode!r}")
        if self.balance not in _BALANCES:
            raise ValueError(f"balance must be one of {sorted(_BALANCES)}, got {self.balance!r}")
        if self.transport not in _TRANSPORTS:
            raise ValueError(f"transport must be one of {_TRANSPORTS}, got {self.transport!r}")
        if not 1 <= self.credits <= 64:
            raise ValueError(f"credits (batches in flight) must be 1..64, got {self.credits}")
        if self.view not in _VIEWS:
            raise ValueError(f"view must be one of {sorted(_VIEWS)}, got {self.view!r}")
        if self.on_error not in _ON_ERROR:
            raise ValueError(f"on_error must be one of {sorted(_ON_ERROR)}, got {self.on_error!r}")
        if self.unservable not in _UNSERVABLE:
            raise ValueError(f"unservable must be one of {sorted(_UNSERVABLE)}, got {self.unservable!r}")
        if self.annotation_region not in _REGIONS:
            raise ValueError(f"annotation_region must be one of {sorted(_REGIONS)}, got {self.annotation_region!r}")
        object.__setattr__(self, "annotation_classes", tuple(self.annotation_classes))
        object.__setattr__(self, "exclude_classes", tuple(self.exclude_classes))
        if self.tile_order not in _TILE_ORDERS:
            raise ValueError(f"tile_order must be one of {sorted(_TILE_ORDERS)}, got {self.tile_order!r}")
        object.__setattr__(self, "grid", tuple(self.grid))
        object.__setattr__(self, "shard", tuple(self.shard))
        if not 1 <= self.shm_keep <= 64:
            raise ValueError(f"shm_keep (batches held zero-copy at once) must be 1..64, got {self.shm_keep}")
        if not 1 <= self.patches_per_region <= 1024:
            raise ValueError(f"patches_per_region must be 1..1024 (1 = independent patches), got {self.patches_per_region}")
        if self.patches_per_region > 1 and self.mode != "random":
            raise ValueError(f"patches_per_region={self.patches_per_region} applies to mode='random' only; "
                             "set patches_per_region=1 for grid mode")
        if not 1 <= self.locality_window <= 4096:
            raise ValueError(f"locality_window must be 1..4096 regions, got {self.locality_window}")
        if self.locality_region_size < 0:
            raise ValueError(f"locality_region_size must be >= 0 (0 = auto), got {self.locality_region_size}")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
        if isinstance(self.reconnect, dict):  # from YAML/JSON
            object.__setattr__(self, "reconnect", ReconnectPolicy(**self.reconnect))
        if not math.isfinite(self.mpp) or self.mpp < 0:
            raise ValueError(f"mpp must be a finite number of µm/px >= 0 (0 = use level), got {self.mpp}")
        object.__setattr__(self, "stain_target", tuple(float(v) for v in self.stain_target))
        object.__setattr__(self, "context", tuple((float(f), int(s)) for f, s in self.context))
        if self.stain not in ("", "macenko", "reinhard"):
            raise ValueError(f"stain must be '', 'macenko' or 'reinhard', got {self.stain!r}")
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    def open_message(self, epoch: int, rank: int, world_size: int, cursor: int, transport: int,
                     shm_probe: str = "", resume: tuple[list[int], list[int]] = ([], [])) -> pb.OpenSession:
        return pb.OpenSession(
            resume_world_sizes=resume[0], resume_cursors=resume[1],
            dataset=self.dataset, split=self.split, mode=_MODES[self.mode], balance=_BALANCES[self.balance],
            patch_size=self.patch_size, level=self.level, mpp=self.mpp, tissue_threshold=self.tissue_threshold,
            samples_per_epoch=self.samples_per_epoch, grid_stride=self.grid_stride, seed=self.seed, epoch=epoch,
            rank=rank, world_size=world_size, cursor=cursor, batch_size=self.batch_size, drop_last=self.drop_last,
            augment=pb.Augment(enabled=self.augment,
                               config_json=json.dumps(self.augment_config) if self.augment_config else ""),
            output=pb.Output(dtype=self.dtype, mean=self.mean, std=self.std, channels_last=self.channels_last),
            transport=transport, shm_probe=shm_probe, job_id=self.job_id,
            patches_per_region=self.patches_per_region, locality_window=self.locality_window,
            locality_region_size=self.locality_region_size,
            on_error=_ON_ERROR[self.on_error], unservable=_UNSERVABLE[self.unservable],
            annotations=pb.AnnotationRequest(region=_REGIONS[self.annotation_region], classes=self.annotation_classes,
                                             exclude=self.exclude_classes, proportions=self.class_proportions,
                                             masks=self.masks),
            view=pb.ViewSpec(view=_VIEWS[self.view], region_width=self.region_width, region_height=self.region_height,
                             whole_slide=self.whole_slide, tile_size=self.tile_size, overlap=self.overlap,
                             grid_rows=self.grid[0], grid_cols=self.grid[1], shard_row=self.shard[0],
                             shard_col=self.shard[1], halo=self.halo, align=self.align,
                             tile_order=_TILE_ORDERS[self.tile_order]),
            stain=self._stain_message(),
            context=[pb.ContextScale(factor=f, size=s) for f, s in self.context],
        )

    def _stain_message(self) -> pb.StainNorm:
        message = pb.StainNorm(method=self.stain, target=self.stain_target, fit_samples=self.stain_fit_samples)
        if self.stain_reference is not None:
            ref = np.ascontiguousarray(np.asarray(self.stain_reference), dtype=np.uint8)
            message.reference.CopyFrom(pb.Tensor(dtype="uint8", shape=list(ref.shape), data=ref.tobytes()))
        return message
