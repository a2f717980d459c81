"""Sequence-parallel attention behind the one attention seam: Ulysses, Ring and their composition (USP).

Every rank holds a shard of the token sequence. `USPAttention` is a `ParallelAttention` (installed with
`AttentionOp.configure(parallel=...)`) that makes each rank's queries attend to the keys of the *whole*
sequence:

* Ulysses (degree U): an all-to-all turns (B, L/U, H, D) sequence shards into (B, L, H/U, D) head shards,
  the local kernel runs on whole sequences, and the inverse all-to-all brings the outputs back.
* Ring (degree R): each rank keeps its queries; the K/V shards travel round the ring (the next transfer
  overlaps the current block's compute) and the partial results are merged exactly with their
  log-sum-exp (`merge_partials`).
* USP (U x R): Ulysses inside, Ring outside. The sequence-parallel rank of a token shard is
  `ring_index * U + ulysses_index` (the mesh order of `diffserve.parallel.mesh`).

Padding: shards have one length per forward (`SequenceLayout.local_len`); positions that are padding are
marked in `SequenceLayout.valid` and their keys are *removed* before any kernel runs, so padding never
changes a result. Padded query rows produce values that the caller drops when it gathers.

Key padding (padded text of different lengths in one batch): `SequenceLayout.valid` may be per sample,
(B, P, local_len), the shard padding and each sample's key mask combined; a transform builds it from the
full masks before sharding. Under `sharded(layout)` the wrapper takes key validity from the layout only:
the per-call `kv_mask` (the local slice of the same information) is checked for its shape and otherwise
not read. The selection of each K/V block's keys (`KeySelection`, one per ring rank) is planned once
when `sharded()` is entered (one host sync per forward, none per attention call). Ulysses: after the
all-to-all each sample attends to its own valid keys (one kernel call when the samples agree, else one per
sample). Ring: each block's valid keys per sample, merged per sample with the log-sum-exp; a block with no
valid key for a sample is skipped for that sample. Outside `sharded()` the wrapper hands `kv_mask` to the
local kernel.

Pure helpers (all-to-all reshapes, LSE merge, the log-sum-exp kernel) are separate functions so they can
be tested without a process group.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from diffserve.layers.attention import (
    KeySelection,
    MaskedAttentionFn,
    attend_selected,
    fa3_attention_lse,
    fused_kernel_fits,
    plan_key_selections,
)

# (B, L, H, D) x3 -> out (B, L, H, D), lse (B, H, L) float32
LseAttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class CommGroup:
    """One process group as this rank sees it. `ranks` are global ranks, in group order."""

    group: dist.ProcessGroup | None  # None when size == 1 (no communication)
    ranks: tuple[int, ...]
    rank: int  # this process's index in `ranks`

    @property
    def size(self) -> int:
        return len(self.ranks)

    @classmethod
    def single(cls, global_rank: int = 0) -> CommGroup:
        return cls(None, (global_rank,), 0)


@dataclass(frozen=True)
class SequenceLayout:
    """How the sequence is cut for one forward: every sequence-parallel rank holds `local_len` positions;
    `valid` marks the real tokens of each rank's shard, as keys: (P, local_len) bool when shared by the
    batch (shard padding only), or (B, P, local_len) bool per sample (shard padding and key padding
    combined). None: no padding."""

    local_len: int
    valid: torch.Tensor | None = None

    def __post_init__(self) -> None:
        v = self.valid
        if v is not None and (v.dtype != torch.bool or v.ndim not in (2, 3) or v.shape[-1] != self.local_len):
            raise ValueError(f"SequenceLayout.valid must be bool (P, {self.local_len}) or (B, P, "
                             f"{self.local_len}), got {v.dtype} {tuple(v.shape)}")


def check_heads(heads: int, ulysses: int) -> None:
    """Ulysses splits the heads over its ranks: they must divide evenly."""
    if heads % ulysses:
        divisors = [d for d in range(1, heads + 1) if heads % d == 0]
        raise ValueError(
            f"--ulysses-degree {ulysses} does not divide the model's {heads} attention heads; use a Ulysses "
            f"degree among {divisors} and put the rest of the sequence parallelism in --ring-degree"
        )


# ----------------------------------------------------------------------------------------------------------
# Pure helpers


def heads_to_send_order(x: torch.Tensor, parts: int) -> torch.Tensor:
    """(B, Ls, H, D) -> (parts, B, Ls, H/parts, D) contiguous: chunk j of the heads goes to rank j."""
    b, ls, h, d = x.shape
    return x.reshape(b, ls, parts, h // parts, d).permute(2, 0, 1, 3, 4).contiguous()


def received_to_sequence(x: torch.Tensor) -> torch.Tensor:
    """(parts, B, Ls, Hs, D), chunk i from rank i -> (B, parts*Ls, Hs, D): the shards in rank order."""
    p, b, ls, hs, d = x.shape
    return x.permute(1, 0, 2, 3, 4).reshape(b, p * ls, hs, d)


def sequence_to_send_order(x: torch.Tensor, parts: int) -> torch.Tensor:
    """(B, parts*Ls, Hs, D) -> (parts, B, Ls, Hs, D) contiguous: rank j's sequence chunk goes back to j."""
    b, l, hs, d = x.shape
    return x.reshape(b, parts, l // parts, hs, d).transpose(0, 1).contiguous()


def received_to_heads(x: torch.Tensor) -> torch.Tensor:
    """(parts, B, Ls, Hs, D), head chunk i from rank i -> (B, Ls, parts*Hs, D)."""
    p, b, ls, hs, d = x.shape
    return x.permute(1, 2, 0, 3, 4).reshape(b, ls, p * hs, d)


def merge_partials(out: torch.Tensor, lse: torch.Tensor, out_b: torch.Tensor,
                   lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two softmax-attention results over disjoint key sets into the one over their union.

    out/out_b (B, L, H, D) float32, lse/lse_b (B, H, L) float32 (natural log of the softmax denominators).
    """
    new = torch.logaddexp(lse, lse_b)
    w_a = torch.exp(lse - new).transpose(1, 2).unsqueeze(-1)  # (B, L, H, 1)
    w_b = torch.exp(lse_b - new).transpose(1, 2).unsqueeze(-1)
    return out * w_a + out_b.float() * w_b, new


def math_attention_lse(q: torch.Tensor, k: torch.Tensor,
                       v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference softmax attention with its log-sum-exp, computed in float32. (B, L, H, D) layout."""
    qf, kf, vf = (t.float().transpose(1, 2) for t in (q, k, v))
    scores = qf @ kf.transpose(-1, -2) * q.shape[-1] ** -0.5  # (B, H, Lq, Lk)
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.exp(scores - lse.unsqueeze(-1)) @ vf
    return out.transpose(1, 2).to(q.dtype), lse


def _lse_rows(lse: torch.Tensor, length: int) -> torch.Tensor:
    """Kernels return lse as (B, H, L), (B, H, L, 1) or padded (B, H, L'); normalise to (B, H, L) fp32."""
    if lse.ndim == 4:
        lse = lse.squeeze(-1)
    return lse[..., :length].float()


def sdpa_attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       backend: str = "sdpa") -> tuple[torch.Tensor, torch.Tensor]:
    """Attention that also returns its log-sum-exp, through the fused torch kernels where they exist.

    CPU: the flash CPU kernel. CUDA: FlashAttention 3 (backend 'fa3', where it takes the inputs), cuDNN
    (backend 'cudnn') or flash for fp16/bf16, memory-efficient for fp32. Anything else (or a torch kernel
    refusing the shapes) falls back to `math_attention_lse`.
    """
    lq = q.shape[1]
    if backend == "fa3" and fused_kernel_fits("fa3", q):
        out, lse = fa3_attention_lse(q, k, v)
        return out, _lse_rows(lse, lq)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    ops = torch.ops.aten
    try:
        if q.device.type == "cpu":
            out, lse = ops._scaled_dot_product_flash_attention_for_cpu(qt, kt, vt)
        elif q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16):
            if backend == "cudnn":
                out, lse = ops._scaled_dot_product_cudnn_attention(qt, kt, vt, None, True)[:2]
            else:
                out, lse = ops._scaled_dot_product_flash_attention(qt, kt, vt)[:2]
        elif q.device.type == "cuda":
            out, lse = ops._scaled_dot_product_efficient_attention(qt, kt, vt, None, True)[:2]
        else:
            return math_attention_lse(q, k, v)
    except RuntimeError:
        return math_attention_lse(q, k, v)
    return out.transpose(1, 2), _lse_rows(lse, lq)


