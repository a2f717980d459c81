from diffserve.engine.engine import Engine, GenerationResult

__all__ = ["Engine", "GenerationResult"]
