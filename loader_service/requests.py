"""Wire messages in, validated configuration out. Anything malformed becomes InvalidRequest with a fix."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from loader_service.annotations.options import REGIONS, AnnotationOptions
from loader_service.augment import AugmentConfig
from loader_service.errors import InvalidRequest, TooLarge
from loader_service.pipeline import OutputSpec
from loader_service.context import MAX_CONTEXT_SCALES, ContextScale
from loader_service.sampling import ResumeStages, SamplingSpec
from loader_service.stain_request import StainRequest, parse_stain
from loader_service.views import TILE_ORDERS, VIEWS, ViewConfig, split_bounds
from wsi_loader.v1 import loader_pb2 as pb

__all__ = ["SessionRequest", "parse_open", "MODE_NAMES", "BALANCE_NAMES"]

MODE_NAMES = {pb.MODE_UNSPECIFIED: "random", pb.RANDOM: "random", pb.GRID: "grid"}
ON_ERROR_NAMES = {pb.ON_ERROR_SKIP: "skip", pb.ON_ERROR_FAIL: "fail"}
UNSERVABLE_NAMES = {pb.UNSERVABLE_SKIP: "skip", pb.UNSERVABLE_FALLBACK: "fallback"}
BALANCE_NAMES = {pb.BALANCE_UNSPECIFIED: "area", pb.BY_AREA: "area", pb.BY_SLIDE: "slide", pb.BY_LABEL: "label"}


@dataclass(frozen=True)
class SessionRequest:
    dataset: str
    spec: SamplingSpec
    epoch: int
    rank: int
    world_size: int
    cursor: int
    batch_size: int
    drop_last: bool
    augment: AugmentConfig | None
    output: OutputSpec
    transport: int
    shm_probe: str
    job_id: str
    shm_slots: int
    view: ViewConfig
    on_error: str = "skip"  # skip | fail: what a sample whose read fails does (docs/failures.md)
    unservable: str = "skip"  # skip | fallback: slides that cannot serve the level/mpp (mixed datasets)
    resume: ResumeStages = ResumeStages()  # elastic resume: the stages the epoch was read in before
    annotations: AnnotationOptions = AnnotationOptions()  # docs/annotations.md
    stain: StainRequest | None = None  # stain normalisation before augmentation (not whole slides)
    context: tuple[ContextScale, ...] = ()  # multi-scale context patches (every view but whole slides)

    def tensor_bytes(self) -> int | None:
        """The largest images tensor one message of this session carries; None when it depends on the slide.

        Patches and images: the batch. Tiles: one tile with its overlap. Shards: at most the whole region.
        Whole slides: each slide's size, so unknown in advance.
        """
        if self.spec.whole_slide:
            return None
        itemsize = {"uint8": 1, "float16": 2, "float32": 4}[self.output.dtype]
        if self.view.view == "tiles":
            side = self.view.tile_size + 2 * self.view.overlap
            return 3 * side * side * itemsize
        return self.batch_size * 3 * self.spec.patch_size * self.spec.height * itemsize

    def inline_bytes(self) -> int:
        """Bytes one message carries inline besides its images, whatever the transport: the context patches
        (N·3·size² per scale, in the output dtype) and the annotation masks (uint8 N·H·W) when asked."""
        itemsize = {"uint8": 1, "float16": 2, "float32": 4}[self.output.dtype]
        n = 1 if self.view.view == "tiles" else self.batch_size
        context = sum(n * 3 * c.size * c.size * itemsize for c in self.context)
        if not self.annotations.masks or self.spec.whole_slide:
            return context
        if self.view.view == "tiles":
            side = self.view.tile_size + 2 * self.view.overlap
            return context + side * side
        return context + n * self.spec.patch_size * self.spec.height

    def message_bytes(self) -> int | None:
        """The largest message of this session: its images (:meth:`tensor_bytes`) plus what travels inline with
        them (:meth:`inline_bytes`); None when the images' size depends on the slide."""
        nbytes = self.tensor_bytes()
        return None if nbytes is None else nbytes + self.inline_bytes()


