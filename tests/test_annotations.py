"""Annotations (#18 part A): parsing, rasterising on pixel centres, annotation sampling, masks in every view.

Real slides and annotation files written by fixtures, a real server on loopback, the real client.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from loader_service.annotations import AnnotationError, inside_grid, inside_points, parse_asap_xml, parse_geojson
from loader_service.augment import AugmentConfig, draw_params
from loader_service.config import DatasetConfig
from loader_service.server import LoaderServer
from tests.annotation_fixtures import (SHAPES_A, SHAPES_B, SIZE, label_mask_c, reference_class, reference_mask,
                                       write_annotated_dataset, write_painted_slide, DARK, LIGHT)
from tests.conftest import make_config
from trainer_client import LoaderClient, StreamConfig
from trainer_client.errors import InvalidRequestError
from trainer_client.views import crop_core, stitch_tiles

GEOMETRY_ONLY = dict(flip=True, rot90=True, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0, hed_sigma=0.0,
                     hed_bias=0.0, blur_prob=0.0)


@pytest.fixture(scope="module")
def ann_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoaderServer]:
    root = tmp_path_factory.mktemp("annotated")
    outside = tmp_path_factory.mktemp("outside-roots")
    write_annotated_dataset(root, outside)
    write_painted_slide(root)
    datasets = tuple(DatasetConfig(n, root / f"{n}.csv") for n in ("good", "mask", "bad", "painted", "link"))
    config = make_config(root, datasets=datasets, tissue_cache_dir=None, tissue_max_size=256)
    with LoaderServer(config) as server:
        yield server


def _run(server: LoaderServer, *, state: dict[str, Any] | None = None, stop_after: int | None = None,
         **kw: Any) -> tuple[list[dict[str, Any]], Any]:
    values: dict[str, Any] = dict(dataset="good", batch_size=8, patch_size=32, level=1, samples_per_epoch=64,
                                  seed=3, augment=False, transport="grpc", tissue_threshold=0.0)
    values.update(kw)
    with LoaderClient(f"127.0.0.1:{server.port}", timeout_s=60) as client:
        stream = client.stream(StreamConfig(**values))
        if state is not None:
            stream.load_state_dict(state)
        batches = []
        for batch in stream:
            batches.append(batch)
            if stop_after is not None and len(batches) == stop_after:
                saved = stream.state_dict()
                stream.close_stream()
                return batches, saved
        return batches, stream


def _shapes(slide_id: str) -> list:
    return SHAPES_A if slide_id == "a" else SHAPES_B


CLASSES = ["background", "necrosis", "stroma", "tumor"]  # the good dataset's vocabulary


# ---------------------------------------------------------------- rasterising
def test_rasteriser_matches_reference_on_pixel_centres() -> None:
    """Holes, multipolygons, slanted edges and later shapes painted over earlier ones: every pixel centre of a
    grid (at level-0 and at a downsample of 2.5) classified as the plain-Python even-odd reference does."""
    from tests.annotation_fixtures import _geojson

    parsed = parse_geojson(_geojson(SHAPES_A, plain_names=True), "a.geojson")
    assert parsed.names == ("necrosis", "stroma", "tumor")
    index = {name: i for i, name in enumerate(CLASSES)}
    for downsample, (x, y, w, h) in ((1.0, (80, 80, 60, 40)), (1.0, (240, 240, 50, 50)), (2.5, (20, 20, 400, 12)),
                                     (1.0, (630, 590, 340, 30)), (1.0, (110, 690, 20, 20))):
        xs = (x + np.arange(w) + 0.5) * downsample
        ys = (y + np.arange(h) + 0.5) * downsample
        got = parsed.classify_grid(xs, ys, index)
        want = reference_mask(SHAPES_A, CLASSES, x, y, w, h, downsample)
        assert (got == want).all(), f"region {(x, y, w, h)} at downsample {downsample}"
        gx, gy = np.meshgrid(xs, ys)
        assert (parsed.classify_points(gx.ravel(), gy.ravel(), index).reshape(h, w) == want).all()
    # hand-checked: the tumor square [96, 608) with hole [256, 448); centres on both sides of each edge
    edges = parsed.shapes[0].edges
    assert inside_points(edges, np.array([96.5, 95.5, 255.5, 256.5, 607.5, 608.5]), np.full(6, 100.5)).tolist() == \
        [True, False, True, True, True, False]
    assert inside_grid(edges, np.array([300.5]), np.array([255.5, 256.5])).ravel().tolist() == [True, False]


def test_asap_xml_and_label_mask_classes(ann_server: LoaderServer) -> None:
    from tests.annotation_fixtures import _asap

    parsed = parse_asap_xml(_asap(SHAPES_B), "b.xml")
    assert [s.name for s in parsed.shapes] == ["tumor", "stroma"]
    index = {"background": 0, "stroma": 1, "tumor": 2}
    pts = np.array([[600.0, 600.0], [100.0, 100.0], [1000.0, 20.0]])
    assert parsed.classify_points(pts[:, 0], pts[:, 1], index).tolist() == [2, 1, 0]
    # the label-mask slide through the service: class names are the values, the downsample SIZE / mask width
    batches, stream = _run(ann_server, dataset="mask", masks=True, mode="grid", level=0, patch_size=64,
                           annotation_region="annotated")
    assert stream.annotation_classes == ["background", "1", "2"]
    values = label_mask_c()
    for batch in batches:
        for k in range(batch["images"].shape[0]):
            x, y = int(batch["x"][k]), int(batch["y"][k])
            want = values[np.arange(y, y + 64)[:, None] // 4, np.arange(x, x + 64)[None, :] // 4]
            assert (batch["masks"][k].numpy() == want).all()
            assert int(batch["classes"][k]) == values[(y + 32) // 4, (x + 32) // 4] > 0


# ---------------------------------------------------------------- malformed files
def test_malformed_files_left_out_with_counted_reason(ann_server: LoaderServer) -> None:
    before = {r: ann_server.metrics.sample("wsi_loader_slides_skipped_total", {"reason": r}) or 0
              for r in ("annotation_malformed", "annotation_outside_roots")}
    batches, stream = _run(ann_server, dataset="bad", annotation_region="annotated", masks=True)
    skipped = {s.split(":", 1)[0]: s for s in stream.skipped_slides}
    assert set(skipped) == {"d", "e", "f"}
    assert "annotation file d.geojson, feature 1" in skipped["d"] and "not numbers" in skipped["d"]
    assert "annotation file e.xml" in skipped["e"] and "not well-formed XML" in skipped["e"]
    assert "annotation file f.geojson: resolves outside the data roots" in skipped["f"] and "/" not in skipped["f"]
    assert {sid for b in batches for sid in b["slide_id"]} == {"a"}
    after = {r: ann_server.metrics.sample("wsi_loader_slides_skipped_total", {"reason": r}) for r in before}
    assert after["annotation_malformed"] - before["annotation_malformed"] == 2
    assert after["annotation_outside_roots"] - before["annotation_outside_roots"] == 1
    # the server keeps serving: a good session right after
    assert _run(ann_server, samples_per_epoch=8)[0]


def test_parsers_name_file_and_feature() -> None:
    with pytest.raises(AnnotationError, match=r"annotation file x.geojson, feature 0: geometry type 'Point'"):
        parse_geojson('{"type": "FeatureCollection", "features": [{"type": "Feature", "geometry": '
                      '{"type": "Point", "coordinates": [1, 2]}, "properties": {"classification": "t"}}]}',
                      "x.geojson")
    with pytest.raises(AnnotationError, match=r"annotation file y.xml, annotation 0 .*PartOfGroup"):
        parse_asap_xml('<ASAP_Annotations><Annotations><Annotation Name="n" Type="Polygon"><Coordinates>'
                       '<Coordinate Order="0" X="1" Y="1"/></Coordinates></Annotation></Annotations>'
                       '</ASAP_Annotations>', "y.xml")


def test_unknown_class_is_invalid_request(ann_server: LoaderServer) -> None:
    with pytest.raises(InvalidRequestError, match="appear in no readable annotation file"):
        _run(ann_server, annotation_region="balanced", class_proportions={"lymph": 1.0})


# ---------------------------------------------------------------- masks
@pytest.mark.parametrize("transport,sampling,downsample", [("grpc", {"level": 1}, 2.0), ("shm", {"level": 1}, 2.0),
                                                            ("grpc", {"level": 0, "mpp": 0.75}, 1.5)])
def test_unaugmented_mask_equals_rasterising_the_region(ann_server: LoaderServer, transport: str,
                                                        sampling: dict[str, Any], downsample: float) -> None:
    """Over gRPC bytes and shared memory, at a level and at an mpp between levels (resampled reads)."""
    batches, stream = _run(ann_server, masks=True, annotation_region="annotated", samples_per_epoch=32,
                           transport=transport, **sampling)
    assert stream.transport == transport and stream.annotation_classes == CLASSES
    for batch in batches:
        assert batch["masks"].shape == (batch["images"].shape[0], 32, 32) and batch["masks"].dtype == torch.uint8
        for k, sid in enumerate(batch["slide_id"]):
            x, y = int(batch["x"][k]), int(batch["y"][k])
            want = reference_mask(_shapes(sid), CLASSES, x, y, 32, 32, downsample)
            assert (batch["masks"][k].numpy() == want).all()
            centre = reference_class(_shapes(sid), CLASSES, (x + 16) * downsample, (y + 16) * downsample)
            assert int(batch["classes"][k]) == centre > 0  # annotated region: centres inside an annotation


def _dihedral(a: np.ndarray, flip_h: bool, flip_v: bool, k: int) -> np.ndarray:
    """numpy's flips then rot90 over the last two axes (the documented augmentation geometry)."""
    if flip_h:
        a = a[..., :, ::-1]
    if flip_v:
        a = a[..., ::-1, :]
    return np.rot90(a, k, axes=(-2, -1))


