"""DescribeDataset's annotation fields: what each slide's file holds, or why it cannot be used."""

from __future__ import annotations

from collections.abc import Sequence

from loader_service.annotations.options import AnnotationOptions
from loader_service.annotations.sampling import SessionAnnotations
from loader_service.annotations.store import COLUMN, AnnotationStore
from loader_service.dataset import SlideRecord
from wsi_loader.v1 import loader_pb2 as pb

__all__ = ["describe_annotations"]


def describe_annotations(info: pb.DatasetInfo, records: Sequence[SlideRecord], store: AnnotationStore) -> None:
    """Fill the annotation fields of ``info`` (whose slides are ``records``, in order); nothing without a column."""
    if not any(COLUMN in r.entry.extra for r in records):
        return
    usable = [r for r in records if r.usable]
    session = SessionAnnotations(AnnotationOptions(), store, usable)
    info.annotation_classes.extend(session.classes)
    for summary, record in zip(info.slides, records):
        error = session.errors.get(record.path)
        found = session.annotations(record) if record.usable else None
        if error is not None:
            summary.annotation_error = str(error)
        elif found is not None:
            summary.annotation_classes.extend(found.names)
