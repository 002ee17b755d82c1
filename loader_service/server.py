"""The gRPC server: datasets, on-demand regions and streaming sessions, with health and metrics."""

from __future__ import annotations

import functools
import logging
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
from grpc_health.v1 import health_pb2_grpc

from loader_service.annotations import COLUMN, AnnotationStore, SessionAnnotations
from loader_service.annotations.masks import Labeller
from loader_service.admission import StreamAdmission
from loader_service._numba_jit import uncached_kernels
from loader_service.augment import warm_up_cpu_kernels, warm_up_param_draws, warm_up_stain_kernels
from loader_service.sampling.streams import warm_up as warm_up_streams
from loader_service.budget import MemoryBudget, default_inflight_bytes
from loader_service.config import ServiceConfig
from loader_service.dataset import DatasetIndex, SlideHandles
from loader_service.errors import Forbidden, InvalidRequest, NotFound, NotReady, TooLarge, Unauthenticated
from loader_service.forecast import TileForecast
from loader_service.failures import FailureBudget, Quarantine
from loader_service.metrics import Metrics, MetricsEndpoint
from loader_service.pipeline import BatchBuilder, BuiltBatch, resolve_device
from loader_service.readiness import LOADER_SERVICE, Readiness
from loader_service.requests import SessionRequest
from loader_service.context import check_context
from loader_service.stain_request import StainFitter
from loader_service.sampling import CandidateCache, EpochPlan, Sample
from loader_service.session import Session
from loader_service.handoff import HandoffPool
from loader_service.slides import DecodePool, SlideError, TileCache, warm_up_read_kernels
from loader_service.tissue import TissueMaskCache
from loader_service.transport import warm_up_message_kernels
from loader_service.transport.cuda_ipc import CudaSlotPool, cuda_ipc_available
from loader_service.transport.shm import ShmRegistry, SlotPool, probe_is_visible, reclaim_orphans
from loader_service.jobs import JobRegistry
from loader_service.servicer import Servicer
from loader_service.sampling.synthetic import SYNTHETIC_DATASET, SyntheticPlan, SyntheticSource
from wsi_loader.v1 import loader_pb2 as pb
from wsi_loader.v1 import loader_pb2_grpc as pb_grpc

__all__ = ["LoaderServer"]

log = logging.getLogger(__name__)
SERVICE_NAME = LOADER_SERVICE
_VARIABLE_SIZE = "whole-slide samples differ in size, so they travel as gRPC bytes"


