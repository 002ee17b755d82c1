"""Generated wire protocol shared by loader_service and trainer_client (see protos/), and the version."""

from importlib.metadata import PackageNotFoundError, version

__all__ = ["__version__"]

try:
    __version__ = version("wsi-loader")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0.1.0+source"
