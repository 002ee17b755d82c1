"""Shared fixtures: real slides written to disk, a real server on loopback, a real client."""

from __future__ import annotations

import csv
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from loader_service.config import ServiceConfig
    from loader_service.server import LoaderServer
    from trainer_client import LoaderClient

pytest_plugins = ["tests.slide_fixtures"]

SHARED_WSI = Path(__file__).resolve().parents[2] / "shared" / "wsi"


@pytest.fixture(scope="session")
def dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four synthetic pyramidal JPEG slides (two labels) plus broken entries in a second manifest."""
    from loader_service.synthetic import write_synthetic_dataset

    root = tmp_path_factory.mktemp("dataset")
    manifest = write_synthetic_dataset(root, n_slides=4, size=2048, seed=7)
    assert manifest == root / "manifest.csv" or manifest.parent == root
    # A manifest that also lists a corrupt slide, a non-TIFF and a path outside the data root.
    (root / "corrupt.tiff").write_bytes(b"II*\x00" + b"\x00" * 64)
    (root / "notes.tiff").write_text("this is not a slide\n")
    outside = tmp_path_factory.mktemp("outside") / "elsewhere.tiff"
    shutil.copy(next(root.rglob("*.tif*")), outside)
    with open(manifest, newline="") as handle:
        rows = list(csv.DictReader(handle))
    with open(root / "mixed.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        extra = {k: "" for k in rows[0]}
        writer.writerow({**extra, "path": "corrupt.tiff", "label": rows[0]["label"]})
        writer.writerow({**extra, "path": "notes.tiff", "label": rows[0]["label"]})
        writer.writerow({**extra, "path": str(outside), "label": rows[0]["label"]})
    return root


def make_config(dataset_dir: Path, **overrides: Any) -> ServiceConfig:
    from loader_service.config import DatasetConfig, ServiceConfig

    values: dict[str, object] = dict(
        datasets=(DatasetConfig("train", dataset_dir / "manifest.csv"), DatasetConfig("mixed", dataset_dir / "mixed.csv")),
        data_roots=(dataset_dir,), listen="127.0.0.1:0", metrics_port=0, workers=2, device="cpu",
        tissue_cache_dir=dataset_dir / ".tissue-cache", credit_timeout_s=30.0, shutdown_grace_s=2.0,
    )
    values.update(overrides)
    return ServiceConfig(**values)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def server(dataset_dir: Path) -> Iterator[LoaderServer]:
    from loader_service.server import LoaderServer

    with LoaderServer(make_config(dataset_dir)) as srv:
        yield srv


@pytest.fixture()
def client(server: LoaderServer) -> Iterator[LoaderClient]:
    from trainer_client import LoaderClient

    with LoaderClient(f"127.0.0.1:{server.port}", timeout_s=30) as c:
        yield c
