"""Sequence-parallel DiTs: explicit per-family transforms that shard after `embed`, run `blocks` on the
shard (attention through the model's `AttentionOp`, whose parallel wrapper is a `USPAttention`), and
gather where the model's `SEQUENCE_PARALLEL` declaration says.

Padding scheme: a sequence of length L is cut into P shards of s = ceil(L / P) positions; rank p holds
positions [p*s, (p+1)*s) and the positions >= L are zero padding (all at the end of the last shards).
The `SequenceLayout` handed to the attention wrapper marks them, and the wrapper removes padded *keys*
before any kernel runs, so padding cannot change a real token's result; padded query rows are dropped
when the shards are gathered (`gather_sequence` keeps the first L positions).

A transform object stands in for the transformer (`components.transformer = transform`): calling it
runs the parallel forward; every other attribute (`cfg`, weights, ...) is the wrapped model's, so the
pipeline stages do not change.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from diffserve.layers.parallel import CommGroup, SequenceLayout, USPAttention, check_heads
from diffserve.models.dits.flux import FluxModulation, FluxTransformer
from diffserve.models.dits.wan import WanTransformer, unpatchify

# ----------------------------------------------------------------------------------------------------------
# Pure helpers


def shard_len(length: int, parts: int) -> int:
    """Positions per shard: ceil(length / parts)."""
    return math.ceil(length / parts)


def valid_counts(length: int, parts: int) -> list[int]:
    """Real (non-padding) positions in each of the `parts` shards."""
    s = shard_len(length, parts)
    return [max(0, min(s, length - p * s)) for p in range(parts)]


def take_shard(x: torch.Tensor, dim: int, index: int, parts: int) -> torch.Tensor:
    """Shard `index` of `x` along `dim`, zero-padded to shard_len(x.shape[dim], parts)."""
    length = x.shape[dim]
    s = shard_len(length, parts)
    start, stop = min(index * s, length), min((index + 1) * s, length)
    part = x.narrow(dim, start, stop - start)
    if stop - start == s:
        return part
    pad_shape = list(x.shape)
    pad_shape[dim] = s - (stop - start)
    return torch.cat([part, x.new_zeros(pad_shape)], dim=dim)


def segments_layout(lengths: list[int], parts: int) -> SequenceLayout:
    """Layout of local sequences made of several segments, each sharded on its own and concatenated per
    rank (FLUX: [text shard; image shard])."""
    rows = []
    for p in range(parts):
        row = []
        for length in lengths:
            s, n = shard_len(length, parts), valid_counts(length, parts)[p]
            row.append(torch.arange(s) < n)
        rows.append(torch.cat(row))
    valid = torch.stack(rows)
    return SequenceLayout(local_len=valid.shape[1], valid=None if bool(valid.all()) else valid)


def gather_sequence(x: torch.Tensor, dim: int, group: CommGroup, length: int) -> torch.Tensor:
    """All-gather the shards of `group` along `dim` and drop the padding: the first `length` positions."""
    if group.size == 1:
        return x.narrow(dim, 0, length)
    parts = [torch.empty_like(x) for _ in range(group.size)]
    dist.all_gather(parts, x.contiguous(), group=group.group)
    return torch.cat(parts, dim=dim).narrow(dim, 0, length)


# ----------------------------------------------------------------------------------------------------------
# Transforms


class SequenceParallelDiT:
    """Base of the per-family transforms: holds the model, the sequence-parallel group and the wrapper,
    and forwards attribute access to the model."""

    family: type[torch.nn.Module] = torch.nn.Module

    def __init__(self, model: torch.nn.Module, sp: CommGroup, attn: USPAttention) -> None:
        if not isinstance(model, self.family):
            raise TypeError(f"{type(self).__name__} wraps {self.family.__name__}, got {type(model).__name__}")
        u, r = attn.ulysses, attn.ring
        if sp.size != u.size * r.size or sp.rank != r.rank * u.size + u.rank:
            raise ValueError(f"sequence-parallel group (rank {sp.rank} of {sp.size}) is not ring x ulysses "
                             f"({r.rank}/{r.size} x {u.rank}/{u.size}) in mesh order")
        check_heads(model.cfg.num_attention_heads, u.size)  # type: ignore[attr-defined]
        self.model, self.sp, self.attn = model, sp, attn
        model.attention.configure(parallel=attn)  # type: ignore[attr-defined]

    def __getattr__(self, name: str):  # only reached for names this object does not have
        model = self.__dict__.get("model")
        if model is None:
            raise AttributeError(name)
        return getattr(model, name)

    def shard(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        return take_shard(x, dim, self.sp.rank, self.sp.size)


class FluxSequenceParallel(SequenceParallelDiT):
    """FLUX: text (B, T, C) and image (B, N, C) streams each sharded; a rank's joint sequence is
    [text shard; image shard] with the RoPE rows of exactly those tokens; image shards gathered before
    the head. Joint attention is a permutation of the full [text; image] attention, so it is exact."""

    family = FluxTransformer

    def __init__(self, model: FluxTransformer, sp: CommGroup, attn: USPAttention) -> None:
        plan = model.SEQUENCE_PARALLEL
        if set(plan["split"]) != {"text", "image", "rope"} or set(plan["gather"]) != {"head"}:
            raise NotImplementedError(f"FluxSequenceParallel does not implement the declared plan {plan}")
        self.text_dim, self.image_dim = plan["split"]["text"], plan["split"]["image"]
        self.rope_dim, self.gather_dim = plan["split"]["rope"], plan["gather"]["head"]
        super().__init__(model, sp, attn)

    def __call__(self, x: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor, timestep: torch.Tensor,
                 img_ids: torch.Tensor, txt_ids: torch.Tensor, guidance: torch.Tensor | None = None,
                 modulation: FluxModulation | None = None) -> torch.Tensor:
        model: FluxTransformer = self.model
        s = model.embed(x, context, pooled, timestep, img_ids, txt_ids, guidance, with_temb=modulation is None)
        mod = modulation if modulation is not None else model.modulation(s["temb"])
        t, n = s["text"].shape[self.text_dim], s["image"].shape[self.image_dim]
        text, image = self.shard(s["text"], self.text_dim), self.shard(s["image"], self.image_dim)
        rope = tuple(
            torch.cat([self.shard(r.narrow(self.rope_dim, 0, t), self.rope_dim),
                       self.shard(r.narrow(self.rope_dim, t, n), self.rope_dim)], dim=self.rope_dim)
            for r in s["rope"]
        )
        layout = segments_layout([t, n], self.sp.size)
        with self.attn.sharded(layout, x.device):
            out = model.blocks(image, text, mod, rope)  # type: ignore[arg-type]
        return model.head(gather_sequence(out, self.gather_dim, self.sp, n), mod)


class WanSequenceParallel(SequenceParallelDiT):
    """Wan: video tokens (B, N, C) and their RoPE rows sharded; self-attention through the wrapper;
    cross-attention stays local (queries are the local tokens, text/image K/V are whole on every rank);
    tokens gathered after the head's projection, before unpatchify."""

    family = WanTransformer

    def __init__(self, model: WanTransformer, sp: CommGroup, attn: USPAttention) -> None:
        plan = model.SEQUENCE_PARALLEL
        split = dict(plan.split)
        if set(split) != {"tokens", "rope"} or plan.gather_after != "proj_out":
            raise NotImplementedError(f"WanSequenceParallel does not implement the declared plan {plan}")
        self.token_dim, self.rope_dim, self.gather_dim = split["tokens"], split["rope"], plan.gather_dim
        super().__init__(model, sp, attn)

    def __call__(self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
                 image_context: torch.Tensor | None = None) -> torch.Tensor:
        model: WanTransformer = self.model
        s = model.embed(x, timestep, context, image_context)
        n = s.tokens.shape[self.token_dim]
        tokens = self.shard(s.tokens, self.token_dim)
        rope = (self.shard(s.rope[0], self.rope_dim), self.shard(s.rope[1], self.rope_dim))
        with self.attn.sharded(segments_layout([n], self.sp.size), x.device):
            for block in model.blocks:
                tokens = block(tokens, s.context, s.image_context, s.t6, rope)
        out = gather_sequence(model.head(tokens, s.temb), self.gather_dim, self.sp, n)
        return unpatchify(out, s.grid, model.cfg.patch_size)


TRANSFORMS: dict[type[torch.nn.Module], type[SequenceParallelDiT]] = {
    FluxTransformer: FluxSequenceParallel,
    WanTransformer: WanSequenceParallel,
}


def sequence_parallel(model: torch.nn.Module, sp: CommGroup, attn: USPAttention) -> SequenceParallelDiT:
    """The transform of `model`'s family (error for a family without one)."""
    for family, transform in TRANSFORMS.items():
        if isinstance(model, family):
            return transform(model, sp, attn)  # type: ignore[arg-type]
    raise NotImplementedError(
        f"{type(model).__name__} has no sequence-parallel transform yet; supported: "
        f"{', '.join(f.__name__ for f in TRANSFORMS)} (use --ulysses-degree 1 --ring-degree 1)"
    )
