"""Annotated test data: real slides, annotation files of every kind (and broken ones), and a reference classifier.

The reference is deliberately simple and independent of ``loader_service.annotations``: a per-point even-odd
ray cast in plain Python over every ring of a shape, shapes painted in file order.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from PIL import Image

from loader_service.synthetic import write_synthetic_slide

SIZE = 1024  # slides are SIZE x SIZE at level 0, mpp 0.5, pyramidal (level 1 downsample 2)

# (class, [polygon: [exterior, hole, ...], ...]) in level-0 pixels
SHAPES_A: list[tuple[str, list[list[list[tuple[float, float]]]]]] = [
    ("tumor", [[[(96, 96), (608, 96), (608, 608), (96, 608)],          # square with a square hole
                [(256, 256), (448, 256), (448, 448), (256, 448)]]]),
    ("stroma", [[[(704, 64), (1000, 64), (1000, 300)]],                 # multipolygon: a triangle ...
                [[(120.5, 700.25), (400, 700.25), (400, 990), (120.5, 990)]]]),  # ... and a rectangle
    ("necrosis", [[[(800, 600), (960, 760), (800, 920), (640, 760)]]]),  # a diamond (slanted edges)
    ("stroma", [[[(300, 300), (400, 300), (400, 400), (300, 400)]]]),    # inside tumor's hole: painted later
]


def _geojson(shapes: list, plain_names: bool) -> str:
    features = []
    for i, (name, polygons) in enumerate(shapes):
        coords = [[[list(p) + [] for p in ring] + [list(ring[0])] for ring in polygon] for polygon in polygons]
        geometry = ({"type": "Polygon", "coordinates": coords[0]} if len(coords) == 1
                    else {"type": "MultiPolygon", "coordinates": coords})
        cls: object = name if (plain_names and i % 2) else {"name": name, "color": [255, 0, 0]}
        features.append({"type": "Feature", "id": f"f{i}", "geometry": geometry,
                         "properties": {"objectType": "annotation", "classification": cls}})
    return json.dumps({"type": "FeatureCollection", "features": features})


SHAPES_B = [("tumor", [[[(512, 512), (900, 512), (900, 900), (512, 900)]]]),
            ("stroma", [[[(50, 60), (400, 80), (300, 450), (60, 300)]]])]


def _asap(shapes: list) -> str:
    parts = ['<?xml version="1.0"?>', "<ASAP_Annotations>", "<Annotations>"]
    for i, (name, polygons) in enumerate(shapes):
        parts.append(f'<Annotation Name="A{i}" Type="Polygon" PartOfGroup="{name}" Color="#F4FA58"><Coordinates>')
        for order, (x, y) in enumerate(polygons[0][0]):
            parts.append(f'<Coordinate Order="{order}" X="{x}" Y="{y}" />')
        parts.append("</Coordinates></Annotation>")
    parts += ["</Annotations>", "<AnnotationGroups />", "</ASAP_Annotations>"]
    return "\n".join(parts)


def label_mask_c() -> np.ndarray:
    """Label mask of slide c at downsample 4: class "1" on the left half's middle, "2" in a corner."""
    values = np.zeros((SIZE // 4, SIZE // 4), dtype=np.uint8)
    values[64:192, 16:128] = 1
    values[200:250, 200:250] = 2
    return values


SHAPES_G = [("tumor", [[[(200, 150), (700, 150), (700, 500), (200, 500)]]]),
            ("stroma", [[[(600.25, 600.25), (950.25, 700.25), (700.25, 980.25)]]])]
DARK, LIGHT = (60, 20, 120), (230, 180, 200)


def write_painted_slide(root: Path) -> None:
    """Slide g: lossless, its pixels painted DARK exactly where SHAPES_G are (pixel centres), LIGHT elsewhere; so
    the image itself shows where its mask must be. Manifest ``painted.csv``."""
    from tests.slide_fixtures import pyramid_levels, write_tifffile_pyramid

    cy, cx = np.mgrid[0:SIZE, 0:SIZE] + 0.5
    inside = (cx >= 200) & (cx < 700) & (cy >= 150) & (cy < 500)
    (ax, ay), (bx, by), (qx, qy) = SHAPES_G[1][1][0][0]
    corners = [(ax, ay), (bx, by), (qx, qy)]
    side = [(x1 - x0) * (cy - y0) - (y1 - y0) * (cx - x0) for (x0, y0), (x1, y1) in zip(corners, corners[1:] + corners[:1])]
    inside |= ((side[0] > 0) & (side[1] > 0) & (side[2] > 0)) | ((side[0] < 0) & (side[1] < 0) & (side[2] < 0))
    image = np.where(inside[..., None], np.array(DARK, np.uint8), np.array(LIGHT, np.uint8)).astype(np.uint8)
    write_tifffile_pyramid(root / "g.tiff", pyramid_levels(image, 2), "deflate", mpp=0.5)
    (root / "g.geojson").write_text(_geojson(SHAPES_G, plain_names=False))
    with open(root / "painted.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "label", "id", "annotation"])
        writer.writeheader()
        writer.writerow({"path": "g.tiff", "label": "x", "id": "g", "annotation": "g.geojson"})


def write_annotated_dataset(root: Path, outside: Path) -> None:
    """Slides a (GeoJSON), b (ASAP XML), c (PNG label mask); d, e with broken files; f with a file outside the
    data roots. Manifests: ``good.csv`` (a, b), ``mask.csv`` (c), ``bad.csv`` (a, d, e, f)."""
    for i, name in enumerate("abcdef"):
        write_synthetic_slide(root / f"{name}.tiff", SIZE, SIZE, seed=80 + i, quality=85, mpp=0.5)
    (root / "a.geojson").write_text(_geojson(SHAPES_A, plain_names=True))
    (root / "b.xml").write_text(_asap(SHAPES_B))
    Image.fromarray(label_mask_c()).save(root / "c.png")
    bad = json.loads(_geojson(SHAPES_A[:2], plain_names=False))
    bad["features"][1]["geometry"] = {"type": "Polygon", "coordinates": [[[1, 2], [3, "x"], [5, 6]]]}
    (root / "d.geojson").write_text(json.dumps(bad))
    (root / "e.xml").write_text(_asap(SHAPES_B)[:-30])  # truncated: not well-formed
    (outside / "f.geojson").write_text(_geojson(SHAPES_A, plain_names=False))
    rows = {"a": "a.geojson", "b": "b.xml", "c": "c.png", "d": "d.geojson", "e": "e.xml",
            "f": str(outside / "f.geojson")}
    (root / "link.geojson").symlink_to(outside / "f.geojson")  # inside the root by name, outside by target
    with open(root / "link.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "label", "id", "annotation"])
        writer.writeheader()
        writer.writerows([{"path": "a.tiff", "label": "x", "id": "a", "annotation": "a.geojson"},
                          {"path": "b.tiff", "label": "x", "id": "b", "annotation": "link.geojson"}])
    for manifest, names in (("good.csv", "ab"), ("mask.csv", "c"), ("bad.csv", "adef")):
        with open(root / manifest, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["path", "label", "id", "annotation"])
            writer.writeheader()
            for n in names:
                writer.writerow({"path": f"{n}.tiff", "label": "x", "id": n, "annotation": rows[n]})


# ---------------------------------------------------------------- reference
def _inside(rings: list[list[tuple[float, float]]], px: float, py: float) -> bool:
    inside = False
    for ring in rings:
        for (x0, y0), (x1, y1) in zip(ring, ring[1:] + ring[:1]):
            if min(y0, y1) <= py < max(y0, y1):
                if x0 + (py - y0) * (x1 - x0) / (y1 - y0) > px:
                    inside = not inside
    return inside


def reference_class(shapes: list, classes: list[str], px: float, py: float) -> int:
    found = 0
    for name, polygons in shapes:
        if _inside([ring for polygon in polygons for ring in polygon], px, py):
            found = classes.index(name)
    return found


def reference_mask(shapes: list, classes: list[str], x: int, y: int, w: int, h: int, downsample: float) -> np.ndarray:
    """Class of each pixel of a level region: pixel (i, j) is its centre ((x + j + 0.5), (y + i + 0.5)) in level
    coordinates, times the downsample in level-0 pixels."""
    out = np.zeros((h, w), dtype=np.uint8)
    for i in range(h):
        for j in range(w):
            out[i, j] = reference_class(shapes, classes, (x + j + 0.5) * downsample, (y + i + 0.5) * downsample)
    return out
