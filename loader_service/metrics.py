"""Prometheus metrics of one service instance (own registry, so several servers can share a process)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram, PlatformCollector, ProcessCollector,
                               start_http_server)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from loader_service.slides import CacheStats

__all__ = ["Metrics", "MetricsEndpoint", "METRIC_NAMES", "SLIDE_FAILURE_REASONS"]

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# Every metric family the service exports (the Grafana dashboard test checks its queries against a live scrape).
METRIC_NAMES = (
    "wsi_loader_patches_total",
    "wsi_loader_bytes_total",
    "wsi_loader_batches_total",
    "wsi_loader_stage_seconds",
    "wsi_loader_credits_available",
    "wsi_loader_batches_in_flight",
    "wsi_loader_active_sessions",
    "wsi_loader_sessions_total",
    "wsi_loader_sessions_resumed_total",
    "wsi_loader_errors_total",
    "wsi_loader_slides_opened_total",
    "wsi_loader_slides_failed_total",
    "wsi_loader_samples_decoded_total",
    "wsi_loader_tile_cache_hits_total",
    "wsi_loader_tile_cache_misses_total",
    "wsi_loader_tile_cache_bytes",
    "wsi_loader_tile_cache_capacity_bytes",
    "wsi_loader_tile_cache_hit_ratio",
    "wsi_loader_tile_cache_announced_bytes",
    "wsi_loader_shm_slots",
    "wsi_loader_shm_slots_reclaimed_total",
    "wsi_loader_cuda_slots",
    "wsi_loader_ready",
    "wsi_loader_dataset_slides",
    "wsi_loader_samples_failed_total",
    "wsi_loader_slides_quarantined_total",
    "wsi_loader_slides_skipped_total",
    "wsi_loader_inflight_bytes",
    "wsi_loader_inflight_budget_bytes",
    "wsi_loader_sessions_ended_total",
    "wsi_loader_streams_refused_total",
)

# Why a slide is left out of a dataset (the `reason` label of wsi_loader_slides_failed_total).
SLIDE_FAILURE_REASONS = ("outside_roots", "unreadable", "no_tissue")


class _LiveCollector(Collector):
    """Reads values that live elsewhere (tile cache, shared-memory pools) at scrape time."""

    def __init__(self) -> None:
        self._cache: Callable[[], CacheStats] | None = None
        self._shm: Callable[[], tuple[int, int]] | None = None
        self._cuda: Callable[[], tuple[int, int]] | None = None

    def collect(self) -> Iterator[Any]:
        if self._cache is not None:
            stats = self._cache()
            yield CounterMetricFamily("wsi_loader_tile_cache_hits", "Decoded-tile cache hits", value=stats.hits)
            yield CounterMetricFamily("wsi_loader_tile_cache_misses", "Decoded-tile cache misses", value=stats.misses)
            yield GaugeMetricFamily("wsi_loader_tile_cache_bytes", "Bytes held by the decoded-tile cache", value=stats.bytes)
            yield GaugeMetricFamily(
                "wsi_loader_tile_cache_capacity_bytes", "Capacity of the decoded-tile cache", value=stats.capacity
            )
            yield GaugeMetricFamily(
                "wsi_loader_tile_cache_announced_bytes",
                "Decoded size of the tiles that sessions announced they will read next (kept before other tiles)",
                value=stats.announced_bytes,
            )
            lookups = stats.hits + stats.misses
            yield GaugeMetricFamily(
                "wsi_loader_tile_cache_hit_ratio",
                "Hits over lookups of the decoded-tile cache since start",
                value=(stats.hits / lookups) if lookups else 0.0,
            )
        if self._shm is not None:
            in_use, free = self._shm()
            family = GaugeMetricFamily("wsi_loader_shm_slots", "Shared-memory batch slots by state", labels=["state"])
            family.add_metric(["in_use"], in_use)
            family.add_metric(["free"], free)
            yield family
        if self._cuda is not None:
            in_use, free = self._cuda()
            family = GaugeMetricFamily("wsi_loader_cuda_slots", "CUDA IPC batch slots (GPU memory) by state",
                                       labels=["state"])
            family.add_metric(["in_use"], in_use)
            family.add_metric(["free"], free)
            yield family


class Metrics:
    """The service's metrics. Pass one instance to every component; tests read values through ``sample``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.patches = Counter("wsi_loader_patches", "Samples (patches or images) served", ["dataset", "transport"], registry=r)
        self.bytes = Counter("wsi_loader_bytes", "Tensor bytes served", ["transport"], registry=r)
        self.batches = Counter("wsi_loader_batches", "Batches sent", ["transport"], registry=r)
        self.stage_seconds = Histogram(
            "wsi_loader_stage_seconds",
            "Latency of one batch in each pipeline stage (read = region read and decode)",
            ["stage"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.credits = Gauge("wsi_loader_credits_available", "Credits granted by clients and not yet used", registry=r)
        self.in_flight = Gauge("wsi_loader_batches_in_flight", "Batches being built or queued to send", registry=r)
        self.active_sessions = Gauge("wsi_loader_active_sessions", "Open streaming sessions", registry=r)
        self.sessions = Counter("wsi_loader_sessions", "Streaming sessions opened", registry=r)
        self.sessions_resumed = Counter(  # reconnects and pool failovers: a session opened mid-epoch
            "wsi_loader_sessions_resumed", "Sessions opened at a non-zero cursor (reconnects, pool failovers, resumes)", registry=r)
        self.errors = Counter("wsi_loader_errors", "Errors by kind", ["kind"], registry=r)
        self.slides_opened = Counter("wsi_loader_slides_opened", "Slides opened successfully", registry=r)
        self.slides_failed = Counter("wsi_loader_slides_failed", "Slides that could not be used", ["reason"], registry=r)
        self.samples_decoded = Counter(
            "wsi_loader_samples_decoded", "Samples read and decoded (shared by every rank of a job)", registry=r
        )
        self.samples_failed = Counter(
            "wsi_loader_samples_failed", "Samples not served as drawn, by reason (read, known_bad_tile, "
            "outside_roots, quarantined); with on_error=skip each was substituted", ["reason"], registry=r)
        self.slides_quarantined = Counter(
            "wsi_loader_slides_quarantined", "Slides set aside for the life of the service after failed samples",
            registry=r)
        self.slides_skipped = Counter(
            "wsi_loader_slides_skipped", "Slides a session left out because they cannot serve its level or mpp "
            "(counted per session), by reason", ["reason"], registry=r)
        for reason in ("read", "known_bad_tile", "outside_roots", "quarantined"):
            self.samples_failed.labels(reason=reason)
        self.shm_reclaimed = Counter(
            "wsi_loader_shm_slots_reclaimed", "Shared-memory slots taken back from vanished clients", registry=r
        )
        self.inflight_bytes = Gauge("wsi_loader_inflight_bytes",
                                    "Bytes of the in-flight memory budget in use (batches, messages, slot pools)",
                                    registry=r)
        self.inflight_budget = Gauge("wsi_loader_inflight_budget_bytes", "The in-flight memory budget (max_inflight_mb)",
                                     registry=r)
        self.sessions_ended = Counter("wsi_loader_sessions_ended", "Streaming sessions ended, by how", ["reason"],
                                      registry=r)
        for reason in ("completed", "client_closed", "client_gone", "error"):
            self.sessions_ended.labels(reason=reason)
        self.streams_refused = Counter("wsi_loader_streams_refused",
                                       "Streams refused or closed before a session: over a limit or no `open` in time",
                                       ["reason"], registry=r)
        for reason in ("max_streams", "max_streams_per_peer", "open_timeout"):
            self.streams_refused.labels(reason=reason)
        for kind in ("invalid_argument", "out_of_range", "not_found", "resource_exhausted", "permission_denied", "unauthenticated",
                     "slide_read", "stalled", "client_gone", "unavailable", "not_ready", "internal"):
            self.errors.labels(kind=kind)
        #: each stage's child of ``stage_seconds``, looked up once (``labels()`` costs microseconds per batch)
        self.stage: dict[str, Histogram] = {stage: self.stage_seconds.labels(stage=stage)
                                            for stage in ("read", "augment", "serialize", "send")}
        for reason in SLIDE_FAILURE_REASONS:  # exported as 0 from the start, so increase() sees the first one
            self.slides_failed.labels(reason=reason)
        self.ready = Gauge("wsi_loader_ready", "1 when every dataset is indexed and has usable slides "
                           "(the readiness health status), else 0", registry=r)
        self.dataset_slides = Gauge(
            "wsi_loader_dataset_slides",
            "Slides of each dataset by state: total and indexed while indexing; usable and failed once indexed",
            ["dataset", "state"], registry=r)
        ProcessCollector(registry=r)  # process_cpu_seconds_total, process_resident_memory_bytes, open fds, ...
        PlatformCollector(registry=r)  # python_info
        self._live = _LiveCollector()
        r.register(self._live)
        self._lock = threading.Lock()

    def watch_tile_cache(self, stats: Callable[[], CacheStats]) -> None:
        self._live._cache = stats

    def watch_shm(self, slots: Callable[[], tuple[int, int]]) -> None:
        self._live._shm = slots

    def watch_cuda(self, slots: Callable[[], tuple[int, int]]) -> None:
        self._live._cuda = slots

    def sample(self, name: str, labels: dict[str, str] | None = None) -> float:
        """Current value of one sample (for tests and the CLI summary); 0 when absent."""
        value = self.registry.get_sample_value(name, labels or {})
        return float(value or 0.0)


class MetricsEndpoint:
    """The HTTP /metrics endpoint; ``port`` is the bound port (useful with port 0)."""

    def __init__(self, metrics: Metrics, host: str, port: int) -> None:
        self._server, self._thread = start_http_server(port, addr=host, registry=metrics.registry)
        self.host = host
        self.port = int(self._server.server_port)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
