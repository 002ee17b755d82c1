"""Multi-scale context in the image and tiles views: what it costs a stream, side by side in one run.

Four synthetic pyramidal slides (2048², levels 1/2/4/8). A service in this process streams ``--samples``
augmented regions of ``--region``² over gRPC in the image view and in the tiles view (``--tile``² tiles), each
without context and with two context scales (2× and 4×, ``--context``² each), interleaved ``--repeats`` times
(the first round is a warm-up); the table gives median samples/s and the ratio to the same view without context.

    python -m bench.bench_context_views [--samples 24] [--region 512] [--tile 128] [--context 256] [--repeats 4]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from bench.common import median


def run(port: int, samples: int, region: int, **kw: object) -> float:
    from trainer_client import LoaderClient, StreamConfig

    config = StreamConfig(dataset="bench", batch_size=1, region_width=region, region_height=region,
                          samples_per_epoch=samples, seed=3, transport="grpc", augment=True, tissue_threshold=0.2,
                          timeout_s=300, **kw)
    with LoaderClient(f"127.0.0.1:{port}", timeout_s=300) as client:
        t0 = time.perf_counter()
        with client.stream(config) as stream:
            for _ in stream:
                pass
        return samples / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=24)
    parser.add_argument("--region", type=int, default=512)
    parser.add_argument("--tile", type=int, default=128)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args()

    from loader_service.config import DatasetConfig, ServiceConfig
    from loader_service.server import LoaderServer
    from loader_service.synthetic import write_synthetic_dataset

    scales = ((2.0, args.context), (4.0, args.context))
    cases = {"image": dict(view="image"), "image + context": dict(view="image", context=scales),
             "tiles": dict(view="tiles", tile_size=args.tile),
             "tiles + context": dict(view="tiles", tile_size=args.tile, context=scales)}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        manifest = write_synthetic_dataset(root, n_slides=4, size=2048, seed=7)
        config = ServiceConfig(datasets=(DatasetConfig("bench", manifest),), data_roots=(root,),
                               listen="127.0.0.1:0", metrics_port=0, device="cpu", tissue_cache_dir=root / ".tc")
        rates: dict[str, list[float]] = {name: [] for name in cases}
        with LoaderServer(config) as server:
            for repeat in range(args.repeats):
                for name, kw in cases.items():
                    rate = run(server.port, args.samples, args.region, **kw)
                    if repeat:
                        rates[name].append(rate)
    print(f"{'case':18s} {'samples/s':>10s} {'ratio':>6s}")
    for name, values in rates.items():
        plain = median(rates[name.split(" +")[0]])
        print(f"{name:18s} {median(values):10.1f} {median(values) / plain:6.2f}")


if __name__ == "__main__":
    main()
