#!/usr/bin/env bash
# Runs every GPU path once and writes OUT_DIR/summary.json and OUT_DIR/gpu_check.log (docs/cuda_ipc.md, "GPU check").
#
#   scripts/gpu_check.sh OUT_DIR [--quick] [--skip-gpu] [--only PART...] [--budget SECONDS]
#   scripts/gpu_check.sh --fetch-wheels     # on a machine with the package registry: the wheels of the
#                                           # project's dependencies a bare GPU image lacks, into .whl/
#
# Without a CUDA device each GPU part is reported "skipped: <reason>" and the CPU parts still run.
# Interpreter: $PYTHON, else .venv/bin/python (scripts/setup.sh's), else the machine's python3 (the GPU
# image's, which holds a CUDA torch); dependencies that one lacks are installed from .whl/ into
# /tmp/wsi-loader-site (no network needed), or, with no .whl/, by scripts/setup.sh (needs the registry).
set -uo pipefail
cd "$(dirname "$0")/.."

# The project's dependencies that are not in the GPU image (device README's package list), for Python 3.12.
WHEELS=(grpcio==1.85.3 grpcio-health-checking==1.85.1 protobuf==7.36.2 pyvips-binary==8.18.7 cffi==2.1.1
        openslide-python==1.4.7 openslide-bin==4.0.1.2 imagecodecs==2026.3.6 tifffile==2026.3.3)
PURE=(pyvips==3.2.0)   # no wheel on the index: built here (pure Python; pyvips-binary holds the library)
NEEDED="import grpc, grpc_health, google.protobuf, pyvips, openslide, imagecodecs, tifffile, numba, torchvision"

if [ "${1:-}" = "--fetch-wheels" ]; then
  mkdir -p .whl
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}" || exit 1
  python3 -m pip wheel -q --no-deps -w .whl "${PURE[@]}" || exit 1
  du -sh .whl
  exit 0
fi

OUT=${1:?usage: scripts/gpu_check.sh OUT_DIR [--quick] [--skip-gpu] [--only PART...] | --fetch-wheels}
shift
mkdir -p "$OUT"
if [ -n "${PYTHON:-}" ]; then
  PY=$PYTHON
elif [ -x .venv/bin/python ]; then
  PY=.venv/bin/python
else
  PY=python3
fi
if ! "$PY" -c "$NEEDED" 2>/dev/null; then
  if compgen -G ".whl/*.whl" >/dev/null; then
    echo "gpu_check: installing the carried wheels (.whl/) into /tmp/wsi-loader-site for $PY" | tee -a "$OUT/gpu_check.log"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/wsi-loader-site .whl/*.whl >>"$OUT/gpu_check.log" 2>&1
    export PYTHONPATH="/tmp/wsi-loader-site${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "gpu_check: $PY lacks the project's dependencies and no .whl/ was carried: scripts/setup.sh" | tee -a "$OUT/gpu_check.log"
    scripts/setup.sh >>"$OUT/gpu_check.log" 2>&1 && PY=.venv/bin/python
  fi
  if ! "$PY" -c "$NEEDED" >>"$OUT/gpu_check.log" 2>&1; then
    echo "gpu_check: $PY still lacks the project's dependencies (see $OUT/gpu_check.log); the parts will fail" \
      | tee -a "$OUT/gpu_check.log"
  fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# 8 minutes for the parts (their caps add up to less); the outer timeout only guards against a hung driver
timeout -k 10 540 "$PY" -m bench.gpu_check "$OUT" "$@"
