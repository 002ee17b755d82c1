#!/usr/bin/env bash
# The test suite: stubs up to date, then pytest (GPU tests skip without a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
PATH="$PWD/.venv/bin:$PATH" scripts/gen_protos.sh --check
exec .venv/bin/python -m pytest -q "$@"
