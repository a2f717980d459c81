"""HunyuanVideo transformer (T2V, 13B): a token refiner over the LLaMA text, FLUX-like dual-stream and
single-stream blocks over [video; text], 3-axis RoPE on the video tokens, embedded guidance.

Parameter names follow the diffusers `HunyuanVideoTransformer3DModel` checkpoints so they load with
strict=True. Shapes are written at the boundaries: B batch, C_in/C_out latent channels, F/H/W latent
frames/height/width, f/h/w the patch grid, N = f*h*w video tokens, T text tokens, C model width, H heads,
D head dim.

dtype policy (as the reference, which keeps no module in float32): every weight and activation is in the
weights' dtype, except the sinusoidal timestep/guidance features (float32, cast to the conditioning dtype
before their MLPs), the masked mean of the text that feeds the refiner's conditioning (accumulated in
float32, cast back), the RoPE tables (built and applied in float32, the rotated q/k cast back) and the
attention output (cast to the query dtype).

Text padding. The text arrives padded (B, T, text_dim) with a mask (B, T). Every attention over text keys
here takes a key mask, so padded text positions never reach a real token; under sequence parallelism
the same holds for the zero padding a shard may carry (its mask entries are False). The outputs at
padded text positions are not the reference's (they are never used: the head reads video tokens only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from diffserve.layers.attention import AttentionOp
from diffserve.layers.embeddings import FeedForward, MLPEmbedder, timestep_features
from diffserve.layers.linear import ConcatLinear, GeluLinear, Projections
from diffserve.layers.rope import apply_rope_interleaved
from diffserve.models.dits.config import config_from_dict, config_from_json
from diffserve.parallel.plan import SequencePlan, Tokens

NORM_EPS = 1e-6


@dataclass(frozen=True)
class HunyuanVideoConfig:
    """The diffusers `HunyuanVideoTransformer3DModel` config (transformer/config.json)."""

    in_channels: int = 16
    out_channels: int | None = 16
    num_attention_heads: int = 24
    attention_head_dim: int = 128
    num_layers: int = 20
    num_single_layers: int = 40
    num_refiner_layers: int = 2
    mlp_ratio: float = 4.0
    patch_size: int = 2
    patch_size_t: int = 1
    qk_norm: str = "rms_norm"
    guidance_embeds: bool = True
    text_embed_dim: int = 4096
    pooled_projection_dim: int = 768
    rope_theta: float = 256.0
    rope_axes_dim: tuple[int, int, int] = (16, 56, 56)
    image_condition_type: str | None = None  # I2V variants ("latent_concat", "token_replace"): not supported

    def __post_init__(self) -> None:
        if self.qk_norm != "rms_norm":
            raise ValueError(f"HunyuanVideoConfig: qk_norm must be 'rms_norm', got {self.qk_norm!r}")
        if self.image_condition_type is not None:
            raise ValueError(f"HunyuanVideoConfig: image_condition_type={self.image_condition_type!r} (the "
                             "image-to-video variants) is not supported; only text-to-video (None)")
        if sum(self.rope_axes_dim) != self.attention_head_dim:
            raise ValueError(f"HunyuanVideoConfig: rope_axes_dim {self.rope_axes_dim} must sum to "
                             f"attention_head_dim {self.attention_head_dim}")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def out_dim(self) -> int:
        return self.out_channels or self.in_channels

    @property
    def patch(self) -> tuple[int, int, int]:
        return self.patch_size_t, self.patch_size, self.patch_size

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> HunyuanVideoConfig:
        return config_from_dict(cls, raw, tuple_fields=("rope_axes_dim",))

    @classmethod
    def from_json(cls, path: str | Path) -> HunyuanVideoConfig:
        return config_from_json(cls, path, tuple_fields=("rope_axes_dim",))


@dataclass
class HunyuanCond:
    """What every rank holds whole: temb (B, C), the conditioning of every AdaNorm and of the head, and the
    (f, h, w) patch grid for `finish`."""

    temb: torch.Tensor
    grid: tuple[int, int, int]


# ----------------------------------------------------------------------------------------------------------
# Pure functions


def hunyuan_rope(grid: tuple[int, int, int], axes_dim: tuple[int, int, int], theta: float,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """3-axis RoPE for a (f, h, w) patch grid -> cos, sin (N, sum(axes_dim)) float32, tokens in (f, h, w)
    order, axes concatenated (frame, height, width), pairs interleaved as `apply_rope_interleaved` expects.

    Built in float32 throughout (frequencies, angles, cos/sin), as the reference builds these tables; a
    float64 build would differ in the last bits."""
    f, h, w = grid
    tables = []
    for n, dim in zip(grid, axes_dim, strict=True):
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))
        angles = torch.outer(torch.arange(n, dtype=torch.float32, device=device), freqs)  # (n, dim/2)
        tables.append((angles.cos().repeat_interleave(2, dim=1), angles.sin().repeat_interleave(2, dim=1)))
    views = ((f, 1, 1, -1), (1, h, 1, -1), (1, 1, w, -1))

    def grid_table(i: int) -> torch.Tensor:
        parts = [t[i].view(*v).expand(f, h, w, -1) for t, v in zip(tables, views, strict=True)]
        return torch.cat(parts, dim=-1).reshape(f * h * w, -1)

    return grid_table(0), grid_table(1)


def text_key_mask(mask: torch.Tensor) -> torch.Tensor:
    """The reference's text key mask: (B, T) -> (B, T) bool, the first sum(mask) positions real.

    The reference counts the mask and keeps that many leading text keys (it assumes right padding, which
    its tokenizer gives); counting here keeps that meaning for any mask."""
    count = mask.sum(dim=1, dtype=torch.int32)  # (B,)
    return torch.arange(mask.shape[1], device=mask.device) < count[:, None]


def refiner_key_mask(mask: torch.Tensor) -> torch.Tensor:
    """The token refiner's key mask (B, T) bool: the text mask with key 0 always visible.

    The reference builds a square (B, 1, T, T) mask m_i & m_j and then forces column 0 True. For a real
    query row i (m_i True) that leaves keys {j : m_j} | {0}, which is exactly this key mask, so the real
    tokens' outputs are identical; padded query rows differ (the reference lets them see key 0 only), and
    those rows are never read by a real token afterwards (all later attention masks them as keys). Forcing
    key 0 also keeps a sample with no real token defined, as in the reference."""
    mask = mask.bool().clone()
    mask[:, 0] = True
    return mask


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over the real tokens: x (B, T, D), mask (B, T) -> (B, D) in x's dtype, accumulated in float32."""
    if mask is None:
        return (x.float().sum(dim=1) / x.shape[1]).to(x.dtype)
    m = mask.float().unsqueeze(-1)
    return ((x * m).sum(dim=1) / m.sum(dim=1)).to(x.dtype)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """LayerNorm (no affine, eps 1e-6) then x * (1 + scale) + shift. x (B, L, C); shift/scale (B, C)."""
    return F.layer_norm(x, (x.shape[-1],), eps=NORM_EPS) * (1 + scale[:, None]) + shift[:, None]


