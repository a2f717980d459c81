"""FlashAttention 3 behind the attention seam, on the CPU: which backend the engine picks, how FA3 is found
(the fa3-fwd wheel with its `flash_attn_config` alias, FA3's own `flash_attn_interface`, not PyPI's empty
placeholder), the inputs it takes, and the custom op's plumbing (fake kernel, torch.compile without graph
breaks, its log-sum-exp through Ring attention's merge). The kernel here is a stand-in module computing
torch SDPA and the log-sum-exp; the real kernel is checked on a GPU by benchmarks/gpu/fa3_check.py.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from benchmarks import roofline
from diffserve.layers import attention as attention_mod
from diffserve.layers import parallel as parallel_mod
from diffserve.layers.attention import (
    AttentionOp,
    KeySelection,
    default_backend,
    fa3_attention_lse,
    fa3_available,
    fused_kernel_fits,
    load_fa3,
)
from diffserve.layers.parallel import attend_block, math_attention_lse, merge_partials, sdpa_attention_lse
from diffserve.models.dits.flux import FluxConfig, FluxSingleBlock

CONFIG = {"build_flags": {"FLASHATTENTION_DISABLE_FP16": True, "FLASHATTENTION_DISABLE_HDIM64": False,
                          "FLASHATTENTION_DISABLE_HDIM96": False, "FLASHATTENTION_DISABLE_HDIM128": False,
                          "FLASHATTENTION_DISABLE_HDIM192": False, "FLASHATTENTION_DISABLE_HDIM256": False}}


def _reference_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What FA3 computes, (B, L, H, D) layout: out (non-contiguous, as SDPA leaves it) and lse (B, H, Lq)."""
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(qt, kt, vt).transpose(1, 2)
    lse = torch.logsumexp((qt.float() @ kt.float().transpose(-1, -2)) * q.shape[-1] ** -0.5, dim=-1)
    return out, lse


def _round_up_headdim(head_size: int) -> int:
    """fa3_fwd_interface's import of the config under FA3's name, as the wheel's function does it."""
    from flash_attn_config import CONFIG as built

    sizes = [s for s in (64, 96, 128, 192, 256) if not built["build_flags"][f"FLASHATTENTION_DISABLE_HDIM{s}"]]
    return next((s for s in sizes if head_size <= s), 256)


def _wheel_modules(calls: list[tuple[int, ...]]) -> tuple[types.ModuleType, types.ModuleType]:
    """A stand-in for the fa3-fwd wheel: `fa3_fwd_interface` (flash_attn_func, round_up_headdim) and
    `fa3_fwd_config`. Each kernel call records q's shape in `calls`."""
    interface, config = types.ModuleType("fa3_fwd_interface"), types.ModuleType("fa3_fwd_config")
    config.CONFIG = CONFIG

    def flash_attn_func(q, k, v, softmax_scale=None, causal=False, return_attn_probs=False):
        calls.append(tuple(q.shape))
        out, lse = _reference_kernel(q, k, v)
        return (out, lse) if return_attn_probs else out

    interface.flash_attn_func = flash_attn_func
    interface.round_up_headdim = _round_up_headdim
    return interface, config


@pytest.fixture
def modules(monkeypatch) -> Iterator[dict[str, types.ModuleType | None]]:
    """sys.modules for the FA3 names, emptied for the test (None: the import fails); load_fa3's cache is
    cleared before and after, and an alias the test left is removed."""
    names = ("fa3_fwd_interface", "fa3_fwd_config", "flash_attn_interface")
    for name in names:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, "flash_attn_config", raising=False)
    load_fa3.cache_clear()
    yield sys.modules  # type: ignore[misc]
    load_fa3.cache_clear()
    sys.modules.pop("flash_attn_config", None)


@pytest.fixture
def wheel(modules) -> list[tuple[int, ...]]:
    """The stand-in fa3-fwd wheel installed; returns the list its kernel records calls in."""
    calls: list[tuple[int, ...]] = []
    modules["fa3_fwd_interface"], modules["fa3_fwd_config"] = _wheel_modules(calls)
    return calls


