from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Mode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODE_UNSPECIFIED: _ClassVar[Mode]
    RANDOM: _ClassVar[Mode]
    GRID: _ClassVar[Mode]

class Balance(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BALANCE_UNSPECIFIED: _ClassVar[Balance]
    BY_AREA: _ClassVar[Balance]
    BY_SLIDE: _ClassVar[Balance]
    BY_LABEL: _ClassVar[Balance]

class Transport(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRANSPORT_UNSPECIFIED: _ClassVar[Transport]
    GRPC: _ClassVar[Transport]
    SHM: _ClassVar[Transport]
    CUDA_IPC: _ClassVar[Transport]

class View(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PATCHES: _ClassVar[View]
    IMAGE: _ClassVar[View]
    TILES: _ClassVar[View]
    SHARD: _ClassVar[View]

class TileOrder(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROW_MAJOR: _ClassVar[TileOrder]
    COLUMN_MAJOR: _ClassVar[TileOrder]
    SERPENTINE: _ClassVar[TileOrder]

class AnnotationRegion(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REGION_TISSUE: _ClassVar[AnnotationRegion]
    REGION_ANNOTATED: _ClassVar[AnnotationRegion]
    REGION_BALANCED: _ClassVar[AnnotationRegion]
    REGION_TISSUE_MINUS: _ClassVar[AnnotationRegion]

class OnError(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ON_ERROR_SKIP: _ClassVar[OnError]
    ON_ERROR_FAIL: _ClassVar[OnError]

class Unservable(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    UNSERVABLE_SKIP: _ClassVar[Unservable]
    UNSERVABLE_FALLBACK: _ClassVar[Unservable]
MODE_UNSPECIFIED: Mode
RANDOM: Mode
GRID: Mode
BALANCE_UNSPECIFIED: Balance
BY_AREA: Balance
BY_SLIDE: Balance
BY_LABEL: Balance
TRANSPORT_UNSPECIFIED: Transport
GRPC: Transport
SHM: Transport
CUDA_IPC: Transport
PATCHES: View
IMAGE: View
TILES: View
SHARD: View
ROW_MAJOR: TileOrder
COLUMN_MAJOR: TileOrder
SERPENTINE: TileOrder
REGION_TISSUE: AnnotationRegion
REGION_ANNOTATED: AnnotationRegion
REGION_BALANCED: AnnotationRegion
REGION_TISSUE_MINUS: AnnotationRegion
ON_ERROR_SKIP: OnError
ON_ERROR_FAIL: OnError
UNSERVABLE_SKIP: Unservable
UNSERVABLE_FALLBACK: Unservable

class ListDatasetsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListDatasetsResponse(_message.Message):
    __slots__ = ("datasets",)
    DATASETS_FIELD_NUMBER: _ClassVar[int]
    datasets: _containers.RepeatedCompositeFieldContainer[DatasetSummary]
    def __init__(self, datasets: _Optional[_Iterable[_Union[DatasetSummary, _Mapping]]] = ...) -> None: ...

class DatasetSummary(_message.Message):
    __slots__ = ("name", "slides", "failed_slides", "labels")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SLIDES_FIELD_NUMBER: _ClassVar[int]
    FAILED_SLIDES_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    name: str
    slides: int
    failed_slides: int
    labels: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., slides: _Optional[int] = ..., failed_slides: _Optional[int] = ..., labels: _Optional[_Iterable[str]] = ...) -> None: ...

class DescribeDatasetRequest(_message.Message):
    __slots__ = ("dataset",)
    DATASET_FIELD_NUMBER: _ClassVar[int]
    dataset: str
    def __init__(self, dataset: _Optional[str] = ...) -> None: ...

class SlideSummary(_message.Message):
    __slots__ = ("slide_id", "label", "split", "vendor", "levels", "mpp", "tissue_fraction", "error", "annotation_error", "annotation_classes")
    SLIDE_ID_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    SPLIT_FIELD_NUMBER: _ClassVar[int]
    VENDOR_FIELD_NUMBER: _ClassVar[int]
    LEVELS_FIELD_NUMBER: _ClassVar[int]
    MPP_FIELD_NUMBER: _ClassVar[int]
    TISSUE_FRACTION_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ANNOTATION_ERROR_FIELD_NUMBER: _ClassVar[int]
    ANNOTATION_CLASSES_FIELD_NUMBER: _ClassVar[int]
    slide_id: str
    label: str
    split: str
    vendor: str
    levels: _containers.RepeatedCompositeFieldContainer[Level]
    mpp: float
    tissue_fraction: float
    error: str
    annotation_error: str
    annotation_classes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, slide_id: _Optional[str] = ..., label: _Optional[str] = ..., split: _Optional[str] = ..., vendor: _Optional[str] = ..., levels: _Optional[_Iterable[_Union[Level, _Mapping]]] = ..., mpp: _Optional[float] = ..., tissue_fraction: _Optional[float] = ..., error: _Optional[str] = ..., annotation_error: _Optional[str] = ..., annotation_classes: _Optional[_Iterable[str]] = ...) -> None: ...

class Level(_message.Message):
    __slots__ = ("width", "height", "downsample", "tile_width", "tile_height")
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    DOWNSAMPLE_FIELD_NUMBER: _ClassVar[int]
    TILE_WIDTH_FIELD_NUMBER: _ClassVar[int]
    TILE_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    width: int
    height: int
    downsample: float
    tile_width: int
    tile_height: int
    def __init__(self, width: _Optional[int] = ..., height: _Optional[int] = ..., downsample: _Optional[float] = ..., tile_width: _Optional[int] = ..., tile_height: _Optional[int] = ...) -> None: ...

class DatasetInfo(_message.Message):
    __slots__ = ("name", "slides", "labels", "annotation_classes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SLIDES_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    ANNOTATION_CLASSES_FIELD_NUMBER: _ClassVar[int]
    name: str
    slides: _containers.RepeatedCompositeFieldContainer[SlideSummary]
    labels: _containers.RepeatedScalarFieldContainer[str]
    annotation_classes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., slides: _Optional[_Iterable[_Union[SlideSummary, _Mapping]]] = ..., labels: _Optional[_Iterable[str]] = ..., annotation_classes: _Optional[_Iterable[str]] = ...) -> None: ...

class ReadRegionRequest(_message.Message):
    __slots__ = ("dataset", "slide_id", "level", "mpp", "x", "y", "width", "height")
    DATASET_FIELD_NUMBER: _ClassVar[int]
    SLIDE_ID_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    MPP_FIELD_NUMBER: _ClassVar[int]
    X_FIELD_NUMBER: _ClassVar[int]
    Y_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    dataset: str
    slide_id: str
    level: int
    mpp: float
    x: int
    y: int
    width: int
    height: int
    def __init__(self, dataset: _Optional[str] = ..., slide_id: _Optional[str] = ..., level: _Optional[int] = ..., mpp: _Optional[float] = ..., x: _Optional[int] = ..., y: _Optional[int] = ..., width: _Optional[int] = ..., height: _Optional[int] = ...) -> None: ...

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data", "shm", "cuda")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHM_FIELD_NUMBER: _ClassVar[int]
    CUDA_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    shm: ShmRef
    cuda: CudaRef
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ..., shm: _Optional[_Union[ShmRef, _Mapping]] = ..., cuda: _Optional[_Union[CudaRef, _Mapping]] = ...) -> None: ...

class CudaRef(_message.Message):
    __slots__ = ("mem_handle", "offset", "nbytes", "slot", "event_handle", "device_uuid")
    MEM_HANDLE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    EVENT_HANDLE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_UUID_FIELD_NUMBER: _ClassVar[int]
    mem_handle: bytes
    offset: int
    nbytes: int
    slot: int
    event_handle: bytes
    device_uuid: str
    def __init__(self, mem_handle: _Optional[bytes] = ..., offset: _Optional[int] = ..., nbytes: _Optional[int] = ..., slot: _Optional[int] = ..., event_handle: _Optional[bytes] = ..., device_uuid: _Optional[str] = ...) -> None: ...

class ShmRef(_message.Message):
    __slots__ = ("segment", "offset", "nbytes", "slot")
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    segment: str
    offset: int
    nbytes: int
    slot: int
    def __init__(self, segment: _Optional[str] = ..., offset: _Optional[int] = ..., nbytes: _Optional[int] = ..., slot: _Optional[int] = ...) -> None: ...

class ViewSpec(_message.Message):
    __slots__ = ("view", "region_width", "region_height", "whole_slide", "tile_size", "overlap", "grid_rows", "grid_cols", "shard_row", "shard_col", "halo", "align", "tile_order")
    VIEW_FIELD_NUMBER: _ClassVar[int]
    REGION_WIDTH_FIELD_NUMBER: _ClassVar[int]
    REGION_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WHOLE_SLIDE_FIELD_NUMBER: _ClassVar[int]
    TILE_SIZE_FIELD_NUMBER: _ClassVar[int]
    OVERLAP_FIELD_NUMBER: _ClassVar[int]
    GRID_ROWS_FIELD_NUMBER: _ClassVar[int]
    GRID_COLS_FIELD_NUMBER: _ClassVar[int]
    SHARD_ROW_FIELD_NUMBER: _ClassVar[int]
    SHARD_COL_FIELD_NUMBER: _ClassVar[int]
    HALO_FIELD_NUMBER: _ClassVar[int]
    ALIGN_FIELD_NUMBER: _ClassVar[int]
    TILE_ORDER_FIELD_NUMBER: _ClassVar[int]
    view: View
    region_width: int
    region_height: int
    whole_slide: bool
    tile_size: int
    overlap: int
    grid_rows: int
    grid_cols: int
    shard_row: int
    shard_col: int
    halo: int
    align: int
    tile_order: TileOrder
    def __init__(self, view: _Optional[_Union[View, str]] = ..., region_width: _Optional[int] = ..., region_height: _Optional[int] = ..., whole_slide: _Optional[bool] = ..., tile_size: _Optional[int] = ..., overlap: _Optional[int] = ..., grid_rows: _Optional[int] = ..., grid_cols: _Optional[int] = ..., shard_row: _Optional[int] = ..., shard_col: _Optional[int] = ..., halo: _Optional[int] = ..., align: _Optional[int] = ..., tile_order: _Optional[_Union[TileOrder, str]] = ...) -> None: ...

class Augment(_message.Message):
    __slots__ = ("enabled", "config_json")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    config_json: str
    def __init__(self, enabled: _Optional[bool] = ..., config_json: _Optional[str] = ...) -> None: ...

class Output(_message.Message):
    __slots__ = ("dtype", "mean", "std", "channels_last")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    STD_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_LAST_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    mean: _containers.RepeatedScalarFieldContainer[float]
    std: _containers.RepeatedScalarFieldContainer[float]
    channels_last: bool
    def __init__(self, dtype: _Optional[str] = ..., mean: _Optional[_Iterable[float]] = ..., std: _Optional[_Iterable[float]] = ..., channels_last: _Optional[bool] = ...) -> None: ...

class OpenSession(_message.Message):
    __slots__ = ("dataset", "split", "mode", "balance", "patch_size", "level", "mpp", "tissue_threshold", "samples_per_epoch", "grid_stride", "seed", "epoch", "rank", "world_size", "cursor", "batch_size", "drop_last", "augment", "output", "transport", "shm_probe", "job_id", "view", "shm_slots", "patches_per_region", "locality_window", "locality_region_size", "on_error", "unservable", "resume_world_sizes", "resume_cursors", "annotations", "stain", "context")
    DATASET_FIELD_NUMBER: _ClassVar[int]
    SPLIT_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    BALANCE_FIELD_NUMBER: _ClassVar[int]
    PATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    MPP_FIELD_NUMBER: _ClassVar[int]
    TISSUE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_PER_EPOCH_FIELD_NUMBER: _ClassVar[int]
    GRID_STRIDE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    DROP_LAST_FIELD_NUMBER: _ClassVar[int]
    AUGMENT_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    SHM_PROBE_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    VIEW_FIELD_NUMBER: _ClassVar[int]
    SHM_SLOTS_FIELD_NUMBER: _ClassVar[int]
    PATCHES_PER_REGION_FIELD_NUMBER: _ClassVar[int]
    LOCALITY_WINDOW_FIELD_NUMBER: _ClassVar[int]
    LOCALITY_REGION_SIZE_FIELD_NUMBER: _ClassVar[int]
    ON_ERROR_FIELD_NUMBER: _ClassVar[int]
    UNSERVABLE_FIELD_NUMBER: _ClassVar[int]
    RESUME_WORLD_SIZES_FIELD_NUMBER: _ClassVar[int]
    RESUME_CURSORS_FIELD_NUMBER: _ClassVar[int]
    ANNOTATIONS_FIELD_NUMBER: _ClassVar[int]
    STAIN_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    dataset: str
    split: str
    mode: Mode
    balance: Balance
    patch_size: int
    level: int
    mpp: float
    tissue_threshold: float
    samples_per_epoch: int
    grid_stride: int
    seed: int
    epoch: int
    rank: int
    world_size: int
    cursor: int
    batch_size: int
    drop_last: bool
    augment: Augment
    output: Output
    transport: Transport
    shm_probe: str
    job_id: str
    view: ViewSpec
    shm_slots: int
    patches_per_region: int
    locality_window: int
    locality_region_size: int
    on_error: OnError
    unservable: Unservable
    resume_world_sizes: _containers.RepeatedScalarFieldContainer[int]
    resume_cursors: _containers.RepeatedScalarFieldContainer[int]
    annotations: AnnotationRequest
    stain: StainNorm
    context: _containers.RepeatedCompositeFieldContainer[ContextScale]
    def __init__(self, dataset: _Optional[str] = ..., split: _Optional[str] = ..., mode: _Optional[_Union[Mode, str]] = ..., balance: _Optional[_Union[Balance, str]] = ..., patch_size: _Optional[int] = ..., level: _Optional[int] = ..., mpp: _Optional[float] = ..., tissue_threshold: _Optional[float] = ..., samples_per_epoch: _Optional[int] = ..., grid_stride: _Optional[int] = ..., seed: _Optional[int] = ..., epoch: _Optional[int] = ..., rank: _Optional[int] = ..., world_size: _Optional[int] = ..., cursor: _Optional[int] = ..., batch_size: _Optional[int] = ..., drop_last: _Optional[bool] = ..., augment: _Optional[_Union[Augment, _Mapping]] = ..., output: _Optional[_Union[Output, _Mapping]] = ..., transport: _Optional[_Union[Transport, str]] = ..., shm_probe: _Optional[str] = ..., job_id: _Optional[str] = ..., view: _Optional[_Union[ViewSpec, _Mapping]] = ..., shm_slots: _Optional[int] = ..., patches_per_region: _Optional[int] = ..., locality_window: _Optional[int] = ..., locality_region_size: _Optional[int] = ..., on_error: _Optional[_Union[OnError, str]] = ..., unservable: _Optional[_Union[Unservable, str]] = ..., resume_world_sizes: _Optional[_Iterable[int]] = ..., resume_cursors: _Optional[_Iterable[int]] = ..., annotations: _Optional[_Union[AnnotationRequest, _Mapping]] = ..., stain: _Optional[_Union[StainNorm, _Mapping]] = ..., context: _Optional[_Iterable[_Union[ContextScale, _Mapping]]] = ...) -> None: ...

class AnnotationRequest(_message.Message):
    __slots__ = ("region", "classes", "exclude", "proportions", "masks")
    class ProportionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    REGION_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_FIELD_NUMBER: _ClassVar[int]
    PROPORTIONS_FIELD_NUMBER: _ClassVar[int]
    MASKS_FIELD_NUMBER: _ClassVar[int]
    region: AnnotationRegion
    classes: _containers.RepeatedScalarFieldContainer[str]
    exclude: _containers.RepeatedScalarFieldContainer[str]
    proportions: _containers.ScalarMap[str, float]
    masks: bool
    def __init__(self, region: _Optional[_Union[AnnotationRegion, str]] = ..., classes: _Optional[_Iterable[str]] = ..., exclude: _Optional[_Iterable[str]] = ..., proportions: _Optional[_Mapping[str, float]] = ..., masks: _Optional[bool] = ...) -> None: ...

class ContextScale(_message.Message):
    __slots__ = ("factor", "size")
    FACTOR_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    factor: float
    size: int
    def __init__(self, factor: _Optional[float] = ..., size: _Optional[int] = ...) -> None: ...

class ContextPlace(_message.Message):
    __slots__ = ("level", "mpp", "x", "y", "size")
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    MPP_FIELD_NUMBER: _ClassVar[int]
    X_FIELD_NUMBER: _ClassVar[int]
    Y_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    level: int
    mpp: float
    x: int
    y: int
    size: int
    def __init__(self, level: _Optional[int] = ..., mpp: _Optional[float] = ..., x: _Optional[int] = ..., y: _Optional[int] = ..., size: _Optional[int] = ...) -> None: ...

class StainNorm(_message.Message):
    __slots__ = ("method", "target", "reference", "fit_samples")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    FIT_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    method: str
    target: _containers.RepeatedScalarFieldContainer[float]
    reference: Tensor
    fit_samples: int
    def __init__(self, method: _Optional[str] = ..., target: _Optional[_Iterable[float]] = ..., reference: _Optional[_Union[Tensor, _Mapping]] = ..., fit_samples: _Optional[int] = ...) -> None: ...

class Credit(_message.Message):
    __slots__ = ("batches",)
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    batches: int
    def __init__(self, batches: _Optional[int] = ...) -> None: ...

class Release(_message.Message):
    __slots__ = ("slots",)
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    slots: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, slots: _Optional[_Iterable[int]] = ...) -> None: ...

class StreamRequest(_message.Message):
    __slots__ = ("open", "credit", "release")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    CREDIT_FIELD_NUMBER: _ClassVar[int]
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    open: OpenSession
    credit: Credit
    release: Release
    def __init__(self, open: _Optional[_Union[OpenSession, _Mapping]] = ..., credit: _Optional[_Union[Credit, _Mapping]] = ..., release: _Optional[_Union[Release, _Mapping]] = ...) -> None: ...

class SessionOpened(_message.Message):
    __slots__ = ("session_id", "shard_length", "batches", "transport", "transport_reason", "labels", "shm_segment", "skipped_slides", "annotation_classes", "stain_target")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SHARD_LENGTH_FIELD_NUMBER: _ClassVar[int]
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_REASON_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    SHM_SEGMENT_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_SLIDES_FIELD_NUMBER: _ClassVar[int]
    ANNOTATION_CLASSES_FIELD_NUMBER: _ClassVar[int]
    STAIN_TARGET_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    shard_length: int
    batches: int
    transport: Transport
    transport_reason: str
    labels: _containers.RepeatedScalarFieldContainer[str]
    shm_segment: str
    skipped_slides: _containers.RepeatedScalarFieldContainer[str]
    annotation_classes: _containers.RepeatedScalarFieldContainer[str]
    stain_target: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, session_id: _Optional[str] = ..., shard_length: _Optional[int] = ..., batches: _Optional[int] = ..., transport: _Optional[_Union[Transport, str]] = ..., transport_reason: _Optional[str] = ..., labels: _Optional[_Iterable[str]] = ..., shm_segment: _Optional[str] = ..., skipped_slides: _Optional[_Iterable[str]] = ..., annotation_classes: _Optional[_Iterable[str]] = ..., stain_target: _Optional[_Iterable[float]] = ...) -> None: ...

class SampleMeta(_message.Message):
    __slots__ = ("slide_id", "level", "mpp", "x", "y", "width", "height", "label", "label_index", "index", "padding", "piece", "substituted", "context")
    SLIDE_ID_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    MPP_FIELD_NUMBER: _ClassVar[int]
    X_FIELD_NUMBER: _ClassVar[int]
    Y_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    LABEL_INDEX_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    PADDING_FIELD_NUMBER: _ClassVar[int]
    PIECE_FIELD_NUMBER: _ClassVar[int]
    SUBSTITUTED_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    slide_id: str
    level: int
    mpp: float
    x: int
    y: int
    width: int
    height: int
    label: str
    label_index: int
    index: int
    padding: bool
    piece: Piece
    substituted: bool
    context: _containers.RepeatedCompositeFieldContainer[ContextPlace]
    def __init__(self, slide_id: _Optional[str] = ..., level: _Optional[int] = ..., mpp: _Optional[float] = ..., x: _Optional[int] = ..., y: _Optional[int] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., label: _Optional[str] = ..., label_index: _Optional[int] = ..., index: _Optional[int] = ..., padding: _Optional[bool] = ..., piece: _Optional[_Union[Piece, _Mapping]] = ..., substituted: _Optional[bool] = ..., context: _Optional[_Iterable[_Union[ContextPlace, _Mapping]]] = ...) -> None: ...

class Piece(_message.Message):
    __slots__ = ("image_height", "image_width", "y", "x", "height", "width", "core_y", "core_x", "core_height", "core_width", "index", "count")
    IMAGE_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_WIDTH_FIELD_NUMBER: _ClassVar[int]
    Y_FIELD_NUMBER: _ClassVar[int]
    X_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    CORE_Y_FIELD_NUMBER: _ClassVar[int]
    CORE_X_FIELD_NUMBER: _ClassVar[int]
    CORE_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    CORE_WIDTH_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    image_height: int
    image_width: int
    y: int
    x: int
    height: int
    width: int
    core_y: int
    core_x: int
    core_height: int
    core_width: int
    index: int
    count: int
    def __init__(self, image_height: _Optional[int] = ..., image_width: _Optional[int] = ..., y: _Optional[int] = ..., x: _Optional[int] = ..., height: _Optional[int] = ..., width: _Optional[int] = ..., core_y: _Optional[int] = ..., core_x: _Optional[int] = ..., core_height: _Optional[int] = ..., core_width: _Optional[int] = ..., index: _Optional[int] = ..., count: _Optional[int] = ...) -> None: ...

class Batch(_message.Message):
    __slots__ = ("sequence", "cursor_after", "images", "labels", "samples", "substituted", "masks", "classes", "context")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    CURSOR_AFTER_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    SUBSTITUTED_FIELD_NUMBER: _ClassVar[int]
    MASKS_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    cursor_after: int
    images: Tensor
    labels: Tensor
    samples: _containers.RepeatedCompositeFieldContainer[SampleMeta]
    substituted: _containers.RepeatedScalarFieldContainer[int]
    masks: Tensor
    classes: Tensor
    context: _containers.RepeatedCompositeFieldContainer[Tensor]
    def __init__(self, sequence: _Optional[int] = ..., cursor_after: _Optional[int] = ..., images: _Optional[_Union[Tensor, _Mapping]] = ..., labels: _Optional[_Union[Tensor, _Mapping]] = ..., samples: _Optional[_Iterable[_Union[SampleMeta, _Mapping]]] = ..., substituted: _Optional[_Iterable[int]] = ..., masks: _Optional[_Union[Tensor, _Mapping]] = ..., classes: _Optional[_Union[Tensor, _Mapping]] = ..., context: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ...) -> None: ...

class EndOfEpoch(_message.Message):
    __slots__ = ("samples", "cursor", "substituted")
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    SUBSTITUTED_FIELD_NUMBER: _ClassVar[int]
    samples: int
    cursor: int
    substituted: int
    def __init__(self, samples: _Optional[int] = ..., cursor: _Optional[int] = ..., substituted: _Optional[int] = ...) -> None: ...

class StreamResponse(_message.Message):
    __slots__ = ("opened", "batch", "end")
    OPENED_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    opened: SessionOpened
    batch: Batch
    end: EndOfEpoch
    def __init__(self, opened: _Optional[_Union[SessionOpened, _Mapping]] = ..., batch: _Optional[_Union[Batch, _Mapping]] = ..., end: _Optional[_Union[EndOfEpoch, _Mapping]] = ...) -> None: ...
