"""A service drained, killed or replaced mid-epoch: the stream reopens its session at the cursor and the epoch the
trainer sees is the undisturbed one (same samples, same order, same pixels). Wrong endpoints fail fast, by name."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from trainer_client import InvalidRequestError, LoaderClient, ReconnectPolicy, StreamConfig, UnavailableError, WSIStream
from trainer_client.cli import main as client_main

ROOT = Path(__file__).resolve().parents[1]
CONFIG = dict(dataset="train", batch_size=8, patch_size=64, samples_per_epoch=96, seed=3, credits=2, timeout_s=60,
              transport="grpc")


class Service:
    """`loader-service serve` in a subprocess, as a deployment runs it."""

    def __init__(self, dataset_dir: Path, port: int = 0) -> None:
        cmd = [sys.executable, "-m", "loader_service.cli", "serve", "--manifest", f"train={dataset_dir / 'manifest.csv'}",
               "--listen", f"127.0.0.1:{port}", "--metrics-port", "-1", "--workers", "2", "--device", "cpu",
               "--tissue-cache-dir", str(dataset_dir / ".tissue-cache")]
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, f"service did not start (exit {self.proc.poll()})"
        self.port = int(json.loads(line)["port"])
        self.endpoint = f"127.0.0.1:{self.port}"

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        self.proc.wait(timeout=60)

    def __enter__(self) -> Service:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=60)


def _key(batch: dict[str, Any]) -> list[tuple[str, int, int]]:
    """(slide_id, x, y) of each sample; a piece of a sample (tiles view) adds its index to the slide id."""
    ids = batch["slide_id"] if batch["piece"] is None else [f"{batch['slide_id'][0]}#{batch['piece']['index']}"]
    return list(zip(ids, batch["x"].tolist(), batch["y"].tolist()))


def _epoch(batches: Iterator[dict[str, Any]]) -> tuple[list[tuple[str, int, int]], torch.Tensor]:
    keys, images = [], []
    for batch in batches:
        keys += _key(batch)
        images.append(batch["images"].clone())
    return keys, torch.cat(images)


def _disturbed(stream: WSIStream, after: int, disturb: Any) -> tuple[list[tuple[str, int, int]], torch.Tensor]:
    """The epoch, with ``disturb()`` run once ``after`` batches were received."""
    def batches() -> Iterator[dict[str, Any]]:
        for i, batch in enumerate(stream):
            if i == after:
                disturb()
            yield batch
    return _epoch(batches())


@pytest.fixture(scope="module")
def undisturbed(dataset_dir: Path) -> tuple[list[tuple[str, int, int]], torch.Tensor]:
    with Service(dataset_dir) as service, WSIStream(StreamConfig(**CONFIG), endpoint=service.endpoint) as stream:
        return _epoch(iter(stream))


def _restarted_during(dataset_dir: Path, config: StreamConfig, after: int, sig: int
                      ) -> tuple[list[tuple[str, int, int]], torch.Tensor, WSIStream]:
    """The epoch read while the service is stopped with ``sig`` after ``after`` messages and restarted on its port."""
    services = [Service(dataset_dir)]
    port = services[0].port

    def restart() -> None:  # in the background, as the orchestrator does it: the stream is reconnecting meanwhile
        services[0].stop(sig)
        services.append(Service(dataset_dir, port))

    restarter = threading.Thread(target=restart)
    policy = ReconnectPolicy(backoff_s=0.2, max_backoff_s=1.0, deadline_s=90, attempts=200)
    config = dataclasses.replace(config, reconnect=policy)
    try:
        with WSIStream(config, endpoint=services[0].endpoint) as stream:
            keys, images = _disturbed(stream, after, restarter.start)
        return keys, images, stream
    finally:
        restarter.join(timeout=90)
        for service in services:
            service.__exit__()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["drained", "killed"])
def test_restart_on_the_same_port_leaves_the_epoch_unchanged(dataset_dir: Path, undisturbed: Any, sig: int) -> None:
    keys, images = undisturbed
    got_keys, got_images, stream = _restarted_during(dataset_dir, StreamConfig(**CONFIG), 3, sig)
    assert stream.stats.reconnects >= 1 and stream.stats.reconnect_attempts >= stream.stats.reconnects
    assert stream.stats.last_break
    assert stream.epoch == 1 and stream.cursor == 0
    assert got_keys == keys  # nothing lost, nothing repeated, same order
    assert torch.equal(got_images, images)  # same pixels: augmentation is a function of (seed, epoch, index)


def test_a_session_reopened_mid_sample_skips_the_pieces_already_handed_out(dataset_dir: Path) -> None:
    """Tiles view: a resumed session sends the sample's tiles from the first again; the trainer sees each once."""
    config = StreamConfig(dataset="train", batch_size=1, view="tiles", region_width=256, region_height=192,
                          tile_size=64, samples_per_epoch=2, seed=5, transport="grpc", tissue_threshold=0.2,
                          credits=2, timeout_s=60)

    with Service(dataset_dir) as service, WSIStream(config, endpoint=service.endpoint) as stream:
        keys, images = _epoch(iter(stream))
    assert len(keys) == 24 and len(set(keys)) == 24  # 2 samples of 4x3 tiles
    got_keys, got_images, resumed = _restarted_during(dataset_dir, config, 5, signal.SIGKILL)
    assert resumed.stats.reconnects >= 1
    assert got_keys == keys
    assert torch.equal(got_images, images)


