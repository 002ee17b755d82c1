"""Annotation files into :class:`SlideAnnotations`: GeoJSON (QuPath), ASAP XML, label-mask images (PNG/TIFF).

Coordinates in GeoJSON and ASAP XML are level-0 pixels (QuPath's and ASAP's convention). A label mask is an
integer image whose value v > 0 is class ``str(v)``; its downsample (level-0 pixels per mask pixel) is given or
taken from the slide's width over the mask's. Anything malformed raises :class:`AnnotationError` naming the
file (as the manifest writes it) and the feature.
"""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np

from loader_service.annotations.model import AnnotationError, LabelMask, Shape, SlideAnnotations

__all__ = ["parse_annotations", "parse_geojson", "parse_asap_xml", "read_label_mask", "MASK_SUFFIXES"]

MASK_SUFFIXES = (".png", ".tif", ".tiff")
_MAX_BYTES = 256 * 2**20


def parse_annotations(path: Path, source: str, slide_width: int, downsample: float | None = None) -> SlideAnnotations:
    """The annotations of one file, by its suffix (.geojson/.json, .xml, .png/.tif/.tiff)."""
    suffix = path.suffix.lower()
    if suffix in MASK_SUFFIXES:
        return read_label_mask(path, source, slide_width, downsample)
    try:
        if path.stat().st_size > _MAX_BYTES:
            raise AnnotationError(f"annotation file {source}: larger than {_MAX_BYTES >> 20} MiB; simplify it")
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise AnnotationError(f"annotation file {source}: cannot be read ({type(err).__name__}: {err})",
                              "annotation_unreadable") from err
    if suffix in (".geojson", ".json"):
        return parse_geojson(text, source)
    if suffix == ".xml":
        return parse_asap_xml(text, source)
    raise AnnotationError(f"annotation file {source}: unknown format {suffix!r}; use .geojson (QuPath), .xml (ASAP), "
                          ".png or .tif (label mask)", "annotation_format")


def _finish(source: str, shapes: list[Shape]) -> SlideAnnotations:
    return SlideAnnotations(source, tuple(shapes), None, tuple(sorted({s.name for s in shapes})))