# ----------------------------------------------------------------------------------------------------------
# Communication


def ulysses_scatter_heads(x: torch.Tensor, group: CommGroup) -> torch.Tensor:
    """All-to-all: (B, Ls, H, D) sequence shard -> (B, U*Ls, H/U, D) head shard over the group's sequence."""
    if group.size == 1:
        return x
    send = heads_to_send_order(x, group.size)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group.group)
    return received_to_sequence(recv)


def ulysses_gather_heads(x: torch.Tensor, group: CommGroup) -> torch.Tensor:
    """Inverse of `ulysses_scatter_heads`: (B, U*Ls, H/U, D) -> (B, Ls, H, D)."""
    if group.size == 1:
        return x
    send = sequence_to_send_order(x, group.size)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group.group)
    return received_to_heads(recv)


def _start_shift(kv: torch.Tensor, group: CommGroup) -> tuple[torch.Tensor, list]:
    """Send `kv` to the next ring rank and receive the previous rank's; returns (buffer, requests)."""
    buf = torch.empty_like(kv)
    nxt = group.ranks[(group.rank + 1) % group.size]
    prv = group.ranks[(group.rank - 1) % group.size]
    ops = [dist.P2POp(dist.isend, kv, nxt, group.group), dist.P2POp(dist.irecv, buf, prv, group.group)]
    return buf, dist.batch_isend_irecv(ops)


