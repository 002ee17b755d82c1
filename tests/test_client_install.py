"""A trainer host installs the client alone: `pip install wsi-loader` gives trainer_client with torch, grpcio,
protobuf and numpy, and streams from a real server; none of the server's packages is importable there.

The virtualenv is built from a copy of this repository (non-editable, as a user installs it). It needs the
package index (PyPI, or the local torch wheel); without one the test skips, except in CI, where it must run.
Set WSI_CLIENT_VENV to a folder to keep the virtualenv between runs (it is reused while pyproject.toml is
unchanged).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from loader_service.entry import SERVER_MODULES
from loader_service.server import LoaderServer

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(1800)  # the first run installs torch into the new virtualenv
IN_CI = bool(os.environ.get("CI"))
# What the client may bring: torch and what torch itself installs, and nothing of the server.
SERVER_DISTRIBUTIONS = {"pyvips", "pyvips-binary", "openslide-python", "openslide-bin", "tifffile", "imagecodecs",
                        "pillow", "scipy", "tqdm", "pyyaml", "psutil", "numba", "llvmlite", "prometheus-client",
                        "grpcio-health-checking", "torchvision"}


def _torch_pin() -> str:
    found = re.search(r'"torch==([^"]+)"', (ROOT / "scripts" / "setup.sh").read_text())
    assert found, "scripts/setup.sh pins torch"
    return found.group(1)


def _project_copy(dest: Path) -> Path:
    """What a source distribution holds for the build: metadata and the packages (no tests, no .venv)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("pyproject.toml", "README.md", "LICENSE", "MANIFEST.in"):
        shutil.copy2(ROOT / name, dest / name)
    for package in ("wsi_loader", "loader_service", "trainer_client"):
        shutil.copytree(ROOT / package, dest / package, ignore=ignore)
    return dest


def _pip(venv: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check",
                           "--no-cache-dir", *args],
                          capture_output=True, text=True, timeout=timeout, cwd="/")


