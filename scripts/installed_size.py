#!/usr/bin/env python3
"""Installed size of a distribution with everything it pulls in, per distribution, in the running environment.

    python scripts/installed_size.py wsi-loader              # the client install
    python scripts/installed_size.py 'wsi-loader[server]'    # client + server extra

Sizes are the files each distribution's RECORD lists (what pip installed). Run it with the interpreter of
the environment to measure (e.g. /tmp/client-venv/bin/python scripts/installed_size.py wsi-loader).
"""

from __future__ import annotations

import re
import sys
from importlib import metadata

_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?")


def _key(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(root: str, extras: set[str]) -> dict[str, metadata.Distribution]:
    """Installed distributions reachable from ROOT[extras] (markers other than `extra` are not evaluated:
    a requirement that does not apply here is simply not installed, so it adds nothing)."""
    found: dict[str, metadata.Distribution] = {}
    todo = [(root, extras)]
    while todo:
        name, wanted = todo.pop()
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        key = _key(dist.metadata["Name"])
        if key in found and not wanted:
            continue
        found[key] = dist
        for requirement in dist.requires or []:
            text, _, marker = requirement.partition(";")
            extra = re.search(r"extra\s*==\s*['\"]([^'\"]+)['\"]", marker)
            if extra and extra.group(1) not in wanted:
                continue
            m = _NAME.match(text)
            if m and _key(m.group(1)) not in found:
                todo.append((m.group(1), {e.strip() for e in (m.group(2) or "").split(",") if e.strip()}))
    return found


def size(dist: metadata.Distribution) -> int:
    total = 0
    for file in dist.files or []:
        try:
            total += dist.locate_file(file).stat().st_size
        except OSError:
            pass
    return total


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    m = _NAME.match(argv[1])
    if not m:
        print(f"not a requirement: {argv[1]}", file=sys.stderr)
        return 2
    extras = {e.strip() for e in (m.group(2) or "").split(",") if e.strip()}
    dists = closure(m.group(1), extras)
    if not dists:
        print(f"{m.group(1)} is not installed in {sys.prefix}", file=sys.stderr)
        return 1
    sizes = sorted(((size(d), k) for k, d in dists.items()), reverse=True)
    for nbytes, key in sizes:
        print(f"{nbytes / 2**20:10.1f} MiB  {key}")
    print(f"{sum(n for n, _ in sizes) / 2**20:10.1f} MiB  total ({len(sizes)} distributions)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
