"""FLUX.1 transformer (dev and schnell): 19 double-stream blocks, 38 single-stream blocks, 3-axis RoPE.

Parameter names follow the diffusers `FluxTransformer2DModel` checkpoints so they load with
strict=True. Shapes are written at the boundaries: B batch, T text tokens, N image tokens, C channels.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from diffserve.layers.attention import AttentionOp
from diffserve.layers.embeddings import FeedForward, MLPEmbedder, timestep_features
from diffserve.layers.linear import ConcatLinear, GeluLinear, Projections
from diffserve.layers.rope import apply_rope_interleaved, rope_nd
from diffserve.models.dits.config import config_from_dict, config_from_json
from diffserve.parallel.plan import SequencePlan, Tokens


@dataclass(frozen=True)
class FluxConfig:
    patch_size: int = 1
    in_channels: int = 64
    out_channels: int | None = None
    num_layers: int = 19
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = False
    axes_dims_rope: tuple[int, int, int] = (16, 56, 56)

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def from_dict(cls, raw: dict) -> FluxConfig:
        return config_from_dict(cls, raw, tuple_fields=("axes_dims_rope",))

    @classmethod
    def from_json(cls, path: str | Path) -> FluxConfig:
        return config_from_json(cls, path, tuple_fields=("axes_dims_rope",))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (B, L, C); shift/scale (B, C)."""
    return x * (1 + scale[:, None]) + shift[:, None]


def layer_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), eps=eps)


class AdaNorm(nn.Module):
    """SiLU -> Linear producing `n` modulation vectors (diffusers AdaLayerNormZero*/Continuous layout),
    returned concatenated (B, n*C); the blocks chunk them."""

    def __init__(self, dim: int, n: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, n * dim)

    def forward(self, temb: torch.Tensor) -> torch.Tensor:
        return self.linear(F.silu(temb))


@dataclass
class FluxModulation:
    """Every AdaNorm's output for some rows of conditioning: per double block (image, text) (R, 6C), per
    single block (R, 3C), and the output norm's (R, 2C). The blocks read these instead of temb, so a
    sampler can compute them for all its steps in one pass (`FluxTransformer.step_modulations`): the
    ~3.2 B modulation weights are then read once per generation, not once per step."""

    double: list[tuple[torch.Tensor, torch.Tensor]]
    single: list[torch.Tensor]
    out: torch.Tensor

    def rows(self, start: int, stop: int) -> FluxModulation:
        return FluxModulation([(a[start:stop], b[start:stop]) for a, b in self.double],
                              [m[start:stop] for m in self.single], self.out[start:stop])


class QKNorm(nn.Module):
    """RMSNorm over the head dimension, with a learned scale."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class FluxAttention(Projections):
    """Q/K/V projections with QK-RMSNorm; `added` adds the text-stream projections (double blocks)."""

    def __init__(self, dim: int, heads: int, head_dim: int, attn: AttentionOp, added: bool, out: bool) -> None:
        groups = [("to_q", "to_k", "to_v")] + [("add_q_proj", "add_k_proj", "add_v_proj")] * added
        super().__init__(groups)
        self.heads, self.head_dim, self.attn = heads, head_dim, attn
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, heads * head_dim) for _ in range(3))
        self.norm_q, self.norm_k = QKNorm(head_dim), QKNorm(head_dim)
        if out:
            self.to_out = nn.ModuleList([nn.Linear(heads * head_dim, dim), nn.Identity()])
        if added:
            self.add_q_proj, self.add_k_proj, self.add_v_proj = (
                nn.Linear(dim, heads * head_dim) for _ in range(3)
            )
            self.norm_added_q, self.norm_added_k = QKNorm(head_dim), QKNorm(head_dim)
            self.to_add_out = nn.Linear(heads * head_dim, dim)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(-1, (self.heads, self.head_dim))

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, L, C) -> q, k, v (B, L, H, D), q and k normalised."""
        q, k, v = self.project(x, "to_q", "to_k", "to_v")
        return self.norm_q(self._heads(q)), self.norm_k(self._heads(k)), self._heads(v)

    def added_qkv(self, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = self.project(c, "add_q_proj", "add_k_proj", "add_v_proj")
        return self.norm_added_q(self._heads(q)), self.norm_added_k(self._heads(k)), self._heads(v)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """(B, L, H, D) -> (B, L, H*D), RoPE applied to q and k."""
        q = apply_rope_interleaved(q, *rope)
        k = apply_rope_interleaved(k, *rope)
        return self.attn(q, k, v).flatten(2).to(q.dtype)


class FluxDoubleBlock(nn.Module):
    """Separate weights for the image and text streams, joint attention over [text, image]."""

    def __init__(self, cfg: FluxConfig, attn: AttentionOp) -> None:
        super().__init__()
        dim = cfg.inner_dim
        self.norm1, self.norm1_context = AdaNorm(dim, 6), AdaNorm(dim, 6)
        self.attn = FluxAttention(dim, cfg.num_attention_heads, cfg.attention_head_dim, attn, added=True, out=True)
        self.ff = FeedForward(dim, 4 * dim)
        self.ff_context = FeedForward(dim, 4 * dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor, mod: torch.Tensor, c_mod: torch.Tensor,
                rope: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, N, C) image stream, c (B, T, C) text stream; mod, c_mod (B, 6C): norm1's and
        norm1_context's outputs."""
        shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=1)
        c_shift, c_scale, c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp = c_mod.chunk(6, dim=1)
        q, k, v = self.attn.qkv(modulate(layer_norm(x), shift, scale))
        cq, ck, cv = self.attn.added_qkv(modulate(layer_norm(c), c_shift, c_scale))
        out = self.attn.attend(torch.cat([cq, q], 1), torch.cat([ck, k], 1), torch.cat([cv, v], 1), rope)
        t = c.shape[1]
        c_out, x_out = out[:, :t], out[:, t:]
        x = x + gate[:, None] * self.attn.to_out[0](x_out.contiguous())
        x = x + gate_mlp[:, None] * self.ff(modulate(layer_norm(x), shift_mlp, scale_mlp))
        c = c + c_gate[:, None] * self.attn.to_add_out(c_out.contiguous())
        c = c + c_gate_mlp[:, None] * self.ff_context(modulate(layer_norm(c), c_shift_mlp, c_scale_mlp))
        if c.dtype == torch.float16:
            c = c.clip(-65504, 65504)
        return x, c