def _unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"{reason} (CI is set: CI has the package index and must run this test)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()[:12]
    venv = Path(os.environ.get("WSI_CLIENT_VENV") or Path(tempfile.gettempdir()) / f"wsi-loader-client-{digest}")
    stamp = venv / f".deps-{digest}"
    # Two test runs on one machine share the venv: one builds it while the other waits (the lock is released
    # when the module's tests are done).
    with open(Path(tempfile.gettempdir()) / f"wsi-loader-client-{digest}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not stamp.exists():
            shutil.rmtree(venv, ignore_errors=True)
            made = subprocess.run([sys.executable, "-m", "venv", str(venv)], capture_output=True, text=True, timeout=300)
            if made.returncode != 0:
                _unavailable(f"cannot create a virtualenv: {made.stderr.strip()[-300:]}")
        source = _project_copy(tmp_path_factory.mktemp("client-src"))
        if not stamp.exists():
            # The pinned torch first (the local wheel where there is one), then the client's own dependencies.
            result = _pip(venv, "install", "-q", f"torch=={_torch_pin()}")
            if result.returncode == 0:
                result = _pip(venv, "install", "-q", str(source))
            if result.returncode != 0:
                _unavailable(f"cannot install the client from the package index: {result.stderr.strip()[-500:]}")
            stamp.touch()
        # This tree's code, whatever an earlier run installed.
        result = _pip(venv, "install", "-q", "--no-deps", "--force-reinstall", str(source))
        assert result.returncode == 0, result.stderr
        try:
            yield venv
        finally:
            if IN_CI and not os.environ.get("WSI_CLIENT_VENV"):
                # A CI machine runs once: give its ~5 GB back rather than leave it in the temp folder.
                shutil.rmtree(venv, ignore_errors=True)


def _run(venv: Path, *argv: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run([*argv], capture_output=True, text=True, timeout=timeout, cwd="/", env=env)


def test_client_install_has_no_server_packages(client_venv: Path) -> None:
    python = str(client_venv / "bin" / "python")
    listed = _pip(client_venv, "list", "--format=json")
    installed = {d["name"].lower().replace("_", "-") for d in json.loads(listed.stdout)}
    assert {"wsi-loader", "torch", "grpcio", "protobuf", "numpy"} <= installed
    assert not installed & SERVER_DISTRIBUTIONS, installed & SERVER_DISTRIBUTIONS
    probe = ("import importlib.util, json, sys; "
             "print(json.dumps([m for m in sys.argv[1:] if importlib.util.find_spec(m) is not None]))")
    out = _run(client_venv, python, "-c", probe, *SERVER_MODULES)
    assert out.returncode == 0 and json.loads(out.stdout) == [], out.stdout + out.stderr
    # The client imports from the venv, never from this source tree.
    out = _run(client_venv, python, "-c", "import trainer_client, wsi_loader; print(trainer_client.__file__)")
    assert out.returncode == 0 and out.stdout.startswith(str(client_venv)), out.stdout + out.stderr


def test_loader_service_without_the_server_extra_says_what_to_install(client_venv: Path) -> None:
    out = _run(client_venv, str(client_venv / "bin" / "loader-service"), "serve", "--synthetic")
    assert out.returncode == 3 and out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'wsi-loader[server]'" in lines[0], out.stderr


CLIENT_SCRIPT = """
import sys
from trainer_client import LoaderClient, StreamConfig
config = StreamConfig(dataset="train", batch_size=4, patch_size=64, samples_per_epoch=16, timeout_s=60)
with LoaderClient(sys.argv[1], timeout_s=30) as client:
    with client.stream(config) as stream:
        shapes = [tuple(batch["images"].shape) for batch in stream]
print(stream.transport, len(shapes), shapes[0])
"""


def test_client_only_install_streams_from_a_server(client_venv: Path, server: LoaderServer) -> None:
    endpoint = f"127.0.0.1:{server.port}"
    out = _run(client_venv, str(client_venv / "bin" / "python"), "-c", CLIENT_SCRIPT, endpoint)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[:2] == ["shm", "4"], out.stdout  # same host, same /dev/shm: shared memory
    bench = _run(client_venv, str(client_venv / "bin" / "trainer-client"), "bench", "--endpoint", endpoint,
                 "--dataset", "train", "--seconds", "1", "--batch-size", "4", "--patch-size", "64", "--transport", "auto")
    assert bench.returncode == 0, bench.stderr
    assert json.loads(bench.stdout.strip().splitlines()[-1])["transport_used"] == "shm"
    assert "transport: shm (asked auto): the service sees this process' /dev/shm" in bench.stderr


def test_sdist_carries_the_protocol_the_tests_and_the_license(tmp_path: Path) -> None:
    """The source distribution rebuilds the stubs (protos/) and runs the tests (fixtures included)."""
    import tarfile

    from setuptools import build_meta

    tracked = subprocess.run(["git", "ls-files"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    if tracked.returncode != 0:
        pytest.skip("not a git checkout: the sdist is built from the tracked files")
    source = tmp_path / "src"
    for name in tracked.stdout.splitlines():
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    cwd = os.getcwd()
    os.chdir(source)
    try:
        sdist = build_meta.build_sdist(str(tmp_path / "dist"))
    finally:
        os.chdir(cwd)
    with tarfile.open(tmp_path / "dist" / sdist) as archive:
        names = {n.split("/", 1)[1] for n in archive.getnames() if "/" in n}
    for needed in ("LICENSE", "protos/wsi_loader/v1/loader.proto", "tests/conftest.py", "tests/slide_fixtures.py",
                   "scripts/gen_protos.sh", "wsi_loader/v1/loader_pb2.py", "loader_service/entry.py"):
        assert needed in names, needed
    assert "Apache License" in (ROOT / "LICENSE").read_text() and "Version 2.0" in (ROOT / "LICENSE").read_text()
