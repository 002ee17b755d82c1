"""What the service tells probes and operators about its state, from the first second of start-up.

Two health services (the standard gRPC health protocol):

- ``""`` (the server as a whole): SERVING as soon as the port is bound, NOT_SERVING only while draining.
  Liveness and start-up probes check this one, so a long index never gets the pod restarted.
- ``wsi_loader.v1.Loader``: NOT_SERVING until every dataset is indexed, and while a dataset has no usable
  slide; readiness probes check this one, so trainers reach only a service that can serve them.

Every answer carries the reason for its status in the trailing metadata ``wsi-loader-reason``
(``loader-service health`` prints it), the same reason is logged when it changes, and the gauge
``wsi_loader_ready`` follows the readiness status for alerts.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2

__all__ = ["Readiness", "REASON_METADATA_KEY", "LOADER_SERVICE"]

log = logging.getLogger(__name__)
REASON_METADATA_KEY = "wsi-loader-reason"
LOADER_SERVICE = "wsi_loader.v1.Loader"
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class _HealthWithReason(health.HealthServicer):
    """The stock health servicer, adding the current reason to every Check answer."""

    def __init__(self, reason: Any) -> None:
        super().__init__()
        self._reason = reason

    def Check(self, request: health_pb2.HealthCheckRequest, context: grpc.ServicerContext
              ) -> health_pb2.HealthCheckResponse:
        reply = super().Check(request, context)
        text = self._reason(request.service)
        if text:
            # Metadata values are ASCII: keep the reason readable rather than dropping it.
            context.set_trailing_metadata(((REASON_METADATA_KEY, text.encode("ascii", "replace").decode()),))
        return reply


class Readiness:
    """The service's start-up state: the health servicer, the reason, and the ``wsi_loader_ready`` gauge."""

    def __init__(self, ready_gauge: Any) -> None:
        self._lock = threading.Lock()
        self._reason = "starting"
        self._ready = False
        self._gauge = ready_gauge
        self._gauge.set(0)
        self.servicer = _HealthWithReason(self._reason_for)
        self.servicer.set("", _SERVING)
        self.servicer.set(LOADER_SERVICE, _NOT_SERVING)

    def _reason_for(self, service: str) -> str:
        with self._lock:
            if service == "":
                return "draining" if self._reason == "draining" else "alive"
            return self._reason

    @property
    def reason(self) -> str:
        with self._lock:
            return self._reason

    @property
    def ready(self) -> bool:
        with self._lock:
            return self._ready

    def not_ready(self, reason: str, *, quiet: bool = False) -> None:
        """NOT_SERVING for the loader service, with what it waits for or what is wrong (logged unless quiet)."""
        with self._lock:
            changed = reason != self._reason
            self._reason, self._ready = reason, False
        self._gauge.set(0)
        self.servicer.set(LOADER_SERVICE, _NOT_SERVING)
        if changed and not quiet:
            log.info("not ready: %s", reason)

    def serving(self, reason: str = "ready") -> None:
        with self._lock:
            self._reason, self._ready = reason, True
        self._gauge.set(1)
        self.servicer.set(LOADER_SERVICE, _SERVING)
        log.info("ready: %s", reason)

    def draining(self) -> None:
        """Every service NOT_SERVING for good: the pod leaves the Service before it stops."""
        with self._lock:
            self._reason, self._ready = "draining", False
        self._gauge.set(0)
        self.servicer.enter_graceful_shutdown()
