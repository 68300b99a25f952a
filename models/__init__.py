"""Pure torch model definitions and their registry; imports nothing of dynviz."""
from models.output import Output
from models.program import ProgramClassifier, ProgramError, load_program
from models.registry import create, names, register_model
from models import resnet, lcnet, staged  # noqa: F401  (registers the builders)

__all__ = ["Output", "ProgramClassifier", "ProgramError", "create", "load_program", "names",
           "register_model"]