def unpatchify(x: torch.Tensor, grid: tuple[int, int, int], patch: tuple[int, int, int]) -> torch.Tensor:
    """(B, N, C*pt*ph*pw) with per-token channels laid out (C, pt, ph, pw) -> (B, C, f*pt, h*ph, w*pw)."""
    (f, h, w), (pt, ph, pw) = grid, patch
    x = x.reshape(x.shape[0], f, h, w, -1, pt, ph, pw)
    x = x.permute(0, 4, 1, 5, 2, 6, 3, 7)  # (B, C, f, pt, h, ph, w, pw)
    return x.reshape(x.shape[0], x.shape[1], f * pt, h * ph, w * pw)


# ----------------------------------------------------------------------------------------------------------
# Modules (named like the checkpoint)


class RMSNorm(nn.Module):
    """RMSNorm over the last dim with a learned scale (the q/k norms, over the head dim)."""

    def __init__(self, dim: int, eps: float = NORM_EPS) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class AdaNorm(nn.Module):
    """SiLU -> Linear: temb (B, C) -> `n` modulation vectors (B, n*out)."""

    def __init__(self, dim: int, n: int, out: int | None = None) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, n * (out or dim))

    def forward(self, temb: torch.Tensor) -> torch.Tensor:
        return self.linear(F.silu(temb))