def test_mask_gets_the_images_geometric_augmentation(ann_server: LoaderServer) -> None:
    """Same samples with and without flips/rot90: the augmented image is the transform of the raw one, and the
    augmented mask the same transform of the raw mask (colour ops off so the image shows the transform)."""
    plain, _ = _run(ann_server, masks=True, annotation_region="annotated", samples_per_epoch=32)
    aug, _ = _run(ann_server, masks=True, annotation_region="annotated", samples_per_epoch=32, augment=True,
                  augment_config=GEOMETRY_ONLY)
    config = AugmentConfig(**GEOMETRY_ONLY)
    moved = 0
    for p, a in zip(plain, aug):
        assert (p["x"] == a["x"]).all() and (p["y"] == a["y"]).all()
        for k in range(p["images"].shape[0]):
            params = draw_params(config, 3, 0, int(a["index"][k]))
            key = params.geometry_key
            moved += key != (False, False, 0)
            assert (a["images"][k].numpy() == _dihedral(p["images"][k].numpy(), *key)).all()
            assert (a["masks"][k].numpy() == _dihedral(p["masks"][k].numpy(), *key)).all()
    assert moved > 8


def _region_masks(server: LoaderServer, **kw: Any) -> list[dict[str, Any]]:
    base = dict(batch_size=1, region_width=96, region_height=64, samples_per_epoch=3, masks=True,
                annotation_region="annotated", augment=True,
                augment_config={**GEOMETRY_ONLY, "scale": 0.5, "crop": 0.2})
    base.update(kw)
    return _run(server, **base)[0]


