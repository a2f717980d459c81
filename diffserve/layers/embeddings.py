"""Small pure functions and modules shared by the DiTs: sinusoidal timestep features, MLP embedders."""

from __future__ import annotations

import math

import torch
from torch import nn

from diffserve.layers.linear import GeluLinear


def timestep_features(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0,
                      flip_sin_to_cos: bool = True, downscale_freq_shift: float = 0.0) -> torch.Tensor:
    """Sinusoidal features of (B,) timesteps -> (B, dim) float32, [cos, sin] order when flipped."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(exponent / (half - downscale_freq_shift))
    args = t[:, None].float() * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    return emb


class MLPEmbedder(nn.Module):
    """linear_1 -> SiLU -> linear_2 (diffusers' TimestepEmbedding / PixArtAlphaTextProjection layout)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int | None = None) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, hidden)
        self.linear_2 = nn.Linear(hidden, out_dim or hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(nn.functional.silu(self.linear_1(x)))


class GeluProj(nn.Module):
    """Linear followed by GELU, laid out as diffusers' `GELU` activation module (`proj`); the engine's
    epilogue fusion applies to its `GeluLinear`."""

    def __init__(self, dim_in: int, dim_out: int, approximate: str = "tanh") -> None:
        super().__init__()
        self.proj = GeluLinear(dim_in, dim_out, approximate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class FeedForward(nn.Module):
    """GELU MLP laid out as `net.0.proj`, `net.2` so diffusers checkpoints load unchanged."""

    def __init__(self, dim: int, inner_dim: int, approximate: str = "tanh") -> None:
        super().__init__()
        self.net = nn.ModuleList([GeluProj(dim, inner_dim, approximate), nn.Identity(), nn.Linear(inner_dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x))
