"""Three services in three network namespaces, two trainer ranks under torchrun (gloo) in a fourth, joined by
veth pairs with private addresses; one service killed with kill -9 mid-epoch. The samples the two ranks received
equal the single-service, single-rank epoch exactly. Skipped where network namespaces cannot be made."""

from __future__ import annotations

import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.test_reconnect import Service
from trainer_client import StreamConfig, WSIStream

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = 576  # 24 batches per sub-shard and rank: far more than the pool receives ahead of the trainer (credits
#               and its queue), so the victim's sub-shards are still open when it is killed, however fast it serves
TAG = f"i{os.getpid() % 100000}"  # unique names: other test runs may share the host


def _ip(*args: str, ns: str | None = None) -> None:
    cmd = ["ip", "netns", "exec", ns, "ip", *args] if ns else ["ip", *args]
    subprocess.run(cmd, check=True, capture_output=True, timeout=20)


def _netns_unavailable() -> str:
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2)"
    probe = f"{TAG}probe"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, timeout=20)
    if made.returncode:
        return f"`ip netns add` failed (needs root / CAP_SYS_ADMIN): {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=20)
    return ""


@pytest.fixture()
def namespaces() -> Iterator[list[str]]:
    """trainer namespace first, then one per service; veth pair i joins 10.231.i.1 (trainer) to 10.231.i.2."""
    reason = _netns_unavailable()
    if reason:
        pytest.skip(reason)
    names = [f"{TAG}t", *(f"{TAG}s{i}" for i in range(3))]
    try:
        for name in names:
            _ip("netns", "add", name)
            _ip("link", "set", "lo", "up", ns=name)
        for i, service_ns in enumerate(names[1:]):
            near, far = f"{TAG}a{i}", f"{TAG}b{i}"
            _ip("link", "add", near, "type", "veth", "peer", "name", far)
            _ip("link", "set", near, "netns", names[0])
            _ip("link", "set", far, "netns", service_ns)
            _ip("addr", "add", f"10.231.{i}.1/24", "dev", near, ns=names[0])
            _ip("addr", "add", f"10.231.{i}.2/24", "dev", far, ns=service_ns)
            _ip("link", "set", near, "up", ns=names[0])
            _ip("link", "set", far, "up", ns=service_ns)
        yield names
    finally:
        for name in names:  # deleting a namespace deletes its end of each veth pair, and so the pair
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=20)


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
                PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _serve(dataset_dir: Path, ns: str, address: str) -> subprocess.Popen[str]:
    cmd = ["ip", "netns", "exec", ns, sys.executable, "-m", "loader_service.cli", "serve", "--manifest",
           f"train={dataset_dir / 'manifest.csv'}", "--listen", f"{address}:50051", "--metrics-port", "-1",
           "--workers", "1", "--device", "cpu", "--tissue-cache-dir", str(dataset_dir / ".tissue-cache")]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=_env())


def _served(line: str) -> dict[str, int]:
    """A rank's BATCH line: batches per service so far ({} when another process's output cut into the line)."""
    try:
        served = json.loads(line.split("served=", 1)[1])
    except (IndexError, ValueError):
        return {}
    return served if isinstance(served, dict) else {}


def _keys(batch: dict[str, Any]) -> list[tuple[str, int, int]]:
    return list(zip(batch["slide_id"], batch["x"].tolist(), batch["y"].tolist()))


def test_two_ranks_over_three_namespaced_services_survive_a_kill_9(dataset_dir: Path, namespaces: list[str],
                                                                     tmp_path: Path) -> None:
    started = time.monotonic()
    trainer_ns, service_ns = namespaces[0], namespaces[1:]
    addresses = [f"10.231.{i}.2" for i in range(3)]
    services = [_serve(dataset_dir, ns, address) for ns, address in zip(service_ns, addresses)]
    torchrun: subprocess.Popen[str] | None = None
    try:
        for service in services:
            assert service.stdout is not None and service.stdout.readline(), f"service exited {service.poll()}"
        with Service(dataset_dir) as single, WSIStream(StreamConfig(
                dataset="train", batch_size=4, patch_size=32, samples_per_epoch=SAMPLES, seed=11, timeout_s=60,
                transport="grpc", augment=False), endpoint=single.endpoint) as stream:  # one service, one rank
            reference = collections.Counter(key for batch in stream for key in _keys(batch))
        endpoints = ",".join(f"{address}:50051" for address in addresses)
        cmd = ["ip", "netns", "exec", trainer_ns, sys.executable, "-m", "torch.distributed.run", "--nproc-per-node",
               "2", "--nnodes", "1", "--master-addr", "127.0.0.1", "--master-port", "29531",
               str(ROOT / "tests" / "pool_rank.py"), "--endpoints", endpoints, "--samples", str(SAMPLES),
               "--out", str(tmp_path), "--pace-s", "0.05"]
        torchrun = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env())
        assert torchrun.stdout is not None
        victim, output = f"{addresses[1]}:50051", []
        for line in torchrun.stdout:  # ends when torchrun exits; bounded by the wait below
            output.append(line)
            if line.startswith("BATCH") and _served(line).get(victim, 0) >= 2:
                services[1].send_signal(signal.SIGKILL)  # mid-epoch: its sub-shards are part-way through
                break
        assert services[1].wait(timeout=20) == -signal.SIGKILL, "".join(output[-20:])
        rest, _ = torchrun.communicate(timeout=max(10.0, 100 - (time.monotonic() - started)))
        assert torchrun.returncode == 0, ("".join(output) + rest)[-4000:]
    finally:
        for proc in (*services, *([torchrun] if torchrun else [])):
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    got = collections.Counter(tuple(key) for r in ranks for key in r["keys"])
    indices = sorted(i for r in ranks for i in r["indices"])
    assert indices == list(range(SAMPLES)), "every global index exactly once over the two ranks"
    assert got == reference, "the union is the single-service, single-rank epoch: nothing lost, nothing twice"
    assert sum(r["failovers"] for r in ranks) >= 1 and any(victim in r["by_endpoint"] for r in ranks)
    assert ranks[0]["counts"] == [SAMPLES // 2, SAMPLES // 2]
