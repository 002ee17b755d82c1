"""The gRPC handlers: each RPC of ``wsi_loader.v1.Loader`` on top of a :class:`LoaderServer`.

Unary handlers run through :func:`_guard` (typed errors become their gRPC status and are counted); ``Stream``
admits the call, opens a session and yields its batches, and accounts for how it ended.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

import grpc

from loader_service.admission import OpenTimeout, Refused, first_message
from loader_service.annotations import describe_annotations
from loader_service.dataset import SlideOutsideRoots
from loader_service.errors import (Forbidden, InvalidRequest, NotFound, OutOfRange, ServiceError, SlideFailure,
                                   TooLarge, Unavailable)
from loader_service.failures import sample_failed
from loader_service.requests import SessionRequest, parse_open
from loader_service.sampling.synthetic import SYNTHETIC_DATASET
from loader_service.session import Session, SessionLimits, check_open
from loader_service.slides import MppOutOfRange, SlideError
from loader_service.transport import encode_tensor
from loader_service.transport.cuda_ipc import CudaSlotPool
from loader_service.transport.shm import SlotPool
from wsi_loader.v1 import loader_pb2 as pb
from wsi_loader.v1 import loader_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from loader_service.server import LoaderServer

__all__ = ["Servicer"]

log = logging.getLogger(__name__)
T = TypeVar("T")


def _guard(server: LoaderServer, context: grpc.ServicerContext, call: Callable[[], T]) -> T:
    """Run a unary handler; typed errors become their gRPC status and are counted."""
    try:
        server.check_started()
        return call()
    except ServiceError as err:
        server.metrics.errors.labels(kind=err.kind).inc()
        context.abort(err.code, str(err))
    except Exception as err:  # noqa: BLE001 - never crash the server on one request
        log.exception("internal error")
        server.metrics.errors.labels(kind="internal").inc()
        context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(err).__name__}: {err}")
    raise AssertionError("unreachable")  # context.abort raises


class Servicer(pb_grpc.LoaderServicer):
    """The Loader service's handlers; one per server."""

    def __init__(self, server: LoaderServer) -> None:
        self.s = server

    def ListDatasets(self, request: pb.ListDatasetsRequest, context: grpc.ServicerContext) -> pb.ListDatasetsResponse:
        def run() -> pb.ListDatasetsResponse:
            allowed = self.s.authorize(context, None)
            found = [
                pb.DatasetSummary(name=d.name, slides=len(d.usable), failed_slides=len(d.records) - len(d.usable),
                                  labels=d.labels)
                for d in self.s.datasets.values() if allowed is None or d.name in allowed
            ]
            if self.s.synthetic is not None and (allowed is None or SYNTHETIC_DATASET in allowed):
                found.append(pb.DatasetSummary(name=SYNTHETIC_DATASET, labels=["synthetic"]))
            return pb.ListDatasetsResponse(datasets=found)
        return _guard(self.s, context, run)

    def DescribeDataset(self, request: pb.DescribeDatasetRequest, context: grpc.ServicerContext) -> pb.DatasetInfo:
        def run() -> pb.DatasetInfo:
            self.s.authorize(context, request.dataset)
            ds = self.s.dataset(request.dataset)
            described = pb.DatasetInfo(name=ds.name, labels=ds.labels, slides=[_slide_summary(r) for r in ds.records])
            describe_annotations(described, ds.records, self.s.annotation_files)
            return described
        return _guard(self.s, context, run)

    def ReadRegion(self, request: pb.ReadRegionRequest, context: grpc.ServicerContext) -> pb.Tensor:
        def run() -> pb.Tensor:
            self.s.authorize(context, request.dataset)
            ds = self.s.dataset(request.dataset)
            record = ds.by_id.get(request.slide_id)
            if record is None:
                raise NotFound(f"slide {request.slide_id!r} is not in dataset {ds.name!r}; DescribeDataset lists its slides")
            if not record.usable:
                raise NotFound(f"slide {request.slide_id!r} is left out of dataset {ds.name!r}: {record.error}")
            if request.width < 1 or request.height < 1:
                raise InvalidRequest(f"region size {request.width}×{request.height} must be at least 1×1")
            if request.width * request.height > self.s.config.max_region_pixels:
                raise TooLarge(f"region {request.width}×{request.height} exceeds the server's limit of "
                               f"{self.s.config.max_region_pixels} pixels; read it in smaller pieces")
            assert record.info is not None
            if not math.isfinite(request.mpp) or request.mpp < 0:
                raise InvalidRequest(f"mpp must be a finite number >= 0 (0 = use level), got {request.mpp}")
            if request.mpp <= 0 and not 0 <= request.level < len(record.info.levels):
                raise InvalidRequest(f"level {request.level} does not exist: slide {request.slide_id} has levels "
                                     f"0..{len(record.info.levels) - 1}")
            try:
                slide = self.s.handles.for_record(record)  # re-checks the data roots
            except SlideOutsideRoots as err:
                self.s.quarantine.failed(sample_failed(record, err))
                raise Forbidden(f"slide {record.slide_id} now resolves outside the server's data roots; it is refused "
                                "and quarantined (ask the operator to restore it)") from err
            except SlideError as err:
                failure = sample_failed(record, err)
                self.s.quarantine.failed(failure)
                raise SlideFailure(f"slide {record.slide_id}: {failure.detail}") from err
            factor = _mpp_read_factor(slide, record, request.mpp) if request.mpp else 1.0
            source = request.width * request.height * factor ** 2
            if source > self.s.config.max_region_pixels:
                raise TooLarge(f"region {request.width}×{request.height} at {request.mpp:g} µm/px reads {source:.0f} "
                               f"pixels, over the server's limit of {self.s.config.max_region_pixels} "
                               "(max_region_pixels); read it in smaller pieces")
            with _region_read(self.s, 2 * 3 * request.width * request.height + 3 * int(source)):
                try:
                    if request.mpp > 0:
                        pixels = slide.read_region_mpp(request.mpp, request.x, request.y, request.width, request.height)
                    else:
                        pixels = slide.read_region(request.level, request.x, request.y, request.width, request.height)
                except SlideError as err:
                    failure = sample_failed(record, err)
                    self.s.quarantine.failed(failure)
                    raise SlideFailure(f"slide {record.slide_id}: {failure.detail}") from err
                except MppOutOfRange as err:
                    raise OutOfRange(f"slide {record.slide_id}: {err}") from err
                except ValueError as err:
                    raise InvalidRequest(str(err)) from err
                return encode_tensor(pixels)
        return _guard(self.s, context, run)

    def Stream(self, requests: Iterator[pb.StreamRequest], context: grpc.ServicerContext) -> Iterator[pb.StreamResponse]:
        s = self.s
        try:
            if s.draining.is_set():
                raise Unavailable("server is shutting down; connect to another replica or retry after restart")
            admitted = s.admission.admit(context.peer())
            admitted.__enter__()
        except ServiceError as err:
            s.metrics.errors.labels(kind=err.kind).inc()
            if isinstance(err, Refused):
                s.metrics.streams_refused.labels(reason=err.reason).inc()
            context.abort(err.code, str(err))
        try:
            yield from self._session(requests, context)
        finally:
            admitted.__exit__(None, None, None)

    def _session(self, requests: Iterator[pb.StreamRequest], context: grpc.ServicerContext
                 ) -> Iterator[pb.StreamResponse]:
        s = self.s
        session: Session | None = None
        pool: SlotPool | CudaSlotPool | None = None
        request: SessionRequest | None = None
        joined = errored = False
        try:
            s.check_started()
            s.authorize(context, None)  # who is asking, before looking at what is asked
            first = first_message(requests, s.config.open_timeout_s)
            request = parse_open(check_open(first), s.config.max_batch_bytes, s.config.max_region_pixels)
            s.authorize(context, request.dataset)
            plan, build, build_piece = s.plan_session(request)
            cost = s.batch_cost(request, plan)
            s.jobs.join(request)
            joined = True
            limits = SessionLimits(s.config.max_credits, s.config.credit_timeout_s)
            account = s.budget.open_account(floor=cost)
            if account is None:
                raise TooLarge(f"the in-flight memory budget is full ({s.budget.used / 2**20:.0f} of "
                               f"{s.budget.total / 2**20:.0f} MiB held by {s.budget.accounts} sessions, max_inflight_mb) "
                               f"and this session needs {cost / 2**20:.0f} MiB for one batch; retry later, read or close "
                               "idle sessions, or lower batch_size")
            session = Session(request, plan, build, s.batch_pool, s.metrics, limits, s.draining, build_piece,
                              account=account, batch_cost=cost, forecast=s.forecast_for(request, plan))
            transport, reason, pool = s.open_transport(request, session)
            context.add_callback(session.on_rpc_done)
            threading.Thread(target=session.consume_requests, args=(requests,), daemon=True,
                             name=f"credits-{session.id}").start()
            s.metrics.sessions.inc()
            if request.cursor:  # a reconnect, a pool failover, a resumed checkpoint
                s.metrics.sessions_resumed.inc()
            s.metrics.active_sessions.inc()
            yield pb.StreamResponse(opened=pb.SessionOpened(
                session_id=session.id, shard_length=plan.shard_length, batches=session.cursor.remaining_batches(),
                transport=transport, transport_reason=reason, labels=plan.labels,
                shm_segment=pool.name if isinstance(pool, SlotPool) else "",
                skipped_slides=getattr(plan, "skipped", []), stain_target=getattr(plan, "stain_target", ()),
                annotation_classes=plan.annotations.classes if getattr(plan, "annotations", None) else [],
            ))
            yield from session.batches()
        except ServiceError as err:
            errored = True
            s.metrics.errors.labels(kind=err.kind).inc()
            if isinstance(err, OpenTimeout):
                s.metrics.streams_refused.labels(reason="open_timeout").inc()
            context.abort(err.code, str(err))
        except Exception as err:  # noqa: BLE001
            if context.is_active():
                errored = True
                log.exception("session failed")
                s.metrics.errors.labels(kind="internal").inc()
                context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(err).__name__}: {err}")
        finally:
            if session is not None:
                reason = _end_reason(session, errored, cancelled=not context.is_active())
                s.metrics.sessions_ended.labels(reason=reason).inc()
                if reason == "client_gone":  # cancelled or vanished without half-closing
                    s.metrics.errors.labels(kind="client_gone").inc()
                s.metrics.active_sessions.dec()
            if joined and request is not None:
                s.jobs.leave(request)
            if pool is not None:
                s.close_slot_pool(pool)
            if session is not None:
                session.close()


