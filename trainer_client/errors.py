"""One exception family for everything that can go wrong between a trainer and the service."""

from __future__ import annotations

from typing import NoReturn

import grpc

__all__ = [
    "LoaderError",
    "InvalidRequestError",
    "NotFoundError",
    "ResourceExhaustedError",
    "PermissionDeniedError",
    "AuthenticationError",
    "UnavailableError",
    "StalledError",
    "DataLossError",
    "raise_from_rpc",
]


class LoaderError(Exception):
    """Base class: catch this to handle any loader failure. ``code`` is the gRPC status when there is one."""

    code: grpc.StatusCode | None = None


class InvalidRequestError(LoaderError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFoundError(LoaderError):
    code = grpc.StatusCode.NOT_FOUND


class ResourceExhaustedError(LoaderError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class PermissionDeniedError(LoaderError):
    code = grpc.StatusCode.PERMISSION_DENIED


class AuthenticationError(LoaderError):
    code = grpc.StatusCode.UNAUTHENTICATED


class UnavailableError(LoaderError):
    """The service is unreachable or shutting down; a stream can be resumed from the saved cursor."""

    code = grpc.StatusCode.UNAVAILABLE


class StalledError(LoaderError):
    """A wait ran past its timeout; the message says what stalled."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class DataLossError(LoaderError):
    """A slide failed while being read on the server (corrupt data)."""

    code = grpc.StatusCode.DATA_LOSS


_BY_CODE: dict[grpc.StatusCode, type[LoaderError]] = {
    cls.code: cls
    for cls in (InvalidRequestError, NotFoundError, ResourceExhaustedError, PermissionDeniedError,
                AuthenticationError, UnavailableError, StalledError, DataLossError)
    if cls.code is not None
}
_BY_CODE[grpc.StatusCode.OUT_OF_RANGE] = InvalidRequestError  # a valid value this server will not serve


def raise_from_rpc(err: grpc.RpcError, what: str) -> NoReturn:
    """Re-raise a gRPC error as the matching LoaderError, keeping the server's message."""
    code = err.code() if hasattr(err, "code") else None
    details = err.details() if hasattr(err, "details") else str(err)
    cls = _BY_CODE.get(code, LoaderError) if code is not None else LoaderError
    exc = cls(f"{what}: {details}" + (f" [{code.name}]" if code is not None else ""))
    exc.code = code
    raise exc from err