def test_mask_views_agree_under_scale_crop_flip_rotation(ann_server: LoaderServer) -> None:
    """image view == stitched tiles == the 2x2 shards' cores, for images and masks, with every geometric op on;
    and the image-view mask is the annotation at the positions the resampled pixels show."""
    images = _region_masks(ann_server, view="image")
    tiles = list(stitch_tiles(_region_masks(ann_server, view="tiles", tile_size=20, overlap=3,
                                            tile_order="serpentine")))
    assert len(images) == len(tiles) == 3
    config = AugmentConfig(**{**GEOMETRY_ONLY, "scale": 0.5, "crop": 0.2})
    for whole, stitched in zip(images, tiles):
        assert (whole["masks"] == stitched["masks"]).all() and (whole["images"] == stitched["images"]).all()
        params = draw_params(config, 3, 0, int(whole["index"][0]))
        x, y, sid = int(whole["x"][0]), int(whole["y"][0]), whole["slide_id"][0]
        rows = 64 / 2 + params.crop_shift[0] * 64 + (np.arange(64) + 0.5 - 64 / 2) / params.scale
        cols = 96 / 2 + params.crop_shift[1] * 96 + (np.arange(96) + 0.5 - 96 / 2) / params.scale
        raw = np.array([[reference_class(_shapes(sid), CLASSES, (x + c) * 2.0, (y + r) * 2.0) for c in cols]
                        for r in rows], dtype=np.uint8)
        assert (whole["masks"][0].numpy() == _dihedral(raw, *params.geometry_key)).all()
    for row in range(2):
        for col in range(2):
            shards = _region_masks(ann_server, view="shard", grid=(2, 2), shard=(row, col), halo=4)
            for whole, shard in zip(images, shards):
                cy, cx, ch, cw = shard["piece"]["core"]
                assert (crop_core(shard, "masks")[0] == whole["masks"][0, cy:cy + ch, cx:cx + cw]).all()