def _end_reason(session: Session, errored: bool, cancelled: bool) -> str:
    """How a session ended. A client that cancels its call may also end its request stream first (gRPC can
    deliver either to the request thread): the cancelled RPC, not the half-close, decides that it is gone."""
    if errored:
        return "error"
    if session.completed:
        return "completed"
    return "client_closed" if session.client_closed.is_set() and not cancelled else "client_gone"


def _mpp_read_factor(slide: Any, record: Any, mpp: float) -> float:
    """How many decoded pixels per output pixel (per side) a read at ``mpp`` takes; checked before reading.

    Slides without mpp and targets finer than level 0 are the client's error; OutOfRange past MAX_READ_FACTOR.
    """
    try:
        return float(slide.read_plan(mpp)[2])
    except MppOutOfRange as err:
        raise OutOfRange(f"slide {record.slide_id}: {err}") from err
    except SlideError as err:  # no mpp metadata, or finer than level 0: nothing is wrong with the file
        raise InvalidRequest(f"slide {record.slide_id} cannot be read at {mpp:g} µm/px: {err}") from err
    except ValueError as err:
        raise InvalidRequest(str(err)) from err


@contextlib.contextmanager
def _region_read(server: LoaderServer, nbytes: int) -> Iterator[None]:
    """One of max_region_reads, holding ``nbytes`` of the in-flight budget; waits up to open_timeout_s for both."""
    timeout = server.config.open_timeout_s
    if nbytes > server.budget.total:
        raise TooLarge(f"this region needs {nbytes / 2**20:.0f} MiB in flight, over the server's in-flight memory "
                       f"budget of {server.budget.total / 2**20:.0f} MiB (max_inflight_mb); read smaller regions")
    if not server.region_reads.acquire(blocking=False):  # never park a thread that control RPCs need
        raise TooLarge(f"{server.config.max_region_reads} region reads are in progress (max_region_reads); "
                       "retry when one ended")
    freed = threading.Event()
    account = server.budget.open_account(freed.set)
    assert account is not None  # no floor: always opens
    try:
        deadline = time.monotonic() + timeout
        while not account.try_reserve(nbytes, within_share=False):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TooLarge(f"the in-flight memory budget ({server.budget.total / 2**20:.0f} MiB, max_inflight_mb) "
                               f"had no room for this region's {nbytes / 2**20:.0f} MiB within {timeout:g} s; retry later")
            freed.clear()
            freed.wait(min(left, 1.0))
        yield
    finally:
        account.close()
        server.region_reads.release()


def _slide_summary(record: Any) -> pb.SlideSummary:
    info = record.info
    levels = [pb.Level(width=lv.width, height=lv.height, downsample=lv.downsample, tile_width=lv.tile_width,
                       tile_height=lv.tile_height) for lv in info.levels] if info else []
    return pb.SlideSummary(
        slide_id=record.slide_id, label=record.entry.label, split=record.entry.split,
        vendor=info.vendor if info else "", levels=levels, mpp=(info.mpp or 0.0) if info else 0.0,
        tissue_fraction=record.tissue.tissue_fraction if record.tissue else 0.0, error=record.error,
    )
