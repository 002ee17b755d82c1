#!/usr/bin/env bash
# The image's runtime layout: a non-root user, the mount points, the default configuration (validated).
#
#   bash deploy/layout.sh --uid 10001 --config deploy/config/container.yaml
#
#   /data                      slides and manifests, mounted read-only (root-owned mount point)
#   /etc/wsi-loader/config.yaml  the configuration `loader-service serve --config` reads (root-owned, 0644)
#   /var/cache/wsi-loader      tissue-mask cache, writable by the service user
#
# Run after deploy/install.sh (the configuration is checked with the installed package). Like install.sh it
# honours WSI_ROOT and WSI_PREFIX, so CI runs the Dockerfiles' command lines into a temporary root; there
# the user is added with `useradd --prefix WSI_ROOT` (the host's /etc/passwd is not touched).
set -euo pipefail

uid=10001
user=wsi
config=""
while [ $# -gt 0 ]; do
  case "$1" in
    --uid) uid=${2:?--uid needs a number}; shift 2 ;;
    --user) user=${2:?--user needs a name}; shift 2 ;;
    --config) config=${2:?--config needs a file}; shift 2 ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "layout.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
[ -n "$config" ] && [ -f "$config" ] || { echo "layout.sh: --config FILE is required and must exist" >&2; exit 2; }
case "$uid" in ''|*[!0-9]*) echo "layout.sh: --uid must be a number" >&2; exit 2 ;; esac
[ "$uid" -ge 1000 ] || { echo "layout.sh: --uid $uid: use a non-system uid (>= 1000) for the service" >&2; exit 2; }

root=${WSI_ROOT:-/}
root=${root%/}
prefix=${WSI_PREFIX:-/opt/wsi-loader}
[ "$(id -u)" = 0 ] || { echo "layout.sh: must run as root (it adds a user and sets owners)" >&2; exit 1; }

# 1. The service user and group, no login shell, no home directory.
at=()
[ -n "$root" ] && at=(--prefix "$root")
if ! grep -q "^$user:" "$root/etc/group"; then
  groupadd "${at[@]}" --gid "$uid" "$user"
fi
if ! grep -q "^$user:" "$root/etc/passwd"; then
  useradd "${at[@]}" --uid "$uid" --gid "$uid" --no-create-home --home-dir /nonexistent \
    --shell /usr/sbin/nologin --no-log-init -K UID_MIN=1000 -K UID_MAX=60000 "$user"
fi

# 2. Folders. Numeric owners: under a WSI_ROOT the name is unknown to the host.
install -d -m 0755 -o 0 -g 0 "$root/data" "$root/etc/wsi-loader"
install -d -m 0750 -o "$uid" -g "$uid" "$root/var/cache/wsi-loader"
install -m 0644 -o 0 -g 0 "$config" "$root/etc/wsi-loader/config.yaml"

# 3. The configuration must load exactly as `serve --config` loads it (unknown keys, bad values fail here).
"$root$prefix/bin/python" - "$root/etc/wsi-loader/config.yaml" <<'PY'
import sys
from pathlib import Path

import yaml

from loader_service.config import config_from_mapping

config = config_from_mapping(yaml.safe_load(Path(sys.argv[1]).read_text()) or {})
print(f"layout.sh: ok: {sys.argv[1]}: listen {config.listen}, metrics {config.metrics_host}:{config.metrics_port}, "
      f"datasets {[d.name for d in config.datasets]}")
PY
