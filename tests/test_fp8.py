"""FP8 (`diffserve.layers.fp8`) on the CPU: the quantization math and its error bounds, `Fp8Linear` against
nn.Linear and against its dequantized reference, which layers `quantize_fp8` picks on tiny FLUX and Wan (plain
and fused), strict state_dict round trips, the FP8 attention math, and the one-line errors of the engine and
CLI paths (FP8 needs a CUDA GPU with compute capability 8.9+). SageAttention's backend checks are here too."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffserve.engine.optimize import fuse_kernels
from diffserve.errors import UserError
from diffserve.layers.attention import (
    AttentionOp,
    check_ring_backend,
    fa3_fp8_attention_lse,
    fused_kernel_fits,
    sage_attention,
)
from diffserve.layers.fp8 import (
    FP8,
    FP8_MAX,
    Fp8ConcatLinear,
    Fp8Linear,
    check_fp8,
    dequantize,
    fp8_attention_reference,
    fp8_linear_reference,
    fp8_targets,
    is_modulation,
    lse_shift,
    quantize_fp8,
    quantize_heads,
    quantize_rows,
    quantize_tensor,
    smooth_keys,
)
from diffserve.layers.linear import GeluLinear
from diffserve.models.dits.flux import FluxConfig, FluxTransformer
from diffserve.models.dits.wan import WanConfig, WanTransformer
from tests.test_flux_transformer import TINY as FLUX_TINY
from tests.test_flux_transformer import _inputs as flux_inputs
from tests.test_wan_transformer import T2V as WAN_TINY

# e4m3 rounds to nearest with 3 mantissa bits: a normal value is off by at most 2^-4 of itself, a subnormal
# (below 2^-6 in quantized units) by at most half the subnormal step 2^-9.
REL_ROUNDING = 2.0**-4
SUBNORMAL_HALF_STEP = 2.0**-10


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------------------
# The quantization math


def test_row_quantization_round_trip_within_e4m3_rounding() -> None:
    x = _randn(64, 96) * torch.logspace(-3, 2, 64)[:, None]  # rows of very different magnitudes
    x[3] = 0.0  # an all-zero row
    x8, scale = quantize_rows(x)
    assert x8.dtype == FP8 and scale.shape == (64, 1) and scale.dtype == torch.float32
    back = dequantize(x8, scale)
    assert torch.isfinite(back).all() and torch.equal(back[3], torch.zeros(96))
    bound = x.abs() * REL_ROUNDING + scale * SUBNORMAL_HALF_STEP
    assert ((back - x).abs() <= bound * (1 + 1e-6)).all()
    # without per-row scales the small rows would drown: their own error stays relative to themselves
    small = x[0]
    assert rel_err(back[0], small) < 0.05


def test_per_row_scales_map_each_row_max_to_448() -> None:
    x = _randn(8, 40, seed=1) * torch.arange(1, 9)[:, None]
    x8, scale = quantize_rows(x)
    amax = x.abs().amax(-1, keepdim=True)
    assert torch.allclose(scale, amax / FP8_MAX, rtol=0, atol=0)
    assert torch.equal(x8.float().abs().amax(-1), torch.full((8,), FP8_MAX))  # the max is exact in e4m3
    t8, t_scale = quantize_tensor(x)
    assert t_scale.shape == () and t_scale == x.abs().amax() / FP8_MAX
    assert t8.float().abs().max() == FP8_MAX
    assert (t8.float().abs().amax(-1) < FP8_MAX).sum() == 7  # other rows use less of the range


def test_head_quantization_is_per_sample_and_head() -> None:
    x = _randn(2, 10, 3, 16, seed=2) * torch.tensor([1.0, 10.0, 100.0])[None, None, :, None]
    x8, descale = quantize_heads(x)
    assert descale.shape == (2, 3) and descale.dtype == torch.float32
    assert torch.allclose(descale, x.abs().amax(dim=(1, 3)) / FP8_MAX)
    back = dequantize(x8, descale[:, None, :, None])
    assert ((back - x).abs() <= x.abs() * REL_ROUNDING + descale[:, None, :, None] * SUBNORMAL_HALF_STEP + 1e-9).all()


# ----------------------------------------------------------------------------------------------------------
# Fp8Linear


@pytest.mark.parametrize("granularity", ["row", "tensor"])
def test_fp8_linear_matches_linear_within_bound(granularity: str) -> None:
    torch.manual_seed(0)
    lin = nn.Linear(96, 80)
    x = torch.randn(2, 33, 96)
    q = Fp8Linear.from_linear(lin, granularity=granularity)
    assert q.weight.dtype == FP8 and q.weight_scale.shape == ((80,) if granularity == "row" else ())
    with torch.no_grad():
        got, expected = q(x), lin(x)
        reference = fp8_linear_reference(x, q.weight, q.weight_scale, q.bias, granularity)
    assert got.shape == (2, 33, 80) and got.dtype == torch.float32
    # torch._scaled_mm computes exactly the dequantized product (float32 out, summation order aside)
    assert torch.allclose(got, reference, rtol=1e-5, atol=1e-5)
    # against the full-precision layer: two e4m3 roundings of <= 2^-4 each, averaged over 96 products
    assert rel_err(got, expected) < 0.04


def test_fp8_linear_bf16_output_and_gelu() -> None:
    torch.manual_seed(1)
    lin = GeluLinear(64, 128, approximate="tanh").to(torch.bfloat16)
    q = Fp8Linear.from_linear(lin, activation="gelu_tanh")
    x = torch.randn(40, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        got, expected = q(x), lin(x)
    assert got.dtype == torch.bfloat16 and q.bias.dtype == torch.bfloat16
    assert rel_err(got, expected) < 0.05


def test_fp8_concat_linear_is_one_gemm_over_the_concatenation() -> None:
    from diffserve.layers.linear import ConcatLinear

    torch.manual_seed(2)
    cat = ConcatLinear((32, 64), 48)
    a, b = torch.randn(5, 32), torch.randn(5, 64)
    q = Fp8ConcatLinear(96, 48)
    w8, scale = quantize_rows(cat.weight.detach())
    q.weight.copy_(w8)
    q.weight_scale.copy_(scale[:, 0])
    q.bias = cat.bias.detach().clone()
    q.out_dtype = torch.float32
    with torch.no_grad():
        assert rel_err(q(a, b), cat(a, b)) < 0.04


def test_fp8_linear_traces_without_graph_breaks() -> None:
    torch.manual_seed(3)
    q = Fp8Linear.from_linear(nn.Linear(32, 48))
    x = torch.randn(7, 32)
    compiled = torch.compile(q, fullgraph=True, backend="eager")
    with torch.no_grad():
        assert torch.equal(compiled(x), q(x))


# ----------------------------------------------------------------------------------------------------------
# The transform on tiny FLUX and Wan


@pytest.fixture(scope="module")
def flux_tiny() -> FluxTransformer:
    torch.manual_seed(0)
    model = FluxTransformer(FluxConfig(**FLUX_TINY, guidance_embeds=True)).eval()
    with torch.no_grad():
        for p in model.parameters():  # default init leaves the heads near zero; make every path matter
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.fixture(scope="module")
def flux_reference(flux_tiny: FluxTransformer) -> torch.Tensor:
    return _flux_forward(flux_tiny)


def _flux_expected(fused: bool) -> set[str]:
    double = ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "attn.to_out.0",
              "attn.to_add_out"]
    double += (["attn.fused.to_q+to_k+to_v", "attn.fused.add_q_proj+add_k_proj+add_v_proj"] if fused else
               ["attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"])
    single = ["proj_mlp"] + (["proj_out.pieces.0", "proj_out.pieces.1", "attn.fused.to_q+to_k+to_v"] if fused else
                             ["proj_out", "attn.to_q", "attn.to_k", "attn.to_v"])
    return ({f"transformer_blocks.{i}.{n}" for i in range(2) for n in double}
            | {f"single_transformer_blocks.{i}.{n}" for i in range(2) for n in single})


def _clone_flux(model: FluxTransformer) -> FluxTransformer:
    with torch.device("meta"):
        twin = FluxTransformer(model.cfg)
    twin.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, strict=True, assign=True)
    return twin.eval()


def _flux_forward(model: FluxTransformer) -> torch.Tensor:
    inp = flux_inputs(torch.float32)
    with torch.no_grad():
        return model(inp["hidden_states"], inp["encoder_hidden_states"], inp["pooled_projections"],
                     inp["timestep"], inp["img_ids"], inp["txt_ids"], inp["guidance"])


def test_transform_picks_the_block_gemms_of_flux(flux_tiny: FluxTransformer, flux_reference: torch.Tensor) -> None:
    model = _clone_flux(flux_tiny)
    assert set(fp8_targets(model)) == _flux_expected(fused=False)
    expected = _flux_expected(fused=False)
    assert quantize_fp8(model) == len(expected)
    kinds = {n: type(m).__name__ for n, m in model.named_modules()}
    assert all(kinds[n] in ("Fp8Linear", "Fp8ConcatLinear") for n in expected)
    # kept in full precision: modulation, embedders, the output head
    for kept in ("transformer_blocks.0.norm1.linear", "single_transformer_blocks.1.norm.linear", "x_embedder",
                 "context_embedder", "proj_out", "norm_out.linear"):
        assert kinds[kept] == "Linear", kept
    assert model.single_transformer_blocks[0].proj_mlp.activation == "gelu_tanh"
    assert fp8_targets(model) == []  # a second run finds nothing left to do
    assert rel_err(_flux_forward(model), flux_reference) < 0.1


def test_transform_composes_with_fused_projections(flux_tiny: FluxTransformer, flux_reference: torch.Tensor) -> None:
    model = _clone_flux(flux_tiny)
    fuse_kernels(model)
    assert set(fp8_targets(model)) == _flux_expected(fused=True)
    quantize_fp8(model)
    block = model.single_transformer_blocks[0]
    assert isinstance(block.attn.fused["to_q+to_k+to_v"], Fp8Linear)
    assert all(isinstance(p, Fp8Linear) for p in block.proj_out.pieces)
    assert rel_err(_flux_forward(model), flux_reference) < 0.1


def test_state_dict_round_trip_is_strict(flux_tiny: FluxTransformer) -> None:
    model = _clone_flux(flux_tiny)
    fuse_kernels(model)
    quantize_fp8(model)
    sd = model.state_dict()
    key = "single_transformer_blocks.0.attn.fused.to_q+to_k+to_v"
    assert sd[f"{key}.weight"].dtype == FP8 and sd[f"{key}.weight_scale"].dtype == torch.float32
    twin = _clone_flux(flux_tiny)
    fuse_kernels(twin)
    quantize_fp8(twin)
    twin.load_state_dict(sd, strict=True)
    assert torch.equal(_flux_forward(twin), _flux_forward(model))
    del sd[f"{key}.weight_scale"]
    with pytest.raises(RuntimeError, match="weight_scale"):
        twin.load_state_dict(sd, strict=True)


def test_transform_on_wan_and_alignment() -> None:
    torch.manual_seed(0)
    model = WanTransformer(WanConfig(**WAN_TINY)).eval()
    # the tiny Wan is 24 wide: not a multiple of cuBLASLt's 16, so nothing qualifies at the default rule
    assert fp8_targets(model) == []
    names = set(fp8_targets(model, min_align=8))
    per_block = {"attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                 "attn2.to_v", "attn2.to_out.0", "ffn.net.0.proj", "ffn.net.2"}
    assert names == {f"blocks.{i}.{n}" for i in range(2) for n in per_block}
    fuse_kernels(model)
    fused = set(fp8_targets(model, min_align=8))
    assert "blocks.0.attn1.fused.to_q+to_k+to_v" in fused and "blocks.0.attn1.to_q" not in fused
    assert quantize_fp8(model, min_align=8) == len(fused)
    assert type(model.proj_out) is nn.Linear and type(model.condition_embedder.time_proj) is nn.Linear


def test_modulation_rule() -> None:
    for path in ("norm1.linear", "norm1_context.linear", "norm.linear", "img_mod.1", "txt_mod.1"):
        assert is_modulation(path), path
    for path in ("attn.to_q", "ff.net.2", "proj_mlp", "attn.fused.to_q+to_k+to_v", "ffn.net.0.proj"):
        assert not is_modulation(path), path


def test_unmerged_lora_adapters_are_refused(flux_tiny: FluxTransformer) -> None:
    from diffserve.lora.targets import AdaptedLayer

    class Wrapped(AdaptedLayer):
        def __init__(self, base: nn.Module) -> None:
            super().__init__()
            self.base = base

    model = _clone_flux(flux_tiny)
    attn = model.transformer_blocks[0].attn
    attn.to_q = Wrapped(attn.to_q)
    with pytest.raises(ValueError, match="unmerged LoRA"):
        quantize_fp8(model)


# ----------------------------------------------------------------------------------------------------------
# FP8 attention math


def _exact_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / math.sqrt(q.shape[-1])
    lse = torch.logsumexp(scores, -1)
    return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(scores, -1), v.double()), lse


def test_key_centring_keeps_softmax_and_shifts_lse_exactly() -> None:
    q, k, v = _randn(2, 9, 3, 16, seed=4).double(), _randn(2, 11, 3, 16, seed=5).double() + 3.0, \
        _randn(2, 11, 3, 16, seed=6).double()
    ks, mean = smooth_keys(k)
    out, lse = _exact_attention(q, k, v)
    out_s, lse_s = _exact_attention(q, ks, v)
    assert torch.allclose(out, out_s, atol=1e-12)
    assert torch.allclose(lse, lse_s + lse_shift(q, mean).double(), atol=1e-5)


def test_fp8_attention_math_within_bound() -> None:
    # keys with a large shared offset, as DiT keys often have: centring keeps e4m3's range for what differs
    q = _randn(2, 64, 2, 32, seed=7)
    k = _randn(2, 80, 2, 32, seed=8) + 4.0 * _randn(1, 1, 2, 32, seed=9)
    v = _randn(2, 80, 2, 32, seed=10)
    out, lse = fp8_attention_reference(q, k, v)
    exact_out, exact_lse = _exact_attention(q, k, v)
    assert rel_err(out, exact_out) < 0.06
    assert (lse.double() - exact_lse).abs().max() < 0.1


def test_fp8_attention_op_traces_with_fake_tensors() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q, k, v = (torch.empty(2, 10, 3, 64, dtype=torch.bfloat16) for _ in range(3))
        out, lse = fa3_fp8_attention_lse(q, k, v)
        assert out.shape == (2, 10, 3, 64) and out.dtype == torch.bfloat16
        assert lse.shape == (2, 3, 10) and lse.dtype == torch.float32
        assert sage_attention(q, k, v).shape == (2, 10, 3, 64)


# ----------------------------------------------------------------------------------------------------------
# Backends and errors


def test_attention_backend_rules() -> None:
    with pytest.raises(ValueError, match="needs attention backend 'fa3'"):
        AttentionOp("sdpa", fp8=True)
    from diffserve.layers.attention import sage_available

    if not sage_available():
        with pytest.raises(ValueError, match="pip install sageattention"):
            AttentionOp("sage")
    cpu = torch.empty(1, 4, 2, 64)
    assert not fused_kernel_fits("sage", cpu)
    with pytest.raises(UserError, match="log-sum-exp"):
        check_ring_backend("sage")
    with pytest.raises(UserError, match="FP8 attention"):
        check_ring_backend("fa3", fp8=True)
    check_ring_backend("fa3")


def test_fp8_needs_an_fp8_gpu() -> None:
    check_fp8("off", torch.device("cpu"), torch.float32)
    with pytest.raises(UserError, match="needs a CUDA GPU with FP8"):
        check_fp8("linear", torch.device("cpu"), torch.float32)
    with pytest.raises(UserError, match="accepted: off, linear, attention, all"):
        check_fp8("int8", torch.device("cpu"), torch.float32)


def test_fp8_refusals_on_a_gpu_with_fp8(monkeypatch) -> None:
    """The rest of the rules, past the device check (a GPU with FP8 pretended)."""
    from diffserve.layers import fp8

    monkeypatch.setattr(fp8, "fp8_supported", lambda device: True)
    cuda = torch.device("cuda")
    fp8.check_fp8("all", cuda, torch.bfloat16, "fa3")
    fp8.check_fp8("linear", cuda, torch.bfloat16, "cudnn", dit_offload=0.0)
    fp8.check_fp8("attention", cuda, torch.bfloat16, "fa3", dit_offload=1.0)
    for args, match in ((("linear", cuda, torch.float16), "--dtype bf16"),
                        (("attention", cuda, torch.bfloat16, "cudnn"), "--attention-backend fa3"),
                        (("linear", cuda, torch.bfloat16, "fa3", "unmerged"), "--lora-mode merged"),
                        (("all", cuda, torch.bfloat16, "fa3", "merged", 0.5), "--dit-cpu-offload")):
        with pytest.raises(UserError, match=match):
            fp8.check_fp8(*args)


def test_engine_and_cli_refuse_fp8_on_cpu(flux_dev_repo: Path, capsys) -> None:
    from diffserve.cli import main
    from diffserve.engine.entry import Engine

    with pytest.raises(UserError, match="compute capability 8.9"):
        Engine.from_pretrained(str(flux_dev_repo), device="cpu", fp8="all")
    code = main(["generate", "--model-path", str(flux_dev_repo), "--prompt", "x", "--device", "cpu",
                 "--fp8", "linear", "--output-path", "/nonexistent/never.png"])
    err = capsys.readouterr().err
    assert code == 2 and "--fp8 linear needs a CUDA GPU" in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.strip()]) == 1
    from diffserve.layers.attention import sage_available

    if not sage_available():  # a missing kernel library is one line too
        code = main(["generate", "--model-path", str(flux_dev_repo), "--prompt", "x", "--device", "cpu",
                     "--attention-backend", "sage", "--output-path", "/nonexistent/never.png"])
        err = capsys.readouterr().err
        assert code == 2 and "pip install sageattention" in err and "Traceback" not in err


def test_gelu_matches_what_the_layer_replaces() -> None:
    torch.manual_seed(4)
    lin = GeluLinear(32, 32, approximate="none")
    q = Fp8Linear.from_linear(lin, activation="gelu")
    x = torch.randn(6, 32)
    with torch.no_grad():
        expected = F.gelu(F.linear(x, lin.weight, lin.bias))
        assert rel_err(q(x), expected) < 0.05


def test_bench_engine_names_take_fp8() -> None:
    from benchmarks.bench_e2e import parse_engine

    assert parse_engine("diffserve+compile+fp8[fa3]").fp8 == "linear"
    assert parse_engine("diffserve+compile+fp8attn[fa3]").fp8 == "attention"
    assert parse_engine("diffserve+fp8+fp8attn+compile[fa3]").fp8 == "all"
    assert parse_engine("diffserve+compile[sage]").fp8 == "off"
    with pytest.raises(SystemExit):
        parse_engine("diffusers+fp8")


@pytest.mark.parametrize("fixture", ["qwen-image", "hunyuan-video"])
def test_modulation_layers_of_qwen_and_hunyuan_stay(fixture: str) -> None:
    """The rule keeps Qwen-Image's img_mod/txt_mod and HunyuanVideo's AdaNorm linears out (meta-device build)."""
    import dataclasses

    from diffserve.models.dits.hunyuan_video import HunyuanVideoConfig, HunyuanVideoTransformer
    from diffserve.models.dits.qwen_image import QwenImageConfig, QwenImageTransformer
    from diffserve.testing.fixtures import component_plan

    cfg_cls, model_cls = ((QwenImageConfig, QwenImageTransformer) if fixture == "qwen-image"
                          else (HunyuanVideoConfig, HunyuanVideoTransformer))
    raw = next(c for c in component_plan(fixture, "tiny") if c.name == "transformer").config
    fields = {f.name for f in dataclasses.fields(cfg_cls)}
    with torch.device("meta"):
        model = model_cls(cfg_cls(**{k: v for k, v in raw.items() if k in fields}))
    picked = {n.split(".", 2)[2] for n in fp8_targets(model, min_align=8)}
    linears = {n.split(".", 2)[2] for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and n.split(".")[0] in type(model).REPEATED_BLOCKS}
    kept = {"img_mod.1", "txt_mod.1"} if fixture == "qwen-image" else {"norm.linear", "norm1.linear",
                                                                        "norm1_context.linear"}
    assert linears - picked == kept
    assert {"attn.to_q", "attn.to_out.0"} <= picked
