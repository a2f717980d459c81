"""Wan2.1 video transformer (T2V 1.3B / 14B, I2V 14B, FLF2V): patchified 3-D latents, 3-axis RoPE, AdaLN
modulation from one shared timestep projection, self-attention, text cross-attention and (I2V) an extra
cross-attention over CLIP image tokens.

Parameter names follow the diffusers `WanTransformer3DModel` checkpoints so they load with strict=True.
Shapes are written at the boundaries: B batch, C_in/C_out latent channels, F/H/W latent frames/height/width,
f/h/w the patch grid, N = f*h*w video tokens, L text tokens, I image tokens, C model width, H heads,
D head dim.

dtype policy (mirrors diffusers so fp32 matches to rounding and bf16 behaves the same): the AdaLN
modulation, the pre-attention / pre-FFN layer norms and the gated residual updates run in float32 and are
cast back to the stream dtype; RoPE tables are built in float64 and applied in float32; everything else
runs in the weights' dtype.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from diffserve.layers.attention import AttentionOp
from diffserve.layers.embeddings import FeedForward, GeluProj, MLPEmbedder, timestep_features
from diffserve.layers.linear import Projections
from diffserve.layers.rope import apply_rope_interleaved, rope_1d
from diffserve.models.dits.config import config_from_dict, config_from_json
from diffserve.parallel.plan import SequencePlan, Tokens

QK_NORMS = ("rms_norm_across_heads", None)


@dataclass(frozen=True)
class WanConfig:
    """The diffusers `WanTransformer3DModel` config (transformer/config.json)."""

    patch_size: tuple[int, int, int] = (1, 2, 2)
    num_attention_heads: int = 40
    attention_head_dim: int = 128
    in_channels: int = 16
    out_channels: int | None = 16
    text_dim: int = 4096
    freq_dim: int = 256
    ffn_dim: int = 13824
    num_layers: int = 40
    cross_attn_norm: bool = True
    # diffusers builds the same across-heads RMSNorm on q and k whatever this says; kept for the config.
    qk_norm: str | None = "rms_norm_across_heads"
    eps: float = 1e-6
    image_dim: int | None = None  # CLIP hidden width of the image tokens (I2V); None for T2V
    added_kv_proj_dim: int | None = None  # input width of the image K/V projections (I2V)
    rope_max_seq_len: int = 1024  # largest patch-grid extent per axis the RoPE table covers
    pos_embed_seq_len: int | None = None  # FLF2V: learned position embedding over 2 x 257 image tokens

    def __post_init__(self) -> None:
        if self.qk_norm not in QK_NORMS:
            raise ValueError(f"WanConfig: qk_norm must be one of {QK_NORMS}, got {self.qk_norm!r}")
        if len(self.patch_size) != 3:
            raise ValueError(f"WanConfig: patch_size must have 3 entries (t, h, w), got {self.patch_size}")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def out_dim(self) -> int:
        return self.out_channels or self.in_channels

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> WanConfig:
        return config_from_dict(cls, raw, tuple_fields=("patch_size",))

    @classmethod
    def from_json(cls, path: str | Path) -> WanConfig:
        return config_from_json(cls, path, tuple_fields=("patch_size",))


@dataclass
class WanCond:
    """What every rank holds whole, as produced by `WanTransformer.embed` (`Tokens.cond`)."""

    temb: torch.Tensor  # (B, C) timestep embedding, for the output head
    t6: torch.Tensor  # (B, 6, C) block modulation offsets
    context: torch.Tensor  # (B, L, C) projected text (image tokens prepended when no separate image K/V)
    image_context: torch.Tensor | None  # (B, I, C) projected image tokens for the separate image K/V, or None
    grid: tuple[int, int, int]  # (f, h, w) patch grid


# ----------------------------------------------------------------------------------------------------------
# Pure functions


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """How the head dim is shared between the (frame, height, width) RoPE axes: h = w = 2*(D//6), t = rest."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def wan_rope(grid: tuple[int, int, int], head_dim: int, device: torch.device,
             theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """3-axis RoPE for a (f, h, w) patch grid -> cos, sin (N, D) float32, tokens in (f, h, w) order.

    Each axis owns a contiguous slice of the head dim with its own frequency ladder; pairs are interleaved
    (x[2i], x[2i+1]), as in `apply_rope_interleaved`. Tables are built in float64 and rounded to float32.
    """
    dims = rope_axis_dims(head_dim)
    per_axis = [rope_1d(d, torch.arange(n, device=device), theta) for n, d in zip(grid, dims)]
    f, h, w = grid
    views = ((f, 1, 1), (1, h, 1), (1, 1, w))

    def grid_table(i: int) -> torch.Tensor:
        return torch.cat(
            [t[i].view(*v, -1).expand(f, h, w, -1) for t, v in zip(per_axis, views)], dim=-1
        ).reshape(f * h * w, head_dim)

    return grid_table(0), grid_table(1)


def fp32_layer_norm(x: torch.Tensor, eps: float, weight: torch.Tensor | None = None,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """LayerNorm over the last dim computed in float32; returns float32."""
    return F.layer_norm(
        x.float(), (x.shape[-1],),
        weight.float() if weight is not None else None,
        bias.float() if bias is not None else None,
        eps,
    )


def modulated_norm(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """AdaLN: LayerNorm(x) * (1 + scale) + shift in float32, back to x's dtype.

    x (B, N, C); shift/scale (B, 1, C) float32.
    """
    return (fp32_layer_norm(x, eps) * (1 + scale) + shift).to(x.dtype)


def gated_residual(x: torch.Tensor, update: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """x + update * gate accumulated in float32, back to x's dtype. x, update (B, N, C); gate (B, 1, C) float32."""
    return (x + update * gate).to(x.dtype)  # bf16 operands promote to gate's float32: no cast copies


def unpatchify(x: torch.Tensor, grid: tuple[int, int, int], patch: tuple[int, int, int]) -> torch.Tensor:
    """(B, N, pt*ph*pw*C) with per-token channels laid out (pt, ph, pw, C) -> (B, C, f*pt, h*ph, w*pw)."""
    (f, h, w), (pt, ph, pw) = grid, patch
    x = x.reshape(x.shape[0], f, h, w, pt, ph, pw, -1)
    x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # (B, C, f, pt, h, ph, w, pw)
    return x.reshape(x.shape[0], x.shape[1], f * pt, h * ph, w * pw)


# ----------------------------------------------------------------------------------------------------------
# Modules (named like the checkpoint)


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm that always computes in float32 and returns its input's dtype (diffusers `FP32LayerNorm`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp32_layer_norm(x, self.eps, self.weight, self.bias).to(x.dtype)


class GeluMLP(nn.Module):
    """`net.0.proj` -> GELU -> `net.2`, with its own output width (diffusers `FeedForward(dim_out=...)`)."""

    def __init__(self, dim_in: int, hidden: int, dim_out: int, approximate: str = "none") -> None:
        super().__init__()
        self.net = nn.ModuleList(
            [GeluProj(dim_in, hidden, approximate), nn.Identity(), nn.Linear(hidden, dim_out)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x))


class TextProjection(nn.Module):
    """linear_1 -> tanh-GELU -> linear_2: T5 features (B, L, text_dim) -> (B, L, C)."""

    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.gelu(self.linear_1(x), approximate="tanh"))


class ImageEmbedding(nn.Module):
    """CLIP penultimate-layer tokens (B, I, image_dim) -> (B, I, C): LayerNorm, GELU MLP, LayerNorm.

    FLF2V (`pos_embed_seq_len`): the first- and last-frame token sets arrive as consecutive batch rows
    (2B, I, image_dim); they are joined to (B, 2I, image_dim) and get a learned position embedding.
    """

    def __init__(self, in_dim: int, dim: int, pos_embed_seq_len: int | None) -> None:
        super().__init__()
        self.norm1 = FP32LayerNorm(in_dim)
        self.ff = GeluMLP(in_dim, in_dim, dim)
        self.norm2 = FP32LayerNorm(dim)
        if pos_embed_seq_len is not None:
            self.pos_embed = nn.Parameter(torch.zeros(1, pos_embed_seq_len, in_dim))
        else:
            self.pos_embed = None

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        if self.pos_embed is not None:
            img = img.reshape(-1, 2 * img.shape[1], img.shape[2]) + self.pos_embed
        return self.norm2(self.ff(self.norm1(img)))


class ConditionEmbedder(nn.Module):
    """Timestep, text and (I2V) image conditioning.

    time_embedder: sinusoidal features (B, freq_dim) -> temb (B, C); time_proj: SiLU(temb) -> (B, 6C), the
    per-block AdaLN offsets that every block adds to its own `scale_shift_table`.
    """

    def __init__(self, cfg: WanConfig) -> None:
        super().__init__()
        dim = cfg.inner_dim
        self.freq_dim = cfg.freq_dim
        self.time_embedder = MLPEmbedder(cfg.freq_dim, dim)
        self.time_proj = nn.Linear(dim, 6 * dim)
        self.text_embedder = TextProjection(cfg.text_dim, dim)
        if cfg.image_dim is not None:
            self.image_embedder = ImageEmbedding(cfg.image_dim, dim, cfg.pos_embed_seq_len)
        else:
            self.image_embedder = None

    def time(self, timestep: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """timestep (B,) -> temb (B, C) in `dtype` and the block modulation offsets (B, 6, C).

        The features go into time_embedder in its weights' dtype (diffusers keeps it float32 when loading
        bf16); temb is then cast to the conditioning dtype before time_proj.
        """
        feats = timestep_features(timestep, self.freq_dim, flip_sin_to_cos=True, downscale_freq_shift=0.0)
        weight = self.time_embedder.linear_1.weight
        if weight.is_floating_point():
            feats = feats.to(weight.dtype)
        temb = self.time_embedder(feats).to(dtype)
        return temb, self.time_proj(F.silu(temb)).unflatten(1, (6, -1))


class WanAttention(Projections):
    """Q/K/V/out projections with RMSNorm on q and k across all heads (one weight of width H*D).

    `cross`: a cross-attention (k/v read the text, q the video); `image_kv_dim` adds the I2V projections of
    the image tokens (add_k_proj, add_v_proj, norm_added_k).
    """

    def __init__(self, dim: int, heads: int, eps: float, attn: AttentionOp, cross: bool,
                 image_kv_dim: int | None = None) -> None:
        super().__init__([("to_k", "to_v")] if cross else [("to_q", "to_k", "to_v")])
        self.heads, self.attn = heads, attn
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim) for _ in range(3))
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Identity()])
        self.norm_q = nn.RMSNorm(dim, eps=eps)
        self.norm_k = nn.RMSNorm(dim, eps=eps)
        if image_kv_dim is not None:
            self.add_k_proj = nn.Linear(image_kv_dim, dim)
            self.add_v_proj = nn.Linear(image_kv_dim, dim)
            self.norm_added_k = nn.RMSNorm(dim, eps=eps)
        else:
            self.add_k_proj = self.add_v_proj = self.norm_added_k = None

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, -1))  # (B, L, C) -> (B, L, H, D)

    def self_attention(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x (B, N, C) -> (B, N, C); RoPE on q and k. Under sequence parallelism N is this rank's shard and
        the AttentionOp's parallel wrapper exchanges tokens."""
        q, k, v = self.project(x, "to_q", "to_k", "to_v")
        q = apply_rope_interleaved(self._heads(self.norm_q(q)), *rope)
        k = apply_rope_interleaved(self._heads(self.norm_k(k)), *rope)
        v = self._heads(v)
        out = self.attn(q, k, v).flatten(2).to(q.dtype)
        return self.to_out[0](out)

    def cross_attention(self, x: torch.Tensor, ctx: torch.Tensor, img: torch.Tensor | None) -> torch.Tensor:
        """x (B, N, C) queries; ctx (B, L, C) text; img (B, I, C) image tokens or None -> (B, N, C).

        Text and image attention are separate softmaxes whose outputs are summed. K/V are whole on every
        rank, so this is always the local kernel (`attn.local`), never the sequence-parallel wrapper.
        """
        q = self._heads(self.norm_q(self.to_q(x)))
        k, v = self.project(ctx, "to_k", "to_v")
        k, v = self._heads(self.norm_k(k)), self._heads(v)
        out = self.attn.local(q, k, v).flatten(2).to(q.dtype)
        if img is not None and self.add_k_proj is not None:
            k_img = self._heads(self.norm_added_k(self.add_k_proj(img)))
            v_img = self._heads(self.add_v_proj(img))
            out = out + self.attn.local(q, k_img, v_img).flatten(2).to(q.dtype)
        return self.to_out[0](out)


class WanBlock(nn.Module):
    """Modulated self-attention, text(+image) cross-attention, modulated GELU FFN.

    `scale_shift_table` (1, 6, C) plus the shared timestep projection (B, 6, C) gives, in float32, the
    shift/scale/gate of the self-attention and the shift/scale/gate of the FFN.
    """

    def __init__(self, cfg: WanConfig, attn: AttentionOp) -> None:
        super().__init__()
        dim, self.eps = cfg.inner_dim, cfg.eps
        self.attn1 = WanAttention(dim, cfg.num_attention_heads, cfg.eps, attn, cross=False)
        self.attn2 = WanAttention(dim, cfg.num_attention_heads, cfg.eps, attn, cross=True,
                                  image_kv_dim=cfg.added_kv_proj_dim)
        self.norm2 = FP32LayerNorm(dim, cfg.eps) if cfg.cross_attn_norm else None
        self.ffn = FeedForward(dim, cfg.ffn_dim, approximate="tanh")
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, img: torch.Tensor | None, t6: torch.Tensor,
                rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x (B, N, C); ctx (B, L, C); img (B, I, C) or None; t6 (B, 6, C); rope cos/sin (N, D)."""
        mod = (self.scale_shift_table + t6.float()).chunk(6, dim=1)  # 6 x (B, 1, C) float32
        shift, scale, gate, ff_shift, ff_scale, ff_gate = mod
        h = modulated_norm(x, shift, scale, self.eps)
        x = gated_residual(x, self.attn1.self_attention(h, rope), gate)
        h = self.norm2(x.float()).to(x.dtype) if self.norm2 is not None else x
        x = x + self.attn2.cross_attention(h, ctx, img)
        h = modulated_norm(x, ff_shift, ff_scale, self.eps)
        return gated_residual(x, self.ffn(h), ff_gate)


class WanBlocks(nn.ModuleList):
    """The repeated blocks (checkpoint keys `blocks.<i>.*`); calling it runs them all, so `model.blocks(tokens)`
    is the `blocks` step of the DiT shape in `diffserve.parallel.plan`."""

    def forward(self, tokens: Tokens, start: int = 0, stop: int | None = None) -> Tokens:
        """Blocks [start, stop) (None: to the end); all of them by default."""
        c: WanCond = tokens.cond
        x, rope = tokens.segments["video"], tokens.rope["video"]
        for block in self[start:stop]:
            x = block(x, c.context, c.image_context, c.t6, rope)
        return tokens.with_segments(video=x)


class WanTransformer(nn.Module):
    """Wan2.1 DiT. forward(x (B, C_in, F, H, W), timestep (B,), context (B, L, text_dim),
    image_context (B, I, image_dim) | None) -> (B, C_out, F, H, W)."""

    # Self-attention runs over the video tokens: sharded under sequence parallelism with their RoPE rows.
    # Cross-attention keys/values (text, image tokens), temb and t6 are whole on every rank (`WanCond`), so
    # cross-attention needs no communication. Tokens are gathered after the head's projection (C_out*pt*ph*pw
    # channels, much narrower than C), before `finish` unpatchifies.
    PLAN: ClassVar[SequencePlan] = SequencePlan(joint=("video",), output="video")

    REPEATED_BLOCKS = ("blocks",)

    # Modules diffusers keeps in float32 when it loads the weights in a lower precision; a parameter
    # matches when one of these is a component of its dotted name (see `keeps_fp32`).
    FP32_MODULES = ("time_embedder", "scale_shift_table", "norm1", "norm2", "norm3")

    # Tensors some published checkpoints carry that no Wan2.1 forward uses: the Wan2.1 I2V diffusers
    # checkpoint is reported to ship `blocks.*.attn2.norm_added_q.weight` (unverified here; diffusers lists
    # `norm_added_q` in `_keys_to_ignore_on_load_unexpected` and drops them on load). FastWan checkpoints
    # carry `blocks.*.attn1.to_gate_compress.*`, the gate of Video Sparse Attention's coarse branch; with
    # dense attention (what diffserve and diffusers run) that branch does not exist and the gate is unused.
    UNUSED_CHECKPOINT_KEYS = re.compile(r"(^|\.)(norm_added_q|to_gate_compress)\.")

    def __init__(self, cfg: WanConfig, attention: AttentionOp | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.attention = attention or AttentionOp()
        dim = cfg.inner_dim
        patch = cfg.patch_size
        self.patch_embedding = nn.Conv3d(cfg.in_channels, dim, kernel_size=patch, stride=patch)
        self.condition_embedder = ConditionEmbedder(cfg)
        self.blocks = WanBlocks(WanBlock(cfg, self.attention) for _ in range(cfg.num_layers))
        self.proj_out = nn.Linear(dim, cfg.out_dim * math.prod(cfg.patch_size))
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    @classmethod
    def keeps_fp32(cls, name: str) -> bool:
        """Whether diffusers would keep parameter `name` in float32 under a bf16/fp16 load."""
        return any(part in cls.FP32_MODULES for part in name.split("."))

    @classmethod
    def drop_unused_keys(cls, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The checkpoint without the tensors listed in UNUSED_CHECKPOINT_KEYS, ready for a strict load."""
        return {k: v for k, v in state_dict.items() if not cls.UNUSED_CHECKPOINT_KEYS.search(k)}

    def patch_grid(self, x: torch.Tensor) -> tuple[int, int, int]:
        """(f, h, w) patch grid of latents (B, C_in, F, H, W); checks divisibility and the RoPE range."""
        sizes, patch = x.shape[2:], self.cfg.patch_size
        if x.ndim != 5 or any(s % p for s, p in zip(sizes, patch)):
            raise ValueError(
                f"Wan latents must be (B, C, F, H, W) divisible by patch {patch}, got {tuple(x.shape)}"
            )
        grid = tuple(s // p for s, p in zip(sizes, patch))
        if max(grid) > self.cfg.rope_max_seq_len:
            raise ValueError(f"patch grid {grid} exceeds rope_max_seq_len={self.cfg.rope_max_seq_len}")
        return grid  # type: ignore[return-value]

    def embed(self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
              image_context: torch.Tensor | None = None) -> Tokens:
        """Patch embedding, RoPE tables and the conditioning: segment "video" (B, N, C) with its RoPE rows
        (cos, sin (N, D)), and `WanCond`."""
        if timestep.ndim != 1:
            raise ValueError(f"timestep must be (B,), got shape {tuple(timestep.shape)}")
        grid = self.patch_grid(x)
        rope = wan_rope(grid, self.cfg.attention_head_dim, x.device)
        tokens = self.patch_embedding(x).flatten(2).transpose(1, 2).contiguous()  # (B, N, C)
        emb = self.condition_embedder
        temb, t6 = emb.time(timestep, context.dtype)
        ctx = emb.text_embedder(context)
        img = None
        if image_context is not None:
            if emb.image_embedder is None:
                raise ValueError("image_context given, but this Wan config has no image_dim (not I2V)")
            img = emb.image_embedder(image_context)
            if self.cfg.added_kv_proj_dim is None:
                # no separate image K/V: the image tokens join the text as one cross-attention sequence
                ctx, img = torch.cat([img, ctx], dim=1), None
        return Tokens(segments={"video": tokens}, rope={"video": rope}, cond=WanCond(temb, t6, ctx, img, grid))

    def run_blocks(self, tokens: Tokens, start: int, stop: int | None) -> Tokens:
        """Blocks [start, stop) (None: to the end); `blocks(tokens)` runs them all."""
        return self.blocks(tokens, start, stop)

    def head(self, tokens: Tokens) -> torch.Tensor:
        """Final AdaLN and projection: (B, N, C) -> (B, N, pt*ph*pw*C_out)."""
        x, temb = tokens.segments["video"], tokens.cond.temb
        shift, scale = (self.scale_shift_table + temb[:, None]).chunk(2, dim=1)  # (B, 1, C) each
        return self.proj_out(modulated_norm(x, shift, scale, self.cfg.eps))

    def finish(self, out: torch.Tensor, tokens: Tokens) -> torch.Tensor:
        """(B, N, pt*ph*pw*C_out) -> (B, C_out, F, H, W)."""
        return unpatchify(out, tokens.cond.grid, self.cfg.patch_size)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
                image_context: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C_in, F, H, W) latents (I2V: noise, mask and image latents concatenated on C);
        timestep (B,) in [0, 1000]; context (B, L, text_dim) T5 features; image_context (B, I, image_dim)
        CLIP tokens (I = 257 for Wan2.1 I2V) or None -> (B, C_out, F, H, W)."""
        tokens = self.embed(x, timestep, context, image_context)
        return self.finish(self.head(self.blocks(tokens)), tokens)
