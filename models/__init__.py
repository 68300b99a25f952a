"""Pure torch model definitions and their registry; imports nothing of dynviz."""
from models.registry import create, names, register_model
from models import resnet, lcnet, staged  # noqa: F401  (registers the builders)

__all__ = ["create", "names", "register_model"]
