"""Trainer-side library: the loader client, streaming and decomposed trainers, memory strategies.

The client never imports ``loader_service``: a trainer host has no slides. Both share only the generated
protocol in ``wsi_loader.v1``.
"""

from trainer_client.channel import ConnectionConfig
from trainer_client.client import LoaderClient, StreamStats, WSIStream, decode_tensor
from trainer_client.config import ReconnectPolicy, StreamConfig
from trainer_client.elastic import merge_state_dicts
from trainer_client.errors import (
    AuthenticationError,
    DataLossError,
    InvalidRequestError,
    LoaderError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    StalledError,
    UnavailableError,
)
from trainer_client.pool import PoolConfig, PoolStats, PoolStream

__all__ = [
    "AuthenticationError",
    "ConnectionConfig",
    "DataLossError",
    "InvalidRequestError",
    "LoaderClient",
    "LoaderError",
    "NotFoundError",
    "PermissionDeniedError",
    "PoolConfig",
    "PoolStats",
    "PoolStream",
    "ReconnectPolicy",
    "ResourceExhaustedError",
    "StalledError",
    "StreamConfig",
    "StreamStats",
    "UnavailableError",
    "WSIStream",
    "decode_tensor",
    "merge_state_dicts",
]
