"""Our Wan2.1 transformer against diffusers' WanTransformer3DModel on the same weights and inputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import WanTransformer3DModel

import diffserve.testing
from diffserve.models.dits.wan import WanConfig, WanTransformer

# diffusers' own tiny Wan test configs (tiny_test_configs.md); I2V adds separate image K/V (as the real
# I2V-14B does) and FLF2V the learned image position embedding.
T2V = {"patch_size": (1, 2, 2), "num_attention_heads": 2, "attention_head_dim": 12, "in_channels": 16,
       "out_channels": 16, "text_dim": 32, "freq_dim": 256, "ffn_dim": 32, "num_layers": 2,
       "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "rope_max_seq_len": 32}
I2V = {**T2V, "in_channels": 36, "image_dim": 4, "added_kv_proj_dim": 24}
I2V_JOINT = {**T2V, "in_channels": 36, "image_dim": 4}  # image tokens share the text K/V (diffusers' fixture)
FLF2V = {**I2V, "pos_embed_seq_len": 2 * 17}

# diffusers' I2V attention splits [image, text] at `len - 512`, so the reference needs 512 text tokens.
TEXT_LEN = {"t2v": 12, "i2v": 512, "i2v_joint": 12, "flf2v": 512}
CONFIGS = {"t2v": T2V, "i2v": I2V, "i2v_joint": I2V_JOINT, "flf2v": FLF2V}
REAL = ("Wan2.1-T2V-1.3B-Diffusers", "Wan2.1-T2V-14B-Diffusers", "Wan2.1-I2V-14B-480P-Diffusers")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _pair(cfg: dict) -> tuple[WanTransformer3DModel, WanTransformer]:
    torch.manual_seed(0)
    ref = WanTransformer3DModel(**cfg).eval()
    # default init leaves the modulation, norms and output head near trivial; perturb so every path matters
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    with torch.device("meta"):
        ours = WanTransformer(WanConfig(**cfg))
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)
    return ref, ours.eval()


def _inputs(name: str, cfg: dict, batch: int = 2, frames: int = 3, h: int = 8, w: int = 12) -> dict:
    g = torch.Generator().manual_seed(1)
    inp = {
        "hidden_states": torch.randn(batch, cfg["in_channels"], frames, h, w, generator=g),
        "timestep": torch.tensor([999.0, 321.5])[:batch],
        "encoder_hidden_states": torch.randn(batch, TEXT_LEN[name], cfg["text_dim"], generator=g),
        "encoder_hidden_states_image": None,
    }
    if "image_dim" in cfg:
        rows = 2 * batch if cfg.get("pos_embed_seq_len") else batch  # FLF2V: first and last frame per sample
        inp["encoder_hidden_states_image"] = torch.randn(rows, 17, cfg["image_dim"], generator=g)
    return inp


def _compare(ref: WanTransformer3DModel, ours: WanTransformer, inp: dict,
             dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    if dtype is not None:
        inp = {k: (v.to(dtype) if v is not None and k != "timestep" else v) for k, v in inp.items()}
    with torch.no_grad():
        expected = ref(**inp, return_dict=False)[0]
        got = ours(inp["hidden_states"], inp["timestep"], inp["encoder_hidden_states"],
                   inp["encoder_hidden_states_image"])
    return got, expected


@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_matches_diffusers_fp32(name: str) -> None:
    cfg = CONFIGS[name]
    ref, ours = _pair(cfg)
    inp = _inputs(name, cfg)
    got, expected = _compare(ref, ours, inp)
    err = rel_err(got, expected)
    print(f"Wan transformer fp32 relative error ({name}): {err:.3e}")
    assert got.shape == expected.shape == (2, cfg["out_channels"], 3, 8, 12)
    assert expected.abs().mean() > 1e-3
    assert err <= 1e-5
    if inp["encoder_hidden_states_image"] is not None:  # the image path must matter
        no_img = ours(inp["hidden_states"], inp["timestep"], inp["encoder_hidden_states"])
        assert rel_err(no_img, expected) > 1e-3


def test_forward_patch_t2_and_single_sample() -> None:
    cfg = {**T2V, "patch_size": (2, 2, 2)}
    ref, ours = _pair(cfg)
    inp = _inputs("t2v", cfg, batch=1, frames=4, h=6, w=4)
    got, expected = _compare(ref, ours, inp)
    err = rel_err(got, expected)
    print(f"Wan transformer fp32 relative error (patch 2x2x2, B=1): {err:.3e}")
    assert err <= 1e-5


def _to_bf16(ref: WanTransformer3DModel, keep_fp32: bool) -> WanTransformer3DModel:
    """The reference in bf16 as diffusers serves it: `from_pretrained(torch_dtype=bf16)` leaves the RoPE
    tables in fp32 and, with `keep_fp32`, the `_keep_in_fp32_modules` parameters too. (A plain
    `.to(bf16)` would also round diffusers' RoPE tables to bf16; ours are always fp32.)"""
    cos, sin = ref.rope.freqs_cos.clone(), ref.rope.freqs_sin.clone()
    ref = ref.to(torch.bfloat16)
    ref.rope.freqs_cos, ref.rope.freqs_sin = cos, sin
    if keep_fp32:
        for name, p in ref.named_parameters():
            if WanTransformer.keeps_fp32(name):
                p.data = p.data.float()
    return ref


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("keep_fp32", [False, True], ids=["pure_bf16", "mixed_fp32"])
@pytest.mark.parametrize("name", ["t2v", "i2v"])
def test_forward_matches_diffusers_bf16(name: str, keep_fp32: bool) -> None:
    cfg = CONFIGS[name]
    ref, ours = _pair(cfg)
    ref = _to_bf16(ref, keep_fp32)
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)
    assert {n: p.dtype for n, p in ours.named_parameters()} == {n: p.dtype for n, p in ref.named_parameters()}
    got, expected = _compare(ref, ours, _inputs(name, cfg), torch.bfloat16)
    err = rel_err(got, expected)
    print(f"Wan transformer bf16 relative error ({name}, {'mixed fp32' if keep_fp32 else 'pure'}): {err:.3e}")
    assert got.dtype == torch.bfloat16
    # T2V runs the same ops on the same tensors as diffusers, so bf16 agrees to the bit. I2V differs by
    # GEMM rounding only: diffusers projects the text and image tokens as non-contiguous slices of one
    # [image, text] tensor, we project two contiguous tensors.
    assert err <= (1e-6 if name == "t2v" else 2e-2)