class SiluProj(nn.Module):
    """Linear followed by SiLU (the layout of diffusers' `LinearActivation`: `proj`)."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(self.proj(x))


class SiluMLP(nn.Module):
    """`net.0.proj` -> SiLU -> `net.2` (diffusers `FeedForward(activation_fn="linear-silu")`)."""

    def __init__(self, dim: int, inner: int) -> None:
        super().__init__()
        self.net = nn.ModuleList([SiluProj(dim, inner), nn.Identity(), nn.Linear(inner, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x))


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.unflatten(-1, (heads, -1))  # (B, L, H*D) -> (B, L, H, D)


class RefinerAttention(Projections):
    """Plain multi-head self-attention with biases (no q/k norm) over the text, run whole on every rank."""

    def __init__(self, dim: int, heads: int, attention: AttentionOp) -> None:
        super().__init__([("to_q", "to_k", "to_v")])
        self.heads, self.attention = heads, attention
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim) for _ in range(3))
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Identity()])

    def forward(self, x: torch.Tensor, kv_mask: torch.Tensor | None) -> torch.Tensor:
        """x (B, T, C), kv_mask (B, T) bool or None -> (B, T, C)."""
        q, k, v = (split_heads(t, self.heads) for t in self.project(x, "to_q", "to_k", "to_v"))
        out = self.attention.local(q, k, v, kv_mask=kv_mask)  # whole text on every rank: never the parallel wrapper
        return self.to_out[0](out.flatten(2).to(q.dtype))


class RefinerBlock(nn.Module):
    """LayerNorm -> self-attention -> gated residual; LayerNorm -> SiLU MLP -> gated residual. The gates
    come from temb through `norm_out`."""

    def __init__(self, cfg: HunyuanVideoConfig, attention: AttentionOp) -> None:
        super().__init__()
        dim = cfg.inner_dim
        self.norm1 = nn.LayerNorm(dim, eps=NORM_EPS)
        self.attn = RefinerAttention(dim, cfg.num_attention_heads, attention)
        self.norm2 = nn.LayerNorm(dim, eps=NORM_EPS)
        self.ff = SiluMLP(dim, int(dim * cfg.mlp_ratio))
        self.norm_out = AdaNorm(dim, 2)

    def forward(self, x: torch.Tensor, temb: torch.Tensor, kv_mask: torch.Tensor | None) -> torch.Tensor:
        """x (B, T, C); temb (B, C); kv_mask (B, T) bool or None."""
        gate_attn, gate_mlp = self.norm_out(temb).chunk(2, dim=1)
        x = x + self.attn(self.norm1(x), kv_mask) * gate_attn[:, None]
        return x + self.ff(self.norm2(x)) * gate_mlp[:, None]


class TokenRefinerStack(nn.Module):
    def __init__(self, cfg: HunyuanVideoConfig, attention: AttentionOp) -> None:
        super().__init__()
        self.refiner_blocks = nn.ModuleList(RefinerBlock(cfg, attention) for _ in range(cfg.num_refiner_layers))


class TimeTextEmbed(nn.Module):
    """Sinusoidal timestep (+ guidance) features through MLPs, plus a projection of a pooled text vector:
    (B,) timesteps, (B, P) pooled -> (B, C)."""

    def __init__(self, dim: int, pooled_dim: int, guidance: bool) -> None:
        super().__init__()
        self.timestep_embedder = MLPEmbedder(256, dim)
        self.text_embedder = MLPEmbedder(pooled_dim, dim)
        if guidance:
            self.guidance_embedder = MLPEmbedder(256, dim)

    def forward(self, t: torch.Tensor, pooled: torch.Tensor, guidance: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.timestep_embedder(timestep_features(t).to(pooled.dtype))
        if guidance is not None:
            emb = emb + self.guidance_embedder(timestep_features(guidance).to(pooled.dtype))
        return emb + self.text_embedder(pooled)


class TokenRefiner(nn.Module):
    """The text path (`context_embedder`): its own timestep + mean-text conditioning, an input projection
    and `num_refiner_layers` masked self-attention blocks. (B, T, text_dim) -> (B, T, C)."""

    def __init__(self, cfg: HunyuanVideoConfig, attention: AttentionOp) -> None:
        super().__init__()
        dim = cfg.inner_dim
        self.time_text_embed = TimeTextEmbed(dim, cfg.text_embed_dim, guidance=False)
        self.proj_in = nn.Linear(cfg.text_embed_dim, dim)
        self.token_refiner = TokenRefinerStack(cfg, attention)

    def forward(self, text: torch.Tensor, timestep: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """text (B, T, text_dim); timestep (B,); mask (B, T) or None (all real)."""
        temb = self.time_text_embed(timestep, masked_mean(text, mask))
        kv_mask = refiner_key_mask(mask) if mask is not None else None
        x = self.proj_in(text)
        for block in self.token_refiner.refiner_blocks:
            x = block(x, temb, kv_mask)
        return x


class JointAttention(Projections):
    """q/k/v with RMSNorm on q and k per head; `added`: the text stream's own projections (dual-stream
    blocks), else one set of projections over the joint sequence (single-stream blocks)."""

    def __init__(self, dim: int, heads: int, attention: AttentionOp, added: bool) -> None:
        super().__init__([("to_q", "to_k", "to_v")] + [("add_q_proj", "add_k_proj", "add_v_proj")] * added)
        self.heads, self.attention = heads, attention
        head_dim = dim // heads
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim) for _ in range(3))
        self.norm_q, self.norm_k = RMSNorm(head_dim), RMSNorm(head_dim)
        if added:
            self.add_q_proj, self.add_k_proj, self.add_v_proj = (nn.Linear(dim, dim) for _ in range(3))
            self.norm_added_q, self.norm_added_k = RMSNorm(head_dim), RMSNorm(head_dim)
            self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Identity()])
            self.to_add_out = nn.Linear(dim, dim)

    def qkv(self, x: torch.Tensor, added: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, L, C) -> q, k, v (B, L, H, D), q and k normalised; `added`: the text-stream projections."""
        if added:
            q, k, v = self.project(x, "add_q_proj", "add_k_proj", "add_v_proj")
            norm_q, norm_k = self.norm_added_q, self.norm_added_k
        else:
            q, k, v = self.project(x, "to_q", "to_k", "to_v")
            norm_q, norm_k = self.norm_q, self.norm_k
        return norm_q(split_heads(q, self.heads)), norm_k(split_heads(k, self.heads)), split_heads(v, self.heads)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_video: int,
               rope: tuple[torch.Tensor, torch.Tensor], kv_mask: torch.Tensor | None) -> torch.Tensor:
        """Joint attention over [video; text]: q, k, v (B, N+T, H, D), RoPE on the first `n_video` tokens
        of q and k (cos/sin (N, D)); kv_mask (B, N+T) bool or None -> (B, N+T, H*D)."""
        q = torch.cat([apply_rope_interleaved(q[:, :n_video], *rope), q[:, n_video:]], dim=1)
        k = torch.cat([apply_rope_interleaved(k[:, :n_video], *rope), k[:, n_video:]], dim=1)
        out = self.attention(q, k, v, kv_mask=kv_mask)
        return out.flatten(2).to(q.dtype)


