"""The gRPC data plane: tensor bytes inside the Batch message."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import numpy as np
import torch

from loader_service.context import resampled_mpp
from loader_service.sampling import SampleRun
from wsi_loader.v1 import loader_pb2 as pb

if TYPE_CHECKING:
    from loader_service.pipeline import BuiltBatch

__all__ = ["encode_tensor", "fill_tensor", "batch_response", "sample_meta", "warm_up"]


def fill_tensor(message: pb.Tensor, tensor: torch.Tensor | np.ndarray) -> None:
    """Write ``tensor`` into ``message`` as dtype, shape and bytes (one copy into ``bytes``, one by protobuf)."""
    array = tensor.numpy() if isinstance(tensor, torch.Tensor) else tensor
    array = np.ascontiguousarray(array)
    message.dtype = array.dtype.name
    message.shape.extend(array.shape)
    message.data = array.tobytes()


def encode_tensor(tensor: torch.Tensor | np.ndarray) -> pb.Tensor:
    message = pb.Tensor()
    fill_tensor(message, tensor)
    return message


def sample_meta(built: BuiltBatch, labels: list[str]) -> list[pb.SampleMeta]:
    """The batch's per-sample metadata as messages (see :func:`add_sample_meta`)."""
    holder = pb.Batch()
    add_sample_meta(holder, built, labels)
    return list(holder.samples)


def add_sample_meta(batch: pb.Batch, built: BuiltBatch, labels: list[str]) -> None:
    """Append one SampleMeta per sample to ``batch.samples``, made in place (``add``: no message copied);
    fields at their default (no piece, no context) are left unset, which reads the same."""
    piece = None
    if built.piece is not None:
        p = built.piece
        piece = pb.Piece(image_height=p.image_hw[0], image_width=p.image_hw[1], y=p.rect.y, x=p.rect.x,
                         height=p.rect.height, width=p.rect.width, core_y=p.core.y, core_x=p.core.x,
                         core_height=p.core.height, core_width=p.core.width, index=p.index, count=p.count)
    if piece is None and not built.context_samples and isinstance(built.samples, SampleRun) and len(built.samples):
        _add_run_meta(batch, built.samples, built.labels.tolist(), labels)
        return
    add = batch.samples.add
    slide_ids: dict[int, str] = {}
    for i, (sample, label) in enumerate(zip(built.samples, built.labels.tolist())):
        record = sample.record
        slide_id = slide_ids.get(id(record))
        if slide_id is None:
            slide_id = slide_ids[id(record)] = record.slide_id
        meta = add(slide_id=slide_id, level=sample.level, mpp=sample.mpp, x=sample.x, y=sample.y,
                   width=sample.width, height=sample.height, label=labels[label], label_index=label,
                   index=sample.index, padding=sample.padding, substituted=bool(sample.substituted))
        if piece is not None:
            meta.piece.CopyFrom(piece)
        if built.context_samples:
            meta.context.extend(pb.ContextPlace(level=c[i].level, mpp=resampled_mpp(c[i]), x=c[i].x, y=c[i].y,
                                                size=c[i].width) for c in built.context_samples)


def _add_run_meta(batch: pb.Batch, run: SampleRun, label_of: list[int], labels: list[str]) -> None:
    """:func:`add_sample_meta` of a run (no piece, no context): one template per slide, one compiled call
    (``_meta_kernel``), one parse."""
    from ._meta_kernel import MAX_EXTRA_BYTES, encode_run_meta  # numba: imported on first use

    grouped = run.groups()
    first = grouped.order[grouped.starts[:-1]].tolist()  # a sample of each slide: the slide's label
    made = [_template(run.fields[s]["record"].slide_id, run.fields[s]["level"], run.fields[s]["mpp"], run.width,
                      run.height, labels[label_of[i]], label_of[i]) for s, i in zip(grouped.slides, first)]
    starts = np.cumsum([0] + [len(t) for t in made])
    templates = np.frombuffer(bytearray(b"".join(made)) or bytearray(1), np.uint8)  # writable, as the kernel takes
    index = np.arange(run.start, run.start + len(run), dtype=np.int64)
    out = np.empty((max(len(t) for t in made) + MAX_EXTRA_BYTES) * len(run), np.uint8)
    size = encode_run_meta(templates, starts.astype(np.int64), grouped.inverse, run.x, run.y, index, out)
    batch.MergeFromString(out[:size].tobytes())


@functools.lru_cache(maxsize=4096)
def _template(slide_id: str, level: int, mpp: float, width: int, height: int, label: str, label_index: int) -> bytes:
    """The serialised ``SampleMeta`` fields a slide's samples share (x, y and index left out)."""
    return pb.SampleMeta(slide_id=slide_id, level=level, mpp=mpp, width=width, height=height, label=label,
                         label_index=label_index).SerializeToString()


def warm_up() -> None:
    """Compile (or load from numba's cache) the batch message's kernel now, not on the first batch."""
    from . import _meta_kernel  # noqa: F401 - its kernel is compiled when it is imported


def batch_response(built: BuiltBatch, sequence: int, cursor_after: int, labels: list[str],
                   images: pb.Tensor | None = None) -> pb.StreamResponse:
    """The message carrying one batch; ``images`` is a slot reference, or None to send the pixels as bytes.

    Built in place: passing a tensor message as a keyword of nested messages makes upb copy its bytes several
    times (12 ms instead of under 1 ms for a 12 MiB batch, measured)."""
    message = pb.StreamResponse()
    batch = message.batch
    batch.sequence = sequence
    batch.cursor_after = cursor_after
    if images is None:
        fill_tensor(batch.images, built.images)
    else:
        batch.images.CopyFrom(images)
    fill_tensor(batch.labels, built.labels)
    add_sample_meta(batch, built, labels)
    if not isinstance(built.samples, SampleRun):  # a run has no substitutes
        batch.substituted.extend(s.index for s in built.samples if s.substituted)
    if built.masks is not None:
        fill_tensor(batch.masks, built.masks)
    if built.classes is not None:
        fill_tensor(batch.classes, built.classes)
    for tensor in built.context:
        fill_tensor(batch.context.add(), tensor)
    return message
