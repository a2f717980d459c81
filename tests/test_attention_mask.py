"""Key-padding masks at the attention seam: padded keys are dropped before the kernel, per sample.

One process: a masked batch equals each sample run alone on its real keys; the plain, shared-prefix,
shared-index and per-sample paths are each taken where they should be. Four processes (gloo, one spawn
for every layout): a joint [text; image] sequence whose text carries per-sample padding, sharded segment
by segment as the FLUX transform does, gives the single-process masked attention under Ulysses, Ring and
USP.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from diffserve.engine.ranks import spawn_world
from diffserve.layers.attention import AttentionOp, key_selection, plan_key_selections, sdpa_attention
from diffserve.layers.parallel import (
    CommGroup,
    SequenceLayout,
    USPAttention,
    attend_block,
    math_attention_lse,
    sdpa_attention_lse,
)
from diffserve.parallel.mesh import ParallelConfig, build_mesh_groups
from diffserve.parallel.sequence import gather_sequence, segments_layout, shard_len, take_shard

WORLD = 4
LAYOUTS = {"U2": (2, 1), "R2": (1, 2), "U2xR2": (2, 2), "U4": (4, 1), "R4": (1, 4)}
TEXT, IMAGE, HEADS, DIM = 7, 9, 4, 8


def _qkv(b: int, lq: int, lk: int, seed: int, heads: int = 2) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, lq, heads, DIM, generator=g), torch.randn(b, lk, heads, DIM, generator=g),
            torch.randn(b, lk, heads, DIM, generator=g))


def _mask(rows: list[list[int] | int], length: int) -> torch.Tensor:
    """(B, length) bool: an int row is a prefix length, a list row the positions of the real keys."""
    m = torch.zeros(len(rows), length, dtype=torch.bool)
    for b, row in enumerate(rows):
        if isinstance(row, int):
            m[b, :row] = True
        else:
            m[b, row] = True
    return m


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each sample alone, on only its real keys. (B, L, H, D)."""
    outs = []
    for b in range(q.shape[0]):
        idx = mask[b].nonzero().flatten()
        outs.append(sdpa_attention(q[b:b + 1], k[b:b + 1, idx], v[b:b + 1, idx]))
    return torch.cat(outs)


class _Spy:
    """A dense kernel that records the keys it was given."""

    def __init__(self) -> None:
        self.calls: list[torch.Tensor] = []

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.calls.append(k)
        return sdpa_attention(q, k, v)


def _spied_op() -> tuple[AttentionOp, _Spy]:
    op, spy = AttentionOp(), _Spy()
    op.dense = spy  # type: ignore[method-assign]
    return op, spy


# ----------------------------------------------------------------------------------------------------------
# One process


def test_per_sample_masks_match_each_sample_alone() -> None:
    q, k, v = _qkv(3, 5, 11, seed=1)
    mask = _mask([4, 11, [0, 3, 4, 9]], 11)  # two prefixes of different lengths and a non-prefix pattern
    sel = key_selection(mask, k)
    assert not sel.shared and sel.counts == (4, 11, 4) and sel.keys[:2] == (4, None)
    op, spy = _spied_op()
    out = op(q, k, v, kv_mask=mask)
    assert [c.shape[1] for c in spy.calls] == [4, 11, 4]  # one call per sample, real keys only
    err = (out - _reference(q, k, v, mask)).abs().max().item()
    print(f"per-sample path: max error {err:.1e}")
    assert out.shape == q.shape and err < 1e-6


def test_all_true_mask_is_the_plain_call() -> None:
    q, k, v = _qkv(3, 6, 9, seed=2)
    op, spy = _spied_op()
    out = op(q, k, v, kv_mask=torch.ones(3, 9, dtype=torch.bool))
    assert len(spy.calls) == 1 and spy.calls[0] is k
    assert torch.equal(out, AttentionOp()(q, k, v))


