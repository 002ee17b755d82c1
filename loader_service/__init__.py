"""The whole-slide image loader service."""
