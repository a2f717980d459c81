"""Sequence parallelism for any DiT that has the shape of `diffserve.parallel.plan`: one generic transform.

`SequenceParallel(model, sp, attn)` stands in for the transformer (`components.transformer = transform`):
calling it runs `model.embed` on the whole inputs, cuts every segment the model's `PLAN.joint` names into
this rank's shard (with its RoPE rows and key mask), runs `model.blocks` on the shards (attention goes
through the model's `AttentionOp`, whose parallel wrapper is a `USPAttention`), gathers the head's output
for `PLAN.output` and hands it to `model.finish`. Every other attribute (`cfg`, weights, ...) is the wrapped
model's, so the pipeline stages do not change. This module knows no model family.

Padding scheme: a segment of length L is cut into P shards of s = ceil(L / P) positions; rank p holds
positions [p*s, (p+1)*s) and the positions >= L are zero padding (at the end of the last shards). A rank's
joint sequence is the concatenation of its shards of the joint segments, in `PLAN.joint` order. The
`SequenceLayout` handed to the attention wrapper marks, for every rank (and, when the model has key masks,
every sample), which of those positions are real keys; the wrapper removes the others before any kernel
runs, so neither padding nor masked tokens change a real token's result; padded query rows are dropped
when the output is gathered (`gather_sequence` keeps the first L positions).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from diffserve.layers.parallel import CommGroup, SequenceLayout, USPAttention, check_heads
from diffserve.parallel.plan import SequencePlan, Tokens

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
    rank (FLUX: [text shard; image shard]); no key masks."""
    rows = []
    for p in range(parts):
        row = []
        for length in lengths:
            s, n = shard_len(length, parts), valid_counts(length, parts)[p]
            row.append(torch.arange(s) < n)
        rows.append(torch.cat(row))
    valid = torch.stack(rows)
    return SequenceLayout(local_len=valid.shape[1], valid=None if bool(valid.all()) else valid)


def masked_layout(lengths: list[int], masks: list[torch.Tensor | None], parts: int) -> SequenceLayout:
    """As `segments_layout`, with per-sample key masks: masks[i] (B, L_i) bool for segment i (None: all
    real) -> valid (B, parts, local_len): shard padding and masked keys both False."""
    batch = next(m.shape[0] for m in masks if m is not None)
    rows = []
    for p in range(parts):
        row = []
        for length, mask in zip(lengths, masks, strict=True):
            if mask is None:
                mask = torch.ones(batch, length, dtype=torch.bool)
            row.append(take_shard(mask.cpu(), 1, p, parts))  # zero (False) padding past the end
        rows.append(torch.cat(row, dim=1))
    valid = torch.stack(rows, dim=1)
    return SequenceLayout(local_len=valid.shape[2], valid=valid)


def gather_sequence(x: torch.Tensor, dim: int, group: CommGroup, length: int) -> torch.Tensor:
    """All-gather the shards of `group` along `dim` and drop the padding: the first `length` positions."""
    if group.size == 1:
        return x.narrow(dim, 0, length)
    parts = [torch.empty_like(x) for _ in range(group.size)]
    dist.all_gather(parts, x.contiguous(), group=group.group)
    return torch.cat(parts, dim=dim).narrow(dim, 0, length)


# ----------------------------------------------------------------------------------------------------------
# The transform


def plan_of(model: torch.nn.Module) -> SequencePlan:
    """The model's declared `PLAN` (error naming the model when it has none)."""
    plan = getattr(model, "PLAN", None)  # the instance: a transform standing in for the model (step cache) has it
    if not isinstance(plan, SequencePlan):
        raise NotImplementedError(
            f"{type(model).__name__} declares no sequence-parallel PLAN (see diffserve/parallel/plan.py); "
            f"use --ulysses-degree 1 --ring-degree 1")
    return plan


class SequenceParallel:
    """Runs `model` with its joint segments sharded over the sequence-parallel group `sp`; attribute access
    falls through to the model."""

    def __init__(self, model: torch.nn.Module, sp: CommGroup, attn: USPAttention) -> None:
        self.plan = plan_of(model)
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

    def shard(self, tokens: Tokens) -> tuple[Tokens, SequenceLayout]:
        """This rank's shard of every joint segment (tokens, RoPE rows, key mask) and the layout of all
        ranks' joint sequences."""
        names, rank, parts = self.plan.joint, self.sp.rank, self.sp.size
        unknown = set(tokens.segments) - set(names) - set(self.plan.replicated)
        if unknown:
            raise ValueError(f"{type(self.model).__name__}.embed returned segments {sorted(unknown)} its PLAN "
                             f"does not name")
        segments, rope, masks = dict(tokens.segments), dict(tokens.rope), dict(tokens.masks)
        for n in names:
            segments[n] = take_shard(tokens.segments[n], 1, rank, parts)
            if n in tokens.rope:
                rope[n] = tuple(take_shard(t, 0, rank, parts) for t in tokens.rope[n])
            if n in tokens.masks:
                masks[n] = take_shard(tokens.masks[n], 1, rank, parts)
        lengths = [tokens.length(n) for n in names]
        if any(n in tokens.masks for n in names):
            layout = masked_layout(lengths, [tokens.masks.get(n) for n in names], parts)
        else:
            layout = segments_layout(lengths, parts)
        return Tokens(segments, rope, masks, tokens.cond), layout

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        model = self.model
        tokens = model.embed(*args, **kwargs)  # type: ignore[operator]
        local, layout = self.shard(tokens)
        device = tokens.segments[self.plan.output].device
        with self.attn.sharded(layout, device):
            local = model.blocks(local)  # type: ignore[operator]
        out = gather_sequence(model.head(local), 1, self.sp, tokens.length(self.plan.output))  # type: ignore[operator]
        return model.finish(out, tokens)  # type: ignore[operator]


def sequence_parallel(model: torch.nn.Module, sp: CommGroup, attn: USPAttention) -> SequenceParallel:
    """The sequence-parallel transform of `model` (error for a model without a PLAN)."""
    return SequenceParallel(model, sp, attn)
