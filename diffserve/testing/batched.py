"""Generate one output per prompt through an Engine, a batch at a time, as arrays: how the embedded models'
quality tests and their trainers' evaluation score what the engine makes."""

from __future__ import annotations

import time

import numpy as np


def generate_outputs(engine, prompts: list[str], batch: int = 16, seed0: int = 0,
                     **params) -> tuple[list[np.ndarray], float]:
    """Outputs for `prompts` (prompt i gets seed ``seed0 + i``; `params` are further GenerationRequest
    fields): (H, W, 3) uint8 images or (F, H, W, 3) uint8 videos, and the wall seconds per output."""
    from diffserve.config import GenerationRequest

    requests = [GenerationRequest(prompt=p, seed=seed0 + i, **params) for i, p in enumerate(prompts)]
    start, outs = time.perf_counter(), []
    for j in range(0, len(requests), batch):
        for r in engine.generate_batch(requests[j:j + batch]):
            outs.append(np.asarray(r.videos[0]) if r.videos else np.asarray(r.images[0].convert("RGB")))
    return outs, (time.perf_counter() - start) / max(1, len(requests))
