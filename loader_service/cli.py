"""`loader-service`: serve datasets, inspect a slide, print the default configuration, run the demo.

The only module that reads the command line, the environment and YAML files. Configuration comes from, in
increasing precedence: the YAML file (--config), WSI_LOADER_<KEY> environment variables, then flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from loader_service.config import DatasetConfig, ServiceConfig, config_from_mapping, default_workers
from wsi_loader import __version__

__all__ = ["main", "build_config", "config_from_environment"]

log = logging.getLogger("loader_service")
ENV_PREFIX = "WSI_LOADER_"
# WSI_LOADER_* variables that are not configuration keys (the log level; the client's and CUDA's own).
_OTHER_ENV = {"LOG_LEVEL", "TOKEN", "CUDA_BACKEND"}
_DESCRIPTION = ("Serve whole-slide image datasets to trainers over gRPC and shared memory; inspect slides; "
                "print the configuration. Every configuration key can also be set as WSI_LOADER_<KEY> "
                "(e.g. WSI_LOADER_METRICS_PORT=9108); flags override the environment, which overrides --config.")


def config_from_environment(environ: Mapping[str, str]) -> dict[str, Any]:
    """Configuration keys from WSI_LOADER_<KEY> variables, each value read as YAML (numbers, lists, mappings)."""
    known = {f.name for f in dataclasses.fields(ServiceConfig)}
    found: dict[str, Any] = {}
    for name, text in environ.items():
        if not name.startswith(ENV_PREFIX) or name[len(ENV_PREFIX):] in _OTHER_ENV:
            continue
        key = name[len(ENV_PREFIX):].lower()
        if key not in known:  # a warning, not an error: client-side WSI_LOADER_* variables may share the shell
            log.warning("environment variable %s is not a configuration key and is ignored; "
                        "`loader-service config --print-defaults` lists the keys (as WSI_LOADER_<KEY>)", name)
            continue
        try:
            found[key] = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as err:
            raise ValueError(f"environment variable {name}: not a YAML value ({err})") from err
    return {k: v for k, v in found.items() if v is not None}


def _dataset_arg(text: str) -> DatasetConfig:
    name, sep, path = text.partition("=")
    if not sep:
        path, name = text, Path(text).stem
    return DatasetConfig(name=name, manifest=Path(path))


def build_config(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> ServiceConfig:
    """YAML file first, then WSI_LOADER_<KEY> environment variables, then every flag given on the command line."""
    data: dict[str, Any] = {}
    if args.config:
        loaded = yaml.safe_load(Path(args.config).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{args.config}: the configuration file must be a mapping of keys to values")
        data.update(loaded)
    data.update(config_from_environment(os.environ if environ is None else environ))
    if args.manifest:
        data["datasets"] = [_dataset_arg(m) for m in args.manifest]
    flags = {
        "listen": args.listen, "metrics_port": args.metrics_port, "workers": args.workers, "device": args.device,
        "jpeg_backend": args.jpeg_backend,
        "synthetic": args.synthetic or None, "metrics_host": args.metrics_host,
        "tissue_cache_dir": args.tissue_cache_dir, "max_credits": args.max_credits,
        "forecast_batches": args.forecast_batches,
        "progress_interval_s": args.progress_interval_s,
        "quarantine_after": args.quarantine_after,
        "max_inflight_mb": args.max_inflight_mb, "open_timeout_s": args.open_timeout_s,
        "max_streams": args.max_streams, "max_streams_per_peer": args.max_streams_per_peer,
    }
    if args.data_root:
        data["data_roots"] = [Path(p) for p in args.data_root]
    if args.tile_cache_mb is not None:
        data["tile_cache_bytes"] = int(args.tile_cache_mb * 2**20)
    data.update({k: v for k, v in flags.items() if v is not None})
    security = dict(data.get("security") or {})
    for key in ("tls_cert", "tls_key", "tls_client_ca"):
        value = getattr(args, key)
        if value:
            security[key] = value
    if args.tokens_file:
        security["tokens"] = yaml.safe_load(Path(args.tokens_file).read_text()) or {}
    if security:
        data["security"] = security
    return config_from_mapping(data)


def _serve(args: argparse.Namespace) -> int:
    from loader_service.server import LoaderServer

    import torch

    config = build_config(args)
    torch.set_num_threads(config.torch_threads)  # a process-wide choice: made here, at the entry point
    server = LoaderServer(config)
    server.start()
    stopping = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("signal %d: draining (finishing in-flight batches, %.0fs grace)", signum, config.shutdown_grace_s)
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print(json.dumps({"event": "serving", "port": server.port, "listen": config.listen,
                      "metrics": server.metrics_endpoint.url if server.metrics_endpoint else None,
                      "datasets": sorted(server.datasets)}), flush=True)
    stopping.wait()
    server.stop()
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from loader_service.slides import SlideError, open_slide
    from loader_service.tissue import compute_tissue_mask, inspect_slide, mask_overlay_png

    try:
        report = inspect_slide(args.slide)
        if args.thumbnail:
            with open_slide(args.slide) as slide:
                mask_overlay_png(slide, compute_tissue_mask(slide), args.thumbnail)
            report["thumbnail"] = str(args.thumbnail)
    except (SlideError, OSError) as err:  # one line, not a traceback: the file is what needs fixing
        print(f"loader-service inspect: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report, default=str))
        return 0
    for key, value in report.items():
        if key == "levels":
            print("levels:")
            for i, level in enumerate(value):
                print(f"  {i}: {level}")
        else:
            print(f"{key}: {value}")
    return 0


def _print_defaults(args: argparse.Namespace) -> int:
    defaults = ServiceConfig(synthetic=True).to_dict()
    defaults["synthetic"] = False
    defaults["workers"] = "auto"  # the cores of the machine that runs it, not of this one
    defaults["datasets"] = [{"name": "train", "manifest": "/data/train/manifest.csv"}]
    print(yaml.safe_dump(defaults, sort_keys=False), end="")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from loader_service.demo import run_demo

    return run_demo(workdir=args.workdir, slides=args.slides, steps=args.steps, workers=args.workers)


def _make_demo_data(args: argparse.Namespace) -> int:
    from loader_service.synthetic import write_synthetic_dataset

    manifest = write_synthetic_dataset(Path(args.directory), n_slides=args.slides, size=args.size, seed=args.seed)
    print(json.dumps({"manifest": str(manifest)}))
    return 0


def _health(args: argparse.Namespace) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from loader_service.readiness import REASON_METADATA_KEY

    if args.tls_ca:
        creds = grpc.ssl_channel_credentials(
            root_certificates=Path(args.tls_ca).read_bytes(),
            private_key=Path(args.client_key).read_bytes() if args.client_key else None,
            certificate_chain=Path(args.client_cert).read_bytes() if args.client_cert else None)
        options = [("grpc.ssl_target_name_override", args.server_name)] if args.server_name else []
        channel = grpc.secure_channel(args.endpoint, creds, options=options)
    else:
        channel = grpc.insecure_channel(args.endpoint)
    try:
        with channel:
            reply, call = health_pb2_grpc.HealthStub(channel).Check.with_call(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout)
    except grpc.RpcError as err:
        print(f"unhealthy: {err.code().name}: {err.details()}", file=sys.stderr)
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    reason = dict(call.trailing_metadata() or ()).get(REASON_METADATA_KEY, "")
    print(f"{status}: {reason}" if reason else status)
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loader-service", description=_DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--log-level", default=os.environ.get("WSI_LOADER_LOG_LEVEL", "INFO"),
                        help="DEBUG, INFO, WARNING or ERROR (default: $WSI_LOADER_LOG_LEVEL or INFO)")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve datasets over gRPC, with Prometheus metrics")
    serve.add_argument("--manifest", action="append", help="manifest CSV/JSONL; NAME=PATH to name the dataset (repeatable)")
    serve.add_argument("--listen", help="HOST:PORT for gRPC (default 127.0.0.1:50051)")
    serve.add_argument("--metrics-port", type=int, help="Prometheus port (default 9108; 0 = any free; -1 = off)")
    serve.add_argument("--metrics-host", help="address of the metrics endpoint (default 127.0.0.1)")
    serve.add_argument("--workers", type=int, help=f"decode threads (default: the cores given, here {default_workers()})")
    serve.add_argument("--progress-interval", type=float, dest="progress_interval_s",
                       help="seconds between indexing progress lines in the log (default 10)")
    serve.add_argument("--config", help="YAML file; flags override it")
    serve.add_argument("--device", help="auto | cpu | cuda | cuda:N (augmentation device)")
    serve.add_argument("--jpeg-backend", help="auto | cpu | nvjpeg | batched-cpu: JPEG tile decode (default auto)")
    serve.add_argument("--data-root", action="append", help="folder slides may be read from (repeatable)")
    serve.add_argument("--tile-cache-mb", type=float, help="decoded-tile cache size in MiB (default 512)")
    serve.add_argument("--forecast-batches", type=int,
                       help="batches per session whose tiles are announced to the tile cache before they are read, "
                            "so it keeps the tiles about to be used (default 64; 0 = plain LRU)")
    serve.add_argument("--tissue-cache-dir", help="folder to cache tissue masks in")
    serve.add_argument("--max-credits", type=int, help="most batches in flight per session (default 16)")
    serve.add_argument("--quarantine-after", type=int,
                       help="failed samples after which a slide is set aside until restart (default 3; docs/failures.md)")
    serve.add_argument("--max-inflight-mb", type=int,
                       help="memory for batches in flight, all sessions together (default 0: a quarter of the RAM)")
    serve.add_argument("--open-timeout-s", type=float, help="close streams that send no `open` within this (default 30)")
    serve.add_argument("--max-streams", type=int, help="Stream RPCs at once (default 200)")
    serve.add_argument("--max-streams-per-peer", type=int, help="Stream RPCs at once from one client host (default 64)")
    serve.add_argument("--synthetic", action="store_true", help="serve random pixels without reading slides")
    serve.add_argument("--tls-cert", help="PEM certificate chain of the server (enables TLS)")
    serve.add_argument("--tls-key", help="PEM private key of the server")
    serve.add_argument("--tls-client-ca", help="PEM CA bundle; clients must present a certificate it signed")
    serve.add_argument("--tokens-file", help="YAML mapping of bearer token -> list of datasets it may read")
    serve.set_defaults(func=_serve)

    inspect = sub.add_parser("inspect", help="print a slide's levels, mpp and tissue fraction")
    inspect.add_argument("slide")
    inspect.add_argument("--thumbnail", help="write a PNG thumbnail with the tissue mask drawn over it")
    inspect.add_argument("--json", action="store_true", help="one JSON object instead of text")
    inspect.set_defaults(func=_inspect)

    config = sub.add_parser("config", help="configuration helpers")
    config.add_argument("--print-defaults", action="store_true", required=True)
    config.set_defaults(func=_print_defaults)

    data = sub.add_parser("make-demo-data", help="write synthetic pyramidal slides and a manifest.csv")
    data.add_argument("directory")
    data.add_argument("--slides", type=int, default=6)
    data.add_argument("--size", type=int, default=4096)
    data.add_argument("--seed", type=int, default=0)
    data.set_defaults(func=_make_demo_data)

    health = sub.add_parser("health", help="gRPC health check (exit 0 when SERVING; prints the reason otherwise)")
    health.add_argument("--endpoint", default="127.0.0.1:50051")
    health.add_argument("--service", default="wsi_loader.v1.Loader",
                        help="wsi_loader.v1.Loader: ready to serve (readiness); '' : the process answers (liveness)")
    health.add_argument("--timeout", type=float, default=5.0)
    health.add_argument("--tls-ca", help="PEM CA of the server's certificate (when the service uses TLS)")
    health.add_argument("--client-cert", help="PEM client certificate (mutual TLS)")
    health.add_argument("--client-key", help="PEM client key (mutual TLS)")
    health.add_argument("--server-name", help="name the server's certificate is for, if not the endpoint's host")
    health.set_defaults(func=_health)

    demo = sub.add_parser("demo", help="synthetic slides + service + a trainer for a few steps")
    demo.add_argument("--workdir", default=None, help="where to write the slides (default: a temporary folder)")
    demo.add_argument("--slides", type=int, default=6)
    demo.add_argument("--steps", type=int, default=20)
    demo.add_argument("--workers", type=int, default=None)
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if "LOADER_LOG_LEVEL" in os.environ and "WSI_LOADER_LOG_LEVEL" not in os.environ:
        print("loader-service: LOADER_LOG_LEVEL is no longer read; set WSI_LOADER_LOG_LEVEL", file=sys.stderr)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    logging.getLogger("pyvips").setLevel(logging.WARNING)  # libvips reports every thread pool at INFO
    logging.getLogger("tifffile").setLevel(logging.ERROR)  # its parse warnings repeat the error we report
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError) as err:  # bad configuration, missing file, port in use: one line
        print(f"loader-service: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