class DualStreamBlock(nn.Module):
    """Separate weights for the video and text streams, joint attention over [video; text]."""

    def __init__(self, cfg: HunyuanVideoConfig, attention: AttentionOp) -> None:
        super().__init__()
        dim, inner = cfg.inner_dim, int(cfg.inner_dim * cfg.mlp_ratio)
        self.norm1, self.norm1_context = AdaNorm(dim, 6), AdaNorm(dim, 6)
        self.attn = JointAttention(dim, cfg.num_attention_heads, attention, added=True)
        self.ff = FeedForward(dim, inner, approximate="tanh")
        self.ff_context = FeedForward(dim, inner, approximate="tanh")

    def forward(self, x: torch.Tensor, c: torch.Tensor, temb: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                kv_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, N, C) video, c (B, T, C) text, temb (B, C), rope (N, D), kv_mask (B, N+T) or None."""
        shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = self.norm1(temb).chunk(6, dim=1)
        c_shift, c_scale, c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(temb).chunk(6, dim=1)
        q, k, v = self.attn.qkv(modulate(x, shift, scale))
        cq, ck, cv = self.attn.qkv(modulate(c, c_shift, c_scale), added=True)
        n = x.shape[1]
        out = self.attn.attend(torch.cat([q, cq], 1), torch.cat([k, ck], 1), torch.cat([v, cv], 1), n, rope, kv_mask)
        x = x + self.attn.to_out[0](out[:, :n]) * gate[:, None]
        c = c + self.attn.to_add_out(out[:, n:]) * c_gate[:, None]
        x = x + gate_mlp[:, None] * self.ff(modulate(x, shift_mlp, scale_mlp))
        c = c + c_gate_mlp[:, None] * self.ff_context(modulate(c, c_shift_mlp, c_scale_mlp))
        return x, c


class SingleStreamBlock(nn.Module):
    """One stream over the joint [video; text] sequence: attention and a GELU MLP in parallel, one output
    projection over [attention, MLP]."""

    def __init__(self, cfg: HunyuanVideoConfig, attention: AttentionOp) -> None:
        super().__init__()
        dim, inner = cfg.inner_dim, int(cfg.inner_dim * cfg.mlp_ratio)
        self.attn = JointAttention(dim, cfg.num_attention_heads, attention, added=False)
        self.norm = AdaNorm(dim, 3)
        self.proj_mlp = GeluLinear(dim, inner, approximate="tanh")
        self.proj_out = ConcatLinear((dim, inner), dim)

    def forward(self, h: torch.Tensor, n_video: int, temb: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                kv_mask: torch.Tensor | None) -> torch.Tensor:
        """h (B, N+T, C) joint stream (video first), temb (B, C), rope (N, D), kv_mask (B, N+T) or None."""
        shift, scale, gate = self.norm(temb).chunk(3, dim=1)
        n = modulate(h, shift, scale)
        attn_out = self.attn.attend(*self.attn.qkv(n), n_video, rope, kv_mask)
        return h + gate[:, None] * self.proj_out(attn_out, self.proj_mlp(n))


class OutputNorm(nn.Module):
    """The head's AdaLN: Linear(SiLU(temb)) -> (scale, shift), in that order."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.linear(F.silu(temb).to(x.dtype)).chunk(2, dim=1)
        return modulate(x, shift, scale)