@pytest.fixture
def fa3_on_cpu(wheel, monkeypatch) -> list[tuple[int, ...]]:
    """The stand-in wheel, and the seam treating CPU tensors as FA3's (as CUDA bf16 ones are on a GPU)."""
    real = fused_kernel_fits

    def fits(backend: str, q: torch.Tensor) -> bool:
        return True if backend == "fa3" else real(backend, q)

    monkeypatch.setattr(attention_mod, "fused_kernel_fits", fits)
    monkeypatch.setattr(parallel_mod, "fused_kernel_fits", fits)
    return wheel


def _qkv(b: int, lq: int, lk: int, seed: int, heads: int = 2, dim: int = 16) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, lq, heads, dim, generator=g), torch.randn(b, lk, heads, dim, generator=g),
            torch.randn(b, lk, heads, dim, generator=g))


# ----------------------------------------------------------------------------------------------------------
# Finding FA3, and which backend the engine picks


@pytest.mark.parametrize(("capability", "with_fa3", "expected"), [
    ((9, 0), True, "fa3"), ((9, 0), False, "cudnn"), ((10, 0), True, "cudnn"), ((8, 0), True, "sdpa"),
])
def test_default_backend_is_fa3_on_hopper_when_it_imports(modules, monkeypatch, capability, with_fa3,
                                                          expected) -> None:
    if with_fa3:
        modules["fa3_fwd_interface"], modules["fa3_fwd_config"] = _wheel_modules([])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.backends.cudnn, "is_available", lambda: True)
    assert default_backend(torch.device("cuda")) == expected
    assert default_backend(torch.device("cpu")) == "sdpa"  # CPU CI never runs FA3


def test_wheel_is_found_and_its_config_aliased_once(wheel, modules) -> None:
    assert "flash_attn_config" not in modules
    fa3 = load_fa3()
    assert fa3 is not None and fa3.module == "fa3_fwd_interface" and fa3.lse_flag
    assert modules["flash_attn_config"] is modules["fa3_fwd_config"]
    assert modules["fa3_fwd_interface"].round_up_headdim(100) == 128  # the path that needs the alias
    assert load_fa3() is fa3  # imported once
    assert AttentionOp("fa3").backend == "fa3"


def test_a_loaded_flash_attn_config_is_not_replaced(wheel, modules) -> None:
    own = types.ModuleType("flash_attn_config")
    modules["flash_attn_config"] = own
    assert load_fa3() is not None and modules["flash_attn_config"] is own


def test_placeholder_package_is_rejected(modules) -> None:
    """PyPI's flash-attn-interface 0.0.1: a module of FA3's name with no flash_attn_func."""
    modules["flash_attn_interface"] = types.ModuleType("flash_attn_interface")
    assert load_fa3() is None and not fa3_available()
    with pytest.raises(ValueError, match=r"FlashAttention 3: pip install \"diffserve\[fa3\]\""):
        AttentionOp("fa3")


def test_upstream_interface_is_accepted_and_its_pair_read(modules, monkeypatch) -> None:
    """FA3's own flash_attn_interface; an older one returns (out, lse) with no return_attn_probs flag."""
    upstream = types.ModuleType("flash_attn_interface")
    upstream.flash_attn_func = lambda q, k, v, softmax_scale=None, causal=False: _reference_kernel(q, k, v)
    modules["flash_attn_interface"] = upstream
    fa3 = load_fa3()
    assert fa3 is not None and fa3.module == "flash_attn_interface" and not fa3.lse_flag
    assert "flash_attn_config" not in modules  # the alias is for the fa3-fwd wheel only
    q, k, v = _qkv(2, 5, 7, seed=0)
    out, lse = fa3_attention_lse(q, k, v)
    ref_out, ref_lse = math_attention_lse(q, k, v)
    assert torch.allclose(out, ref_out, atol=1e-5) and torch.allclose(lse, ref_lse, atol=1e-5)


