"""Engines, lowest layer first: `engine` (LocalEngine: one model in this process, GenerationResult),
`ranks` (what runs in each process of a multi-process engine), `parallel_engine` (ParallelEngine: the
caller's handle on those processes), `entry` (the public `Engine`, which picks in-process or several
processes). Each module imports only from those before it."""

from diffserve.engine.engine import GenerationResult
from diffserve.engine.entry import Engine

__all__ = ["Engine", "GenerationResult"]
