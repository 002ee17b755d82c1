"""Service configuration: frozen dataclasses validated on construction.

Only the entry point (``loader_service.cli``) reads the command line, the environment and YAML files;
everything below it receives these objects.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["DatasetConfig", "ServiceConfig", "SecurityConfig", "config_from_mapping", "default_workers"]


def default_workers() -> int:
    """The cores this process may run on (respects taskset/cgroup CPU affinity)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class DatasetConfig:
    """One dataset: a manifest (CSV with a header, or JSON Lines) and the name clients use for it."""

    name: str
    manifest: Path

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise ValueError(
                f"dataset name {self.name!r} is invalid: use letters, digits, '-', '_' or '.' (e.g. 'train-2024')"
            )
        object.__setattr__(self, "manifest", Path(self.manifest))
        if self.manifest.suffix.lower() not in (".csv", ".jsonl", ".json"):
            raise ValueError(
                f"manifest {self.manifest} must be a .csv (with a header: path,label[,split,...]) or a .jsonl file"
            )


@dataclass(frozen=True)
class SecurityConfig:
    """TLS and bearer tokens for the gRPC port. Empty means plaintext, no tokens."""

    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # set to require client certificates (mutual TLS)
    tokens: dict[str, tuple[str, ...]] = field(default_factory=dict)  # token -> datasets it may read ('*' = all)

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both tls_cert and tls_key (PEM files); set both or neither")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca (mutual TLS) needs tls_cert and tls_key too")
        for token, datasets in self.tokens.items():
            if len(token) < 16:
                raise ValueError("bearer tokens must be at least 16 characters; generate one with `openssl rand -hex 24`")
            if not datasets:
                raise ValueError("each token must name the datasets it may read (a list; '*' for all)")

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None


