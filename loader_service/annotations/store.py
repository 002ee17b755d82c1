"""Annotation files of a dataset's slides, opened with the slides' data-root checks, parsed once and cached."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from loader_service.annotations.model import AnnotationError, SlideAnnotations
from loader_service.annotations.parse import parse_annotations
from loader_service.dataset import SlideRecord
from loader_service.dataset.index import is_under_roots

__all__ = ["AnnotationStore", "COLUMN", "DOWNSAMPLE_COLUMN"]

log = logging.getLogger(__name__)

COLUMN = "annotation"  # manifest column naming a slide's annotation file (relative to the manifest)
DOWNSAMPLE_COLUMN = "annotation_downsample"  # label masks: level-0 pixels per mask pixel (empty: from the widths)


class AnnotationStore:
    """``load(record)``: the slide's annotations, None when its manifest row names none; raises AnnotationError.

    Every load checks, like a slide open, that the file resolves inside the slide's data roots, before and after
    reading; results (and errors) are cached per (path, size, mtime), so an edited file is read again.
    """

    def __init__(self) -> None:
        self._cache: dict[tuple[object, ...], SlideAnnotations | AnnotationError] = {}
        self._lock = threading.Lock()

    def load(self, record: SlideRecord) -> SlideAnnotations | None:
        written = record.entry.extra.get(COLUMN, "").strip()
        if not written:
            return None
        base = record.entry.base or record.entry.path.parent
        path = Path(written) if Path(written).is_absolute() else base / written
        if path.is_absolute() and Path(written).is_absolute():
            written = path.name  # messages reach clients: never the server's absolute paths
        self._check_roots(path, written, record)
        try:
            st = os.stat(path)
        except OSError as err:
            raise AnnotationError(f"annotation file {written}: cannot be opened ({err.strerror})",
                                  "annotation_missing") from err
        key = (os.path.realpath(path), st.st_size, st.st_mtime_ns, record.entry.extra.get(DOWNSAMPLE_COLUMN, ""))
        with self._lock:
            found = self._cache.get(key)
        if found is None:
            found = self._parse(path, written, record)
            self._check_roots(path, written, record)  # swapped for a link while it was read
            with self._lock:
                self._cache[key] = found
        if isinstance(found, AnnotationError):
            raise found
        return found

    @staticmethod
    def _check_roots(path: Path, written: str, record: SlideRecord) -> None:
        if record.roots and not is_under_roots(path, record.roots):
            raise AnnotationError(f"annotation file {written}: resolves outside the data roots; put it beside the "
                                  "slides", "annotation_outside_roots")

    @staticmethod
    def _parse(path: Path, written: str, record: SlideRecord) -> SlideAnnotations | AnnotationError:
        downsample_text = record.entry.extra.get(DOWNSAMPLE_COLUMN, "").strip()
        try:
            downsample = float(downsample_text) if downsample_text else None
            width = record.info.levels[0].width if record.info is not None else 0
            return parse_annotations(path, written, width, downsample)
        except AnnotationError as err:
            found = err
        except ValueError:
            found = AnnotationError(f"annotation file {written}: `{DOWNSAMPLE_COLUMN}` {downsample_text!r} is not a "
                                    "number; give level-0 pixels per mask pixel, or leave it empty")
        except Exception as err:  # noqa: BLE001 - a file the parsers did not foresee must not stop the session
            log.warning("annotation file %s of slide %s", path, record.slide_id, exc_info=True)
            found = AnnotationError(f"annotation file {written}: cannot be parsed ({type(err).__name__}); check it "
                                    "against the format in docs/annotations.md")
        log.warning("slide %s left out of annotation sessions: %s", record.slide_id, found)
        return found
