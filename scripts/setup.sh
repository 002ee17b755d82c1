#!/usr/bin/env bash
# Creates .venv with the project and its test tools (idempotent; re-run after pyproject.toml changes).
# Also installs Debian's `prometheus` (for the metrics test) when run as root and it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$stamp" ]; then
  # torch with its CUDA libraries takes ~5.5 GB here, and the client-install test builds a second venv like it.
  free_gb=$(df -Pk . | awk 'NR==2 {print int($4 / 1048576)}')
  if [ "$free_gb" -lt 14 ]; then
    echo "setup.sh: only ${free_gb} GiB free on $(df -P . | awk 'NR==2 {print $6}'); the install and the tests" \
         "need about 14 GiB (free old virtualenvs or clones under /tmp)" >&2
  fi
  export PIP_NO_CACHE_DIR=1  # no second copy of the wheels in ~/.cache
  .venv/bin/python -m pip install -q --upgrade pip
  # CPU/CUDA torch wheels: these versions are what the rest of the stack is tested with.
  .venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
  .venv/bin/python -m pip install -q -e ".[server,models,dev]"
  touch "$stamp"
fi
if ! command -v prometheus >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q prometheus) >/dev/null
fi