def _ring(coords: Any, where: str) -> np.ndarray:
    try:
        ring = np.asarray(coords, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise AnnotationError(f"{where}: coordinates are not numbers ({err})") from err
    if ring.ndim != 2 or ring.shape[1] < 2 or len(ring) < 3:
        raise AnnotationError(f"{where}: a ring needs at least 3 [x, y] points (got shape {ring.shape})")
    if not np.isfinite(ring).all():
        raise AnnotationError(f"{where}: coordinates must be finite numbers")
    ring = ring[:, :2]
    return ring[:-1] if len(ring) > 3 and (ring[0] == ring[-1]).all() else ring


def _class_name(props: Any, where: str) -> str:
    """QuPath: ``properties.classification.name``, or a plain ``properties.classification`` string
    (also ``properties.name`` / ``properties.label`` when there is no classification)."""
    if not isinstance(props, dict):
        raise AnnotationError(f"{where}: `properties` must be an object with a `classification`")
    value = props.get("classification")
    if isinstance(value, dict):
        value = value.get("name")
    if value is None:
        value = props.get("name", props.get("label"))
    if not isinstance(value, (str, int)) or str(value).strip() in ("", "background"):
        raise AnnotationError(f"{where}: no class name; give properties.classification.name (QuPath) or "
                              "properties.classification as a string (not 'background', which is class 0)")
    return str(value).strip()


def parse_geojson(text: str, source: str) -> SlideAnnotations:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise AnnotationError(f"annotation file {source}: not valid JSON at line {err.lineno} ({err.msg})") from err
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        features = data.get("features")
    elif isinstance(data, list):  # QuPath's "export as array"
        features = data
    elif isinstance(data, dict) and data.get("type") == "Feature":
        features = [data]
    else:
        raise AnnotationError(f"annotation file {source}: expected a GeoJSON FeatureCollection, a Feature or an array "
                              "of Features")
    if not isinstance(features, list):
        raise AnnotationError(f"annotation file {source}: `features` must be an array")
    shapes: list[Shape] = []
    for i, feature in enumerate(features):
        where = f"annotation file {source}, feature {i}"
        if not isinstance(feature, dict) or not isinstance(feature.get("geometry"), dict):
            raise AnnotationError(f"{where}: a Feature needs a `geometry` object")
        name = _class_name(feature.get("properties"), where)
        geometry = feature["geometry"]
        kind, coords = geometry.get("type"), geometry.get("coordinates")
        if kind == "Polygon":
            polygons = [coords]
        elif kind == "MultiPolygon":
            polygons = coords
        else:
            raise AnnotationError(f"{where}: geometry type {kind!r} has no area; use Polygon or MultiPolygon")
        if not isinstance(polygons, list) or not all(isinstance(p, list) and p for p in polygons):
            raise AnnotationError(f"{where}: {kind} coordinates must be a list of rings")
        rings = tuple(_ring(r, f"{where} ({kind})") for polygon in polygons for r in polygon)
        shapes.append(Shape(name, rings))
    return _finish(source, shapes)


def parse_asap_xml(text: str, source: str) -> SlideAnnotations:
    """ASAP: ``Annotations/Annotation[@PartOfGroup, @Type]/Coordinates/Coordinate[@Order, @X, @Y]``."""
    try:
        root = ET.fromstring(text)
    except ET.ParseError as err:
        raise AnnotationError(f"annotation file {source}: not well-formed XML ({err})") from err
    found = root.find("Annotations")
    annotations = found.findall("Annotation") if found is not None else root.findall(".//Annotation")
    shapes: list[Shape] = []
    for i, node in enumerate(annotations):
        where = f"annotation file {source}, annotation {i} ({node.get('Name', '')!r})"
        kind = (node.get("Type") or "Polygon").lower()
        if kind not in ("polygon", "rectangle", "spline"):
            raise AnnotationError(f"{where}: type {node.get('Type')!r} has no area; use Polygon or Rectangle")
        name = (node.get("PartOfGroup") or "").strip()
        if not name or name in ("None", "background"):
            raise AnnotationError(f"{where}: no class; set PartOfGroup to the class name")
        points = []
        for c in node.iter("Coordinate"):
            try:
                points.append((float(c.get("Order", len(points))), float(c.get("X", "")), float(c.get("Y", ""))))
            except ValueError as err:
                raise AnnotationError(f"{where}: a Coordinate needs numeric X and Y ({err})") from err
        points.sort(key=lambda p: p[0])
        shapes.append(Shape(name, (_ring([p[1:] for p in points], where),)))
    return _finish(source, shapes)


def read_label_mask(path: Path, source: str, slide_width: int, downsample: float | None = None) -> SlideAnnotations:
    """A label-mask image; a pyramidal TIFF is read at its first (full) page. ``downsample`` None: slide width /
    mask width."""
    try:
        if path.suffix.lower() == ".png":
            from PIL import Image

            with Image.open(path) as image:
                values = np.asarray(image)
        else:
            import tifffile

            values = tifffile.imread(path, key=0)
    except Exception as err:  # noqa: BLE001 - any decoder failure is this file's fault
        raise AnnotationError(f"annotation file {source}: not a readable label image ({type(err).__name__}: {err})",
                              "annotation_unreadable") from err
    if values.ndim != 2 or not np.issubdtype(values.dtype, np.integer) or (values.size and values.min() < 0):
        raise AnnotationError(f"annotation file {source}: a label mask must be one channel of non-negative integers "
                              f"(got {values.dtype} {values.shape})")
    if values.size == 0:
        raise AnnotationError(f"annotation file {source}: the label mask is empty")
    ds = downsample if downsample else slide_width / values.shape[1]
    if not (math.isfinite(ds) and ds > 0):
        raise AnnotationError(f"annotation file {source}: downsample {ds} must be > 0")
    values = values.astype(np.int64)
    names = tuple(sorted(str(int(v)) for v in np.unique(values) if v > 0))
    return SlideAnnotations(source, (), LabelMask(values, float(ds)), names)
