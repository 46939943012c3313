"""offload: run LLMs larger than your GPU from int4 weights in host RAM."""
from .engine import Engine, load
from .errors import OffloadError
from .evaluate import evaluate

__all__ = ["Engine", "OffloadError", "evaluate", "load"]
__version__ = "0.1.0"
