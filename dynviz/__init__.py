"""dynviz: dynamic inference (LC-Net gating, Bolukbasi et al. early exits and cascades)."""
__version__ = "0.1.0"
