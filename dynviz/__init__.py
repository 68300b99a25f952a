"""dynviz: dynamic inference (LC-Net gating, Bolukbasi et al. early exits and cascades)."""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("dynviz")        # pyproject.toml is its one home
except PackageNotFoundError:               # a checkout on sys.path, not installed
    __version__ = "0+unknown"
