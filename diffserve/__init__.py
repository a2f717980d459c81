"""diffserve: a fast inference and serving engine for diffusion image and video models."""

from diffserve.config import EngineConfig, GenerationRequest
from diffserve.engine.engine import GenerationResult
from diffserve.engine.entry import Engine

__all__ = ["Engine", "EngineConfig", "GenerationRequest", "GenerationResult"]
__version__ = "0.1.0"
