"""Start-up an operator can see: ports, metrics and health first; readiness with a reason; progress lines.

Indexing is held, without mocking anything, by a FIFO placed where the tissue-mask cache file of the last
slide will be looked up: the service's read of it blocks until this test writes to the FIFO.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loader_service.cli import _parser, build_config
from loader_service.config import DatasetConfig
from loader_service.readiness import REASON_METADATA_KEY
from loader_service.server import LoaderServer
from loader_service.tissue import TissueMaskCache, TissueParams
from tests.conftest import make_config
from trainer_client import LoaderClient, UnavailableError

ROOT = Path(__file__).resolve().parents[1]
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def wait_for(predicate: Callable[[], Any], timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return bool(predicate())


def check(port: int, service: str) -> tuple[int, str]:
    """(status, reason) of one health service."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply, call = health_pb2_grpc.HealthStub(channel).Check.with_call(
            health_pb2.HealthCheckRequest(service=service), timeout=10)
    return reply.status, dict(call.trailing_metadata() or ()).get(REASON_METADATA_KEY, "")


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return reply.read().decode()


def sample(text: str, line_start: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def hold_last_slide(dataset_dir: Path, cache_dir: Path) -> Path:
    """A FIFO where the last slide's tissue mask will be looked up: indexing blocks there until written."""
    last = (dataset_dir / "manifest.csv").read_text().strip().splitlines()[-1].split(",")[0]
    slide = Path(os.path.realpath(dataset_dir / last))
    fifo = TissueMaskCache(cache_dir).path_for(slide, 2048, TissueParams())
    os.mkfifo(fifo)
    return fifo


def release(fifo: Path) -> None:
    with open(fifo, "wb") as writer:  # not an .npz: the service logs it, recomputes and replaces the file
        writer.write(b"not a cached mask")


@pytest.fixture()
def held_start(dataset_dir: Path, tmp_path: Path) -> Iterator[tuple[LoaderServer, Path, list[BaseException]]]:
    """A server whose start() is running in a thread and blocked on the last of 4 slides."""
    cache = tmp_path / "tissue"
    cache.mkdir()
    fifo = hold_last_slide(dataset_dir, cache)
    config = make_config(dataset_dir, datasets=(DatasetConfig("train", dataset_dir / "manifest.csv"),), workers=1,
                         tissue_cache_dir=cache, progress_interval_s=0.001)
    server = LoaderServer(config)
    errors: list[BaseException] = []

    def start() -> None:
        try:
            server.start()
        except BaseException as err:  # noqa: BLE001 - reported by the test
            errors.append(err)

    thread = threading.Thread(target=start, daemon=True)
    thread.start()
    try:
        yield server, fifo, errors
    finally:
        if thread.is_alive():
            release(fifo)
        thread.join(timeout=60)
        server.stop(grace=0)


def test_health_and_metrics_answer_while_indexing_with_a_reason(held_start: Any) -> None:
    server, fifo, errors = held_start
    assert wait_for(lambda: server.port and server.metrics_endpoint is not None), errors
    port = server.port
    # The process answers from the start (liveness); the loader is not ready, and says why.
    assert check(port, "") == (SERVING, "alive")
    assert wait_for(lambda: check(port, "wsi_loader.v1.Loader")[1] == "indexing dataset train: 3/4 slides")
    assert check(port, "wsi_loader.v1.Loader")[0] == NOT_SERVING
    assert server.metrics_endpoint is not None
    text = scrape(server.metrics_endpoint.url)
    assert sample(text, "wsi_loader_ready") == 0
    assert sample(text, 'wsi_loader_dataset_slides{dataset="train",state="total"}') == 4
    assert sample(text, 'wsi_loader_dataset_slides{dataset="train",state="indexed"}') == 3
    assert sample(text, "process_cpu_seconds_total") is not None and sample(text, "process_open_fds")
    assert sample(text, 'wsi_loader_slides_failed_total{reason="unreadable"}') == 0  # exported before any failure
    # The CLI probe prints the reason; requests are refused with it, as UNAVAILABLE (retry later).
    out = subprocess.run([sys.executable, "-m", "loader_service.cli", "health", "--endpoint", f"127.0.0.1:{port}"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 1 and out.stdout.strip() == "NOT_SERVING: indexing dataset train: 3/4 slides"
    with LoaderClient(f"127.0.0.1:{port}", timeout_s=10) as client:
        with pytest.raises(UnavailableError, match="starting"):
            client.datasets()
    assert server.metrics.sample("wsi_loader_errors_total", {"kind": "not_ready"}) == 1  # not "unavailable"
    assert server.metrics.sample("wsi_loader_errors_total", {"kind": "unavailable"}) == 0
    release(fifo)
    assert wait_for(lambda: check(port, "wsi_loader.v1.Loader") == (SERVING, "serving train")), errors
    assert not errors
    assert sample(scrape(server.metrics_endpoint.url), "wsi_loader_ready") == 1
    with LoaderClient(f"127.0.0.1:{port}", timeout_s=10) as client:
        assert [d.slides for d in client.datasets()] == [4]


def test_a_dataset_without_usable_slides_is_not_ready(dataset_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken.csv"
    broken.write_text(f"path,label\n{dataset_dir / 'corrupt.tiff'},x\n{dataset_dir / 'notes.tiff'},x\n")
    config = make_config(dataset_dir, datasets=(DatasetConfig("train", dataset_dir / "manifest.csv"),
                                                DatasetConfig("broken", broken)), tissue_cache_dir=tmp_path / "t")
    with LoaderServer(config) as server:
        status, reason = check(server.port, "wsi_loader.v1.Loader")
        assert status == NOT_SERVING and reason.startswith("no usable slide in dataset broken")
        assert check(server.port, "")[0] == SERVING  # alive: not a reason to restart it
        assert server.metrics.sample("wsi_loader_ready") == 0
        assert server.metrics.sample("wsi_loader_dataset_slides", {"dataset": "broken", "state": "usable"}) == 0
        assert server.metrics.sample("wsi_loader_dataset_slides", {"dataset": "broken", "state": "failed"}) == 2
        assert server.metrics.sample("wsi_loader_slides_failed_total", {"reason": "unreadable"}) == 2
        with LoaderClient(f"127.0.0.1:{server.port}", timeout_s=10) as client:  # the other dataset still serves
            assert {d.name: d.slides for d in client.datasets()} == {"train": 4, "broken": 0}


def serve(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "loader_service.cli", "serve", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)


@pytest.mark.parametrize("which", ["grpc", "metrics"])
def test_a_port_in_use_is_one_line_before_indexing(dataset_dir: Path, tmp_path: Path, which: str) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        ports = ["--listen", f"127.0.0.1:{taken}", "--metrics-port", "-1"] if which == "grpc" else \
            ["--listen", "127.0.0.1:0", "--metrics-port", str(taken)]
        out = serve("--manifest", f"train={dataset_dir / 'manifest.csv'}", "--data-root", str(dataset_dir),
                    "--tissue-cache-dir", str(tmp_path / "t"), "--device", "cpu", "--workers", "1", *ports)
    assert out.returncode == 2
    errors = [line for line in out.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "Traceback" not in out.stderr, out.stderr
    assert errors[0].startswith(f"loader-service: error: cannot {'listen' if which == 'grpc' else 'serve metrics'} on")
    assert f":{taken}" in errors[0]
    assert "indexing" not in out.stderr  # refused before any slide was opened


def test_progress_is_logged_without_a_terminal(dataset_dir: Path, tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-m", "loader_service.cli", "serve", "--manifest", f"train={dataset_dir / 'manifest.csv'}",
         "--data-root", str(dataset_dir), "--tissue-cache-dir", str(tmp_path / "t"), "--device", "cpu",
         "--workers", "1", "--listen", "127.0.0.1:0", "--metrics-port", "-1", "--progress-interval", "0.001"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, cwd=ROOT, env=env)
    try:
        event = json.loads(proc.stdout.readline())  # type: ignore[union-attr]
        assert event["event"] == "serving"
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    assert re.search(r"indexing train: [1-3]/4 slides \(\d+%\), [\d.]+ slides/s, ETA \d+ s", err), err
    assert re.search(r"indexed train: 4 slides in \d+ s", err), err
    assert "not ready: starting" in err and "ready: serving train" in err


def test_version_env_config_and_portable_defaults(tmp_path: Path, dataset_dir: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "loader_service.cli", "--version"], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert out.returncode == 0 and re.fullmatch(r"loader-service \d+\.\d+\.\d+\S*\n", out.stdout)
    help_text = subprocess.run([sys.executable, "-m", "loader_service.cli", "--help"], capture_output=True, text=True,
                               timeout=120, cwd=ROOT).stdout
    assert "The only module" not in help_text and "WSI_LOADER_" in help_text
    # print-defaults names no core count of this machine: the file is portable.
    defaults = subprocess.run([sys.executable, "-m", "loader_service.cli", "config", "--print-defaults"],
                              capture_output=True, text=True, timeout=120, cwd=ROOT).stdout
    data = yaml.safe_load(defaults)
    assert data["workers"] == "auto"
    # Environment between the file and the flags: WSI_LOADER_<KEY>, values read as YAML.
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**data, "metrics_port": 1111, "workers": 2,
                                    "datasets": [{"name": "train", "manifest": str(dataset_dir / "manifest.csv")}]}))
    environ = {"WSI_LOADER_METRICS_PORT": "2222", "WSI_LOADER_WORKERS": "3", "WSI_LOADER_LISTEN": "127.0.0.1:7",
               "WSI_LOADER_TOKEN": "client-side, not a key", "WSI_LOADER_LOG_LEVEL": "DEBUG"}
    config = build_config(_parser().parse_args(["serve", "--config", str(path), "--workers", "4"]), environ)
    assert (config.metrics_port, config.workers, config.listen) == (2222, 4, "127.0.0.1:7")
    config = build_config(_parser().parse_args(["serve", "--config", str(path)]), {})
    assert (config.metrics_port, config.workers) == (1111, 2)
    with pytest.raises(ValueError, match="WSI_LOADER_METRICS_PORT"):
        build_config(_parser().parse_args(["serve", "--config", str(path)]), {"WSI_LOADER_METRICS_PORT": "[1"})
