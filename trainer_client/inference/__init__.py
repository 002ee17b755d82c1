"""Inference stitched back to the slide: a tissue-grid session, a weighted merger on disk, resumable predict."""

from trainer_client.inference.export import write_overlay_png, write_pyramidal_tiff
from trainer_client.inference.merger import WINDOWS, Footprint, SlideMerger, weight_window
from trainer_client.inference.predict import STATE_FILE, PredictConfig, predict

__all__ = ["Footprint", "PredictConfig", "STATE_FILE", "SlideMerger", "WINDOWS", "predict", "weight_window",
           "write_overlay_png", "write_pyramidal_tiff"]