def parse_open(msg: pb.OpenSession, max_batch_bytes: int, max_region_pixels: int) -> SessionRequest:
    if not msg.dataset:
        raise InvalidRequest("open.dataset is empty: name one of the datasets ListDatasets returns")
    if msg.mode not in MODE_NAMES:
        raise InvalidRequest(f"open.mode {msg.mode} is unknown; use RANDOM or GRID")
    if msg.on_error not in ON_ERROR_NAMES:
        raise InvalidRequest(f"open.on_error {msg.on_error} is unknown; use ON_ERROR_SKIP or ON_ERROR_FAIL")
    if msg.unservable not in UNSERVABLE_NAMES:
        raise InvalidRequest(f"open.unservable {msg.unservable} is unknown; use UNSERVABLE_SKIP or UNSERVABLE_FALLBACK")
    if msg.balance not in BALANCE_NAMES:
        raise InvalidRequest(f"open.balance {msg.balance} is unknown; use BY_AREA, BY_SLIDE or BY_LABEL")
    world = msg.world_size or 1
    if msg.rank >= world:
        raise InvalidRequest(f"open.rank {msg.rank} must be < world_size {world}")
    batch = msg.batch_size or 32
    try:
        spec = _spec(msg)
        view = _view(msg.view)
        output = OutputSpec(
            dtype=msg.output.dtype or "uint8",
            mean=tuple(msg.output.mean),
            std=tuple(msg.output.std),
            channels_last=msg.output.channels_last,
        )
        augment: AugmentConfig | None = None
        if msg.augment.enabled:
            augment = AugmentConfig.from_dict(json.loads(msg.augment.config_json)) if msg.augment.config_json else AugmentConfig()
        annotations = _annotations(msg.annotations)
        stain = parse_stain(msg.stain)
        context = tuple(ContextScale(float(c.factor), c.size or spec.patch_size) for c in msg.context)
    except (ValueError, TypeError, KeyError) as err:
        raise InvalidRequest(f"invalid session request: {err}") from err
    if len(context) > MAX_CONTEXT_SCALES:
        raise InvalidRequest(f"multi-scale context serves at most {MAX_CONTEXT_SCALES} scales per sample, got "
                             f"{len(context)}; ask for fewer context scales")
    if context and spec.whole_slide:
        raise InvalidRequest("multi-scale context is not served for whole slides (whole_slide=true): context shows "
                             "the surroundings of a region, and a whole slide has none. Ask for regions of a fixed "
                             "size (view.region_width/region_height) with context, or read the whole slide at a "
                             "coarser level (level or mpp) in a second session")
    if context and augment is not None and (augment.scale or augment.crop):
        raise InvalidRequest("multi-scale context cannot be combined with image-level scale or crop augmentation "
                             "(they resample one scale only); set augment scale=0 and crop=0")
    if stain is not None and spec.whole_slide:
        raise InvalidRequest("stain normalisation is not served for whole slides (whole_slide=true); normalise "
                             "client-side, or ask for regions of a fixed size")
    if view.view != "patches":
        if spec.patch_size * spec.height > max_region_pixels and not spec.whole_slide:
            raise TooLarge(f"a {spec.patch_size}×{spec.height} region exceeds the server's limit of {max_region_pixels} "
                           "pixels; ask for a smaller region or a coarser level")
        if view.view == "shard" and not spec.whole_slide:
            try:  # the raw region; an augmentation that changes the size is checked again per sample
                split_bounds(spec.height, view.grid_rows, view.align)
                split_bounds(spec.patch_size, view.grid_cols, view.align)
            except ValueError as err:
                raise InvalidRequest(f"shard grid {view.grid_rows}×{view.grid_cols} does not fit the "
                                     f"{spec.patch_size}×{spec.height} region: {err}") from err
        if (view.pieces_per_sample or spec.whole_slide) and batch != 1:
            raise InvalidRequest(f"the {view.view} view{' of whole slides' if spec.whole_slide else ''} sends one "
                                 f"sample at a time: set batch_size=1 (got {batch})")
    request = SessionRequest(
        dataset=msg.dataset, spec=spec, epoch=msg.epoch, rank=msg.rank, world_size=world, cursor=msg.cursor,
        batch_size=batch, drop_last=msg.drop_last, augment=augment, output=output, transport=msg.transport,
        shm_probe=msg.shm_probe, job_id=msg.job_id, shm_slots=msg.shm_slots, view=view,
        on_error=ON_ERROR_NAMES[msg.on_error], unservable=UNSERVABLE_NAMES[msg.unservable], annotations=annotations,
        resume=ResumeStages.from_wire(list(msg.resume_world_sizes), list(msg.resume_cursors)),
        stain=stain, context=context,
    )
    nbytes = request.tensor_bytes()
    if nbytes is not None and nbytes > max_batch_bytes and view.view != "shard":
        raise InvalidRequest(
            f"a batch of {batch}×3×{spec.patch_size}² {output.dtype} is {nbytes / 2**20:.0f} MiB, over the server's "
            f"limit of {max_batch_bytes / 2**20:.0f} MiB; lower batch_size or patch_size"
        )
    message = request.message_bytes()
    if message is not None and nbytes is not None and message > max_batch_bytes and view.view != "shard":
        raise TooLarge(
            f"one message of this session (images {nbytes / 2**20:.0f} MiB, context patches and masks "
            f"{request.inline_bytes() / 2**20:.0f} MiB) is {message / 2**20:.0f} MiB, over the server's limit of "
            f"{max_batch_bytes / 2**20:.0f} MiB (max_batch_bytes; a message may not exceed max_message_bytes); "
            "lower batch_size, or the context sizes or number of scales"
        )
    return request


