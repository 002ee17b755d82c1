"""Connecting to a loader service: plaintext or TLS (optionally mutual), with an optional bearer token."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

__all__ = ["ConnectionConfig", "open_channel", "MAX_MESSAGE_BYTES"]

MAX_MESSAGE_BYTES = 1024 * 1024**2 + 1024**2  # one batch travels in one message


@dataclass(frozen=True)
class ConnectionConfig:
    endpoint: str
    tls_ca: Path | None = None  # PEM of the CA that signed the server's certificate; set to use TLS
    client_cert: Path | None = None  # mutual TLS
    client_key: Path | None = None
    token: str | None = None  # bearer token, sent as `authorization: Bearer <token>`
    server_name: str | None = None  # TLS name override (when the certificate names another host)
    timeout_s: float = 60.0  # unary-call deadline; stream waits use StreamConfig.timeout_s
    connect_timeout_s: float = 10.0  # how long to wait for the service to accept the connection

    def __post_init__(self) -> None:
        host, sep, port = self.endpoint.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"endpoint {self.endpoint!r} must be HOST:PORT, e.g. 127.0.0.1:50051")
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("mutual TLS needs both client_cert and client_key")
        if self.client_cert is not None and self.tls_ca is None:
            raise ValueError("client_cert needs tls_ca too (the CA that signed the server's certificate)")
        if self.timeout_s <= 0 or self.connect_timeout_s <= 0:
            raise ValueError(f"timeout_s ({self.timeout_s}) and connect_timeout_s ({self.connect_timeout_s}) "
                             "must be > 0")

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()


def open_channel(config: ConnectionConfig) -> grpc.Channel:
    options: list[tuple[str, object]] = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", 4 * 1024 * 1024),
    ]
    if config.server_name:
        options.append(("grpc.ssl_target_name_override", config.server_name))
    if config.tls_ca is None:
        return grpc.insecure_channel(config.endpoint, options=options)
    creds = grpc.ssl_channel_credentials(
        root_certificates=config.tls_ca.read_bytes(),
        private_key=config.client_key.read_bytes() if config.client_key else None,
        certificate_chain=config.client_cert.read_bytes() if config.client_cert else None,
    )
    return grpc.secure_channel(config.endpoint, creds, options=options)
