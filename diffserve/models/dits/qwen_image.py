"""Qwen-Image transformer (Qwen-Image, Qwen-Image-Edit): 60 dual-stream MMDiT blocks, 3-axis RoPE.

Each block keeps separate weights for the text stream (Qwen2.5-VL hidden states) and the image stream
(packed VAE latents; for editing, the noise tokens followed by the reference image's tokens) and runs
one joint attention over [text; image], with the text key-padding mask. Parameter names follow the
diffusers `QwenImageTransformer2DModel` checkpoints so they load with strict=True.

Precision follows the reference: everything runs in the model dtype except the RMS statistics of the
RMSNorms, the rotary products (float32 tables), and the timestep's sinusoidal features (float32, of the
timestep as given in the model dtype). Shapes: B batch, T text tokens, N image tokens, C channels,
H heads, D head size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from diffserve.layers.attention import AttentionOp
from diffserve.layers.embeddings import FeedForward, MLPEmbedder
from diffserve.layers.linear import Projections
from diffserve.layers.rope import apply_rope_interleaved
from diffserve.models.dits.config import config_from_dict, config_from_json
from diffserve.parallel.plan import SequencePlan, Tokens

ROPE_THETA = 10000.0
ImageShape = tuple[int, int, int]  # (frames, rows, cols) of one image's token grid


@dataclass(frozen=True)
class QwenImageConfig:
    """`transformer/config.json` of a Qwen-Image checkpoint.

    `pooled_projection_dim` is a leftover key of the first Qwen-Image release (no layer uses it); it is
    accepted and ignored. `guidance_embeds`, `zero_cond_t`, `use_additional_t_cond` and
    `use_layer3d_rope` (later variants' options) are accepted only with their neutral value."""

    patch_size: int = 2
    in_channels: int = 64
    out_channels: int | None = 16
    num_layers: int = 60
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 3584
    guidance_embeds: bool = False
    axes_dims_rope: tuple[int, int, int] = (16, 56, 56)
    pooled_projection_dim: int | None = None
    zero_cond_t: bool = False
    use_additional_t_cond: bool = False
    use_layer3d_rope: bool = False

    def __post_init__(self) -> None:
        for name in ("guidance_embeds", "zero_cond_t", "use_additional_t_cond", "use_layer3d_rope"):
            if getattr(self, name):
                raise ValueError(f"QwenImageConfig: {name}=true is not implemented by diffserve "
                                 "(Qwen-Image and Qwen-Image-Edit checkpoints have it false)")
        if len(self.axes_dims_rope) != 3 or any(d % 2 for d in self.axes_dims_rope):
            raise ValueError(f"QwenImageConfig: axes_dims_rope must be three even sizes, got {self.axes_dims_rope}")
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ValueError(f"QwenImageConfig: axes_dims_rope {self.axes_dims_rope} must sum to "
                             f"attention_head_dim {self.attention_head_dim}")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def output_channels(self) -> int:
        return self.out_channels or self.in_channels

    @classmethod
    def from_dict(cls, raw: dict) -> QwenImageConfig:
        return config_from_dict(cls, raw, tuple_fields=("axes_dims_rope",))

    @classmethod
    def from_json(cls, path: str | Path) -> QwenImageConfig:
        return config_from_json(cls, path, tuple_fields=("axes_dims_rope",))


# ---------------------------------------------------------------------------------------------------------
# Pure functions: timestep features, RoPE tables, norms


def timestep_features(t: torch.Tensor, dim: int = 256, scale: float = 1000.0) -> torch.Tensor:
    """Sinusoidal features [cos, sin] (B, dim) float32 of timesteps t (B,) in [0, 1]: angles
    (t * freq) * scale in float32, frequencies 10000^(-i/half), as the reference orders the products."""
    half = dim // 2
    exponent = -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    freqs = torch.exp(exponent)
    angles = scale * (t[:, None].float() * freqs[None, :])  # (B, half)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def _axis_angles(pos: torch.Tensor, dim: int) -> torch.Tensor:
    """(L,) integer positions -> (L, dim/2) float32 rotation angles pos * theta^(-2i/dim)."""
    inv = 1.0 / torch.pow(ROPE_THETA, torch.arange(0, dim, 2, dtype=torch.float32, device=pos.device) / dim)
    return pos.to(torch.float32)[:, None] * inv[None, :]


def _interleaved(angles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, D/2) angles -> cos, sin (L, D), each repeated for the (real, imaginary) pair it rotates. Taken
    from the unit complex numbers e^(i angle) as the reference makes them (`torch.polar`, whose cos/sin
    can differ from torch.cos/sin in the last bit)."""
    unit = torch.polar(torch.ones_like(angles), angles)
    return unit.real.repeat_interleave(2, dim=1), unit.imag.repeat_interleave(2, dim=1)


def centred_positions(n: int, device: torch.device | None = None) -> torch.Tensor:
    """Row (or column) positions of an n-long grid axis centred on 0: -(n - n//2) .. n//2 - 1."""
    return torch.arange(n, device=device) - (n - n // 2)


def image_rope(shapes: list[ImageShape], axes: tuple[int, int, int],
               device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE tables cos, sin (sum f*h*w, D) of the image tokens: image i of `shapes` (the target, then
    reference images) takes frame positions i..i+f-1; rows and columns are centred on 0. Tokens are
    row-major per image, images one after the other."""
    tables = []
    for i, (f, h, w) in enumerate(shapes):
        fa = _axis_angles(torch.arange(i, i + f, device=device), axes[0])  # (f, a0/2)
        ha = _axis_angles(centred_positions(h, device), axes[1])  # (h, a1/2)
        wa = _axis_angles(centred_positions(w, device), axes[2])  # (w, a2/2)
        grid = torch.cat([fa[:, None, None].expand(f, h, w, -1), ha[None, :, None].expand(f, h, w, -1),
                          wa[None, None, :].expand(f, h, w, -1)], dim=-1)
        tables.append(grid.reshape(f * h * w, -1))
    return _interleaved(torch.cat(tables, dim=0))


def text_rope(shapes: list[ImageShape], length: int, axes: tuple[int, int, int],
              device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE tables cos, sin (T, D) of the text tokens: token j sits at position m + j on all three axes,
    m = the largest half-extent (max(h//2, w//2)) of any image, so text follows the image grid."""
    start = max(max(h // 2, w // 2) for _, h, w in shapes)
    pos = torch.arange(start, start + length, device=device)
    return _interleaved(torch.cat([_axis_angles(pos, d) for d in axes], dim=-1))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim: statistics in float32, the normalised value cast to the weight's dtype
    before the scale (as the reference)."""
    variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
    return (x * torch.rsqrt(variance + eps)).to(weight.dtype) * weight


def layer_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), eps=eps)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (B, L, C); shift, scale (B, C)."""
    return x * (1 + scale[:, None]) + shift[:, None]


# ---------------------------------------------------------------------------------------------------------
# Modules


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class JointAttention(Projections):
    """Image-stream (to_q/k/v, to_out.0) and text-stream (add_*_proj, to_add_out) projections with
    per-head RMSNorm on q and k, and one attention over [text; image]."""

    def __init__(self, dim: int, heads: int, head_dim: int, attn: AttentionOp) -> None:
        super().__init__([("to_q", "to_k", "to_v"), ("add_q_proj", "add_k_proj", "add_v_proj")])
        self.heads, self.head_dim, self.attn = heads, head_dim, attn
        inner = heads * head_dim
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, inner) for _ in range(3))
        self.add_q_proj, self.add_k_proj, self.add_v_proj = (nn.Linear(dim, inner) for _ in range(3))
        self.norm_q, self.norm_k = RMSNorm(head_dim), RMSNorm(head_dim)
        self.norm_added_q, self.norm_added_k = RMSNorm(head_dim), RMSNorm(head_dim)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Identity()])
        self.to_add_out = nn.Linear(inner, dim)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(-1, (self.heads, self.head_dim))  # (B, L, H*D) -> (B, L, H, D)

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                kv_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, N, C) image stream, c (B, T, C) text stream; rope cos, sin (T+N, D) over [text; image];
        kv_mask (B, T+N) bool or None -> (image output (B, N, C), text output (B, T, C))."""
        q, k, v = (self._heads(t) for t in self.project(x, "to_q", "to_k", "to_v"))
        cq, ck, cv = (self._heads(t) for t in self.project(c, "add_q_proj", "add_k_proj", "add_v_proj"))
        q = torch.cat([self.norm_added_q(cq), self.norm_q(q)], dim=1)  # (B, T+N, H, D)
        k = torch.cat([self.norm_added_k(ck), self.norm_k(k)], dim=1)
        v = torch.cat([cv, v], dim=1)
        q, k = apply_rope_interleaved(q, *rope), apply_rope_interleaved(k, *rope)
        out = self.attn(q, k, v, kv_mask=kv_mask).flatten(2).to(q.dtype)  # (B, T+N, H*D)
        t = c.shape[1]
        return self.to_out[0](out[:, t:].contiguous()), self.to_add_out(out[:, :t].contiguous())


class QwenImageBlock(nn.Module):
    """One dual-stream block: AdaLN-modulated joint attention, then an AdaLN-modulated GELU MLP, per stream."""

    def __init__(self, cfg: QwenImageConfig, attn: AttentionOp) -> None:
        super().__init__()
        dim = cfg.inner_dim
        self.img_mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.txt_mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.attn = JointAttention(dim, cfg.num_attention_heads, cfg.attention_head_dim, attn)
        self.img_mlp = FeedForward(dim, 4 * dim)
        self.txt_mlp = FeedForward(dim, 4 * dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor, temb: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                kv_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, N, C) image, c (B, T, C) text, temb (B, C) -> updated (x, c)."""
        shift, scale, gate, shift2, scale2, gate2 = self.img_mod(temb).chunk(6, dim=-1)  # each (B, C)
        c_shift, c_scale, c_gate, c_shift2, c_scale2, c_gate2 = self.txt_mod(temb).chunk(6, dim=-1)
        x_attn, c_attn = self.attn(modulate(layer_norm(x), shift, scale), modulate(layer_norm(c), c_shift, c_scale),
                                   rope, kv_mask)
        x = x + gate[:, None] * x_attn
        c = c + c_gate[:, None] * c_attn
        x = x + gate2[:, None] * self.img_mlp(modulate(layer_norm(x), shift2, scale2))
        c = c + c_gate2[:, None] * self.txt_mlp(modulate(layer_norm(c), c_shift2, c_scale2))
        if x.dtype == torch.float16:
            x, c = x.clip(-65504, 65504), c.clip(-65504, 65504)
        return x, c


class TimestepEmbed(nn.Module):
    """`time_text_embed`: sinusoidal timestep features -> MLP -> (B, C) conditioning."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.timestep_embedder = MLPEmbedder(256, dim)

    def forward(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.timestep_embedder(timestep_features(t).to(dtype))


class OutputNorm(nn.Module):
    """`norm_out`: LayerNorm modulated by (scale, shift) from the conditioning."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.linear(F.silu(temb).to(x.dtype)).chunk(2, dim=1)
        return modulate(layer_norm(x), shift, scale)


@dataclass
class QwenImageCond:
    """What every rank holds whole: the conditioning vector and how many leading image tokens are the ones
    being denoised (the rest are reference-image tokens, dropped by `finish`)."""

    temb: torch.Tensor  # (B, C)
    noise_tokens: int


class QwenImageTransformer(nn.Module):
    """Qwen-Image DiT. forward(x (B, N, in_ch), context (B, T, joint_dim), context_mask, timestep, img_shapes)
    -> (B, N_noise, out_ch), as `finish(head(blocks(embed(...))), tokens)` (see `diffserve.parallel.plan`)."""

    REPEATED_BLOCKS = ("transformer_blocks",)

    # Joint attention over [text; image] (the reference's order); the image segment holds the noise tokens
    # and, for editing, the reference image's tokens after them. Both are sharded under sequence
    # parallelism, with their RoPE rows and the text key mask; the conditioning is replicated.
    PLAN: ClassVar[SequencePlan] = SequencePlan(joint=("text", "image"), output="image")

    def __init__(self, cfg: QwenImageConfig, attention: AttentionOp | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.attention = attention or AttentionOp()
        dim = cfg.inner_dim
        self.time_text_embed = TimestepEmbed(dim)
        self.txt_norm = RMSNorm(cfg.joint_attention_dim)
        self.img_in = nn.Linear(cfg.in_channels, dim)
        self.txt_in = nn.Linear(cfg.joint_attention_dim, dim)
        self.transformer_blocks = nn.ModuleList(QwenImageBlock(cfg, self.attention) for _ in range(cfg.num_layers))
        self.norm_out = OutputNorm(dim)
        self.proj_out = nn.Linear(dim, cfg.patch_size * cfg.patch_size * cfg.output_channels)

    def embed(self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None,
              timestep: torch.Tensor, img_shapes: list[ImageShape]) -> Tokens:
        """Inputs (as `forward`) -> segments "text" (B, T, C) and "image" (B, N, C), each with its RoPE rows
        (cos, sin (L, D)), the text key mask (when given), and `QwenImageCond`."""
        n_image = sum(f * h * w for f, h, w in img_shapes)
        if x.shape[1] != n_image:
            raise ValueError(f"img_shapes {img_shapes} describe {n_image} image tokens, x has {x.shape[1]}")
        image = self.img_in(x)
        temb = self.time_text_embed(timestep.to(image.dtype), image.dtype)
        text = self.txt_in(self.txt_norm(context))
        axes, dev = self.cfg.axes_dims_rope, x.device
        rope = {"text": text_rope(img_shapes, text.shape[1], axes, dev), "image": image_rope(img_shapes, axes, dev)}
        masks = {} if context_mask is None else {"text": context_mask.to(torch.bool)}
        f, h, w = img_shapes[0]
        return Tokens(segments={"text": text, "image": image}, rope=rope, masks=masks,
                      cond=QwenImageCond(temb=temb, noise_tokens=f * h * w))

    def blocks(self, tokens: Tokens) -> Tokens:
        """The dual-stream blocks over whatever (possibly sharded) segments `tokens` holds."""
        return self.run_blocks(tokens, 0, None)

    def run_blocks(self, tokens: Tokens, start: int, stop: int | None) -> Tokens:
        """Blocks [start, stop) (None: to the end); `blocks` is run_blocks(tokens, 0, None)."""
        order = self.PLAN.joint
        rope, kv_mask = tokens.joint_rope(order), tokens.joint_mask(order)
        temb = tokens.cond.temb
        x, c = tokens.segments["image"], tokens.segments["text"]
        for block in self.transformer_blocks[start:stop]:
            x, c = block(x, c, temb, rope, kv_mask)
        return tokens.with_segments(text=c, image=x)

    def head(self, tokens: Tokens) -> torch.Tensor:
        """Output norm and projection of every image token: (B, N, C) -> (B, N, p*p*out_ch)."""
        return self.proj_out(self.norm_out(tokens.segments["image"], tokens.cond.temb))

    def finish(self, out: torch.Tensor, tokens: Tokens) -> torch.Tensor:
        """Keep the tokens being denoised: (B, N, p*p*out_ch) -> (B, N_noise, p*p*out_ch) (drops the
        reference image's tokens when editing)."""
        return out[:, :tokens.cond.noise_tokens]

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None,
                timestep: torch.Tensor, img_shapes: list[ImageShape]) -> torch.Tensor:
        """x (B, N, in_ch) packed latents (noise tokens, then reference tokens when editing); context
        (B, T, joint_dim) text hidden states; context_mask (B, T) bool/int (1 = real token) or None;
        timestep (B,) in [0, 1]; img_shapes: (frames, rows, cols) token grid of the target image, then of
        each reference image -> (B, N_noise, p*p*out_ch). Pass context_mask=None when no text token is
        padding (a mask is carried into every attention call)."""
        tokens = self.embed(x, context, context_mask, timestep, img_shapes)
        return self.finish(self.head(self.blocks(tokens)), tokens)
