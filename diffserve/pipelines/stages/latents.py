"""Initial noise: one CPU generator per request, so a seed gives the same image on any device and in
any batch (the n outputs of one request come from one generator, as in the reference pipelines)."""

from __future__ import annotations

import torch

from diffserve.config import GenerationRequest


def initial_noise(requests: list[GenerationRequest], sample_shape: tuple[int, ...], device: torch.device,
                  dtype: torch.dtype) -> torch.Tensor:
    """(sum(num_outputs), *sample_shape) standard normal noise, drawn in float32 on the CPU."""
    parts = []
    for r in requests:
        g = torch.Generator("cpu").manual_seed(int(r.seed))
        parts.append(torch.randn((r.num_outputs, *sample_shape), generator=g, dtype=torch.float32))
    return torch.cat(parts).to(device=device, dtype=dtype)