class PatchEmbed(nn.Module):
    def __init__(self, cfg: HunyuanVideoConfig) -> None:
        super().__init__()
        self.proj = nn.Conv3d(cfg.in_channels, cfg.inner_dim, kernel_size=cfg.patch, stride=cfg.patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, F, H, W) -> (B, N, C), tokens in (f, h, w) order."""
        return self.proj(x).flatten(2).transpose(1, 2)


class HunyuanVideoTransformer(nn.Module):
    """HunyuanVideo DiT. forward(x (B, C_in, F, H, W), timestep (B,), text (B, T, text_dim), text_mask (B, T),
    pooled (B, pooled_dim), guidance (B,)) -> (B, C_out, F, H, W), as `finish(head(blocks(embed(...))))`."""

    REPEATED_BLOCKS = ("transformer_blocks", "single_transformer_blocks")

    # The blocks attend over [video; text] (video first, as the reference concatenates; RoPE on the video
    # tokens only). Both segments are sharded under sequence parallelism: the video tokens with their RoPE
    # rows, the refined text with its key mask. The text is sharded, not replicated, because it is a full
    # stream here (every block updates it: its own projections and MLP in the dual-stream blocks, the shared
    # ones in the single-stream blocks), so sharding divides that work by the degree; its keys still reach
    # every query through the attention wrapper, which drops shard padding and masked text keys before the
    # kernel. The token refiner ran whole on every rank inside `embed` (it attends over the text alone).
    # temb and the grid are replicated in `cond`; the video segment's head output is gathered.
    PLAN: ClassVar[SequencePlan] = SequencePlan(joint=("image", "text"), output="image")

    def __init__(self, cfg: HunyuanVideoConfig, attention: AttentionOp | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.attention = attention or AttentionOp()
        dim = cfg.inner_dim
        self.x_embedder = PatchEmbed(cfg)
        self.context_embedder = TokenRefiner(cfg, self.attention)
        self.time_text_embed = TimeTextEmbed(dim, cfg.pooled_projection_dim, cfg.guidance_embeds)
        self.transformer_blocks = nn.ModuleList(DualStreamBlock(cfg, self.attention) for _ in range(cfg.num_layers))
        self.single_transformer_blocks = nn.ModuleList(
            SingleStreamBlock(cfg, self.attention) for _ in range(cfg.num_single_layers)
        )
        self.norm_out = OutputNorm(dim)
        self.proj_out = nn.Linear(dim, cfg.out_dim * math.prod(cfg.patch))

    def patch_grid(self, x: torch.Tensor) -> tuple[int, int, int]:
        """(f, h, w) patch grid of latents (B, C_in, F, H, W); checks the shape."""
        patch = self.cfg.patch
        if x.ndim != 5 or x.shape[1] != self.cfg.in_channels or any(s % p for s, p in zip(x.shape[2:], patch)):
            raise ValueError(f"HunyuanVideo latents must be (B, {self.cfg.in_channels}, F, H, W) divisible by "
                             f"patch {patch}, got {tuple(x.shape)}")
        return tuple(s // p for s, p in zip(x.shape[2:], patch))  # type: ignore[return-value]

    def embed(self, x: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor | None,
              pooled: torch.Tensor, guidance: torch.Tensor | None = None) -> Tokens:
        """Inputs (as `forward`) -> segments "image" (B, N, C) video tokens with RoPE rows (cos, sin (N, D)),
        "text" (B, T, C) refined text with its key mask (B, T) bool when `text_mask` is given; `cond` holds
        temb (B, C) and the patch grid."""
        if timestep.ndim != 1:
            raise ValueError(f"timestep must be (B,), got shape {tuple(timestep.shape)}")
        if text_mask is not None and tuple(text_mask.shape) != tuple(text.shape[:2]):
            raise ValueError(f"text_mask must be (B, T) = {tuple(text.shape[:2])}, got {tuple(text_mask.shape)}")
        grid = self.patch_grid(x)
        if self.cfg.guidance_embeds and guidance is None:
            raise ValueError("this HunyuanVideo checkpoint embeds the guidance scale: pass guidance (B,)")
        temb = self.time_text_embed(timestep, pooled, guidance if self.cfg.guidance_embeds else None)
        video = self.x_embedder(x)
        refined = self.context_embedder(text, timestep, text_mask)
        rope = hunyuan_rope(grid, self.cfg.rope_axes_dim, self.cfg.rope_theta, x.device)
        masks = {} if text_mask is None else {"text": text_key_mask(text_mask)}
        return Tokens(segments={"image": video, "text": refined}, rope={"image": rope}, masks=masks,
                      cond=HunyuanCond(temb, grid))

    def blocks(self, tokens: Tokens) -> Tokens:
        """Dual-stream blocks on (video, text), then single-stream blocks on [video; text] (B, N+T, C), on
        whatever segment lengths `tokens` holds (a rank's shards under sequence parallelism)."""
        return self.run_blocks(tokens, 0, None)

    def run_blocks(self, tokens: Tokens, start: int, stop: int | None) -> Tokens:
        """Blocks [start, stop) in `REPEATED_BLOCKS` order (dual-stream, then single-stream; None: to the
        end); `blocks` is run_blocks(tokens, 0, None). Between calls the streams stay separate segments."""
        order = self.PLAN.joint
        temb, rope, kv_mask = tokens.cond.temb, tokens.rope["image"], tokens.joint_mask(order)
        n_dual = len(self.transformer_blocks)
        stop = n_dual + len(self.single_transformer_blocks) if stop is None else stop
        x, c = tokens.segments["image"], tokens.segments["text"]
        for block in self.transformer_blocks[start:min(stop, n_dual)]:
            x, c = block(x, c, temb, rope, kv_mask)
        if stop > n_dual:
            n = x.shape[1]
            h = torch.cat([x, c], dim=1)
            for block in self.single_transformer_blocks[max(start, n_dual) - n_dual:stop - n_dual]:
                h = block(h, n, temb, rope, kv_mask)
            x, c = h[:, :n], h[:, n:]
        return tokens.with_segments(image=x, text=c)

    def head(self, tokens: Tokens) -> torch.Tensor:
        """Final AdaLN and projection of the video tokens: (B, N, C) -> (B, N, C_out*pt*p*p)."""
        return self.proj_out(self.norm_out(tokens.segments["image"], tokens.cond.temb))

    def finish(self, out: torch.Tensor, tokens: Tokens) -> torch.Tensor:
        """(B, N, C_out*pt*p*p) -> (B, C_out, F, H, W)."""
        return unpatchify(out, tokens.cond.grid, self.cfg.patch)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor | None,
                pooled: torch.Tensor, guidance: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C_in, F, H, W) latents; timestep (B,) in [0, 1000]; text (B, T, text_dim) LLaMA states;
        text_mask (B, T) (1 = real token, right padding) or None when every token is real; pooled
        (B, pooled_dim) CLIP vector; guidance (B,) the embedded guidance scale x 1000 -> (B, C_out, F, H, W)."""
        tokens = self.embed(x, timestep, text, text_mask, pooled, guidance)
        return self.finish(self.head(self.blocks(tokens)), tokens)
