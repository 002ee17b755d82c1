"""Failure budgets (#13): slides damaged inside (zeroed and truncated tiles in a valid pyramid) served through a
real gRPC server: substituted samples, quarantine, resume that never re-reads a bad tile, reproducible epochs;
and a slide swapped for a link out of the data roots after start-up."""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from loader_service.server import LoaderServer
from loader_service.synthetic import write_synthetic_slide
from tests.conftest import make_config
from tests.slide_fixtures import damage_tiles
from trainer_client import LoaderClient, StreamConfig
from trainer_client.errors import DataLossError, PermissionDeniedError

SIZE = 1024  # 4×4 tiles of 256 at level 0
BAD = "bad.tiff"


@pytest.fixture(scope="module")
def damaged_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three good slides and one whose level 0 has zeroed and truncated tiles (it indexes fine)."""
    root = tmp_path_factory.mktemp("damaged")
    rows = []
    for i in range(3):
        write_synthetic_slide(root / f"good{i}.tiff", SIZE, SIZE, seed=40 + i, quality=80, mpp=0.5)
        rows.append({"path": f"good{i}.tiff", "label": "normal" if i % 2 else "tumor"})
    clean = write_synthetic_slide(root / "clean_copy.tiff", SIZE, SIZE, seed=50, quality=80, mpp=0.5)
    damage = {5: "zero", 6: "truncate", 9: "zero", 10: "truncate", 0: "zero", 15: "truncate"}
    damage_tiles(clean, root / BAD, damage)
    clean.unlink()
    rows.append({"path": BAD, "label": "tumor"})
    with open(root / "manifest.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return root


def _server(root: Path, **overrides: Any) -> LoaderServer:
    values: dict[str, Any] = dict(datasets=(), tissue_cache_dir=None, workers=2, quarantine_after=1000,
                                 tissue_max_size=256)  # the mask from level 2: the damage is in level 0
    values.update(overrides)
    from loader_service.config import DatasetConfig

    values["datasets"] = (DatasetConfig("dmg", root / "manifest.csv"),)
    return LoaderServer(make_config(root, **values))


def _cfg(**kw: Any) -> StreamConfig:
    values: dict[str, Any] = dict(dataset="dmg", batch_size=16, patch_size=128, samples_per_epoch=192, seed=3,
                                  balance="slide", augment=False, transport="grpc", tissue_threshold=0.1)
    values.update(kw)
    return StreamConfig(**values)


def _epoch(server: LoaderServer, cfg: StreamConfig, **kw: Any) -> tuple[list[tuple[Any, ...]], list[int], str]:
    """(per sample (index, slide, x, y, label), substituted indices, hash of every pixel) of one stream."""
    metas: list[tuple[Any, ...]] = []
    substituted: list[int] = []
    digest = hashlib.sha256()
    with LoaderClient(f"127.0.0.1:{server.port}", timeout_s=60) as client:
        for batch in client.stream(cfg, **kw):
            assert batch["images"].shape[0] == cfg.batch_size  # full batches: failures are replaced
            metas += list(zip(batch["index"].tolist(), batch["slide_id"], batch["x"].tolist(), batch["y"].tolist(),
                              batch["labels"].tolist()))
            substituted += batch["substituted"].tolist()
            digest.update(batch["images"].numpy().tobytes())
    return metas, substituted, digest.hexdigest()


def _failed(server: LoaderServer, reason: str) -> float:
    return server.metrics.sample("wsi_loader_samples_failed_total", {"reason": reason})


@pytest.mark.parametrize("variant", [{}, {"augment": True}, {"mode": "grid", "grid_stride": 160, "drop_last": True},
                                     {"patches_per_region": 4, "locality_window": 4}],
                         ids=["random", "augmented", "grid", "locality"])
def test_damaged_tiles_are_substituted_reproducibly(damaged_dir: Path, variant: dict[str, Any]) -> None:
    runs = []
    cfg = _cfg(**variant)
    for workers in (1, 3):  # two fresh servers, different thread counts
        with _server(damaged_dir, workers=workers) as server:
            runs.append(_epoch(server, cfg))
            assert _failed(server, "read") >= 1
            assert server.metrics.sample("wsi_loader_slides_quarantined_total") == 0  # budget of 1000 not spent
    (metas, substituted, pixels), (metas2, substituted2, pixels2) = runs
    assert substituted, "the damaged slide's bad tiles were never drawn: the test proves nothing"
    assert metas == metas2 and substituted == substituted2 and pixels == pixels2
    assert [m[0] for m in metas] == list(range(len(metas)))  # every index once, in order
    assert set(substituted) <= {m[0] for m in metas}


def test_fail_policy_ends_the_session_and_resume_never_rereads_the_bad_tile(damaged_dir: Path) -> None:
    with _server(damaged_dir) as server:
        endpoint = f"127.0.0.1:{server.port}"
        cfg = _cfg(on_error="fail", batch_size=1, credits=1)
        with LoaderClient(endpoint, timeout_s=60) as client:
            stream = client.stream(cfg)
            with pytest.raises(DataLossError) as info:
                for _ in stream:
                    pass
            assert str(damaged_dir) not in str(info.value) and BAD in str(info.value)  # names the slide by id
            state = stream.state_dict()
        read, bad_tiles = _failed(server, "read"), len(server.handles.bad_tiles)
        assert read == bad_tiles == 1
        with LoaderClient(endpoint, timeout_s=60) as client:
            resumed = client.stream(_cfg(batch_size=1, credits=1))
            resumed.load_state_dict(state)
            first = next(iter(resumed))
            assert first["substituted"].tolist() == [state["cursor"]]  # the failed sample, replaced...
            assert _failed(server, "known_bad_tile") == 1  # ...without reading its tile again
            # (no count of "read" here: with the next credit granted, the service may already be building the
            # next batch, which can meet another damaged tile; the end of the test bounds reads per tile)
            for _ in resumed:
                pass
        # every read failure found at least one tile not known before (a region's tiles decode together)
        assert _failed(server, "read") <= len(server.handles.bad_tiles)


def test_slide_quarantined_after_n_failures(damaged_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    with _server(damaged_dir, quarantine_after=2) as server:
        with caplog.at_level(logging.WARNING, logger="loader_service.failures"):
            _epoch(server, _cfg())
        assert server.metrics.sample("wsi_loader_slides_quarantined_total") == 1
        lines = [r.getMessage() for r in caplog.records if "quarantined" in r.getMessage()]
        assert lines and BAD in lines[0] and "tile " in lines[0] and "of level 0" in lines[0]
        assert str(damaged_dir) not in lines[0]
        read_before = _failed(server, "read")
        quarantined_before = _failed(server, "quarantined")
        with LoaderClient(f"127.0.0.1:{server.port}", timeout_s=60) as client:
            stream = client.stream(_cfg(seed=4))
            slides = {s for batch in stream for s in batch["slide_id"]}
            assert any(s.startswith(BAD) for s in stream.skipped_slides)
        assert BAD not in slides  # sessions opened after the quarantine never read the slide
        assert _failed(server, "read") == read_before
        assert _failed(server, "quarantined") > quarantined_before


def test_slide_swapped_for_a_link_outside_the_roots(damaged_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    shutil.copytree(damaged_dir, root, ignore=shutil.ignore_patterns(BAD))
    (root / "manifest.csv").write_text("path,label\ngood0.tiff,a\ngood1.tiff,b\ngood2.tiff,a\n")
    outside = tmp_path / "outside"
    outside.mkdir()
    with _server(root) as server:
        with LoaderClient(f"127.0.0.1:{server.port}", timeout_s=60) as client:
            client.read_region("dmg", "good1.tiff", 0, 0, 64, 64)  # good1's handle is open before the swap
        for name in ("good1.tiff", "good2.tiff"):  # after start-up: a link to a file outside the roots
            shutil.copy(root / name, outside / name)
            (root / name).unlink()
            os.symlink(outside / name, root / name)
        with LoaderClient(f"127.0.0.1:{server.port}", timeout_s=60) as client:
            with pytest.raises(PermissionDeniedError) as info:
                client.read_region("dmg", "good1.tiff", 0, 0, 64, 64)
            assert "outside" in str(info.value) and str(tmp_path) not in str(info.value)
            assert _failed(server, "outside_roots") == 1
            with pytest.raises(PermissionDeniedError):  # refused again at the next open
                client.read_region("dmg", "good1.tiff", 0, 0, 64, 64)
            batches = list(client.stream(_cfg(balance="slide", samples_per_epoch=64)))
        slides = [s for b in batches for s in b["slide_id"]]
        assert set(slides) == {"good0.tiff"}  # good2 refused at its first read, then substituted
        assert sum(len(b["substituted"]) for b in batches) >= 1
        assert _failed(server, "outside_roots") >= 3
        assert server.metrics.sample("wsi_loader_slides_quarantined_total") == 2


def test_truncated_jpeg_tile_is_an_error_not_grey(damaged_dir: Path) -> None:
    from loader_service.slides import SlideReadError, open_slide

    with open_slide(damaged_dir / BAD) as slide:
        for index in (6, 10):  # truncated tiles: libjpeg alone would fill them with grey and say nothing
            ty, tx = divmod(index, 4)
            with pytest.raises(SlideReadError, match="truncated") as info:
                slide.read_region(0, tx * 256 + 8, ty * 256 + 8, 16, 16)
            assert info.value.tile == index and info.value.level == 0


def test_shard_view_substitutes_and_tiles_view_resumes_past_a_partly_sent_sample(damaged_dir: Path) -> None:
    """Shard view: one piece per sample in a stream, so a failed sample is replaced like a patch. Tiles view: a
    failure after earlier tiles of the sample were sent cannot be taken back; the slide is quarantined and the
    resumed session replaces the sample."""
    with _server(damaged_dir) as server:
        endpoint = f"127.0.0.1:{server.port}"
        shard = _cfg(view="shard", batch_size=1, patch_size=256, grid=(2, 2), shard=(0, 1), samples_per_epoch=48)
        metas, substituted, _ = _epoch(server, shard)
        assert len(metas) == 48 and substituted
        tiles = _cfg(view="tiles", batch_size=1, patch_size=256, tile_size=128, samples_per_epoch=48)
        state: dict[str, Any] | None = None
        errors = 0
        for _ in range(4):
            with LoaderClient(endpoint, timeout_s=60) as client:
                stream = client.stream(tiles)
                if state is not None:
                    stream.load_state_dict(state)
                try:
                    for _ in stream:
                        pass
                    break
                except DataLossError as err:
                    errors += 1
                    assert "quarantined" in str(err) and "resume" in str(err)
                    state = stream.state_dict()
        else:
            pytest.fail("the tiles stream never finished")
        assert errors == 1  # one slide, quarantined at its first partly sent failure
        assert server.metrics.sample("wsi_loader_slides_quarantined_total") == errors


def test_resumed_epoch_equals_the_uninterrupted_one(damaged_dir: Path) -> None:
    """Without a quarantine in between, stopping and resuming gives the same samples and pixels as one run."""
    with _server(damaged_dir) as server:
        whole, substituted, _ = _epoch(server, _cfg())
        assert substituted
    with _server(damaged_dir) as server, LoaderClient(f"127.0.0.1:{server.port}", timeout_s=60) as client:
        stream = client.stream(_cfg())
        first: list[tuple[Any, ...]] = []
        for batch in stream:
            first += list(zip(batch["index"].tolist(), batch["slide_id"], batch["x"].tolist(), batch["y"].tolist(),
                              batch["labels"].tolist()))
            if len(first) >= 96:
                break
        state = stream.state_dict()
        stream.close()
        resumed = client.stream(_cfg())
        resumed.load_state_dict(state)
        rest = [m for batch in resumed for m in zip(batch["index"].tolist(), batch["slide_id"], batch["x"].tolist(),
                                                      batch["y"].tolist(), batch["labels"].tolist())]
    assert first + rest == whole


@pytest.fixture(scope="module")
def context_damaged_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two good slides and one whose level 1 (where 2× context patches are read) is damaged; level 0 is whole."""
    root = tmp_path_factory.mktemp("context_damaged")
    for i in range(2):
        write_synthetic_slide(root / f"good{i}.tiff", SIZE, SIZE, seed=60 + i, quality=80, mpp=0.5)
    clean = write_synthetic_slide(root / "clean_copy.tiff", SIZE, SIZE, seed=62, quality=80, mpp=0.5)
    damage_tiles(clean, root / BAD, {0: "zero", 1: "truncate", 2: "zero", 3: "truncate"}, level=1)
    clean.unlink()
    with open(root / "manifest.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "label"])
        writer.writeheader()
        writer.writerows([{"path": "good0.tiff", "label": "normal"}, {"path": "good1.tiff", "label": "tumor"},
                          {"path": BAD, "label": "tumor"}])
    return root


def test_a_failed_context_read_substitutes_the_whole_sample(context_damaged_dir: Path) -> None:
    cfg = _cfg(batch_size=8, patch_size=64, samples_per_epoch=48, context=((2.0, 64),))
    with _server(context_damaged_dir) as server:
        before = _failed(server, "known_bad_tile") + _failed(server, "read")
        with LoaderClient(f"127.0.0.1:{server.port}", timeout_s=60) as client:
            n, substituted = 0, 0
            for batch in client.stream(cfg):
                assert batch["images"].shape[0] == 8 and batch["context"][0].shape == (8, 3, 64, 64)
                assert BAD not in batch["slide_id"], "a sample whose context cannot be read is replaced whole"
                n += 8
                substituted += int(batch["substituted"].sum())
            assert n == 48 and substituted > 0
        assert _failed(server, "known_bad_tile") + _failed(server, "read") > before  # counted against the slide
        with LoaderClient(f"127.0.0.1:{server.port}", timeout_s=60) as client:
            with pytest.raises(DataLossError, match=BAD):  # on_error=fail still ends the session
                for _ in client.stream(_cfg(batch_size=8, patch_size=64, samples_per_epoch=48, seed=4,
                                            context=((2.0, 64),), on_error="fail")):
                    pass


def test_a_failed_context_read_in_the_piece_views(context_damaged_dir: Path) -> None:
    """Shard view: the sample's only piece in the stream, so a sample whose context fails is replaced whole, as in
    the patches view. Tiles view: the context travels with the first tile and the later tiles are cut from the same
    sample, so the slide is quarantined and the session ends; its resume replaces the sample."""
    base = dict(batch_size=1, patch_size=64, samples_per_epoch=24, context=((2.0, 64),))
    with _server(context_damaged_dir) as server:
        endpoint = f"127.0.0.1:{server.port}"
        before = _failed(server, "known_bad_tile") + _failed(server, "read")
        with LoaderClient(endpoint, timeout_s=60) as client:
            shards = list(client.stream(_cfg(view="shard", grid=(1, 2), shard=(0, 1), **base)))
        assert len(shards) == 24 and sum(int(b["substituted"].numel()) for b in shards) > 0
        assert all(BAD not in b["slide_id"] and b["context"][0].shape == (1, 3, 64, 64) for b in shards)
        assert _failed(server, "known_bad_tile") + _failed(server, "read") > before  # counted against the slide
        tiles = _cfg(view="tiles", tile_size=32, **base)
        state: dict[str, Any] | None = None
        errors, samples = 0, []
        for _ in range(4):
            with LoaderClient(endpoint, timeout_s=60) as client:
                stream = client.stream(tiles)
                if state is not None:
                    stream.load_state_dict(state)
                try:
                    for batch in stream:
                        assert batch["context"][0].shape == (1, 3, 64, 64)
                        if batch["piece"]["index"] == 0:
                            samples.append((errors, batch["slide_id"][0]))
                    break
                except DataLossError as err:
                    errors += 1
                    assert "quarantined" in str(err) and "later pieces are cut from this sample" in str(err)
                    state = stream.state_dict()
        else:
            pytest.fail("the tiles stream never finished")
        assert errors == 1 and len(samples) == 24
        assert all(slide != BAD for resumed, slide in samples if resumed), "the resumed session replaced the sample"
        assert server.metrics.sample("wsi_loader_slides_quarantined_total") == errors


def test_a_stain_fit_to_the_dataset_survives_a_damaged_tile(damaged_dir: Path) -> None:
    cfg = _cfg(batch_size=8, samples_per_epoch=16, stain="reinhard", stain_fit_samples=96)
    with _server(damaged_dir) as server:
        before = _failed(server, "known_bad_tile") + _failed(server, "read")
        with LoaderClient(f"127.0.0.1:{server.port}", timeout_s=60) as client:
            stream = client.stream(cfg)
            assert sum(b["images"].shape[0] for b in stream) == 16
            assert len(stream.stain_target) > 0
        assert _failed(server, "known_bad_tile") + _failed(server, "read") > before, "the fit met the damage"
