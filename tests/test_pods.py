"""Two emulated pods: the service and a trainer, each in its own mount namespace with its own /dev/shm.

Like two containers of one Kubernetes pod (the sidecar topology) they share the network namespace, so the
trainer reaches the service on loopback. Whether they also share memory is decided by /dev/shm alone:
- "shared": both mount the same folder at /dev/shm (the pod's one emptyDir mounted in both containers, or
  a hostIPC pod beside a hostIPC DaemonSet) -> the session must use shared memory;
- "separate": each mounts its own tmpfs (two pods, each with its own emptyDir) -> gRPC bytes, with the
  reason.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CLIENT = """
import json, sys
from trainer_client import LoaderClient, StreamConfig
config = StreamConfig(dataset="synthetic", batch_size=4, patch_size=64, samples_per_epoch=16, transport="auto",
                      timeout_s=60)
with LoaderClient(sys.argv[1], timeout_s=30) as client:
    with client.stream(config) as stream:
        batches = sum(1 for _ in stream)
print(json.dumps({"transport": stream.transport, "reason": stream.transport_reason, "batches": batches}))
"""


def in_pod(shm: Path | None, argv: list[str]) -> list[str]:
    """ARGV in a new mount namespace whose /dev/shm is SHM (bind-mounted) or, with None, a fresh tmpfs."""
    mount = f"mount --bind {shlex.quote(str(shm))} /dev/shm" if shm else "mount -t tmpfs -o size=256m tmpfs /dev/shm"
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c",
            f"{mount} && exec {' '.join(shlex.quote(a) for a in argv)}"]


@pytest.fixture(scope="module")
def can_unshare() -> None:
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1) to give each emulated pod its own /dev/shm")
    probe = subprocess.run(in_pod(None, ["true"]), capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip(f"this sandbox does not allow mount namespaces: {probe.stderr.strip()}")


@pytest.fixture()
def service_pod(request: pytest.FixtureRequest, tmp_path: Path, can_unshare: None) -> Iterator[tuple[str, Path]]:
    """The loader in its own mount namespace; yields its endpoint and the folder a 'shared' peer mounts."""
    shared = tmp_path / "pod-shm"
    shared.mkdir()
    mode = request.param
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "loader_service.cli", "serve", "--synthetic", "--listen", "127.0.0.1:0",
           "--metrics-port", "-1", "--workers", "1", "--device", "cpu"]
    proc = subprocess.Popen(in_pod(shared if mode == "shared" else None, cmd), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        assert line, proc.stderr.read()  # type: ignore[union-attr]
        yield f"127.0.0.1:{json.loads(line)['port']}", shared
    finally:
        proc.terminate()
        proc.communicate(timeout=60)


def run_trainer_pod(endpoint: str, shm: Path | None) -> dict[str, object]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run(in_pod(shm, [sys.executable, "-c", CLIENT, endpoint]), capture_output=True, text=True,
                         timeout=180, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("service_pod", ["shared"], indirect=True)
def test_pods_sharing_a_shm_folder_use_shared_memory(service_pod: tuple[str, Path]) -> None:
    endpoint, shared = service_pod
    got = run_trainer_pod(endpoint, shared)
    assert got == {"transport": "shm", "reason": "", "batches": 4}
    # The segments lived in the shared folder and the service unlinked them when the session closed.
    assert not [p for p in shared.iterdir() if p.name.startswith("wsi")], list(shared.iterdir())


@pytest.mark.parametrize("service_pod", ["separate", "shared"], indirect=True)
def test_pods_with_their_own_shm_fall_back_to_grpc(service_pod: tuple[str, Path]) -> None:
    endpoint, _ = service_pod
    got = run_trainer_pod(endpoint, None)  # the trainer's own /dev/shm, whatever the service's
    assert got["transport"] == "grpc" and got["batches"] == 4
    assert "not visible" in str(got["reason"]), got
