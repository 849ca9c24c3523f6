"""laser-export: LASER (layer-selective rank reduction) as a model-hub workflow."""

__version__ = "0.1.0"