def test_fa3_takes_cuda_bf16_head_sizes_up_to_256_and_the_rest_falls_back() -> None:
    with FakeTensorMode():
        def q(dtype=torch.bfloat16, d=128, device="cuda"):
            return torch.empty(1, 4, 2, d, dtype=dtype, device=device)

        assert fused_kernel_fits("fa3", q()) and fused_kernel_fits("fa3", q(d=256)) and fused_kernel_fits("fa3", q(d=64))
        assert not fused_kernel_fits("fa3", q(torch.float16))  # the fa3-fwd build has no fp16 kernels
        assert not fused_kernel_fits("fa3", q(torch.float32))
        assert not fused_kernel_fits("fa3", q(d=260)) and not fused_kernel_fits("fa3", q(d=100))
        assert not fused_kernel_fits("fa3", q(device="cpu"))
        assert fused_kernel_fits("cudnn", q(torch.float16)) and not fused_kernel_fits("cudnn", q(d=256))


def test_inputs_fa3_does_not_take_go_to_sdpa(wheel) -> None:
    """CPU fp32 under the fa3 backend: torch's SDPA for the plain and the log-sum-exp path; FA3 not called."""
    q, k, v = _qkv(2, 5, 7, seed=1)
    op = AttentionOp("fa3")
    ref_out, ref_lse = math_attention_lse(q, k, v)
    assert torch.allclose(op(q, k, v), ref_out, atol=1e-5)
    out, lse = sdpa_attention_lse(q, k, v, backend="fa3")
    assert torch.allclose(out, ref_out, atol=1e-5) and torch.allclose(lse, ref_lse, atol=1e-5)
    assert wheel == []


# ----------------------------------------------------------------------------------------------------------
# The custom op: its fake, torch.compile, Ring's merge, key masks


def test_op_returns_out_and_lse_and_passes_opcheck(wheel) -> None:
    q, k, v = _qkv(2, 5, 9, seed=2)
    out, lse = fa3_attention_lse(q, k, v)
    ref_out, ref_lse = math_attention_lse(q, k, v)
    assert out.is_contiguous() and lse.shape == (2, 2, 5) and lse.dtype == torch.float32
    assert torch.allclose(out, ref_out, atol=1e-5) and torch.allclose(lse, ref_lse, atol=1e-5)
    torch.library.opcheck(torch.ops.diffserve.fa3_attention.default, (q, k, v))
    with FakeTensorMode():
        fake_out, fake_lse = fa3_attention_lse(torch.empty(3, 11, 4, 64), torch.empty(3, 6, 4, 64),
                                               torch.empty(3, 6, 4, 64))
    assert fake_out.shape == (3, 11, 4, 64) and fake_lse.shape == (3, 4, 11)


def test_op_rejects_a_missing_lse_or_one_of_another_layout(wheel, modules) -> None:
    interface = modules["fa3_fwd_interface"]
    interface.flash_attn_func = lambda q, k, v, **kwargs: q.clone()
    with pytest.raises(RuntimeError, match="returned no log-sum-exp"):
        fa3_attention_lse(*_qkv(1, 5, 3, seed=3))
    load_fa3.cache_clear()
    interface.flash_attn_func = (
        lambda q, k, v, return_attn_probs=False: (q.clone(), torch.zeros(q.shape[0], q.shape[1], q.shape[2])))
    with pytest.raises(RuntimeError, match=r"expected \(batch, heads, queries\)"):
        fa3_attention_lse(*_qkv(1, 5, 3, seed=3))


def _tiny_single_block(attn: AttentionOp) -> FluxSingleBlock:
    torch.manual_seed(0)
    cfg = FluxConfig(num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                     axes_dims_rope=(4, 6, 6))
    return FluxSingleBlock(cfg, attn).eval()


