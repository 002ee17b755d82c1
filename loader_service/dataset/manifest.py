"""Manifests: which slides make a dataset, with their labels and splits.

CSV with a header (``path,label`` at least; optional ``split``, ``id``, ``mpp`` and any other label columns) or
JSON Lines with the same keys; a UTF-8 byte-order mark is allowed. ``mpp`` (microns per pixel at level 0)
overrides the slide's own resolution metadata when given (missing or wrong scanner metadata). Paths are relative to the manifest's folder (absolute paths are allowed but must
still lie under a data root).
"""

from __future__ import annotations

import csv
import json
import math
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
    mpp: float | None = None  # the manifest's µm/px for level 0: overrides the slide's metadata
    base: Path | None = None  # the manifest's folder: what relative paths in other columns are relative to


def _entry(row: dict[str, Any], base: Path, where: str) -> ManifestEntry:
    raw_path = str(row.get("path") or "").strip()
    if not raw_path:
        raise ManifestError(f"{where}: empty `path`; every row needs the slide's path relative to the manifest")
    if "label" not in row or row["label"] is None:
        raise ManifestError(f"{where}: missing `label`; every row needs one (use any string, e.g. 'tumor')")
    label = str(row["label"]).strip()
    if not label:
        raise ManifestError(f"{where}: empty `label`; every row needs one (use any string, e.g. 'tumor' or "
                            "'unlabelled')")
    path = Path(raw_path)
    if not path.is_absolute():
        path = base / path
    known = {"path", "label", "split", "id", "mpp"}
    return ManifestEntry(
        slide_id=str(row.get("id") or raw_path).strip(),
        path=path,
        label=label,
        split=str(row.get("split") or "").strip(),
        extra={k: str(v) for k, v in row.items() if k not in known and v is not None},
        mpp=_mpp(row.get("mpp"), where),
        base=base,
    )


def _mpp(value: Any, where: str) -> float | None:
    """The `mpp` column: empty = the slide's own metadata; else a positive number of microns per pixel."""
    if value is None or str(value).strip() == "":
        return None
    try:
        mpp = float(value)
    except (TypeError, ValueError):
        mpp = math.nan
    if not (math.isfinite(mpp) and 0.01 <= mpp <= 1000.0):
        raise ManifestError(f"{where}: `mpp` {value!r} is not a resolution; give microns per pixel at level 0 "
                            "(e.g. 0.25 for 40x, 0.5 for 20x) or leave it empty to use the slide's metadata")
    return mpp


def read_manifest(manifest: Path) -> list[ManifestEntry]:
    """Parse a manifest; raises ManifestError naming the line for anything malformed."""
    manifest = Path(manifest)
    if not manifest.is_file():
        raise ManifestError(f"manifest {manifest} does not exist or is not a file")
    base = manifest.resolve().parent
    entries: list[ManifestEntry] = []
    if manifest.suffix.lower() == ".csv":
        with manifest.open(newline="", encoding="utf-8-sig") as handle:  # -sig: a byte-order mark is not a column
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
        with manifest.open(encoding="utf-8-sig") as handle:
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
