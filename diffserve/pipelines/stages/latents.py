"""Initial noise: one CPU generator per request, so a seed gives the same image on any GPU and in any
batch (the n outputs of one request come from one generator, as in the reference pipelines).

The noise is drawn directly in `noise_dtype` (what the reference pipeline draws in: the model dtype for
FLUX, float32 for Wan): a bf16 draw is not always the float32 draw rounded (CPU kernels differ), so
drawing in another dtype would give a different image for the same seed.
"""

from __future__ import annotations

import torch

from diffserve.config import GenerationRequest


def initial_noise(requests: list[GenerationRequest], sample_shape: tuple[int, ...], device: torch.device,
                  noise_dtype: torch.dtype) -> torch.Tensor:
    """(sum(num_outputs), *sample_shape) standard normal noise in `noise_dtype`, drawn on the CPU."""
    parts = []
    for r in requests:
        g = torch.Generator("cpu").manual_seed(int(r.seed))  # type: ignore[arg-type]
        parts.append(torch.randn((r.num_outputs, *sample_shape), generator=g, dtype=noise_dtype))
    return torch.cat(parts).to(device=device)


def video_latent_shape(channels: int, num_frames: int, height: int, width: int, scale_temporal: int,
                       scale_spatial: int) -> tuple[int, int, int, int]:
    """(C, F_lat, H/s, W/s) latents of a causal video VAE (Wan, HunyuanVideo): the first frame is its own latent
    frame and every `scale_temporal` frames after it share one, so F_lat = (F - 1) / t + 1."""
    return channels, (num_frames - 1) // scale_temporal + 1, height // scale_spatial, width // scale_spatial
