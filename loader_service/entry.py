"""The `loader-service` console script: checks that the server's dependencies are installed, then runs the CLI.

A trainer host installs ``wsi-loader`` alone (the client); the service needs ``wsi-loader[server]``. Without
it, ``loader-service`` says so in one line instead of a traceback from deep inside an import.
"""

from __future__ import annotations

import importlib.util
import sys

__all__ = ["main", "missing_server_modules", "SERVER_MODULES"]

# One importable module of each of the `server` extra's distributions that loader_service imports at start.
SERVER_MODULES = ("yaml", "prometheus_client", "grpc_health", "pyvips", "openslide", "tifffile", "imagecodecs",
                  "PIL", "scipy", "tqdm", "numba", "torchvision")


def missing_server_modules() -> list[str]:
    """The server modules that cannot be found in this environment."""
    missing = []
    for name in SERVER_MODULES:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(name)
    return missing


def main(argv: list[str] | None = None) -> int:
    missing = missing_server_modules()
    if missing:
        print(f"loader-service: the server's dependencies are not installed (missing: {', '.join(missing)}); "
              "install them with: pip install 'wsi-loader[server]'", file=sys.stderr)
        return 3
    from loader_service.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