# ---------------------------------------------------------------- sampling
def _class_fractions(batches: list[dict[str, Any]]) -> dict[int, float]:
    classes = torch.cat([b["classes"] for b in batches]).numpy()
    return {c: float((classes == c).mean()) for c in np.unique(classes)}


@pytest.mark.parametrize("proportions", [{}, {"tumor": 0.2, "necrosis": 0.5, "stroma": 0.3}])
def test_balanced_sampling_converges_to_the_proportions(ann_server: LoaderServer, proportions: dict[str, float]
                                                        ) -> None:
    batches, _ = _run(ann_server, annotation_region="balanced", class_proportions=proportions, batch_size=64,
                      samples_per_epoch=1536, patch_size=16)
    want = {CLASSES.index(n): w for n, w in (proportions or {n: 1 / 3 for n in CLASSES[1:]}).items()}
    got = _class_fractions(batches)
    assert set(got) == set(want)
    for c, w in want.items():  # 1536 draws: 4 standard deviations of a binomial fraction < 0.05
        assert abs(got[c] - w) < 0.05, (CLASSES[c], got[c], w)


def test_tissue_minus_excluded_classes(ann_server: LoaderServer) -> None:
    batches, _ = _run(ann_server, annotation_region="tissue_minus", exclude_classes=("tumor", "stroma"),
                      samples_per_epoch=256, batch_size=64)
    got = _class_fractions(batches)
    assert set(got) <= {0, CLASSES.index("necrosis")} and 0 in got


def test_annotation_sampling_is_deterministic_and_resumable(ann_server: LoaderServer) -> None:
    kw: dict[str, Any] = dict(annotation_region="balanced", masks=True, augment=True, samples_per_epoch=48)
    full, _ = _run(ann_server, **kw)
    again, _ = _run(ann_server, **kw)
    head, state = _run(ann_server, stop_after=2, **kw)
    tail, _ = _run(ann_server, state=state, **kw)
    assert len(head) + len(tail) == len(full) == 6
    for reference in (again, head + tail):
        for a, b in zip(full, reference):
            assert a["slide_id"] == b["slide_id"] and (a["x"] == b["x"]).all() and (a["y"] == b["y"]).all()
            assert (a["images"] == b["images"]).all() and (a["masks"] == b["masks"]).all()
            assert (a["classes"] == b["classes"]).all()


def test_label_mask_tiff_at_a_coarse_level(tmp_path: Path) -> None:
    """A TIFF label mask stored at downsample 8 (the manifest's `annotation_downsample`), and an RGB image refused."""
    import tifffile
    from PIL import Image

    from loader_service.annotations import parse_annotations

    values = np.zeros((32, 40), dtype=np.uint16)
    values[4:10, 5:20] = 3
    tifffile.imwrite(tmp_path / "m.tiff", values)
    parsed = parse_annotations(tmp_path / "m.tiff", "m.tiff", slide_width=999, downsample=8.0)
    assert parsed.names == ("3",)
    index = {"background": 0, "3": 1}
    xs, ys = np.array([5 * 8 + 0.5, 4 * 8 - 0.5, 19 * 8 + 7.9]), np.array([4 * 8 + 0.5, 40.0, 9 * 8 + 7.9])
    assert parsed.classify_points(xs, ys, index).tolist() == [1, 0, 1]
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(AnnotationError, match="annotation file rgb.png: a label mask must be one channel"):
        parse_annotations(tmp_path / "rgb.png", "rgb.png", slide_width=64)


def test_nothing_to_sample_says_why(ann_server: LoaderServer) -> None:
    with pytest.raises(InvalidRequestError, match=r"has its centre in the asked region \(region=annotated of classes "
                                                  r"\['necrosis'\].*Slides left out: d: annotation file d.geojson"):
        _run(ann_server, dataset="bad", annotation_region="annotated", annotation_classes=("necrosis",),
             patch_size=128)


