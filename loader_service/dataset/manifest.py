"""Manifests: which slides make a dataset, with their labels and splits.

CSV with a header (``path,label`` at least; optional ``split``, ``id`` and any other label columns) or JSON
Lines with the same keys. Paths are relative to the manifest's folder (absolute paths are allowed but must
still lie under a data root).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["ManifestEntry", "ManifestError", "read_manifest"]


class ManifestError(ValueError):
    """A manifest that cannot be used; the message names the file, the line and what to fix."""


@dataclass(frozen=True)
class ManifestEntry:
    slide_id: str  # what clients name the slide by: the `id` column, else the path as written
    path: Path  # absolute, not yet resolved against the data roots
    label: str
    split: str = ""
    extra: dict[str, str] = field(default_factory=dict)


def _entry(row: dict[str, Any], base: Path, where: str) -> ManifestEntry:
    raw_path = str(row.get("path") or "").strip()
    if not raw_path:
        raise ManifestError(f"{where}: empty `path`; every row needs the slide's path relative to the manifest")
    if "label" not in row or row["label"] is None:
        raise ManifestError(f"{where}: missing `label`; every row needs one (use any string, e.g. 'tumor')")
    path = Path(raw_path)
    if not path.is_absolute():
        path = base / path
    known = {"path", "label", "split", "id"}
    return ManifestEntry(
        slide_id=str(row.get("id") or raw_path).strip(),
        path=path,
        label=str(row["label"]).strip(),
        split=str(row.get("split") or "").strip(),
        extra={k: str(v) for k, v in row.items() if k not in known and v is not None},
    )


def read_manifest(manifest: Path) -> list[ManifestEntry]:
    """Parse a manifest; raises ManifestError naming the line for anything malformed."""
    manifest = Path(manifest)
    if not manifest.is_file():
        raise ManifestError(f"manifest {manifest} does not exist or is not a file")
    base = manifest.resolve().parent
    entries: list[ManifestEntry] = []
    if manifest.suffix.lower() == ".csv":
        with manifest.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            header = reader.fieldnames or []
            missing = {"path", "label"} - set(header)
            if missing:
                raise ManifestError(
                    f"{manifest}: header {header} lacks {sorted(missing)}; the first line must name the columns, "
                    "e.g. `path,label,split`"
                )
            for line, row in enumerate(reader, start=2):
                entries.append(_entry(row, base, f"{manifest}:{line}"))
    else:
        with manifest.open(encoding="utf-8") as handle:
            for line, text in enumerate(handle, start=1):
                if not text.strip():
                    continue
                try:
                    row = json.loads(text)
                except json.JSONDecodeError as err:
                    raise ManifestError(f"{manifest}:{line}: not valid JSON ({err.msg})") from err
                if not isinstance(row, dict):
                    raise ManifestError(f"{manifest}:{line}: each line must be a JSON object with `path` and `label`")
                entries.append(_entry(row, base, f"{manifest}:{line}"))
    seen: set[str] = set()
    for entry in entries:
        if entry.slide_id in seen:
            raise ManifestError(f"{manifest}: slide id {entry.slide_id!r} appears twice; ids (or paths) must be unique")
        seen.add(entry.slide_id)
    if not entries:
        raise ManifestError(f"{manifest}: no slides listed")
    return entries
