"""A real Prometheus server scrapes the service while a client pulls batches; the rate is read back."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from loader_service.server import LoaderServer
from trainer_client import LoaderClient, StreamConfig


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _query(base: str, expr: str) -> list[dict]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as reply:
        body = json.load(reply)
    assert body["status"] == "success", body
    return body["data"]["result"]


@pytest.fixture()
def prometheus(server: LoaderServer, tmp_path: Path):
    binary = shutil.which("prometheus")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("prometheus is not installed; .ci/run installs Debian's `prometheus` package")
        pytest.skip("prometheus binary not installed (apt-get install prometheus)")
    assert server.metrics_endpoint is not None
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: wsi-loader\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{server.metrics_endpoint.port}']\n"
    )
    port = _free_port()
    proc = subprocess.Popen(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{base}/-/ready", timeout=1)
            break
        except OSError:
            time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("prometheus did not become ready within 30 s")
    yield base
    proc.terminate()
    proc.wait(timeout=10)


def test_prometheus_scrapes_throughput(server: LoaderServer, client: LoaderClient, prometheus: str) -> None:
    stop = threading.Event()
    served = {"patches": 0, "seconds": 0.0}

    def pull() -> None:
        cfg = StreamConfig(dataset="train", batch_size=16, patch_size=64, samples_per_epoch=10**6, timeout_s=60)
        start = time.perf_counter()
        with client.stream(cfg) as stream:
            for batch in stream:
                served["patches"] += batch["images"].shape[0]
                if stop.is_set():
                    break
        served["seconds"] = time.perf_counter() - start

    puller = threading.Thread(target=pull)
    puller.start()
    try:
        rate: list[dict] = []
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            time.sleep(1.0)
            rate = _query(prometheus, 'sum(rate(wsi_loader_patches_total{dataset="train"}[5s]))')
            if rate and float(rate[0]["value"][1]) > 0:
                break
        assert rate and float(rate[0]["value"][1]) > 0, "Prometheus never saw patches served"
        up = _query(prometheus, 'up{job="wsi-loader"}')
        assert up and up[0]["value"][1] == "1"
        time.sleep(3.0)  # a few more scrapes at a steady rate
        scraped = float(_query(prometheus, 'sum(rate(wsi_loader_patches_total{dataset="train"}[5s]))')[0]["value"][1])
        latency = _query(prometheus, 'histogram_quantile(0.5, sum by (le) (rate(wsi_loader_stage_seconds_bucket{stage="read"}[10s])))')
        assert latency and float(latency[0]["value"][1]) > 0
    finally:
        stop.set()
        puller.join(timeout=60)
    client_rate = served["patches"] / served["seconds"]
    assert 0.2 * client_rate < scraped < 5 * client_rate, (scraped, client_rate)
