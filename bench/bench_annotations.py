"""Annotation masks: what they cost a stream, side by side in one run.

A synthetic pyramidal slide with a QuPath-style GeoJSON of ``--shapes`` star polygons of ``--vertices`` vertices
each (holes included). A service in this process streams ``--batches`` batches of 32 patches of 256² over gRPC,
without annotations, with ``annotation_region=annotated`` (classes only) and with masks, interleaved
``--repeats`` times; the table gives median patches/s and the ratio to the plain stream. ``--rasterise`` also
times ``classify_grid`` alone on one 256² patch.

    python -m bench.bench_annotations [--shapes 40] [--vertices 256] [--batches 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import median

SIZE, PATCH, BATCH = 8192, 256, 32


def _star(cx: float, cy: float, r: float, n: int, rng: np.random.Generator) -> list[list[float]]:
    angles = np.linspace(0, 2 * np.pi, n, endpoint=False)
    radii = r * (0.6 + 0.4 * rng.random(n))
    ring = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], axis=1).tolist()
    return ring + [ring[0]]


def write_dataset(root: Path, shapes: int, vertices: int) -> Path:
    from loader_service.synthetic import write_synthetic_slide

    write_synthetic_slide(root / "s.tiff", SIZE, SIZE, seed=5, quality=85, mpp=0.5)
    rng = np.random.default_rng(0)
    features = []
    for i in range(shapes):
        cx, cy, r = rng.uniform(800, SIZE - 800, 2).tolist() + [float(rng.uniform(200, 700))]
        rings = [_star(cx, cy, r, vertices, rng), _star(cx, cy, r / 3, vertices // 4, rng)]  # with a hole
        features.append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": rings},
                         "properties": {"classification": {"name": f"class{i % 3}"}}})
    (root / "s.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    with open(root / "m.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerows([["path", "label", "annotation"], ["s.tiff", "x", "s.geojson"]])
    return root / "m.csv"


def run(port: int, batches: int, **kw: object) -> float:
    from trainer_client import LoaderClient, StreamConfig

    config = StreamConfig(dataset="bench", batch_size=BATCH, patch_size=PATCH, samples_per_epoch=BATCH * batches,
                          tissue_threshold=0.0, transport="grpc", augment=True, seed=int(time.time()), **kw)
    with LoaderClient(f"127.0.0.1:{port}", timeout_s=300) as client:
        t0 = time.perf_counter()
        n = sum(b["images"].shape[0] for b in client.stream(config))
        return n / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", type=int, default=40)
    parser.add_argument("--vertices", type=int, default=256)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    from loader_service.config import DatasetConfig, ServiceConfig
    from loader_service.server import LoaderServer

    with tempfile.TemporaryDirectory() as tmp:
        manifest = write_dataset(Path(tmp), args.shapes, args.vertices)
        from loader_service.annotations import parse_annotations

        parsed = parse_annotations(Path(tmp) / "s.geojson", "s.geojson", SIZE)
        index = {"background": 0, **{n: i + 1 for i, n in enumerate(parsed.names)}}
        xs = ys = np.arange(SIZE // 2, SIZE // 2 + PATCH) + 0.5
        t0 = time.perf_counter()
        for _ in range(10):
            parsed.classify_grid(xs, ys, index)
        print(f"classify_grid, one {PATCH}² patch, {args.shapes} shapes × {args.vertices} vertices: "
              f"{(time.perf_counter() - t0) / 10 * 1e3:.2f} ms")
        config = ServiceConfig(datasets=(DatasetConfig("bench", manifest),), data_roots=(Path(tmp),),
                               listen="127.0.0.1:0", metrics_port=0, workers=args.workers, device="cpu",
                               tissue_cache_dir=None)
        settings = {"plain": {}, "classes": {"annotation_region": "annotated"},
                    "masks": {"annotation_region": "annotated", "masks": True}}
        rates: dict[str, list[float]] = {k: [] for k in settings}
        with LoaderServer(config) as server:
            run(server.port, 1)  # warm-up
            for _ in range(args.repeats):
                for name, kw in settings.items():
                    rates[name].append(run(server.port, args.batches, **kw))
        base = median(rates["plain"])
        print(f"{'setting':<10} {'patches/s (median)':>20} {'ratio':>8}")
        for name, values in rates.items():
            print(f"{name:<10} {median(values):>20.1f} {median(values) / base:>8.2f}")


if __name__ == "__main__":
    main()
