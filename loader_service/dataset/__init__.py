"""Datasets: manifests and the index built from them."""

from loader_service.dataset.index import DatasetIndex, SlideHandles, SlideOutsideRoots, SlideRecord, is_under_roots
from loader_service.dataset.manifest import ManifestEntry, ManifestError, read_manifest

__all__ = ["DatasetIndex", "ManifestEntry", "ManifestError", "SlideHandles", "SlideOutsideRoots", "SlideRecord", "is_under_roots", "read_manifest"]