@dataclass(frozen=True)
class ServiceConfig:
    """Everything `loader-service serve` needs. Every CLI flag has a field here (and a YAML key)."""

    datasets: tuple[DatasetConfig, ...] = ()
    data_roots: tuple[Path, ...] = ()  # empty: each manifest's own folder is its only root
    listen: str = "127.0.0.1:50051"
    metrics_port: int = 9108  # 0 = any free port; -1 = no metrics endpoint
    metrics_host: str = "127.0.0.1"
    workers: int = field(default_factory=default_workers)
    torch_threads: int = 1  # intra-op threads for CPU augmentation: batches already run in parallel (measured faster)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    jpeg_backend: str = "auto"  # auto | cpu | nvjpeg | batched-cpu: how JPEG tiles are decoded (docs/slides.md)
    tile_cache_bytes: int = 512 * 1024**2
    forecast_batches: int = 64  # batches per session whose tiles are announced to the tile cache ahead; 0 = off
    tissue_cache_dir: Path | None = None
    tissue_max_size: int = 2048
    max_region_pixels: int = 16384 * 16384
    max_batch_bytes: int = 1024 * 1024**2
    max_credits: int = 16
    max_open_slides: int = 256
    credit_timeout_s: float = 600.0
    quarantine_after: int = 3  # failed samples after which a slide is set aside for the life of the service
    shutdown_grace_s: float = 30.0
    max_message_bytes: int = 1024 * 1024**2 + 1024**2
    shm_slot_bytes: int = 0  # 0 = sized from the first batch
    progress_interval_s: float = 10.0  # start-up: one log line of indexing progress (done, rate, ETA) this often
    max_inflight_mb: int = 0  # memory for everything in flight, all sessions together; 0 = a quarter of the RAM
    open_timeout_s: float = 30.0  # a stream that sends no `open` within this is closed
    max_streams: int = 200  # Stream RPCs at once (each holds a thread); control RPCs have their own threads
    max_streams_per_peer: int = 64  # Stream RPCs at once from one client host
    max_region_reads: int = 8  # ReadRegion calls at once; more are refused (RESOURCE_EXHAUSTED)
    control_threads: int = 16  # threads kept for ListDatasets, DescribeDataset, health and refusals
    synthetic: bool = False
    security: SecurityConfig = field(default_factory=SecurityConfig)

    def __post_init__(self) -> None:
        object.__setattr__(self, "datasets", tuple(self.datasets))
        object.__setattr__(self, "data_roots", tuple(Path(p) for p in self.data_roots))
        if not self.datasets and not self.synthetic:
            raise ValueError("no dataset: pass --manifest PATH (repeatable, NAME=PATH to name it) or --synthetic")
        names = [d.name for d in self.datasets] + (["synthetic"] if self.synthetic else [])
        if len(set(names)) != len(names):
            raise ValueError(f"dataset names must be unique, got {names}; name them with --manifest NAME=PATH")
        host, sep, port = self.listen.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"listen address {self.listen!r} must be HOST:PORT, e.g. 127.0.0.1:50051 or [::]:50051")
        if not -1 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port {self.metrics_port} must be 0..65535 (0 = any free port) or -1 (off)")
        if self.torch_threads < 1:
            raise ValueError(f"torch_threads must be >= 1, got {self.torch_threads}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValueError(f"device {self.device!r} must be auto, cpu, cuda or cuda:N")
        if self.jpeg_backend not in ("auto", "cpu", "nvjpeg", "batched-cpu"):
            raise ValueError(
                f"jpeg_backend {self.jpeg_backend!r} must be auto, cpu, nvjpeg or batched-cpu "
                "(auto: nvJPEG on the GPU when it measures faster, else the CPU decode threads)"
            )
        if self.jpeg_backend == "nvjpeg" and self.device == "cpu":
            raise ValueError("jpeg_backend 'nvjpeg' decodes on the GPU but device is 'cpu'; set device to auto/cuda or jpeg_backend to auto/cpu")
        for name in ("tile_cache_bytes", "max_region_pixels", "max_batch_bytes", "max_credits", "max_open_slides"):
            if getattr(self, name) < (0 if name == "tile_cache_bytes" else 1):
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.forecast_batches < 0:
            raise ValueError(f"forecast_batches must be >= 0 (0 turns announced reads off), got {self.forecast_batches}")
        if not self.progress_interval_s > 0:
            raise ValueError(f"progress_interval_s must be > 0 seconds, got {self.progress_interval_s}")
        if self.quarantine_after < 1:
            raise ValueError(f"quarantine_after must be >= 1 failed samples per slide, got {self.quarantine_after}")
        for name in ("max_streams", "max_streams_per_peer", "max_region_reads", "control_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_inflight_mb < 0:
            raise ValueError(f"max_inflight_mb must be >= 0 (0 = a quarter of the machine's RAM), got {self.max_inflight_mb}")
        if not 0 < self.open_timeout_s < float("inf"):
            raise ValueError(f"open_timeout_s must be a positive number of seconds, got {self.open_timeout_s}")
        if self.max_message_bytes < self.max_batch_bytes:
            raise ValueError("max_message_bytes must be at least max_batch_bytes (a batch travels in one message)")

    @property
    def listen_port(self) -> int:
        return int(self.listen.rpartition(":")[2])

    def to_dict(self) -> dict[str, Any]:
        def plain(value: Any) -> Any:
            if isinstance(value, Path):
                return str(value)
            if isinstance(value, (list, tuple)):
                return [plain(v) for v in value]
            if isinstance(value, dict):
                return {k: plain(v) for k, v in value.items()}
            if dataclasses.is_dataclass(value):
                return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
            return value

        return plain(self)


def config_from_mapping(data: dict[str, Any]) -> ServiceConfig:
    """Build a ServiceConfig from a plain mapping (a parsed YAML file merged with CLI flags)."""
    known = {f.name for f in dataclasses.fields(ServiceConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown configuration keys {unknown}; `loader-service config --print-defaults` lists them")
    values = dict(data)
    if values.get("workers") == "auto":  # `config --print-defaults` writes this: the cores of the machine it runs on
        del values["workers"]
    datasets = []
    for entry in values.get("datasets", ()):
        if isinstance(entry, DatasetConfig):
            datasets.append(entry)
        elif isinstance(entry, dict) and set(entry) <= {"name", "manifest"}:
            datasets.append(DatasetConfig(name=entry["name"], manifest=Path(entry["manifest"])))
        else:
            raise ValueError(f"each dataset needs `name` and `manifest`, got {entry!r}")
    values["datasets"] = tuple(datasets)
    if "security" in values and isinstance(values["security"], dict):
        sec = dict(values["security"])
        for key in ("tls_cert", "tls_key", "tls_client_ca"):
            if sec.get(key):
                sec[key] = Path(sec[key])
        sec["tokens"] = {str(k): tuple(v) if isinstance(v, (list, tuple)) else (str(v),) for k, v in sec.get("tokens", {}).items()}
        values["security"] = SecurityConfig(**sec)
    if values.get("tissue_cache_dir"):
        values["tissue_cache_dir"] = Path(values["tissue_cache_dir"])
    return ServiceConfig(**values)
