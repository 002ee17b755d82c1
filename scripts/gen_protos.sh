#!/usr/bin/env bash
# Regenerate the gRPC stubs from protos/ into the import root (wsi_loader/v1/...).
# Pinned generator: grpcio-tools from the `dev` extra. `--check` regenerates into a temporary
# folder and fails when the committed stubs differ.
set -euo pipefail
cd "$(dirname "$0")/.."
out=.
if [ "${1:-}" = "--check" ]; then out=$(mktemp -d); fi
python -m grpc_tools.protoc -Iprotos --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
  protos/wsi_loader/v1/loader.proto
if [ "${1:-}" = "--check" ]; then
  for f in loader_pb2.py loader_pb2.pyi loader_pb2_grpc.py; do
    if ! diff -u "wsi_loader/v1/$f" "$out/wsi_loader/v1/$f"; then
      echo "generated stubs are stale: run scripts/gen_protos.sh and commit wsi_loader/v1/" >&2
      exit 1
    fi
  done
  echo "generated stubs are up to date"
fi