# Running (out (B, L, H, D) float32, lse (B, H, L) float32) of a blockwise attention; None before any block
Partial = tuple[torch.Tensor, torch.Tensor] | None


def attend_block(acc: Partial, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sel: KeySelection,
                 kernel: LseAttentionFn) -> Partial:
    """Merge the attention of q (B, Lq, H, D) over one K/V block's kept keys (k, v (B, Lk, H, D), `sel`)
    into the running partial `acc`, per sample: a sample that keeps no key of this block is left as it
    was. A sample no block has reached yet holds out 0 and lse -inf, which the merge turns into the
    block's own result exactly."""
    for rows, qr, kr, vr in sel.pieces(q, k, v):
        o, s = kernel(qr, kr, vr)
        if acc is None and rows == slice(None):
            acc = (o.float(), s)
            continue
        if acc is None:
            b, lq, h, _ = q.shape
            acc = (q.new_zeros(q.shape, dtype=torch.float32),
                   q.new_full((b, h, lq), float("-inf"), dtype=torch.float32))
        out, lse = acc
        merged_out, merged_lse = merge_partials(out[rows], lse[rows], o, s)
        if rows == slice(None):
            acc = (merged_out, merged_lse)
        else:
            out[rows], lse[rows] = merged_out, merged_lse
    return acc


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: CommGroup,
                   blocks: list[KeySelection], kernel: LseAttentionFn) -> torch.Tensor:
    """Blockwise attention of the local queries over every ring rank's K/V, merged with log-sum-exp.

    q, k, v (B, Ls, H, D) local; blocks[r] the keys of ring rank r's block that each sample attends to.
    Returns (B, Ls, H, D) in q's dtype.
    """
    kv = torch.stack([k, v]).contiguous()
    acc: Partial = None
    for step in range(group.size):
        pending = _start_shift(kv, group) if step + 1 < group.size else None
        src = (group.rank - step) % group.size
        acc = attend_block(acc, q, kv[0], kv[1], blocks[src], kernel)
        if pending is not None:
            kv, reqs = pending
            for r in reqs:
                r.wait()
    if acc is None:
        raise ValueError("ring attention: no valid key anywhere in the sequence")
    return acc[0].to(q.dtype)


# ----------------------------------------------------------------------------------------------------------
# The ParallelAttention wrapper


