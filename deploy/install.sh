#!/usr/bin/env bash
# Installs wsi-loader into a virtual environment: the container images' install step.
#
#   bash deploy/install.sh --variant cpu|cuda [--src DIR]
#
# The Dockerfiles run exactly this (`RUN bash deploy/install.sh --variant ...`), from a copy of the
# repository in /src. CI has no docker engine, so tests/test_deploy.py runs the same command lines with
# WSI_ROOT set to a temporary folder and WSI_DEPS=reuse (see below), and checks what they produced.
#
# Environment:
#   WSI_ROOT    filesystem root to install under (default /; CI: a temporary folder)
#   WSI_PREFIX  virtual environment, under WSI_ROOT (default /opt/wsi-loader)
#   WSI_PYTHON  interpreter that creates the venv (default python3; the CUDA image uses python3.11)
#   WSI_DEPS    index (default): pip installs the pinned torch and every dependency from the package index.
#               reuse: take the dependencies from an existing environment (the site-packages of
#               WSI_REUSE_PYTHON) and install only the project (--no-deps), then `pip check` it and
#               check the torch pin. CI uses this: torch with CUDA is ~3 GB.
set -euo pipefail

# The torch build the rest of the stack is tested with: keep equal to scripts/setup.sh
# (tests/test_deploy.py fails when they differ).
TORCH_VERSION=2.14.1
TORCHVISION_VERSION=0.29.1
CPU_TORCH_INDEX=https://download.pytorch.org/whl/cpu

variant=""
src=$(pwd)
while [ $# -gt 0 ]; do
  case "$1" in
    --variant) variant=${2:?--variant needs cpu or cuda}; shift 2 ;;
    --src) src=${2:?--src needs a folder}; shift 2 ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
case "$variant" in
  cpu|cuda) ;;
  *) echo "install.sh: --variant cpu|cuda is required" >&2; exit 2 ;;
esac
[ -f "$src/pyproject.toml" ] || { echo "install.sh: $src has no pyproject.toml (run from the repository copy)" >&2; exit 2; }

root=${WSI_ROOT:-/}
root=${root%/}
prefix=${WSI_PREFIX:-/opt/wsi-loader}
python=${WSI_PYTHON:-python3}
deps=${WSI_DEPS:-index}
venv="$root$prefix"
say() { echo "install.sh: $*"; }

# 1. System packages. The CPU image (python:3.11-slim) needs none: pyvips-binary, openslide-bin and the
#    torch wheels bundle their native libraries. The CUDA image (Ubuntu 22.04) has no Python 3.11.
if [ "$variant" = cuda ] && ! command -v "$python" >/dev/null 2>&1; then
  if [ -n "$root" ] || [ "$(id -u)" != 0 ]; then
    echo "install.sh: $python is missing and this is not an image build (WSI_ROOT=${WSI_ROOT:-/})" >&2; exit 1
  fi
  say "apt-get install python3.11 python3.11-venv"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends python3.11 python3.11-venv ca-certificates
  rm -rf /var/lib/apt/lists/*
fi
"$python" -c 'import sys; assert sys.version_info >= (3, 11), sys.version' \
  || { echo "install.sh: $python must be Python >= 3.11" >&2; exit 1; }

# 2. The virtual environment.
mkdir -p "$(dirname "$venv")"
if [ "$deps" = reuse ]; then
  reuse=${WSI_REUSE_PYTHON:-$python}
  "$python" -m venv --without-pip "$venv"
  site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  # Appended to sys.path after the venv's own site-packages: the project installed below wins.
  "$reuse" -c 'import site; print("\n".join(site.getsitepackages()))' > "$site/_wsi_reused_deps.pth"
  say "reusing dependencies from $(tr '\n' ' ' < "$site/_wsi_reused_deps.pth")"
elif [ "$deps" = index ]; then
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --no-cache-dir --upgrade pip
else
  echo "install.sh: WSI_DEPS must be index or reuse, got $deps" >&2; exit 2
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)

# 3. torch (pinned) and the project. A non-editable install: the image does not need /src afterwards.
if [ "$deps" = index ]; then
  if [ "$variant" = cpu ]; then
    "${pip[@]}" install --no-cache-dir --index-url "$CPU_TORCH_INDEX" "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
  else  # PyPI's Linux torch wheels are the CUDA build and bring their CUDA runtime as nvidia-* wheels
    "${pip[@]}" install --no-cache-dir "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
  fi
  "${pip[@]}" install --no-cache-dir "$src"
else
  "${pip[@]}" install --no-cache-dir --no-deps "$src"
fi
"${pip[@]}" check

# 4. Smoke test from outside the source tree, so imports come from the venv, not from $src.
(
  cd /
  "$venv/bin/python" - "$venv" "$TORCH_VERSION" <<'PY'
import sys
from pathlib import Path

venv, torch_pin = Path(sys.argv[1]).resolve(), sys.argv[2]
import loader_service
import loader_service.cli
import loader_service.server  # the whole service imports: every subpackage made it into the wheel
import trainer_client
import torch
import wsi_loader.v1.loader_pb2_grpc  # noqa: F401  generated stubs are packaged

for module in (loader_service, trainer_client):
    assert Path(module.__file__).resolve().is_relative_to(venv), f"{module.__name__} imported from {module.__file__}"
assert torch.__version__.split("+")[0] == torch_pin, f"torch {torch.__version__}, the image pins {torch_pin}"
print(f"install.sh: ok: wsi-loader in {venv}, torch {torch.__version__}")
PY
  "$venv/bin/loader-service" --help >/dev/null
  "$venv/bin/trainer-client" --help >/dev/null
)