def test_shared_prefix_is_one_call_on_a_view() -> None:
    q, k, v = _qkv(3, 6, 9, seed=3)
    mask = _mask([5, 5, 5], 9)
    op, spy = _spied_op()
    out = op(q, k, v, kv_mask=mask)
    (seen,) = spy.calls
    assert seen.shape[1] == 5 and seen.data_ptr() == k.data_ptr()  # k[:, :5], no copy
    assert torch.equal(out, sdpa_attention(q, k[:, :5], v[:, :5]))
    assert (out - _reference(q, k, v, mask)).abs().max().item() < 1e-6


def test_shared_non_prefix_is_one_call() -> None:
    q, k, v = _qkv(2, 4, 8, seed=4)
    mask = _mask([[1, 2, 6], [1, 2, 6]], 8)
    op, spy = _spied_op()
    out = op(q, k, v, kv_mask=mask)
    assert [c.shape[1] for c in spy.calls] == [3]
    assert (out - _reference(q, k, v, mask)).abs().max().item() < 1e-6


def test_sample_without_keys_raises() -> None:
    q, k, v = _qkv(3, 4, 6, seed=5)
    with pytest.raises(ValueError, match=r"sample\(s\) \[1\] of the batch have no real key"):
        AttentionOp()(q, k, v, kv_mask=_mask([6, 0, 2], 6))


def test_bad_masks_raise() -> None:
    q, k, v = _qkv(2, 4, 6, seed=6)
    with pytest.raises(ValueError, match="kv_mask must be a bool tensor of shape"):
        AttentionOp()(q, k, v, kv_mask=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="kv_mask must be a bool tensor of shape"):
        AttentionOp()(q, k, v, kv_mask=torch.ones(2, 6))
    with pytest.raises(ValueError, match="SequenceLayout.valid must be bool"):
        SequenceLayout(4, torch.ones(2, 3, dtype=torch.bool))


def test_wrapper_outside_sharded_hands_the_mask_to_the_local_kernel() -> None:
    q, k, v = _qkv(3, 5, 8, seed=7)
    mask = _mask([8, 2, [1, 5]], 8)
    op = AttentionOp()
    op.configure(parallel=USPAttention(CommGroup.single(), CommGroup.single()))
    assert torch.equal(op(q, k, v, kv_mask=mask), AttentionOp().local(q, k, v, kv_mask=mask))


def test_sharded_single_rank_takes_keys_from_the_layout() -> None:
    q, k, v = _qkv(3, 8, 8, seed=8)
    mask = _mask([8, 3, [0, 2, 7]], 8)
    op, usp = AttentionOp(), USPAttention(CommGroup.single(), CommGroup.single())
    op.configure(parallel=usp)
    with usp.sharded(SequenceLayout(8, mask.unsqueeze(1)), q.device):  # (B, P=1, 8)
        out = op(q, k, v, kv_mask=mask)
        with pytest.raises(ValueError, match="made for a batch of 3 samples"):
            op(q[:2], k[:2], v[:2])
    assert (out - _reference(q, k, v, mask)).abs().max().item() < 1e-6
    with usp.sharded(SequenceLayout(8, mask[1:2]), q.device):  # (P=1, 8): shared by any batch
        shared = op(q, k, v)
    assert torch.equal(shared, sdpa_attention(q, k[:, :3], v[:, :3]))
    with pytest.raises(ValueError, match=r"sample\(s\) \[2\] has no valid key"):
        usp.key_selections(SequenceLayout(8, _mask([1, 2, 0], 8).unsqueeze(1)), q.device)


@pytest.mark.parametrize("kernel", [sdpa_attention_lse, math_attention_lse])
def test_blockwise_merge_per_sample(kernel) -> None:
    """The ring's per-block step without a ring: three K/V blocks, some empty for a sample or for all."""
    q, k, v = _qkv(3, 5, 16, seed=9)
    # blocks of 4 keys: 0 lacks sample 1, 1 has keys for all, 2 only for sample 1, 3 for nobody
    mask = _mask([[0, 1, 2, 3, 4], [5, 6, 7, 9, 10], [0, 2, 5, 7]], 16)
    acc = None
    for start in (0, 4, 8, 12):
        sl = slice(start, start + 4)
        sel = plan_key_selections(mask[:, sl].unsqueeze(0), q.device)[0]
        acc = attend_block(acc, q, k[:, sl], v[:, sl], sel, kernel)
    assert acc is not None
    err = (acc[0] - _reference(q, k, v, mask)).abs().max().item()
    assert err < 1e-5, err