class USPAttention:
    """Unified sequence parallelism: Ulysses over `ulysses`, Ring over `ring` (either may have size 1).

    Outside `sharded(layout)` (no layout active) it calls the local kernel: the whole sequence is on this
    rank. Inside, q/k/v are this rank's (padded) shard of `layout`.
    """

    def __init__(self, ulysses: CommGroup, ring: CommGroup, lse_kernel: LseAttentionFn | None = None) -> None:
        self.ulysses, self.ring = ulysses, ring
        self.lse_kernel: LseAttentionFn = lse_kernel or sdpa_attention_lse
        self._blocks: list[KeySelection] | None = None  # per ring rank, while `sharded` is active

    @property
    def name(self) -> str:
        parts = [f"ulysses{self.ulysses.size}"] * (self.ulysses.size > 1) + [f"ring{self.ring.size}"] * (
            self.ring.size > 1)
        return "x".join(parts) or "local"

    def key_selections(self, layout: SequenceLayout, device: torch.device) -> list[KeySelection]:
        """Per ring rank r, the keys of the block it holds after the Ulysses all-to-all (the shards of
        sequence-parallel ranks r*U .. r*U+U-1, concatenated) that each sample attends to. One host sync
        (none when nothing is padded); a sample with no valid key in the whole sequence is an error."""
        u, r, n = self.ulysses.size, self.ring.size, layout.local_len
        valid = layout.valid
        if valid is None:
            return [KeySelection.every_key(u * n)] * r
        if tuple(valid.shape[-2:]) != (u * r, n):
            raise ValueError(f"layout.valid has shape {tuple(valid.shape)}, expected ([B,] {u * r}, {n}) for "
                             f"ulysses {u} x ring {r}")
        blocks = valid.reshape(-1, r, u * n).transpose(0, 1)  # (R, B or 1, U*local_len)
        sels = plan_key_selections(blocks, device, any_batch=valid.ndim == 2)
        empty = [b for b in range(blocks.shape[1]) if not any(sel.count(b) for sel in sels)]
        if empty:
            who = "the batch" if valid.ndim == 2 else f"sample(s) {empty}"
            raise ValueError(f"layout.valid: {who} has no valid key anywhere in the sequence; attention needs "
                             "at least one real key per sample")
        return sels

    @contextmanager
    def sharded(self, layout: SequenceLayout, device: torch.device) -> Iterator[None]:
        """Within this block, attention calls receive shards cut as `layout` says."""
        prev = self._blocks
        self._blocks = self.key_selections(layout, device)
        try:
            yield
        finally:
            self._blocks = prev

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, local: MaskedAttentionFn,
                 kv_mask: torch.Tensor | None = None) -> torch.Tensor:
        """q, k, v (B, Ls, H, D) shards (or whole sequences outside `sharded`), kv_mask (B, Ls) bool or None
        -> (B, Ls, H, D). Under `sharded` the layout says which keys are real; kv_mask is only checked for
        its shape (see the module docstring)."""
        blocks = self._blocks
        if blocks is None:
            return local(q, k, v) if kv_mask is None else local(q, k, v, kv_mask=kv_mask)
        if kv_mask is not None and tuple(kv_mask.shape) != tuple(k.shape[:2]):
            raise ValueError(f"kv_mask has shape {tuple(kv_mask.shape)}, expected this rank's (batch, keys) = "
                             f"{tuple(k.shape[:2])}")
        blocks[0].check_batch(q.shape[0])
        check_heads(q.shape[2], self.ulysses.size)
        q, k, v = (ulysses_scatter_heads(t, self.ulysses) for t in (q, k, v))
        if self.ring.size == 1:
            out = attend_selected(local, q, k, v, blocks[0])
        else:
            out = ring_attention(q, k, v, self.ring, blocks, self.lse_kernel)
        return ulysses_gather_heads(out, self.ulysses)


def ulysses_attention(group: CommGroup) -> USPAttention:
    """Ulysses only (all-to-all over heads); the local kernel is the seam's own."""
    return USPAttention(group, CommGroup.single(group.ranks[group.rank]))


def ring_attention_wrapper(group: CommGroup, lse_kernel: LseAttentionFn | None = None) -> USPAttention:
    """Ring only (K/V rotation with log-sum-exp merging)."""
    return USPAttention(CommGroup.single(group.ranks[group.rank]), group, lse_kernel)
