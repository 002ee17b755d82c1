#!/usr/bin/env bash
# Installs wsi-loader into a virtual environment: the container images' install step.
#
#   bash deploy/install.sh --variant cpu|cuda [--src DIR] [--stage deps|project|all]
#
# The Dockerfiles run exactly this, in two stages so that a code edit does not reinstall torch (~3 GB):
#   --stage deps      the venv, the pinned torch and every runtime dependency of the service, read from
#                     pyproject.toml (the base dependencies and the `server` extra); needs only pyproject.toml
#   --stage project   the project itself (--no-deps), `pip check`, and a smoke test; needs the source
#   --stage all       both (default)
# from a copy of the repository in /src. CI has no docker engine, so tests/test_deploy.py runs the same command lines with
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
stage=all
src=$(pwd)
while [ $# -gt 0 ]; do
  case "$1" in
    --variant) variant=${2:?--variant needs cpu or cuda}; shift 2 ;;
    --src) src=${2:?--src needs a folder}; shift 2 ;;
    --stage) stage=${2:?--stage needs deps, project or all}; shift 2 ;;
    -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
case "$variant" in
  cpu|cuda) ;;
  *) echo "install.sh: --variant cpu|cuda is required" >&2; exit 2 ;;
esac
case "$stage" in
  deps|project|all) ;;
  *) echo "install.sh: --stage must be deps, project or all, got $stage" >&2; exit 2 ;;
esac
[ -f "$src/pyproject.toml" ] || { echo "install.sh: $src has no pyproject.toml (run from the repository copy)" >&2; exit 2; }

root=${WSI_ROOT:-/}
root=${root%/}
prefix=${WSI_PREFIX:-/opt/wsi-loader}
python=${WSI_PYTHON:-python3}
deps=${WSI_DEPS:-index}
venv="$root$prefix"
say() { echo "install.sh: $*"; }

# 1. System packages. Neither image needs any: pyvips-binary, openslide-bin and the torch wheels bundle
#    their native libraries (the CUDA build brings its CUDA runtime as nvidia-* wheels), and both images
#    start from python:3.11-slim.
"$python" -c 'import sys; assert sys.version_info >= (3, 11), sys.version' \
  || { echo "install.sh: $python must be Python >= 3.11" >&2; exit 1; }
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)

install_deps() {
  # 2. The virtual environment.
  mkdir -p "$(dirname "$venv")"
  if [ "$deps" = reuse ]; then
    reuse=${WSI_REUSE_PYTHON:-$python}
    "$python" -m venv --without-pip "$venv"
    site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    # Appended to sys.path after the venv's own site-packages: the project installed below wins.
    "$reuse" -c 'import site; print("\n".join(site.getsitepackages()))' > "$site/_wsi_reused_deps.pth"
    say "reusing dependencies from $(tr '\n' ' ' < "$site/_wsi_reused_deps.pth")"
    return
  elif [ "$deps" != index ]; then
    echo "install.sh: WSI_DEPS must be index or reuse, got $deps" >&2; exit 2
  fi
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --no-cache-dir --upgrade pip
  # 3. torch (pinned), then the runtime dependencies named in pyproject.toml (client + `server` extra).
  if [ "$variant" = cpu ]; then
    "${pip[@]}" install --no-cache-dir --index-url "$CPU_TORCH_INDEX" "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
  else  # PyPI's Linux torch wheels are the CUDA build and bring their CUDA runtime as nvidia-* wheels
    "${pip[@]}" install --no-cache-dir "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
  fi
  "$venv/bin/python" - "$src/pyproject.toml" > "$venv/wsi-loader-requirements.txt" <<'PY'
import sys
import tomllib

with open(sys.argv[1], "rb") as f:
    project = tomllib.load(f)["project"]
print("\n".join(project["dependencies"] + project["optional-dependencies"]["server"]))
PY
  "${pip[@]}" install --no-cache-dir -r "$venv/wsi-loader-requirements.txt" "torch==$TORCH_VERSION"
}

install_project() {
  [ -x "$venv/bin/python" ] || { echo "install.sh: no venv at $venv: run --stage deps first" >&2; exit 1; }
  # A non-editable install: the image does not need /src afterwards. Its dependencies are in place.
  "${pip[@]}" install --no-cache-dir --no-deps "$src"
  "${pip[@]}" check
  smoke_test
}

smoke_test() {
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
}

case "$stage" in
  deps) install_deps ;;
  project) install_project ;;
  all) install_deps; install_project ;;
esac