def _annotations(msg: pb.AnnotationRequest) -> AnnotationOptions:
    if msg.region >= len(REGIONS):
        raise ValueError(f"annotations.region {msg.region} is unknown; use REGION_TISSUE, REGION_ANNOTATED, "
                         "REGION_BALANCED or REGION_TISSUE_MINUS")
    return AnnotationOptions(region=REGIONS[msg.region], classes=tuple(msg.classes), exclude=tuple(msg.exclude),
                             proportions=tuple(sorted(msg.proportions.items())), masks=msg.masks)


def _view(msg: pb.ViewSpec) -> ViewConfig:
    if msg.view >= len(VIEWS):
        raise ValueError(f"view {msg.view} is unknown; use PATCHES, IMAGE, TILES or SHARD")
    if msg.tile_order >= len(TILE_ORDERS):
        raise ValueError(f"tile_order {msg.tile_order} is unknown; use ROW_MAJOR, COLUMN_MAJOR or SERPENTINE")
    return ViewConfig(view=VIEWS[msg.view], tile_size=msg.tile_size, overlap=msg.overlap, grid_rows=msg.grid_rows or 1,
                      grid_cols=msg.grid_cols or 1, shard_row=msg.shard_row, shard_col=msg.shard_col, halo=msg.halo,
                      align=msg.align or 1, tile_order=TILE_ORDERS[msg.tile_order])


def _spec(msg: pb.OpenSession) -> SamplingSpec:
    threshold = msg.tissue_threshold if msg.HasField("tissue_threshold") else 0.5
    region = msg.view.view != pb.PATCHES
    whole_slide = region and msg.view.whole_slide
    patch_size = msg.view.region_width if region and msg.view.region_width else msg.patch_size
    if not patch_size and not whole_slide:
        what = "open.patch_size (or view.region_width)" if region else "open.patch_size"
        raise ValueError(f"{what} is 0: set the patch side in pixels, e.g. 256")
    if not math.isfinite(msg.mpp):
        raise ValueError(f"open.mpp must be a finite number of µm/px (0 = use level), got {msg.mpp}")
    return SamplingSpec(
        patch_size=patch_size or 256,  # whole slides: patch sizes are not used
        patch_height=msg.view.region_height if region else 0,
        whole_slide=region and msg.view.whole_slide,
        level=msg.level,
        mpp=msg.mpp,
        mode=MODE_NAMES[msg.mode],
        balance=BALANCE_NAMES[msg.balance],
        tissue_threshold=threshold,
        samples_per_epoch=msg.samples_per_epoch or 4096,
        grid_stride=msg.grid_stride,
        split=msg.split,
        seed=msg.seed,
        patches_per_region=msg.patches_per_region or 1,
        locality_window=msg.locality_window or 16,
        locality_region_size=msg.locality_region_size,
    )
