"""Typed errors of the slide-reading layer.

Every failure to open or read a slide surfaces as a :class:`SlideError` subclass that names the
file, the cause and what to do about it; the underlying library exception is chained
(``raise ... from err``) so the detail is still in the traceback.
"""

from __future__ import annotations

import os

__all__ = ["SlideError", "SlideOpenError", "SlideReadError"]


class SlideError(Exception):
    """A slide could not be used. ``path`` names the file, ``reason`` the cause."""

    default_hint = "check that the file is a whole-slide image this service supports"

    def __init__(self, path: str | os.PathLike[str], reason: str, hint: str | None = None) -> None:
        self.path = os.fspath(path)
        self.reason = reason
        self.hint = self.default_hint if hint is None else hint
        super().__init__(self.path, reason, self.hint)

    def __str__(self) -> str:
        text = f"{self.path}: {self.reason}"
        if self.hint:
            text += f" ({self.hint})"
        return text


class SlideOpenError(SlideError):
    """The file could not be opened as a slide (missing, empty, truncated, not a slide, unsupported)."""

    default_hint = (
        "check that the file is complete and is a tiled pyramidal TIFF, Aperio SVS, OME-TIFF or "
        "another format OpenSlide reads (e.g. DICOM); re-copy or re-export it, or remove it from "
        "the manifest"
    )


class SlideReadError(SlideError):
    """Pixels of an opened slide could not be read (corrupt tile data, file changed or truncated).

    ``level`` and ``tile`` name the damaged tile when known; ``known`` is true when the tile was not read
    at all because an earlier read found it damaged (see :class:`BadTiles`).
    """

    default_hint = (
        "the file's image data is damaged or the file changed since it was opened; re-copy it or "
        "remove it from the manifest"
    )

    def __init__(self, path: str | os.PathLike[str], reason: str, hint: str | None = None, *,
                 level: int | None = None, tile: int | None = None, known: bool = False) -> None:
        super().__init__(path, reason, hint)
        self.level, self.tile, self.known = level, tile, known
