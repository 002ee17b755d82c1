"""TLS, mutual TLS and dataset-scoped bearer tokens, over real TLS on loopback.

The test makes its own PKI with `cryptography`: a CA, a server certificate for 127.0.0.1/localhost, a
client certificate, and a second ("rogue") CA whose certificates the server must not accept. One server
requires client certificates and bearer tokens and serves two datasets; a token for `alpha` must not read
`beta`.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.conftest import make_config

TOKEN_ALPHA = "alpha-only-token-" + "a" * 24  # may read dataset `alpha` only
TOKEN_ALL = "all-datasets-token-" + "b" * 24  # may read every dataset ('*')
TOKEN_UNKNOWN = "not-a-known-token-" + "c" * 24


# --- a throwaway PKI --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(folder: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> Issued:
    cert_path, key_path = folder / f"{stem}.crt", folder / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return Issued(cert_path, key_path)


def _make_ca(folder: Path, cn: str) -> tuple[Issued, x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn)).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _write(folder, cn, cert, key), cert, key


def _issue(folder: Path, stem: str, ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, *,
           server: bool) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    builder = (
        x509.CertificateBuilder().subject_name(_name(stem)).issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                              else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return _write(folder, stem, builder.sign(ca_key, hashes.SHA256()), key)


@dataclass(frozen=True)
class PKI:
    ca: Issued
    server: Issued
    client: Issued
    rogue_ca: Issued  # a CA the server does not trust
    rogue_client: Issued  # a client certificate signed by the rogue CA
    rogue_server: Issued  # a server certificate for localhost/127.0.0.1 signed by the rogue CA


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    folder = tmp_path_factory.mktemp("pki")
    ca, ca_cert, ca_key = _make_ca(folder, "test-ca")
    rogue, rogue_cert, rogue_key = _make_ca(folder, "rogue-ca")
    return PKI(
        ca=ca,
        server=_issue(folder, "server", ca_cert, ca_key, server=True),
        client=_issue(folder, "client", ca_cert, ca_key, server=False),
        rogue_ca=rogue,
        rogue_client=_issue(folder, "rogue-client", rogue_cert, rogue_key, server=False),
        rogue_server=_issue(folder, "rogue-server", rogue_cert, rogue_key, server=True),
    )


# --- the secured server -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def secure_server(dataset_dir: Path, pki: PKI) -> Iterator[object]:
    from loader_service.config import DatasetConfig, SecurityConfig
    from loader_service.server import LoaderServer

    security = SecurityConfig(tls_cert=pki.server.cert, tls_key=pki.server.key, tls_client_ca=pki.ca.cert,
                              tokens={TOKEN_ALPHA: ("alpha",), TOKEN_ALL: ("*",)})
    datasets = (DatasetConfig("alpha", dataset_dir / "manifest.csv"), DatasetConfig("beta", dataset_dir / "manifest.csv"))
    with LoaderServer(make_config(dataset_dir, security=security, datasets=datasets)) as srv:
        yield srv


def _client(server: object, pki: PKI, *, token: str | None = TOKEN_ALPHA, tls_ca: Path | None = None,
            cert: Issued | None = None, server_name: str | None = "localhost", host: str = "127.0.0.1",
            timeout_s: float = 10.0):
    from trainer_client import LoaderClient

    return LoaderClient(f"{host}:{server.port}", tls_ca=tls_ca or pki.ca.cert,  # type: ignore[attr-defined]
                        client_cert=cert.cert if cert else None, client_key=cert.key if cert else None,
                        token=token, server_name=server_name, timeout_s=timeout_s)


def _first_batches(client: object, dataset: str, n: int = 2) -> list[dict]:
    from trainer_client import StreamConfig

    config = StreamConfig(dataset=dataset, batch_size=4, patch_size=64, samples_per_epoch=64, transport="grpc",
                          timeout_s=30)
    got = []
    with client.stream(config) as stream:  # type: ignore[attr-defined]
        for batch in stream:
            got.append(batch)
            if len(got) == n:
                break
    return got


def _errors(server: object, kind: str) -> float:
    return server.metrics.sample("wsi_loader_errors_total", {"kind": kind})  # type: ignore[attr-defined]


# --- transport security -----------------------------------------------------------------------------------
def test_good_client_streams_batches_over_mutual_tls(secure_server: object, pki: PKI) -> None:
    with _client(secure_server, pki, cert=pki.client, token=TOKEN_ALL) as client:
        assert {"alpha", "beta"} <= {d.name for d in client.datasets()}
    with _client(secure_server, pki, cert=pki.client) as client:
        batches = _first_batches(client, "alpha", n=2)
    assert len(batches) == 2
    for batch in batches:
        assert tuple(batch["images"].shape)[0] == 4
        assert batch["images"].numel() == 4 * 64 * 64 * 3
        assert batch["labels"].shape[0] == 4


def test_server_certificate_is_verified_by_name_and_address(secure_server: object, pki: PKI) -> None:
    # No override: the client checks the certificate's IP SAN against 127.0.0.1 and accepts it.
    with _client(secure_server, pki, cert=pki.client, server_name=None) as client:
        assert client.datasets()
    # A name the certificate does not carry is refused by the client.
    from trainer_client import UnavailableError

    with _client(secure_server, pki, cert=pki.client, server_name="not-the-server.example", timeout_s=5) as client:
        with pytest.raises(UnavailableError):
            client.datasets()


def test_client_that_does_not_trust_the_servers_ca_is_refused(secure_server: object, pki: PKI) -> None:
    from trainer_client import UnavailableError

    with _client(secure_server, pki, cert=pki.client, tls_ca=pki.rogue_ca.cert, timeout_s=5) as client:
        with pytest.raises(UnavailableError):
            client.datasets()


def test_client_without_certificate_is_refused(secure_server: object, pki: PKI) -> None:
    from trainer_client import LoaderError, UnavailableError

    with _client(secure_server, pki, cert=None, timeout_s=5) as client:
        with pytest.raises(UnavailableError) as excinfo:
            client.datasets()
        with pytest.raises(LoaderError):  # the stream is refused too, before any batch
            _first_batches(client, "alpha", n=1)
    assert excinfo.value.code == grpc.StatusCode.UNAVAILABLE


def test_client_certificate_from_another_ca_is_refused(secure_server: object, pki: PKI) -> None:
    from trainer_client import UnavailableError

    with _client(secure_server, pki, cert=pki.rogue_client, timeout_s=5) as client:
        with pytest.raises(UnavailableError):
            client.datasets()


def test_plaintext_client_is_refused(secure_server: object) -> None:
    from trainer_client import LoaderClient, UnavailableError

    with LoaderClient(f"127.0.0.1:{secure_server.port}", token=TOKEN_ALPHA, timeout_s=5) as client:  # type: ignore[attr-defined]
        with pytest.raises(UnavailableError):
            client.datasets()


# --- bearer tokens ----------------------------------------------------------------------------------------
def test_wrong_or_missing_token_is_unauthenticated(secure_server: object, pki: PKI) -> None:
    from trainer_client import AuthenticationError

    before = _errors(secure_server, "unauthenticated")
    for token in (TOKEN_UNKNOWN, None):
        with _client(secure_server, pki, cert=pki.client, token=token) as client:
            with pytest.raises(AuthenticationError) as excinfo:
                client.datasets()
            assert excinfo.value.code == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(AuthenticationError):
                _first_batches(client, "alpha", n=1)
    assert _errors(secure_server, "unauthenticated") - before >= 4


def test_token_for_one_dataset_cannot_read_another(secure_server: object, pki: PKI) -> None:
    from trainer_client import PermissionDeniedError

    before = _errors(secure_server, "permission_denied")
    with _client(secure_server, pki, cert=pki.client, token=TOKEN_ALPHA) as client:
        with pytest.raises(PermissionDeniedError) as excinfo:
            _first_batches(client, "beta", n=1)
        assert excinfo.value.code == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(PermissionDeniedError):
            client.describe("beta")
        # ... while its own dataset still streams on the same connection.
        assert len(_first_batches(client, "alpha", n=1)) == 1
    assert _errors(secure_server, "permission_denied") - before >= 2
    # A wildcard token reads both.
    with _client(secure_server, pki, cert=pki.client, token=TOKEN_ALL) as client:
        assert len(_first_batches(client, "beta", n=1)) == 1


def test_list_datasets_shows_only_what_the_token_may_read(secure_server: object, pki: PKI) -> None:
    with _client(secure_server, pki, cert=pki.client, token=TOKEN_ALPHA) as client:
        assert {d.name for d in client.datasets()} == {"alpha"}


# --- what stays outside the gRPC port ---------------------------------------------------------------------
def test_health_and_metrics_need_no_token(secure_server: object, pki: PKI) -> None:
    """Probes and Prometheus must work without a token: health on the gRPC port, metrics on their own port."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    creds = grpc.ssl_channel_credentials(pki.ca.cert.read_bytes(), pki.client.key.read_bytes(),
                                         pki.client.cert.read_bytes())
    with grpc.secure_channel(f"127.0.0.1:{secure_server.port}", creds) as channel:  # type: ignore[attr-defined]
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="wsi_loader.v1.Loader"), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    endpoint = secure_server.metrics_endpoint  # type: ignore[attr-defined]
    assert endpoint is not None and endpoint.port != secure_server.port  # type: ignore[attr-defined]
    assert endpoint.host == "127.0.0.1"  # metrics_host defaults to loopback
    with urllib.request.urlopen(endpoint.url, timeout=10) as reply:
        body = reply.read().decode()
    assert "wsi_loader_errors_total" in body
    assert TOKEN_ALPHA not in body and TOKEN_ALL not in body  # no secret leaks into labels
