"""`trainer-client`: list datasets, measure throughput, train a small model from the stream.

The only module of trainer_client that reads the command line.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from trainer_client.client import LoaderClient
from trainer_client.config import StreamConfig
from trainer_client.errors import LoaderError
from wsi_loader import __version__

__all__ = ["main"]

log = logging.getLogger("trainer_client")


def _client(args: argparse.Namespace) -> LoaderClient:
    client = LoaderClient(args.endpoint, token=args.token, tls_ca=args.tls_ca, client_cert=args.client_cert,
                          client_key=args.client_key, server_name=args.server_name,
                          connect_timeout_s=args.connect_timeout)
    client.wait_ready()
    return client


def _dataset(client: LoaderClient, name: str | None) -> str:
    if name:
        return name
    datasets = client.datasets()
    if not datasets:
        raise LoaderError("the service serves no dataset")
    return datasets[0].name


def _datasets(args: argparse.Namespace) -> int:
    with _client(args) as client:
        for d in client.datasets():
            print(json.dumps({"name": d.name, "slides": d.slides, "failed_slides": d.failed_slides,
                              "labels": list(d.labels)}))
    return 0


def _bench(args: argparse.Namespace) -> int:
    with _client(args) as client:
        config = StreamConfig(dataset=_dataset(client, args.dataset), batch_size=args.batch_size,
                              patch_size=args.patch_size, level=args.level, transport=args.transport,
                              samples_per_epoch=10**9, credits=args.credits, augment=not args.no_augment,
                              tissue_threshold=args.tissue_threshold, dtype=args.dtype, job_id=args.job_id,
                              patches_per_region=args.patches_per_region, locality_window=args.locality_window,
                              locality_region_size=args.locality_region_size, seed=args.seed)
        stream = client.stream(config, rank=args.rank, world_size=args.world_size)
        batches = tiles = nbytes = 0
        start = None
        cpu_start = 0.0
        deadline = None
        for batch in stream:
            now = time.perf_counter()
            if start is None:  # the first batch pays connection and warm-up: not counted
                start, deadline, cpu_start = now, now + args.seconds, time.process_time()
                continue
            images = batch["images"]
            if args.consume == "copy":  # a consumer that reads every byte (as an H2D copy would)
                images = images.clone()
            batches += 1
            tiles += images.shape[0]
            nbytes += images.numel() * images.element_size()
            if now >= deadline:  # type: ignore[operator]
                if images.is_cuda:  # CUDA IPC: the copies queued on the GPU count too
                    torch.cuda.synchronize(images.device)
                break
        cpu = time.process_time() - cpu_start if start is not None else 0.0
        stream.close()
        why = stream.transport_reason or {
            "shm": "the service sees this process' /dev/shm, so batches travel through shared memory",
            "cuda_ipc": "the service and this process share the GPU: batches stay on it (CUDA IPC)",
        }.get(stream.transport, "gRPC bytes, as asked")
        print(f"transport: {stream.transport} (asked {args.transport}): {why}", file=sys.stderr, flush=True)
        elapsed = time.perf_counter() - (start or time.perf_counter())
        elapsed = max(elapsed, 1e-9)
        print(json.dumps({
            "transport": args.transport, "seconds": round(elapsed, 3), "batches": batches, "tiles": tiles,
            "tiles_per_s": tiles / elapsed, "mpix_per_s": tiles * args.patch_size**2 / elapsed / 1e6,
            "bytes_per_s": nbytes / elapsed, "batch_size": args.batch_size, "patch_size": args.patch_size,
            "batch_bytes": nbytes / max(batches, 1), "transport_used": stream.transport,
            "transport_reason": stream.transport_reason,
            "cpu_s": round(cpu, 3),  # this process's CPU time over the timed batches (all its threads)
        }), flush=True)
    return 0


def _train(args: argparse.Namespace) -> int:
    from trainer_client.train_patches import run

    with _client(args) as client:
        dataset = _dataset(client, args.dataset)
        labels = next(list(d.labels) for d in client.datasets() if d.name == dataset)
        print(json.dumps(run(args, client, dataset, labels)), flush=True)
    return 0


def _train_streaming(args: argparse.Namespace) -> int:
    from trainer_client.train_streaming import run

    with _client(args) as client:
        dataset = _dataset(client, args.dataset)
        labels = next(list(d.labels) for d in client.datasets() if d.name == dataset)
        print(json.dumps(run(args, client, dataset, labels)), flush=True)
    return 0


def _predict(args: argparse.Namespace) -> int:
    from trainer_client.inference.cli import run

    with _client(args) as client:
        return run(args, client, _dataset(client, args.dataset))


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--endpoint", required=True, help="HOST:PORT of a loader-service")
    p.add_argument("--token", default=os.environ.get("WSI_LOADER_TOKEN"),
                   help="bearer token, when the service requires one (default: $WSI_LOADER_TOKEN)")
    p.add_argument("--tls-ca", type=Path, default=None, help="PEM CA of the service's certificate: use TLS")
    p.add_argument("--client-cert", type=Path, default=None, help="PEM client certificate (mutual TLS)")
    p.add_argument("--client-key", type=Path, default=None, help="PEM client key (mutual TLS)")
    p.add_argument("--server-name", default=None, help="name on the service's certificate, if not the endpoint's")
    p.add_argument("--dataset", default=None, help="dataset name (default: the first the service lists)")
    p.add_argument("--connect-timeout", type=float, default=10.0,
                   help="seconds to wait for the service to accept the connection before failing (default 10)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trainer-client", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--log-level", default="WARNING")
    sub = parser.add_subparsers(dest="command", required=True)

    datasets = sub.add_parser("datasets", help="list the service's datasets")
    _common(datasets)
    datasets.set_defaults(func=_datasets)

    bench = sub.add_parser("bench", help="pull batches for a while and print one JSON line of throughput")
    _common(bench)
    bench.add_argument("--seconds", type=float, default=10.0)
    bench.add_argument("--batch-size", type=int, default=64)
    bench.add_argument("--patch-size", type=int, default=256)
    bench.add_argument("--level", type=int, default=0)
    bench.add_argument("--transport", choices=("auto", "grpc", "shm", "cuda_ipc"), default="grpc")
    bench.add_argument("--credits", type=int, default=8)
    bench.add_argument("--tissue-threshold", type=float, default=0.5)
    bench.add_argument("--no-augment", action="store_true")
    bench.add_argument("--consume", choices=("none", "copy"), default="none",
                       help="copy: clone every batch, i.e. read every byte as a trainer's H2D copy would")
    bench.add_argument("--dtype", choices=("uint8", "float16", "float32"), default="uint8")
    bench.add_argument("--rank", type=int, default=None, help="this trainer's rank (default: RANK or 0)")
    bench.add_argument("--world-size", type=int, default=None, help="ranks sharing the epoch (default: WORLD_SIZE or 1)")
    bench.add_argument("--job-id", default="", help="ranks of one job (the server checks they agree)")
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--patches-per-region", type=int, default=1,
                       help="locality: patches cut from one region read once (1 = independent patches)")
    bench.add_argument("--locality-window", type=int, default=16, help="locality: regions shuffled together")
    bench.add_argument("--locality-region-size", type=int, default=0,
                       help="locality: region side in pixels (0 = ceil(sqrt(patches-per-region)) patches)")
    bench.set_defaults(func=_bench)

    train = sub.add_parser("train", help="train a ResNet-18 patch classifier from the stream (DDP under torchrun)")
    _common(train)
    from trainer_client.train_patches import add_arguments as add_train_arguments

    add_train_arguments(train)
    train.set_defaults(func=_train)

    streaming = sub.add_parser("train-streaming", help="train a streaming ResNet on whole regions (tiles view)")
    _common(streaming)
    from trainer_client.train_streaming import add_arguments

    add_arguments(streaming)
    streaming.set_defaults(func=_train_streaming)

    predict = sub.add_parser("predict", help="run a checkpoint over a dataset's tissue grid into slide maps (resumable)")
    _common(predict)
    from trainer_client.inference.cli import add_arguments as add_predict_arguments

    add_predict_arguments(predict)
    predict.set_defaults(func=_predict)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr)
    try:
        return int(args.func(args) or 0)
    except LoaderError as err:
        print(f"trainer-client: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    except ValueError as err:
        print(f"trainer-client: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