def test_keeps_fp32_matches_diffusers() -> None:
    names = [n for n, _ in WanTransformer3DModel(**I2V).named_parameters()]
    patterns = WanTransformer3DModel._keep_in_fp32_modules
    for n in names:
        assert WanTransformer.keeps_fp32(n) == any(m in n.split(".") for m in patterns), n


def test_strict_loading_rejects_bad_state_dicts() -> None:
    ref, _ = _pair(I2V)
    good = ref.state_dict()

    def load(sd: dict) -> None:
        with torch.device("meta"):
            ours = WanTransformer(WanConfig(**I2V))
        ours.load_state_dict(sd, strict=True, assign=True)

    load(good)
    missing = {k: v for k, v in good.items() if k != "blocks.1.attn2.norm_added_k.weight"}
    with pytest.raises(RuntimeError, match="Missing key"):
        load(missing)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        load({**good, "blocks.0.attn2.norm_added_q.weight": torch.ones(24)})
    wrong = dict(good)
    wrong["condition_embedder.image_embedder.ff.net.2.weight"] = torch.zeros(24, 5)
    with pytest.raises(RuntimeError, match="size mismatch"):
        load(wrong)
    # the unused tensor the published I2V checkpoint carries is dropped before a strict load
    load(WanTransformer.drop_unused_keys({**good, "blocks.0.attn2.norm_added_q.weight": torch.ones(24)}))


def test_no_checkpoint_buffers_and_meta_construction() -> None:
    with torch.device("meta"):
        ours = WanTransformer(WanConfig(**I2V))
    assert list(ours.buffers()) == []
    ref = WanTransformer3DModel(**I2V)
    assert set(ours.state_dict()) == set(ref.state_dict())
    assert all(p.is_meta for p in ours.parameters())


@pytest.mark.parametrize("repo", REAL)
def test_real_configs_param_count(repo: str) -> None:
    path = Path(diffserve.testing.__file__).parent / "model_configs" / repo / "transformer" / "config.json"
    cfg = WanConfig.from_json(path)
    raw = WanTransformer3DModel.load_config(str(path.parent))
    with torch.device("meta"):
        ours = WanTransformer(cfg)
        ref = WanTransformer3DModel.from_config(raw)
    ref_sd, ours_sd = ref.state_dict(), ours.state_dict()
    assert set(ours_sd) == set(ref_sd)
    assert all(ours_sd[k].shape == ref_sd[k].shape for k in ref_sd)
    n = sum(p.numel() for p in ours.parameters())
    assert n == sum(p.numel() for p in ref.parameters())
    print(f"{repo}: {n / 1e9:.3f} B parameters")


def test_config_rejects_unknown_keys() -> None:
    with pytest.raises(ValueError, match="unknown config keys"):
        WanConfig.from_dict({**T2V, "expand_timesteps": True})
    with pytest.raises(ValueError, match="qk_norm"):
        WanConfig.from_dict({**T2V, "qk_norm": "layer_norm"})
    assert WanConfig.from_dict({**T2V, "_class_name": "WanTransformer3DModel"}).patch_size == (1, 2, 2)


def test_rejects_bad_inputs() -> None:
    _, ours = _pair(T2V)
    x, ctx = torch.randn(1, 16, 2, 8, 8), torch.randn(1, 4, 32)
    with pytest.raises(ValueError, match="divisible"):
        ours(torch.randn(1, 16, 2, 7, 8), torch.tensor([1.0]), ctx)
    with pytest.raises(ValueError, match=r"timestep must be \(B,\)"):
        ours(x, torch.ones(1, 8), ctx)
    with pytest.raises(ValueError, match="rope_max_seq_len"):
        ours(torch.randn(1, 16, 33, 2, 2), torch.tensor([1.0]), ctx)
    with pytest.raises(ValueError, match="image_dim"):
        ours(x, torch.tensor([1.0]), ctx, torch.randn(1, 3, 4))
