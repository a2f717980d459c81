"""The shape every DiT gives its token sequence, and its sequence-parallel plan (types only).

A DiT splits its forward into four calls, so that one generic transform (`parallel/sequence.py`) can run
any family under sequence parallelism without knowing it:

    tokens = model.embed(*inputs)      # -> Tokens: named segments, their RoPE rows and key masks
    tokens = model.blocks(tokens)      # the repeated blocks, on whatever segment lengths it is given
    out = model.head(tokens)           # (B, L_out, C_out): the head over segment `PLAN.output`
    return model.finish(out, tokens)   # e.g. unpatchify; `tokens` is the full (unsharded) embedding

and `forward(*inputs)` is exactly that chain. Each DiT class declares `PLAN: ClassVar[SequencePlan]`.

Under sequence parallelism over P ranks the transform cuts every segment named in `PLAN.joint` into P
shards along its sequence (zero padding at the end of the last shards), with the rows of its RoPE tables
and of its key mask, and hands `blocks` a `Tokens` holding this rank's shards; the attention seam's
parallel wrapper makes each rank's queries attend to the keys of the whole joint sequence (padding and
masked keys removed). Segments not in `joint` (cross-attention text, say) and `cond` stay whole on every
rank. The head's output for `PLAN.output` is gathered, padding dropped, and `finish` gets the full result.

This module imports no model and no process-group code: models import it to declare their plan.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch


@dataclass(frozen=True)
class SequencePlan:
    """Which segments of a DiT's tokens are sharded for sequence parallelism.

    joint: the segments of the self-/joint-attention sequence, in the order the blocks concatenate them
        (FLUX: ("text", "image")); each one is sharded on its own and a rank's joint sequence is the
        concatenation of its shards, in this order.
    output: the segment the head's output belongs to; gathered after `head`.
    replicated: the other segments, whole on every rank (documentation and a check: `embed` must not
        return a segment that is in neither tuple).
    """

    joint: tuple[str, ...]
    output: str
    replicated: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.output not in self.joint:
            raise ValueError(f"SequencePlan: output segment {self.output!r} must be one of joint {self.joint}")
        if set(self.joint) & set(self.replicated):
            raise ValueError(f"SequencePlan: segments both joint and replicated: {set(self.joint) & set(self.replicated)}")


RopeRows = tuple[torch.Tensor, ...]  # per-token tables (cos, sin) or (complex freqs,), token axis first


@dataclass
class Tokens:
    """What `embed` hands the blocks.

    segments: name -> (B, L, C) token streams.
    rope: name -> that segment's RoPE tables, one row per token on dim 0 (e.g. cos, sin (L, D)); a segment
        without RoPE has no entry.
    masks: name -> (B, L) bool, True for real tokens (key padding); a segment without an entry is all real.
    cond: model-specific conditioning that every rank holds whole (timestep embedding, modulations, the
        patch grid, ...); the transform never looks inside.
    """

    segments: dict[str, torch.Tensor]
    rope: dict[str, RopeRows] = field(default_factory=dict)
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    cond: Any = None

    def length(self, name: str) -> int:
        return self.segments[name].shape[1]

    def joint(self, names: tuple[str, ...]) -> torch.Tensor:
        """The segments concatenated along the sequence: (B, sum L, C)."""
        return torch.cat([self.segments[n] for n in names], dim=1)

    def joint_mask(self, names: tuple[str, ...]) -> torch.Tensor | None:
        """(B, sum L) bool key mask of the concatenation, or None when every token is real."""
        if not any(n in self.masks for n in names):
            return None
        parts = []
        for n in names:
            seg = self.segments[n]
            m = self.masks.get(n)
            parts.append(m if m is not None else torch.ones(seg.shape[:2], dtype=torch.bool, device=seg.device))
        return torch.cat(parts, dim=1)

    def joint_rope(self, names: tuple[str, ...]) -> RopeRows:
        """The RoPE tables of the concatenation (every named segment must have one)."""
        tables = [self.rope[n] for n in names]
        return tuple(torch.cat(parts, dim=0) for parts in zip(*tables, strict=True))

    def split(self, x: torch.Tensor, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """Inverse of `joint` for a (B, sum L, ...) tensor: name -> its (B, L, ...) slice."""
        out, start = {}, 0
        for n in names:
            stop = start + self.length(n)
            out[n] = x[:, start:stop]
            start = stop
        return out

    def with_segments(self, **segments: torch.Tensor) -> Tokens:
        """A copy with some segments replaced (rope, masks and cond shared)."""
        return replace(self, segments={**self.segments, **segments})
