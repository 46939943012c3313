"""offload: run LLMs larger than your GPU from int4 weights in host RAM."""
from .engine import Engine, load
from .errors import OffloadError

__all__ = ["Engine", "OffloadError", "load"]
__version__ = "0.1.0"
