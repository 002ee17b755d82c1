#!/usr/bin/env bash
# The main job on an embedded default: synthetic slides, the service, and a trainer pulling from it.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/loader-service demo "$@"
