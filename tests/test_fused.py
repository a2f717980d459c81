"""The lossless kernel-level transforms: the GEMM+GELU epilogue op, split and concatenated projections, and
the RoPE rewrite. Each keeps the function: fp32 outputs equal the untransformed model's (and diffusers')."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffserve.engine.optimize import compile_blocks, fuse_kernels
from diffserve.layers.fused import concat_linears, linear_gelu_tanh
from diffserve.layers.rope import apply_rope_interleaved
from tests.test_flux_transformer import _inputs as flux_inputs
from tests.test_flux_transformer import _pair as flux_pair
from tests.test_wan_transformer import T2V as WAN_TINY
from tests.test_wan_transformer import _inputs as wan_inputs
from tests.test_wan_transformer import _pair as wan_pair


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_linear_gelu_tanh_is_linear_then_tanh_gelu() -> None:
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(2, 5, 8, generator=g), torch.randn(12, 8, generator=g), torch.randn(12, generator=g)
    expected = F.gelu(F.linear(x, w, b), approximate="tanh")
    assert torch.equal(linear_gelu_tanh(x, w, b), expected)
    assert linear_gelu_tanh(x, w, b).shape == (2, 5, 12)
    # the exact (erf) GELU differs: the op is the tanh approximation on every device
    assert (linear_gelu_tanh(x, w, b) - F.gelu(F.linear(x, w, b))).abs().max() > 0
    compiled = torch.compile(lambda x: linear_gelu_tanh(x, w, b) * 2, fullgraph=True)
    assert torch.allclose(compiled(x), expected * 2, rtol=1e-6, atol=1e-6)


def test_flop_counter_counts_the_fused_op_as_its_gemm() -> None:
    from torch.utils.flop_counter import FlopCounterMode

    x, w, b = torch.randn(2, 5, 8), torch.randn(12, 8), torch.randn(12)
    with FlopCounterMode(display=False) as fused:
        linear_gelu_tanh(x, w, b)
    with FlopCounterMode(display=False) as plain:
        F.linear(x, w, b)
    assert fused.get_total_flops() == plain.get_total_flops() == 2 * 10 * 8 * 12


def test_concat_linears() -> None:
    parts = [torch.nn.Linear(6, n) for n in (4, 5)]
    x = torch.randn(3, 6)
    fused = concat_linears(*parts)
    assert torch.allclose(fused(x), torch.cat([p(x) for p in parts], -1), atol=1e-6)


def test_rope_is_the_pairwise_rotation_bit_for_bit() -> None:
    g = torch.Generator().manual_seed(0)
    angles = torch.randn(7, 4, generator=g)
    cos, sin = angles.cos().repeat_interleave(2, 1), angles.sin().repeat_interleave(2, 1)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(2, 7, 3, 8, generator=g).to(dtype)
        x0, x1 = x.float()[..., 0::2], x.float()[..., 1::2]
        c, s = cos[None, :, None, 0::2], sin[None, :, None, 0::2]
        expected = torch.stack([x0 * c - x1 * s, x1 * c + x0 * s], -1).flatten(-2).to(dtype)
        assert torch.equal(apply_rope_interleaved(x, cos, sin), expected)


def test_flux_fused_transforms_keep_the_output_eager_and_compiled() -> None:
    ref, ours = flux_pair(True)
    inp = flux_inputs(torch.float32)
    args = (inp["hidden_states"], inp["encoder_hidden_states"], inp["pooled_projections"], inp["timestep"],
            inp["img_ids"], inp["txt_ids"], inp["guidance"])
    with torch.no_grad():
        expected = ref(**inp, return_dict=False)[0]
        fuse_kernels(ours)
        block = ours.single_transformer_blocks[0]
        assert block.proj_out.pieces is not None and block.proj_out.pieces[1].bias is None
        assert block.proj_mlp.epilogue
        assert "to_q+to_k+to_v" in block.attn.fused and not hasattr(block.attn, "to_q")
        double = ours.transformer_blocks[0].attn
        assert set(double.fused) == {"to_q+to_k+to_v", "add_q_proj+add_k_proj+add_v_proj"}
        assert all(b.ff.net[0].proj.epilogue and b.ff_context.net[0].proj.epilogue for b in ours.transformer_blocks)
        eager = ours(*args)
        compile_blocks(ours)
        compiled = ours(*args)
    assert rel_err(eager, expected) < 1e-6
    assert rel_err(compiled, expected) < 1e-5


def test_wan_fused_transforms_keep_the_output_eager_and_compiled() -> None:
    ref, ours = wan_pair(WAN_TINY)
    inp = wan_inputs("t2v", WAN_TINY)
    args = (inp["hidden_states"], inp["timestep"], inp["encoder_hidden_states"], None)
    with torch.no_grad():
        expected = ref(**inp, return_dict=False)[0]
        fuse_kernels(ours)
        assert "to_q+to_k+to_v" in ours.blocks[0].attn1.fused and "to_k+to_v" in ours.blocks[0].attn2.fused
        assert not hasattr(ours.blocks[0].attn1, "to_q") and hasattr(ours.blocks[0].attn2, "to_q")
        assert ours.blocks[0].ffn.net[0].proj.epilogue
        eager = ours(*args)
        compile_blocks(ours)
        compiled = ours(*args)
    assert rel_err(eager, expected) < 1e-6
    assert rel_err(compiled, expected) < 1e-5


@pytest.mark.parametrize("repo_fixture", ["flux_dev_repo", "wan_t2v_repo"])
def test_engine_fuse_option(repo_fixture: str, request: pytest.FixtureRequest) -> None:
    """Off by default on the CPU; `fuse=True` applies both fusions and keeps the picture; the CLI flag too."""
    from diffserve import Engine
    from diffserve.cli import build_parser

    repo = str(request.getfixturevalue(repo_fixture))
    kw = dict(height=32, width=32, num_inference_steps=2, seed=0)
    if repo_fixture == "wan_t2v_repo":
        kw["num_frames"] = 5
    plain = Engine.from_pretrained(repo, dtype="fp32", device="cpu")
    fused = Engine.from_pretrained(repo, dtype="fp32", device="cpu", fuse=True)
    t_plain, t_fused = plain.pipeline.components.transformer, fused.pipeline.components.transformer
    assert not any(n.endswith("to_q+to_k+to_v") for n, _ in t_plain.named_modules())
    assert any(n.endswith("to_q+to_k+to_v") for n, _ in t_fused.named_modules())
    a, b = plain.generate("a red circle", **kw), fused.generate("a red circle", **kw)
    pa = np.asarray(a.images[0] if a.images else a.videos[0], dtype=int)
    pb = np.asarray(b.images[0] if b.images else b.videos[0], dtype=int)
    assert np.abs(pa - pb).max() <= 1
    args = build_parser().parse_args(["generate", "--model-path", repo, "--prompt", "x", "--no-fuse"])
    assert args.fuse is False
    assert build_parser().parse_args(["generate", "--model-path", repo, "--prompt", "x"]).fuse is None


def test_fusions_follow_compile_on_cuda_unless_set() -> None:
    from diffserve.config import EngineConfig

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert EngineConfig("m", device=cuda, compile=True).fusions_enabled
    assert not EngineConfig("m", device=cuda).fusions_enabled  # eager: measured slower for FLUX
    assert not EngineConfig("m", device=cpu, compile=True).fusions_enabled
    assert EngineConfig("m", device=cpu, fuse=True).fusions_enabled
    assert not EngineConfig("m", device=cuda, compile=True, fuse=False).fusions_enabled


def test_fa3_placeholder_module_is_not_fa3(tmp_path, monkeypatch) -> None:
    """PyPI's flash-attn-interface 0.0.1 is an empty module of FA3's name: the engine must not pick it."""
    import sys

    from diffserve.layers.attention import AttentionOp, fa3_available

    (tmp_path / "flash_attn_interface").mkdir()
    (tmp_path / "flash_attn_interface" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "flash_attn_interface", raising=False)
    assert not fa3_available()
    with pytest.raises(ValueError, match="FlashAttention 3"):
        AttentionOp("fa3")