def test_block_on_the_fa3_seam_compiles_to_one_graph(fa3_on_cpu) -> None:
    block = _tiny_single_block(AttentionOp("fa3"))
    h, mod = torch.randn(2, 10, 32), torch.randn(2, 96)
    angles = torch.randn(10, 8)
    rope = (angles.cos().repeat_interleave(2, -1), angles.sin().repeat_interleave(2, -1))
    with torch.no_grad():
        explained = torch._dynamo.explain(block)(h, mod, rope)
        assert explained.graph_break_count == 0 and explained.graph_count == 1
        assert "diffserve.fa3_attention" in explained.graphs[0].code
        torch._dynamo.reset()
        eager = block(h, mod, rope)
        assert fa3_on_cpu  # the FA3 stand-in ran
        compiled = torch.compile(block, fullgraph=True)(h, mod, rope)
        block.attn.attn.configure(backend="sdpa")
        sdpa = block(h, mod, rope)
    assert torch.allclose(eager, sdpa, atol=1e-5) and torch.allclose(compiled, sdpa, atol=1e-4)


def test_ring_merges_fa3_lse_blocks_into_full_attention(fa3_on_cpu) -> None:
    """Two K/V blocks through `attend_block` with the kernel Ring gets for backend 'fa3' (as
    engine/ranks.py builds it): the merge equals attention over all keys."""
    q, k, v = _qkv(2, 6, 11, seed=4)
    kernel = partial(sdpa_attention_lse, backend="fa3")
    acc = attend_block(None, q, k[:, :5], v[:, :5], KeySelection.every_key(5), kernel)
    acc = attend_block(acc, q, k[:, 5:], v[:, 5:], KeySelection.every_key(6), kernel)
    ref_out, ref_lse = math_attention_lse(q, k, v)
    assert acc is not None and len(fa3_on_cpu) == 2
    assert torch.allclose(acc[0], ref_out, atol=1e-5) and torch.allclose(acc[1], ref_lse, atol=1e-5)
    a, b = kernel(q, k[:, :5], v[:, :5]), kernel(q, k[:, 5:], v[:, 5:])
    merged, lse = merge_partials(a[0].float(), a[1], *b)
    assert torch.allclose(merged, ref_out, atol=1e-5) and torch.allclose(lse, ref_lse, atol=1e-5)


def test_masked_keys_on_the_fa3_seam_equal_each_sample_alone(fa3_on_cpu) -> None:
    q, k, v = _qkv(2, 4, 9, seed=5)
    mask = torch.arange(9) < torch.tensor([[6], [3]])  # two different prefix lengths
    out = AttentionOp("fa3")(q, k, v, kv_mask=mask)
    for b, n in enumerate((6, 3)):
        ref, _ = math_attention_lse(q[b:b + 1], k[b:b + 1, :n], v[b:b + 1, :n])
        assert torch.allclose(out[b:b + 1], ref, atol=1e-5)
    assert sorted(fa3_on_cpu) == [(1, 4, 2, 16)] * 2  # one kernel call per sample


# ----------------------------------------------------------------------------------------------------------
# The roofline's count at the seam, which now carries key masks


def test_roofline_counts_masked_calls_by_their_real_keys() -> None:
    attn = AttentionOp()
    q, k, v = _qkv(2, 4, 9, seed=6)
    masks = [None, torch.ones(2, 9, dtype=torch.bool), torch.arange(9) < torch.tensor([[5], [5]]),
             torch.arange(9) < torch.tensor([[6], [3]])]

    class Model(torch.nn.Module):
        def forward(self) -> None:
            for mask in masks:
                attn(q, k, v) if mask is None else attn(q, k, v, kv_mask=mask)

    model = Model()
    tally = roofline.count_step_flops(model, attn, model)
    assert tally.attention_shapes == {(2, 4, 9, 2, 16): 2, (2, 4, 5, 2, 16): 1, (1, 4, 6, 2, 16): 1,
                                      (1, 4, 3, 2, 16): 1}
    assert tally.attention == 4 * 4 * 2 * 16 * (2 * 9 + 2 * 9 + 2 * 5 + 6 + 3)
    assert "local" not in vars(attn)