# ----------------------------------------------------------------------------------------------------------
# Four processes

# Text masks of a batch of 3 (TEXT tokens each); the image segment is all real.
TEXT_MASKS: dict[str, list[list[int] | int]] = {
    "prefixes": [7, 3, 5],
    "non-prefix": [6, [0, 2, 3, 6], 2],
    "same prefix": [4, 4, 4],
    "one text all padded": [7, 0, 1],
}


def _world_max(x: float) -> float:
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _sharded_valid(text_mask: torch.Tensor, parts: int) -> torch.Tensor:
    """(B, P, local_len) key validity of [text shard; image shard] per rank: shard padding is invalid."""
    image = torch.ones(text_mask.shape[0], IMAGE, dtype=torch.bool)
    return torch.stack([torch.cat([take_shard(text_mask, 1, p, parts), take_shard(image, 1, p, parts)], 1)
                        for p in range(parts)], 1)


def _layout_errors(u: int, r: int) -> dict[str, float]:
    cfg = ParallelConfig(num_gpus=WORLD, ulysses_degree=u, ring_degree=r, cfg_parallel=False,
                         dp_size=WORLD // (u * r))
    groups = build_mesh_groups(cfg.resolve())
    usp = USPAttention(groups.ulysses, groups.ring)
    op = AttentionOp()
    op.configure(parallel=usp)
    sp, me = groups.sp.size, groups.sp.rank
    errors = {}
    for i, (case, rows) in enumerate(TEXT_MASKS.items()):
        text_mask = _mask(rows, TEXT)
        full = torch.cat([text_mask, torch.ones(len(rows), IMAGE, dtype=torch.bool)], 1)  # (B, T+N)
        q, k, v = _qkv(len(rows), TEXT + IMAGE, TEXT + IMAGE, seed=100 + i, heads=HEADS)
        ref = _reference(q, k, v, full)

        def shard(x: torch.Tensor) -> torch.Tensor:
            return torch.cat([take_shard(x[:, :TEXT], 1, me, sp), take_shard(x[:, TEXT:], 1, me, sp)], 1)

        valid = _sharded_valid(text_mask, sp)
        shard_valid = segments_layout([TEXT, IMAGE], sp).valid
        assert shard_valid is None or not (valid & ~shard_valid).any()  # key padding within shard validity
        with usp.sharded(SequenceLayout(valid.shape[-1], valid), q.device):
            out = op(shard(q), shard(k), shard(v), kv_mask=valid[:, me])
        st = shard_len(TEXT, sp)
        gathered = torch.cat([gather_sequence(out[:, :st], 1, groups.sp, TEXT),
                              gather_sequence(out[:, st:], 1, groups.sp, IMAGE)], 1)
        errors[case] = _world_max((gathered - ref).abs().max().item())
    return errors


def _mask_worker(rank: int, out_file: str) -> None:
    results = {name: _layout_errors(u, r) for name, (u, r) in LAYOUTS.items()}
    if rank == 0:
        Path(out_file).write_text(json.dumps(results, indent=1))


@pytest.fixture(scope="module")
def world_results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("mask") / "results.json"
    spawn_world(_mask_worker, WORLD, str(out))
    res = json.loads(out.read_text())
    for name, errs in res.items():
        print(f"masked attention {name}: max error {max(errs.values()):.2e} over {len(errs)} mask sets")
    return res


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_sharded_masked_attention_matches_single_process(world_results: dict, layout: str) -> None:
    for case, err in world_results[layout].items():
        assert err < 1e-5, f"{layout} {case}: {err}"