@pytest.mark.parametrize("view", ["patches", "image"])
def test_mask_lies_on_the_painted_shapes_under_every_geometric_op(ann_server: LoaderServer, view: str) -> None:
    """Slide g shows its annotations: DARK exactly on the shapes. With scale, crop, flips and rotations, every image
    pixel that is purely DARK (all its resampling taps on a shape; the shapes are convex) has a mask class, and
    purely LIGHT pixels have none but for a few at edges (a centre just inside, its taps just outside)."""
    kw: dict[str, Any] = dict(dataset="painted", level=0, masks=True, annotation_region="balanced", augment=True,
                              augment_config={**GEOMETRY_ONLY, "scale": 0.5, "crop": 0.2}, samples_per_epoch=12)
    if view == "image":
        kw.update(view="image", batch_size=1, region_width=160, region_height=112)
    else:
        kw.update(batch_size=4, patch_size=128)
    batches, _ = _run(ann_server, **kw)
    dark_n = light_n = light_bad = 0
    for batch in batches:
        images = batch["images"].numpy().transpose(0, 2, 3, 1)
        masks = batch["masks"].numpy()
        dark = (images == np.array(DARK)).all(axis=-1)
        light = (images == np.array(LIGHT)).all(axis=-1)
        assert (masks[dark] > 0).all()
        dark_n, light_n, light_bad = dark_n + dark.sum(), light_n + light.sum(), light_bad + (masks[light] > 0).sum()
    assert dark_n > 1000 and light_n > 1000
    assert light_bad <= 0.01 * light_n


def test_annotation_linked_outside_the_roots_is_refused(ann_server: LoaderServer) -> None:
    """The same data-root check as slides: a file named inside the root that resolves outside it is not read."""
    batches, stream = _run(ann_server, dataset="link", masks=True)
    assert [s.split(":", 1)[0] for s in stream.skipped_slides] == ["b"]
    assert "link.geojson: resolves outside the data roots" in stream.skipped_slides[0]
    assert {sid for b in batches for sid in b["slide_id"]} == {"a"}


def test_tile_feeder_fills_masks_with_the_tiles(ann_server: LoaderServer) -> None:
    from trainer_client.views import TileFeeder

    whole = _region_masks(ann_server, view="image")
    tiles = _region_masks(ann_server, view="tiles", tile_size=32, overlap=2)
    arrived = list(TileFeeder(iter(tiles)))
    assert len(arrived) == len(whole)
    for image, reference in zip(arrived, whole):
        assert image.masks is not None and (image.masks == reference["masks"]).all()
        assert (image.images == reference["images"]).all()


@pytest.mark.parametrize("text,where", [
    ("[1, 2", "not valid JSON"),
    ('{"type": "Topology"}', "expected a GeoJSON FeatureCollection"),
    ('{"type": "FeatureCollection", "features": {}}', "`features` must be an array"),
    ('[{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": {"a": 1}}, '
     '"properties": {"classification": "t"}}]', "feature 0: Polygon coordinates must be a list of rings"),
    ('[{"type": "Feature", "geometry": {"type": "MultiPolygon", "coordinates": [[[[0, 0], [1, 1]]]]}, '
     '"properties": {"classification": "t"}}]', "feature 0 (MultiPolygon): a ring needs at least 3"),
    ('[{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [1, 1], [0, 1]]]}, '
     '"properties": {"classification": {"colour": 1}}}]', "feature 0: no class name"),
    ('[{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [1e999, 1], [0, 1]]]}, '
     '"properties": {"classification": "t"}}]', "feature 0 (Polygon): coordinates must be finite"),
])
def test_malformed_geojson_variants(text: str, where: str) -> None:
    with pytest.raises(AnnotationError, match=r"annotation file z.geojson") as info:
        parse_geojson(text, "z.geojson")
    assert where in str(info.value)


def test_describe_dataset_shows_annotation_classes_and_errors(ann_server: LoaderServer) -> None:
    with LoaderClient(f"127.0.0.1:{ann_server.port}", timeout_s=30) as client:
        info = client.describe("bad")
        good = client.describe("good")
    by_id = {s.slide_id: s for s in info.slides}
    assert list(by_id["a"].annotation_classes) == ["necrosis", "stroma", "tumor"] and not by_id["a"].annotation_error
    assert "annotation file d.geojson, feature 1" in by_id["d"].annotation_error
    assert "not well-formed XML" in by_id["e"].annotation_error
    assert list(good.annotation_classes) == CLASSES