@pytest.mark.parametrize("transport", ["grpc", "shm"])
def test_a_second_service_takes_over(dataset_dir: Path, undisturbed: Any, transport: str) -> None:
    """A rolling update: the first replica drains and exits, the stream moves to the next endpoint it knows
    (with shared memory: a new segment from the new replica; tensors of the old one stay valid)."""
    keys, images = undisturbed
    with Service(dataset_dir) as old, Service(dataset_dir) as new:
        policy = ReconnectPolicy(endpoints=(new.endpoint,), backoff_s=0.1, deadline_s=60)
        config = StreamConfig(**{**CONFIG, "transport": transport}, reconnect=policy)
        with WSIStream(config, endpoint=old.endpoint) as stream:
            got_keys, got_images = _disturbed(stream, 2, lambda: old.stop(signal.SIGTERM))
            assert stream.endpoint == new.endpoint and stream.transport == transport
            assert stream.stats.reconnects == 1
        assert got_keys == keys
        assert torch.equal(got_images, images)


def test_gives_up_after_the_policy_with_the_cursor(dataset_dir: Path) -> None:
    with Service(dataset_dir) as service:
        policy = ReconnectPolicy(attempts=3, backoff_s=0.05, max_backoff_s=0.1, connect_timeout_s=0.5)
        with WSIStream(StreamConfig(**CONFIG, reconnect=policy), endpoint=service.endpoint) as stream:
            received = 0
            start = time.monotonic()
            with pytest.raises(UnavailableError, match=r"gave up reconnecting after 3 attempt\(s\).*resume from cursor"):
                for _ in stream:
                    received += 1
                    if received == 1:
                        service.stop(signal.SIGKILL)
                        start = time.monotonic()
            assert time.monotonic() - start < 20
            assert stream.stats.reconnect_attempts == 3 and stream.stats.reconnects == 0
            assert stream.state_dict()["cursor"] == received * CONFIG["batch_size"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("endpoint", [f"127.0.0.1:{_free_port()}", "no-such-host.invalid:50051"])
def test_unreachable_endpoint_fails_fast_by_name(endpoint: str) -> None:
    start = time.monotonic()
    with WSIStream(StreamConfig(**CONFIG), endpoint=endpoint, connect_timeout_s=1.5) as stream:
        with pytest.raises(UnavailableError, match=f"cannot connect to the service at {endpoint} within 1.5s"):
            next(iter(stream))
    assert time.monotonic() - start < 10


def test_cli_names_the_unreachable_endpoint(capsys: pytest.CaptureFixture[str]) -> None:
    endpoint = f"127.0.0.1:{_free_port()}"
    start = time.monotonic()
    assert client_main(["datasets", "--endpoint", endpoint, "--connect-timeout", "1"]) == 1
    assert time.monotonic() - start < 10
    assert f"cannot connect to the service at {endpoint}" in capsys.readouterr().err


def test_dataloader_workers_are_refused(client: LoaderClient) -> None:
    """A worker's copy of the stream would advance its own cursor, never the one state_dict() saves."""
    stream = client.stream(StreamConfig(**CONFIG))
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=1)
    with pytest.raises(InvalidRequestError, match="num_workers=1.*state_dict"):
        next(iter(loader))
    assert stream.state_dict()["cursor"] == 0
    first = next(iter(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=0)))
    assert len(first["slide_id"]) == CONFIG["batch_size"]
    assert stream.state_dict()["cursor"] == CONFIG["batch_size"]
    stream.close()