class FluxSingleBlock(nn.Module):
    """One stream over the joint [text, image] sequence: attention and MLP in parallel."""

    def __init__(self, cfg: FluxConfig, attn: AttentionOp) -> None:
        super().__init__()
        dim = cfg.inner_dim
        self.norm = AdaNorm(dim, 3)
        self.proj_mlp = GeluLinear(dim, 4 * dim, approximate="tanh")
        self.proj_out = ConcatLinear((dim, 4 * dim), dim)  # over [attention, MLP]
        self.attn = FluxAttention(dim, cfg.num_attention_heads, cfg.attention_head_dim, attn, added=False, out=False)

    def forward(self, h: torch.Tensor, mod: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """h (B, T+N, C); mod (B, 3C): the block's norm output."""
        shift, scale, gate = mod.chunk(3, dim=1)
        n = modulate(layer_norm(h), shift, scale)
        qkv = self.attn.qkv(n)
        mlp = self.proj_mlp(n)
        h = h + gate[:, None] * self.proj_out(self.attn.attend(*qkv, rope), mlp)
        if h.dtype == torch.float16:
            h = h.clip(-65504, 65504)
        return h


class TimeTextEmbed(nn.Module):
    """Timestep (+ guidance) sinusoidal features and the pooled text vector -> (B, C) conditioning."""

    def __init__(self, dim: int, pooled_dim: int, guidance: bool) -> None:
        super().__init__()
        self.timestep_embedder = MLPEmbedder(256, dim)
        if guidance:
            self.guidance_embedder = MLPEmbedder(256, dim)
        self.text_embedder = MLPEmbedder(pooled_dim, dim)

    def forward(self, t: torch.Tensor, pooled: torch.Tensor, guidance: torch.Tensor | None) -> torch.Tensor:
        emb = self.timestep_embedder(timestep_features(t).to(pooled.dtype))
        if guidance is not None:
            emb = emb + self.guidance_embedder(timestep_features(guidance).to(pooled.dtype))
        return emb + self.text_embedder(pooled)


class FluxTransformer(nn.Module):
    """FLUX.1 DiT. forward(x (B, N, in_ch), context (B, T, joint_dim), ...) -> (B, N, out_ch), as
    `finish(head(blocks(embed(...))))` (the shape `diffserve.parallel.plan` describes)."""

    REPEATED_BLOCKS = ("transformer_blocks", "single_transformer_blocks")
    # Block submodules called outside the blocks' forward (`modulation` runs every block's AdaNorm at once):
    # block-streaming offload (diffserve.engine.offload) keeps them on the device.
    STREAM_RESIDENT = ("norm1", "norm1_context", "norm")

    # Joint attention runs over [text; image]: both streams are sharded under sequence parallelism (each
    # with its RoPE rows); temb and the modulations are replicated; the image stream's head is gathered.
    PLAN: ClassVar[SequencePlan] = SequencePlan(joint=("text", "image"), output="image")

    def __init__(self, cfg: FluxConfig, attention: AttentionOp | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.attention = attention or AttentionOp()
        dim = cfg.inner_dim
        self.time_text_embed = TimeTextEmbed(dim, cfg.pooled_projection_dim, cfg.guidance_embeds)
        self.context_embedder = nn.Linear(cfg.joint_attention_dim, dim)
        self.x_embedder = nn.Linear(cfg.in_channels, dim)
        self.transformer_blocks = nn.ModuleList(FluxDoubleBlock(cfg, self.attention) for _ in range(cfg.num_layers))
        self.single_transformer_blocks = nn.ModuleList(
            FluxSingleBlock(cfg, self.attention) for _ in range(cfg.num_single_layers)
        )
        self.norm_out = AdaNorm(dim, 2)
        out_ch = cfg.out_channels or cfg.in_channels
        self.proj_out = nn.Linear(dim, cfg.patch_size * cfg.patch_size * out_ch)

    def embed(self, x: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor, timestep: torch.Tensor,
              img_ids: torch.Tensor, txt_ids: torch.Tensor, guidance: torch.Tensor | None = None,
              modulation: FluxModulation | None = None) -> Tokens:
        """Inputs (as `forward`) -> segments "text" (B, T, C) and "image" (B, N, C), each with its RoPE rows
        (cos, sin (L, D)); `cond` is this step's `FluxModulation` (computed from the timestep unless given)."""
        image = self.x_embedder(x)
        if modulation is None:
            t = timestep.to(image.dtype) * 1000
            g = guidance.to(image.dtype) * 1000 if (guidance is not None and self.cfg.guidance_embeds) else None
            modulation = self.modulation(self.time_text_embed(t, pooled, g))
        text = self.context_embedder(context)
        cos, sin = rope_nd(torch.cat([txt_ids, img_ids], dim=0), self.cfg.axes_dims_rope)
        n_text = txt_ids.shape[0]
        rope = {"text": (cos[:n_text], sin[:n_text]), "image": (cos[n_text:], sin[n_text:])}
        return Tokens(segments={"text": text, "image": image}, rope=rope, cond=modulation)

    def modulation(self, temb: torch.Tensor) -> FluxModulation:
        """Every AdaNorm's output for conditioning rows temb (R, C)."""
        return FluxModulation([(b.norm1(temb), b.norm1_context(temb)) for b in self.transformer_blocks],
                              [b.norm(temb) for b in self.single_transformer_blocks], self.norm_out(temb))

    def step_modulations(self, timesteps: torch.Tensor, pooled: torch.Tensor,
                         guidance: torch.Tensor | None) -> FluxModulation:
        """The modulations of a whole sampling run at once: timesteps (S,) as `forward` takes them, pooled
        (B, P), guidance (B,) or None -> rows ordered step-major (step i = rows i*B to (i+1)*B). The same
        values as `forward` computes per step (one GEMM of S*B rows per AdaNorm instead of S of B rows)."""
        steps, batch = timesteps.shape[0], pooled.shape[0]
        t = timesteps.to(pooled.dtype).repeat_interleave(batch) * 1000
        g = None
        if guidance is not None and self.cfg.guidance_embeds:
            g = guidance.to(pooled.dtype).repeat(steps) * 1000
        return self.modulation(self.time_text_embed(t, pooled.repeat(steps, 1), g))

    def blocks(self, tokens: Tokens) -> Tokens:
        """Double-stream blocks on (image, text), then single-stream blocks on [text; image] (B, T+N, C)."""
        return self.run_blocks(tokens, 0, None)

    def run_blocks(self, tokens: Tokens, start: int, stop: int | None) -> Tokens:
        """Blocks [start, stop) in `REPEATED_BLOCKS` order (double blocks, then single blocks; None: to the
        end); `blocks` is run_blocks(tokens, 0, None). Between calls the streams stay separate segments."""
        mod: FluxModulation = tokens.cond
        rope = tokens.joint_rope(self.PLAN.joint)
        n_double = len(self.transformer_blocks)
        stop = n_double + len(self.single_transformer_blocks) if stop is None else stop
        x, c = tokens.segments["image"], tokens.segments["text"]
        for k in range(start, min(stop, n_double)):
            x, c = self.transformer_blocks[k](x, c, *mod.double[k], rope)
        if stop > n_double:
            h = torch.cat([c, x], dim=1)
            for k in range(max(start, n_double) - n_double, stop - n_double):
                h = self.single_transformer_blocks[k](h, mod.single[k], rope)
            c, x = h[:, :c.shape[1]], h[:, c.shape[1]:]
        return tokens.with_segments(text=c, image=x)

    def head(self, tokens: Tokens) -> torch.Tensor:
        """Final AdaLN and projection of the image tokens: (B, N, C) -> (B, N, out_ch)."""
        x, mod = tokens.segments["image"], tokens.cond
        scale, shift = mod.out.to(x.dtype).chunk(2, dim=1)
        return self.proj_out(modulate(layer_norm(x), shift, scale))

    def finish(self, out: torch.Tensor, tokens: Tokens) -> torch.Tensor:
        """The packed latents are the output as they are."""
        return out

    def forward(self, x: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor, timestep: torch.Tensor,
                img_ids: torch.Tensor, txt_ids: torch.Tensor, guidance: torch.Tensor | None = None,
                modulation: FluxModulation | None = None) -> torch.Tensor:
        """x (B, N, in_ch) packed latents; context (B, T, joint_dim); pooled (B, pooled_dim);
        timestep (B,) in [0, 1]; img_ids (N, 3); txt_ids (T, 3); guidance (B,) or None -> (B, N, out_ch).
        `modulation`: this step's rows of `step_modulations` (else computed here from the timestep)."""
        tokens = self.embed(x, context, pooled, timestep, img_ids, txt_ids, guidance, modulation)
        return self.finish(self.head(self.blocks(tokens)), tokens)
