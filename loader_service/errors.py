"""Errors that cross the service boundary as data: each maps to one gRPC status and one metrics kind."""

from __future__ import annotations

import grpc

__all__ = [
    "ServiceError",
    "InvalidRequest",
    "NotFound",
    "TooLarge",
    "OutOfRange",
    "Forbidden",
    "Unauthenticated",
    "Unavailable",
    "NotReady",
    "Stalled",
    "SlideFailure",
]


class ServiceError(Exception):
    """Base of the errors a request can end with. ``code`` is the gRPC status, ``kind`` the metrics label."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    kind: str = "internal"


class InvalidRequest(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    kind = "invalid_argument"


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND
    kind = "not_found"


class TooLarge(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    kind = "resource_exhausted"


class OutOfRange(ServiceError):
    """A valid value the server will not serve (e.g. a resolution that would read too much from a finer level)."""

    code = grpc.StatusCode.OUT_OF_RANGE
    kind = "out_of_range"


class Forbidden(ServiceError):
    code = grpc.StatusCode.PERMISSION_DENIED
    kind = "permission_denied"


class Unauthenticated(ServiceError):
    code = grpc.StatusCode.UNAUTHENTICATED
    kind = "unauthenticated"


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE
    kind = "unavailable"


class NotReady(Unavailable):
    """Still starting (binding, compiling kernels, indexing): UNAVAILABLE, counted apart from real failures so
    clients retrying through a long index do not look like an error storm."""

    kind = "not_ready"


class Stalled(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    kind = "stalled"


class SlideFailure(ServiceError):
    """A slide that indexed fine failed while being read (corrupt tile data): the session ends with it."""

    code = grpc.StatusCode.DATA_LOSS
    kind = "slide_read"