class LoaderServer:
    """One service instance. ``start()`` binds, then indexes the datasets; ``stop()`` drains and closes."""

    def __init__(self, config: ServiceConfig, metrics: Metrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or Metrics()
        self.device = resolve_device(config.device)
        self.draining = threading.Event()
        self.datasets: dict[str, DatasetIndex] = {}
        self.candidates: dict[str, CandidateCache] = {}
        self.annotation_files = AnnotationStore()  # parsed annotation files, shared by sessions
        self.stain_fitter = StainFitter()
        self.port = 0
        self.metrics_endpoint: MetricsEndpoint | None = None
        self._server: grpc.Server | None = None
        self.readiness = Readiness(self.metrics.ready)
        self._started = threading.Event()  # datasets indexed: RPCs other than health are answered
        self.jobs = JobRegistry()
        self.shm = ShmRegistry()
        self.cuda_pools = ShmRegistry()
        self.synthetic = SyntheticSource() if config.synthetic else None
        budget_bytes = config.max_inflight_mb * 2**20 or default_inflight_bytes()
        self.budget = MemoryBudget(budget_bytes, on_change=self.metrics.inflight_bytes.set)
        self.metrics.inflight_budget.set(budget_bytes)
        self.admission = StreamAdmission(config.max_streams, config.max_streams_per_peer)
        self.region_reads = threading.BoundedSemaphore(config.max_region_reads)

    # --- lifecycle ---------------------------------------------------------------------------------------
    def start(self, *, progress: bool | None = None) -> int:
        """Bind the metrics and gRPC ports, then index the datasets; returns the gRPC port once ready.

        Ports come first, so a port in use fails at once (OSError, one line), and metrics and health answer
        from the first second: health NOT_SERVING, with the reason, until every dataset is indexed.
        """
        cfg = self.config
        self.readiness.not_ready("starting: binding ports")
        if cfg.metrics_port >= 0:
            self.metrics_endpoint = _open_metrics(self.metrics, cfg.metrics_host, cfg.metrics_port)
        try:
            self._open_grpc()
        except BaseException:
            self._close_metrics()
            raise
        try:
            self._prepare(progress)
        except BaseException:
            self._abort_start()
            raise
        empty = [name for name, ds in self.datasets.items() if not ds.usable]
        if empty:
            self.readiness.not_ready(f"no usable slide in dataset {', '.join(empty)}: every slide was left out "
                                     "(the log names each slide and why)")
        else:
            self.readiness.serving(f"serving {', '.join(self.served_names()) or '(none)'}")
        log.info("serving %s on %s (port %d), device %s, %d workers%s", ", ".join(self.datasets) or "(none)",
                 cfg.listen, self.port, self.device, cfg.workers,
                 f", metrics at {self.metrics_endpoint.url}" if self.metrics_endpoint else "")
        return self.port

    def _prepare(self, progress: bool | None) -> None:
        """Everything after binding: caches, pools, kernels, the dataset index."""
        cfg = self.config
        self.tile_cache = TileCache(cfg.tile_cache_bytes)
        self.metrics.watch_tile_cache(self.tile_cache.stats)
        self.metrics.watch_shm(self.shm.slots)
        self.metrics.watch_cuda(self.cuda_pools.slots)
        reclaimed = reclaim_orphans()
        if reclaimed:
            self.metrics.shm_reclaimed.inc(reclaimed)
        self.decode_pool = DecodePool(cfg.workers, jpeg_backend=cfg.jpeg_backend, jpeg_device=cfg.device)
        self.handles = SlideHandles(cfg.max_open_slides, self.tile_cache, self.decode_pool)
        self.quarantine = Quarantine(cfg.quarantine_after, self.metrics)
        self.read_pool = HandoffPool(2 * cfg.workers, thread_name_prefix="read")
        self.batch_pool = HandoffPool(max(2, cfg.workers), thread_name_prefix="batch")
        self.builder = BatchBuilder(self.handles, self.read_pool, self.device, self.metrics, workers=cfg.workers)
        log.info("listening on %s (port %d)%s; preparing datasets", cfg.listen, self.port,
                 f", metrics at {self.metrics_endpoint.url}" if self.metrics_endpoint else "")
        if not cfg.synthetic:
            self.readiness.not_ready("starting: compiling the sampling, batch-read, batch-message and CPU augmentation kernels")
            started = time.perf_counter()
            warm_up_streams()  # the batch draws, reads and messages run on every device
            warm_up_param_draws()
            warm_up_read_kernels()
            warm_up_message_kernels()
            if self.device.type == "cpu":
                warm_up_cpu_kernels()  # compile or load them now, not on the first batch
                warm_up_stain_kernels()
            took = time.perf_counter() - started
            log.info("numba kernels ready in %.1f s", took)
            uncached = uncached_kernels()
            if uncached:
                log.warning("%d numba kernels could not be cached (%s) and were compiled in %.1f s; every start will "
                            "compile them again. Set NUMBA_CACHE_DIR to a writable folder that persists across "
                            "restarts (the images use /var/cache/wsi-loader/numba, on the cache volume)",
                            len(uncached), uncached[0], took)
        self._index_datasets(progress)
        self._started.set()

    def _abort_start(self) -> None:
        """A start that failed after binding: release the ports and whatever was made."""
        if self._server is not None:
            self._server.stop(0).wait()
            self._server = None
        for name in ("batch_pool", "read_pool"):
            pool = getattr(self, name, None)
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
        if getattr(self, "decode_pool", None) is not None:
            self.decode_pool.close()
        self._close_metrics()

    def _open_grpc(self) -> None:
        cfg = self.config
        options = [
            ("grpc.max_send_message_length", cfg.max_message_bytes),
            ("grpc.max_receive_message_length", 4 * 1024 * 1024),
            ("grpc.so_reuseport", 0),
        ]
        # Each stream holds one gRPC thread plus one request-reader thread for its whole life; at most max_streams
        # do (StreamAdmission), at most max_region_reads threads read regions, and control_threads are left for
        # ListDatasets, DescribeDataset, health and refusals: no number of streams starves them.
        threads = cfg.max_streams + cfg.max_region_reads + cfg.control_threads
        self._server = grpc.server(ThreadPoolExecutor(max_workers=threads, thread_name_prefix="grpc"), options=options)
        pb_grpc.add_LoaderServicer_to_server(Servicer(self), self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.readiness.servicer, self._server)
        try:
            self.port = self._bind(self._server)
        except BaseException:
            self._server = None
            raise
        self._server.start()

    def _index_datasets(self, progress: bool | None) -> None:
        cfg = self.config
        tissue_cache = TissueMaskCache(cfg.tissue_cache_dir) if cfg.tissue_cache_dir else None
        for dataset in cfg.datasets:
            def on_progress(done: int, total: int, name: str = dataset.name) -> None:
                self.metrics.dataset_slides.labels(dataset=name, state="total").set(total)
                self.metrics.dataset_slides.labels(dataset=name, state="indexed").set(done)
                self.readiness.not_ready(f"indexing dataset {name}: {done}/{total} slides", quiet=True)

            index = DatasetIndex.build(
                dataset, cfg.data_roots, metrics=self.metrics, tissue_cache=tissue_cache,
                tissue_max_size=cfg.tissue_max_size, workers=cfg.workers, progress=progress,
                progress_interval_s=cfg.progress_interval_s, on_progress=on_progress,
            )
            usable = len(index.usable)
            self.metrics.dataset_slides.labels(dataset=dataset.name, state="usable").set(usable)
            self.metrics.dataset_slides.labels(dataset=dataset.name, state="failed").set(len(index.records) - usable)
            self.datasets[dataset.name] = index
            self.candidates[dataset.name] = CandidateCache()

    def served_names(self) -> list[str]:
        return list(self.datasets) + ([SYNTHETIC_DATASET] if self.synthetic is not None else [])

    def check_started(self) -> None:
        """Raise UNAVAILABLE, saying what the service waits for, while it is still starting."""
        if not self._started.is_set():
            raise NotReady(f"the service is starting ({self.readiness.reason}); retry when its health check "
                           "reports SERVING")

    def _close_metrics(self) -> None:
        if self.metrics_endpoint is not None:
            self.metrics_endpoint.close()
            self.metrics_endpoint = None

    def _bind(self, server: grpc.Server) -> int:
        sec = self.config.security
        _check_port_free(self.config.listen)  # gRPC's own failure is a C-level log line and a bare 0
        try:
            return self._add_port(server, sec)
        except RuntimeError as err:  # grpcio raises RuntimeError("Failed to bind ...") on some versions
            raise OSError(f"cannot listen on {self.config.listen} (gRPC): the address is in use or not local; "
                          "stop the other process or choose another --listen") from err

    def _add_port(self, server: grpc.Server, sec: Any) -> int:
        if sec.tls:
            assert sec.tls_cert is not None and sec.tls_key is not None
            creds = grpc.ssl_server_credentials(
                [(sec.tls_key.read_bytes(), sec.tls_cert.read_bytes())],
                root_certificates=sec.tls_client_ca.read_bytes() if sec.tls_client_ca else None,
                require_client_auth=sec.tls_client_ca is not None,
            )
            port = server.add_secure_port(self.config.listen, creds)
        else:
            host = self.config.listen.rpartition(":")[0].strip("[]")
            if host not in ("127.0.0.1", "localhost", "::1"):
                log.warning("listening on %s WITHOUT TLS: anyone who can reach this address can read the data; "
                            "set tls_cert/tls_key, or listen on 127.0.0.1", self.config.listen)
            else:
                log.info("no TLS configured: listening on loopback only (%s)", self.config.listen)
            if sec.tokens and host not in ("127.0.0.1", "localhost", "::1"):
                log.warning("bearer tokens are configured without TLS on %s: they travel in clear text; "
                            "set tls_cert/tls_key", self.config.listen)
            port = server.add_insecure_port(self.config.listen)
        if port == 0:
            raise OSError(f"cannot listen on {self.config.listen} (gRPC): the address is in use or not local; "
                          "stop the other process or choose another --listen")
        return port

    def stop(self, grace: float | None = None) -> None:
        """Drain: refuse new sessions, let open ones finish the batches already in flight, then close."""
        if self._server is None:
            return
        self.draining.set()
        self.readiness.draining()
        self._server.stop(self.config.shutdown_grace_s if grace is None else grace).wait()
        self._server = None
        for pool in (self.batch_pool, self.read_pool):
            pool.shutdown(wait=True, cancel_futures=True)
        self.decode_pool.close()
        self.handles.close()
        self._close_metrics()

    def wait(self, timeout: float | None = None) -> bool:
        return self._server.wait_for_termination(timeout) if self._server else True

    def __enter__(self) -> LoaderServer:
        if self._server is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop(grace=1.0)

    # --- helpers used by the servicer --------------------------------------------------------------------
    def forecast_for(self, request: SessionRequest, plan: EpochPlan | SyntheticPlan) -> TileForecast | None:
        """What announces the tiles of the session's coming batches to the tile cache (None: nothing to announce:
        synthetic data, whole slides, tile and shard views, no cache, or ``forecast_batches`` 0)."""
        if (not isinstance(plan, EpochPlan) or self.config.forecast_batches == 0 or self.tile_cache.capacity == 0
                or request.spec.whole_slide or request.view.pieces_per_sample):
            return None
        return TileForecast(plan, self.handles, self.tile_cache, request.batch_size,
                            max_batches=self.config.forecast_batches)

    def plan_session(self, request: SessionRequest
                     ) -> tuple[EpochPlan | SyntheticPlan, Callable[..., BuiltBatch], Callable[..., BuiltBatch]]:
        """The session's epoch plan and its functions building a batch and a piece (tiles/shard views)."""
        if self.synthetic is not None and request.dataset == SYNTHETIC_DATASET:
            if request.view.view != "patches" or request.stain is not None or request.context:
                raise InvalidRequest("the synthetic dataset serves the patches view only, without stain normalisation "
                                     "or context")
            plan_s = SyntheticPlan(request.spec, request.epoch, request.rank, request.world_size, request.resume)
            build_s = functools.partial(self.synthetic.build, output=request.output)
            return plan_s, build_s, build_s
        ds = self.dataset(request.dataset)
        annotations = (SessionAnnotations(request.annotations, self.annotation_files, ds.usable)
                       if request.annotations.active or any(COLUMN in r.entry.extra for r in ds.usable) else None)
        plan = EpochPlan(ds, request.spec, request.epoch, request.rank, request.world_size, self.candidates[ds.name],
                         avoid=self.quarantine.snapshot(), unservable=request.unservable, resume=request.resume,
                         annotations=annotations)
        for reason in plan.skipped_reasons:
            self.metrics.slides_skipped.labels(reason=reason).inc()
        if request.spec.whole_slide:
            limit = self.config.max_region_pixels
            big = [r.slide_id for r, c in plan.slides if c.geometry.width * c.geometry.height > limit]
            if big:
                raise TooLarge(f"whole slides {big[:3]} exceed the server's limit of {limit} pixels at this level; "
                               "ask for a coarser level or a larger mpp")
        failures = FailureBudget(request.on_error, self.quarantine, plan.substitute, plan.label_index)
        common = dict(augment=request.augment, seed=request.spec.seed, epoch=request.epoch, output=request.output,
                      failures=failures)
        build = functools.partial(self.builder.build, **common)
        build_piece = functools.partial(self.builder.build_piece, **common)
        if request.stain is not None:
            stain = self.stain_fitter.config(request.stain, ds, request.spec, self.candidates[ds.name],
                                             self.builder.read, self.quarantine)
            build = functools.partial(build, stain=stain)
            build_piece = functools.partial(build_piece, stain=stain)  # the whole image normalised, then cut
            plan.stain_target = stain.target  # type: ignore[attr-defined]  # reported in SessionOpened
        if request.context:
            probes = [Sample(0, 0, r, c.geometry.level, c.geometry.mpp, 0, 0, request.spec.patch_size,
                             request.spec.height) for r, c in plan.slides]  # one per slide: fail at open
            check_context(probes, request.context, request.spec.mpp > 0, self._plan_read)
            build = functools.partial(build, context=request.context, context_by_mpp=request.spec.mpp > 0)
            build_piece = functools.partial(build_piece, context=request.context,  # with each sample's first piece
                                            context_by_mpp=request.spec.mpp > 0)
        if annotations is not None:  # classes at patch centres, masks when asked (docs/annotations.md)
            labeller = Labeller(annotations, request.augment, request.spec.seed, request.epoch, self.read_pool)
            build, build_piece = labeller.wrap(build), labeller.wrap(build_piece)
        return plan, build, build_piece

    def _plan_read(self, sample: Sample) -> None:
        """How ``sample`` would be read at its mpp (MppOutOfRange past MAX_READ_FACTOR); a slide that does not
        open is left to its reads (counted and substituted there)."""
        try:
            self.builder.handles.for_record(sample.record).read_plan(sample.mpp)
        except SlideError:  # e.g. its mpp is the manifest's: the read itself checks
            return

    def batch_cost(self, request: SessionRequest, plan: EpochPlan | SyntheticPlan) -> int:
        """Bytes one batch of this session holds in flight over gRPC: its tensor and its message (the tensor is
        dropped once the message holds the bytes, the message once gRPC took it), plus the raw region a piece
        is cut from. Refuses a session whose one batch would not fit the whole budget."""
        itemsize = {"uint8": 1, "float16": 2, "float32": 4}[request.output.dtype]
        nbytes = request.message_bytes()  # images plus the context patches and masks beside them
        if nbytes is None:  # whole slides: the largest one
            pixels = max(c.geometry.width * c.geometry.height for _, c in plan.slides) if isinstance(plan, EpochPlan) \
                else request.spec.patch_size * request.spec.height
            nbytes = 3 * pixels * itemsize + (pixels if request.annotations.masks else 0)
        cost = 2 * nbytes
        if request.view.pieces_per_sample and not request.spec.whole_slide:
            cost += 3 * request.spec.patch_size * request.spec.height * 4
        if cost > self.budget.total:
            raise TooLarge(f"one batch of this session needs {cost / 2**20:.0f} MiB in flight (tensor and message), over "
                           f"the server's in-flight memory budget of {self.budget.total / 2**20:.0f} MiB "
                           "(max_inflight_mb); lower batch_size, patch_size or the context sizes")
        return cost

    def reserve_slots(self, request: SessionRequest, session: Session) -> tuple[bool, str]:
        """Reserve the slot pool's memory in the budget before creating it; (False, why) when it does not fit."""
        pool_bytes = self._slot_count(request) * (request.tensor_bytes() or 0)
        assert session.account is not None
        if session.account.try_reserve(pool_bytes, within_share=False):
            return True, ""
        return False, (f"{self._slot_count(request)} slots ({pool_bytes / 2**20:.0f} MiB) do not fit the in-flight "
                       f"memory budget now ({self.budget.used / 2**20:.0f} of {self.budget.total / 2**20:.0f} MiB in "
                       "use, max_inflight_mb), so gRPC bytes")

    def open_transport(self, request: SessionRequest, session: Session
                       ) -> tuple[int, str, SlotPool | CudaSlotPool | None]:
        """The session's data plane: (transport, why not the one asked for, its slot pool or None).

        CUDA IPC falls back to shared memory (when the client's probe is visible here), then to gRPC bytes.
        """
        if request.transport not in (pb.SHM, pb.CUDA_IPC):
            return pb.GRPC, "", None
        if request.tensor_bytes() is None:
            return pb.GRPC, _VARIABLE_SIZE, None
        fits, why_not = self.reserve_slots(request, session)
        if not fits:
            return pb.GRPC, why_not, None
        transport, reason, pool = self._open_slots(request, session)
        if pool is None:
            session.account.release(self._slot_count(request) * (request.tensor_bytes() or 0))  # type: ignore[union-attr]
        else:
            # the built tensor until it is copied into its slot; context and masks travel inline in the message
            # (held by the built batch and the message until the batch drops them)
            session.gate.cost = (request.tensor_bytes() or 0) + 2 * request.inline_bytes()
        return transport, reason, pool

    def _open_slots(self, request: SessionRequest, session: Session) -> tuple[int, str, SlotPool | CudaSlotPool | None]:
        reason = ""
        if request.transport == pb.CUDA_IPC:
            cuda_pool, why = self.open_cuda_pool(request, session.gate.cond)
            if cuda_pool is not None:
                session.use_cuda(cuda_pool)
                return pb.CUDA_IPC, "", cuda_pool
            reason = f"CUDA IPC not used: {why}"
            if not request.shm_probe:
                return pb.GRPC, f"{reason}; no shared-memory probe sent, so gRPC bytes", None
        visible, why = probe_is_visible(request.shm_probe)
        if not visible:
            return pb.GRPC, f"{reason}; {why}" if reason else why, None
        pool = self.open_slot_pool(request, session.gate.cond)
        assert pool is not None  # tensor_bytes() is known
        session.use_shm(pool)
        return pb.SHM, f"{reason}; shared memory instead" if reason else "", pool

    def _slot_count(self, request: SessionRequest) -> int:
        return max(1, min(request.shm_slots or self.config.max_credits, self.config.max_credits + 8))

    def open_slot_pool(self, request: SessionRequest, cond: threading.Condition) -> SlotPool | None:
        """A slot pool sized for the session's largest message; None when that size is not known up front."""
        slot_bytes = request.tensor_bytes()
        if slot_bytes is None:
            return None
        pool = SlotPool(self._slot_count(request), slot_bytes, cond)
        self.shm.add(pool)
        return pool

    def open_cuda_pool(self, request: SessionRequest, cond: threading.Condition) -> tuple[CudaSlotPool | None, str]:
        """A CUDA IPC slot pool on the service's GPU, sized like the shared-memory one; or None and why not."""
        if self.device.type != "cuda":
            return None, f"service has no CUDA device (it runs on {self.device})"
        slot_bytes = request.tensor_bytes()
        if slot_bytes is None:
            return None, _VARIABLE_SIZE
        ok, why = cuda_ipc_available()
        if not ok:
            return None, f"service cannot share GPU memory: {why}"
        try:
            pool = CudaSlotPool(self._slot_count(request), slot_bytes, cond, self.device)
        except (RuntimeError, ValueError) as err:  # cudaMalloc out of memory, IPC not supported, ...
            log.warning("no CUDA IPC slot pool for a session, falling back: %s", err)
            return None, f"allocating the GPU slot pool failed: {err}"
        self.cuda_pools.add(pool)
        return pool, ""

    def close_slot_pool(self, pool: SlotPool | CudaSlotPool) -> None:
        with pool.cond:
            held = pool.held
        if isinstance(pool, CudaSlotPool):
            if held:
                log.info("CUDA slot pool %s closed with %d slots still held by the trainer", pool.name, held)
            self.cuda_pools.remove(pool)
        else:
            if held:
                self.metrics.shm_reclaimed.inc(held)
            self.shm.remove(pool)
        pool.close()

    def dataset(self, name: str) -> DatasetIndex:
        found = self.datasets.get(name)
        if found is None:
            raise NotFound(f"dataset {name!r} is not served here; known datasets: {sorted(self.datasets)}")
        return found

    def authorize(self, context: grpc.ServicerContext, dataset: str | None) -> frozenset[str] | None:
        """Check the caller's bearer token (and, given a dataset, that it may read it).

        Returns the datasets the caller may read, or None for all (no tokens configured, or a '*' token).
        """
        tokens = self.config.security.tokens
        if not tokens:
            return None
        metadata = dict(context.invocation_metadata())
        header = str(metadata.get("authorization", ""))
        if not header.startswith("Bearer "):
            raise Unauthenticated("this server needs a bearer token: send metadata `authorization: Bearer <token>`")
        allowed = tokens.get(header[len("Bearer "):])
        if allowed is None:
            raise Unauthenticated("the bearer token is not known to this server")
        if dataset is not None and "*" not in allowed and dataset not in allowed:
            raise Forbidden(f"this token may read {sorted(allowed)}, not dataset {dataset!r}")
        return None if "*" in allowed else frozenset(allowed)


def _check_port_free(listen: str) -> None:
    """Raise OSError (one line: which address, why, what to do) when HOST:PORT cannot be bound."""
    host, _, port = listen.rpartition(":")
    if int(port) == 0:
        return
    try:
        infos = socket.getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise OSError(f"cannot listen on {listen} (gRPC): {err.strerror}; check the host of --listen") from err
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds: TIME_WAIT is no conflict
        try:
            probe.bind(address)
        except OSError as err:
            raise OSError(f"cannot listen on {listen} (gRPC): {err.strerror}; stop the other process or choose "
                          "another --listen") from err


def _open_metrics(metrics: Metrics, host: str, port: int) -> MetricsEndpoint:
    try:
        return MetricsEndpoint(metrics, host, port)
    except OSError as err:
        raise OSError(f"cannot serve metrics on {host}:{port}: {err.strerror or err}; stop the other process or "
                      "choose another --metrics-port (-1 = no metrics endpoint)") from err
