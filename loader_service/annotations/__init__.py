"""Annotations: region/label files per slide (GeoJSON, ASAP XML, label masks), sampling by them, and masks."""

from loader_service.annotations.model import AnnotationError, LabelMask, Shape, SlideAnnotations
from loader_service.annotations.options import BACKGROUND, REGIONS, AnnotationOptions
from loader_service.annotations.parse import parse_annotations, parse_asap_xml, parse_geojson, read_label_mask
from loader_service.annotations.raster import inside_grid, inside_points
from loader_service.annotations.sampling import SessionAnnotations
from loader_service.annotations.describe import describe_annotations
from loader_service.annotations.store import COLUMN, DOWNSAMPLE_COLUMN, AnnotationStore

__all__ = ["AnnotationError", "AnnotationOptions", "AnnotationStore", "BACKGROUND", "COLUMN", "DOWNSAMPLE_COLUMN",
           "LabelMask", "REGIONS", "SessionAnnotations", "Shape", "SlideAnnotations", "describe_annotations", "inside_grid", "inside_points",
           "parse_annotations", "parse_asap_xml", "parse_geojson", "read_label_mask"]
