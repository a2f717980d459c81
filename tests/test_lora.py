"""LoRA (`diffserve.lora`) on the tiny FLUX, Wan and Qwen-Image repos (fp32, CPU).

Random LoRAs are built with peft on diffusers' own transformers (every Linear targeted, alpha != rank,
an alpha_pattern entry) and saved with diffusers' `save_lora_weights`; diffusers' pipelines load them with
`load_lora_weights` and are the reference. kohya (FLUX) and ComfyUI (Wan) files are written from the same
tensors by small converters below and must give the same weights as their diffusers-format twins.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    FluxPipeline,
    FluxTransformer2DModel,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
    WanPipeline,
    WanTransformer3DModel,
)
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from diffserve import Engine, GenerationRequest
from diffserve.errors import InvalidRequestError
from diffserve.lora import LoraError, LoraSet, LoraSpec
from diffserve.lora.formats import load_lora
from diffserve.lora.merge import merge_loras
from diffserve.pipelines.base import PipelineState
from diffserve.testing.fixtures import fixture_path

PROMPT = "a red fox in the snow"
FLUX_P = dict(height=32, width=32, num_inference_steps=2, guidance_scale=3.5, max_sequence_length=16)
WAN_P = dict(height=16, width=16, num_frames=5, num_inference_steps=2, guidance_scale=5.0,
             negative_prompt="blurry", max_sequence_length=16)
QWEN_P = dict(height=32, width=32, num_inference_steps=2)
SEED = 7
TOL = 1 / 255


# ----------------------------------------------------------------------------------------------------------
# Building LoRA files


def peft_lora(model: torch.nn.Module, seed: int, rank: int, alpha: float,
              alpha_pattern: dict[str, float] | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """A random LoRA on every Linear of a diffusers transformer, defined by peft: (state dict with the
    `transformer.` prefix, peft config dict for diffusers' metadata). Values N(0, 0.1), seeded."""
    targets = sorted(n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear))
    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, alpha_pattern=alpha_pattern or {},
                     init_lora_weights=False)
    model.add_adapter(cfg, adapter_name="build")
    shapes = get_peft_model_state_dict(model, adapter_name="build")
    g = torch.Generator().manual_seed(seed)
    state = {f"transformer.{k}": torch.randn(v.shape, generator=g) * 0.1 for k, v in sorted(shapes.items())}
    return state, cfg.to_dict()


def save_diffusers(pipeline_cls, folder: Path, state: dict[str, torch.Tensor], cfg: dict) -> Path:
    """Write a diffusers-format LoRA folder (pytorch_lora_weights.safetensors with the adapter metadata)."""
    layers = {k.removeprefix("transformer."): v for k, v in state.items()}
    pipeline_cls.save_lora_weights(folder, transformer_lora_layers=layers, transformer_lora_adapter_metadata=cfg)
    return folder


def _pair(state: dict[str, torch.Tensor], module: str) -> tuple[torch.Tensor, torch.Tensor]:
    return state[f"transformer.{module}.lora_A.weight"], state[f"transformer.{module}.lora_B.weight"]


FLUX_DOUBLE = {"img_attn_proj": "attn.to_out.0", "img_mlp_0": "ff.net.0.proj", "img_mlp_2": "ff.net.2",
               "img_mod_lin": "norm1.linear", "txt_attn_proj": "attn.to_add_out",
               "txt_mlp_0": "ff_context.net.0.proj", "txt_mlp_2": "ff_context.net.2",
               "txt_mod_lin": "norm1_context.linear"}
FLUX_TOP = {"img_in": "x_embedder", "txt_in": "context_embedder",
            "time_in_in_layer": "time_text_embed.timestep_embedder.linear_1",
            "time_in_out_layer": "time_text_embed.timestep_embedder.linear_2",
            "vector_in_in_layer": "time_text_embed.text_embedder.linear_1",
            "vector_in_out_layer": "time_text_embed.text_embedder.linear_2",
            "guidance_in_in_layer": "time_text_embed.guidance_embedder.linear_1",
            "guidance_in_out_layer": "time_text_embed.guidance_embedder.linear_2",
            "final_layer_linear": "proj_out"}


def kohya_flux_twins(model: FluxTransformer2DModel, seed: int, rank: int = 4,
                     alpha: float = 2.0) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A random kohya-format FLUX LoRA in BFL's names (fused img/txt qkv and single-block linear1 with one
    shared down matrix, `.alpha` tensors, the final AdaLN in (shift, scale) order) and its diffusers-format
    twin (down copied to each part, up split by rows, alpha folded in) with the same function."""
    g = torch.Generator().manual_seed(seed)
    shapes = {n: (m.in_features, m.out_features) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    kohya: dict[str, torch.Tensor] = {}
    twin: dict[str, torch.Tensor] = {}

    def add(stem: str, parts: list[str], swap: bool = False) -> None:
        n_in = shapes[parts[0]][0]
        sizes = [shapes[p][1] for p in parts]
        down = torch.randn(rank, n_in, generator=g) * 0.1
        up = torch.randn(sum(sizes), rank, generator=g) * 0.1
        kohya.update({f"lora_unet_{stem}.lora_down.weight": down, f"lora_unet_{stem}.lora_up.weight": up,
                      f"lora_unet_{stem}.alpha": torch.tensor(alpha)})
        ours = torch.cat(up.chunk(2)[::-1]) if swap else up
        for part, rows in zip(parts, ours.split(sizes), strict=True):
            twin[f"transformer.{part}.lora_A.weight"] = down * (alpha / rank)
            twin[f"transformer.{part}.lora_B.weight"] = rows.clone()

    for i in range(len(model.transformer_blocks)):
        p = f"transformer_blocks.{i}."
        add(f"double_blocks_{i}_img_attn_qkv", [p + "attn.to_q", p + "attn.to_k", p + "attn.to_v"])
        add(f"double_blocks_{i}_txt_attn_qkv", [p + "attn.add_q_proj", p + "attn.add_k_proj", p + "attn.add_v_proj"])
        for theirs, mine in FLUX_DOUBLE.items():
            add(f"double_blocks_{i}_{theirs}", [p + mine])
    for i in range(len(model.single_transformer_blocks)):
        p = f"single_transformer_blocks.{i}."
        add(f"single_blocks_{i}_linear1", [p + "attn.to_q", p + "attn.to_k", p + "attn.to_v", p + "proj_mlp"])
        add(f"single_blocks_{i}_linear2", [p + "proj_out"])
        add(f"single_blocks_{i}_modulation_lin", [p + "norm.linear"])
    for theirs, mine in FLUX_TOP.items():
        add(theirs, [mine])
    add("final_layer_adaLN_modulation_1", ["norm_out.linear"], swap=True)
    kohya["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.zeros(rank, 32)  # skipped
    return kohya, twin


WAN_ORIGINAL = {"attn1.to_q": "self_attn.q", "attn1.to_k": "self_attn.k", "attn1.to_v": "self_attn.v",
                "attn1.to_out.0": "self_attn.o", "attn2.to_q": "cross_attn.q", "attn2.to_k": "cross_attn.k",
                "attn2.to_v": "cross_attn.v", "attn2.to_out.0": "cross_attn.o", "ffn.net.0.proj": "ffn.0",
                "ffn.net.2": "ffn.2"}
WAN_TOP = {"condition_embedder.time_proj": "time_projection.1", "proj_out": "head.head",
           "condition_embedder.text_embedder.linear_1": "text_embedding.0",
           "condition_embedder.text_embedder.linear_2": "text_embedding.2",
           "condition_embedder.time_embedder.linear_1": "time_embedding.0",
           "condition_embedder.time_embedder.linear_2": "time_embedding.2"}


def comfyui_wan(state: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """The ComfyUI layout of a diffusers-format Wan LoRA (`diffusion_model.blocks.0.self_attn.q.lora_down
    .weight`, `.alpha` = scaling * rank), plus a `.diff_b` bias update on one layer and an all-zero norm
    `.diff` (which readers skip)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        module, _, kind = key.removeprefix("transformer.").rpartition(".lora_")
        if module.startswith("blocks."):
            i, rest = module.removeprefix("blocks.").split(".", 1)
            theirs = f"blocks.{i}.{WAN_ORIGINAL[rest]}"
        else:
            theirs = WAN_TOP[module]
        role = "lora_down" if kind == "A.weight" else "lora_up"
        out[f"diffusion_model.{theirs}.{role}.weight"] = value
        if role == "lora_down":
            out[f"diffusion_model.{theirs}.alpha"] = torch.tensor(scaling * value.shape[0])
    out["diffusion_model.blocks.0.ffn.2.diff_b"] = torch.linspace(-0.1, 0.1, state[
        "transformer.blocks.0.ffn.net.2.lora_B.weight"].shape[0])
    out["diffusion_model.blocks.0.norm3.diff"] = torch.zeros(24)
    return out


# ----------------------------------------------------------------------------------------------------------
# Running


def pixels(engine: Engine, **params) -> np.ndarray:
    """The engine's float pixels (B, ..., 3) for one request, with the request's LoRA set active."""
    requests = [GenerationRequest(prompt=PROMPT, seed=SEED, **params)]
    engine.loras.activate(engine.batch_lora(requests))
    state = PipelineState(requests=requests, device=torch.device("cpu"), dtype=torch.float32)
    with torch.inference_mode():
        engine.pipeline(state)
    px = state.pixels
    return px.movedim(1, -1).numpy()  # type: ignore[union-attr]


def reference(pipe, adapters: dict[str, float], **params) -> np.ndarray:
    """diffusers' output with the named adapters at those weights (none: the base model)."""
    if adapters:
        pipe.enable_lora()
        pipe.set_adapters(list(adapters), list(adapters.values()))
    else:
        pipe.disable_lora()
    out = pipe(PROMPT, generator=torch.Generator().manual_seed(SEED), output_type="np", **params)
    return out.frames if hasattr(out, "frames") else out.images


def max_diff(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max())


def weights(engine: Engine) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in engine.pipeline.components.transformer.state_dict().items()}


# ----------------------------------------------------------------------------------------------------------
# FLUX


@pytest.fixture(scope="module")
def flux(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The FLUX repo, LoRA files a (rank 4, alpha 8, alpha_pattern to_k: 2), b (rank 2, alpha 2), a kohya
    file and its diffusers twin, and diffusers' reference images for base, a@0.8 and a@0.8 + b@0.5."""
    repo = fixture_path("flux-dev")
    tmp = tmp_path_factory.mktemp("flux-lora")
    model = FluxTransformer2DModel.from_pretrained(repo / "transformer")
    a = save_diffusers(FluxPipeline, tmp / "a", *peft_lora(model, 1, 4, 8.0, {"to_k": 2.0}))
    model = FluxTransformer2DModel.from_pretrained(repo / "transformer")
    b = save_diffusers(FluxPipeline, tmp / "b", *peft_lora(model, 2, 2, 2.0))
    kohya, twin = kohya_flux_twins(FluxTransformer2DModel.from_pretrained(repo / "transformer"), 3)
    save_file(kohya, tmp / "style_kohya.safetensors")
    save_file(twin, tmp / "style_twin.safetensors")
    pipe = FluxPipeline.from_pretrained(repo, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(a), adapter_name="a")
    pipe.load_lora_weights(str(b), adapter_name="b")
    refs = {"base": reference(pipe, {}, **FLUX_P), "a": reference(pipe, {"a": 0.8}, **FLUX_P),
            "ab": reference(pipe, {"a": 0.8, "b": 0.5}, **FLUX_P)}
    assert max_diff(refs["a"], refs["base"]) > 0.05 and max_diff(refs["ab"], refs["a"]) > 0.05  # LoRAs matter
    return {"repo": str(repo), "a": a, "b": b, "kohya": tmp / "style_kohya.safetensors",
            "twin": tmp / "style_twin.safetensors", "refs": refs}


@pytest.fixture(scope="module")
def flux_unmerged(flux: dict) -> Engine:
    """One engine with a@0.8 and b@0.5 as switchable adapters (the default set: both)."""
    return Engine.from_pretrained(flux["repo"], dtype="fp32", device="cpu", lora_mode="unmerged",
                                  loras=[(str(flux["a"]), 0.8), f"{flux['b']}:0.5"])


def test_flux_merged_matches_diffusers(flux: dict) -> None:
    engine = Engine.from_pretrained(flux["repo"], dtype="fp32", device="cpu", loras=[(str(flux["a"]), 0.8)])
    diff = max_diff(pixels(engine, **FLUX_P), flux["refs"]["a"])
    print(f"FLUX merged LoRA vs diffusers load_lora_weights: max pixel diff {diff * 255:.2e} / 255")
    assert diff <= TOL
    assert engine.list_loras()[0]["name"] == "a" and engine.list_loras()[0]["mode"] == "merged"


def test_flux_unmerged_switches_per_request(flux: dict, flux_unmerged: Engine) -> None:
    """One engine: the default set (a + b stacked), a alone, and none, each equal to diffusers."""
    engine, refs = flux_unmerged, flux["refs"]
    got = {"ab": pixels(engine, **FLUX_P), "a": pixels(engine, lora="a:0.8", **FLUX_P),
           "base": pixels(engine, lora=[], **FLUX_P), "ab again": pixels(engine, lora=[{"name": "b", "scale": 0.5},
                                                                                      "a:0.8"], **FLUX_P)}
    for name, px in got.items():
        diff = max_diff(px, refs[name.split()[0]])
        print(f"FLUX unmerged LoRA set {name!r} vs diffusers: max pixel diff {diff * 255:.2e} / 255")
        assert diff <= TOL
    base = Engine.from_pretrained(flux["repo"], dtype="fp32", device="cpu")
    assert np.array_equal(got["base"], pixels(base, **FLUX_P))  # no active adapter: the plain layers exactly
    assert engine.loras.default_set == LoraSet((("a", 0.8), ("b", 0.5)))
    # the set each result ran with is in its metadata (PNG text chunks, MP4 tags): the start-up set, or the
    # request's, and no entry without one
    results = engine.generate_batch([GenerationRequest(prompt=PROMPT, seed=SEED, **FLUX_P)])
    assert results[0].metadata["lora"] == "a:0.8,b:0.5"
    results = engine.generate_batch([GenerationRequest(prompt=PROMPT, seed=SEED, lora=[], **FLUX_P)])
    assert "lora" not in results[0].metadata


def test_flux_fused_merged_stack_matches_diffusers(flux: dict) -> None:
    """Two LoRAs merged before the kernel fusions (fused q/k/v, split single-block output, GELU epilogue)."""
    engine = Engine.from_pretrained(flux["repo"], dtype="fp32", device="cpu", fuse=True,
                                    loras=[(str(flux["a"]), 0.8), (str(flux["b"]), 0.5)])
    assert "to_q+to_k+to_v" in engine.pipeline.components.transformer.transformer_blocks[0].attn.fused
    diff = max_diff(pixels(engine, **FLUX_P), flux["refs"]["ab"])
    print(f"FLUX fused + merged a+b vs diffusers: max pixel diff {diff * 255:.2e} / 255")
    assert diff <= TOL


def test_flux_kohya_equals_its_diffusers_twin(flux: dict) -> None:
    """kohya's fused qkv / linear1 layouts with one shared down matrix, alphas and BFL's final-layer order:
    merged weights equal the twin's; unmerged on the fused model (one adapter block feeding q, k and v rows
    of the fused projection, and proj_mlp) equals merged."""
    merged = Engine.from_pretrained(flux["repo"], dtype="fp32", device="cpu", loras=[(str(flux["kohya"]), 0.7)])
    twin = Engine.from_pretrained(flux["repo"], dtype="fp32", device="cpu", loras=[(str(flux["twin"]), 0.7)])
    info = merged.list_loras()[0]
    assert info["layout"] == "kohya" and info["skipped_tensors"] == 1 and info["name"] == "style_kohya"
    wa, wb = weights(merged), weights(twin)
    assert wa.keys() == wb.keys()
    worst = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    print(f"FLUX kohya vs diffusers twin: max weight diff {worst:.2e}")
    assert worst < 1e-6
    unmerged = Engine.from_pretrained(flux["repo"], dtype="fp32", device="cpu", fuse=True, lora_mode="unmerged",
                                      loras=[(str(flux["kohya"]), 0.7)])
    x, y = pixels(unmerged, **FLUX_P), pixels(merged, **FLUX_P)
    assert max_diff(x, y) < 1e-5


def test_flux_load_while_running_and_errors(flux: dict, flux_unmerged: Engine, tmp_path: Path) -> None:
    engine = flux_unmerged
    shutil.copy(flux["twin"], tmp_path / "late.safetensors")
    info = engine.load_lora(str(tmp_path / "late.safetensors"))
    assert info["name"] == "late" and not info["default"]
    assert [i["name"] for i in engine.list_loras()] == ["a", "b", "late"]
    assert engine.validate(GenerationRequest(prompt="x", lora="late:0.3")).lora == LoraSet((("late", 0.3),))
    with pytest.raises(LoraError, match="no LoRA named 'nope' is loaded"):
        engine.validate(GenerationRequest(prompt="x", lora="nope"))
    with pytest.raises(InvalidRequestError, match="same LoRA set"):
        engine.generate_batch([GenerationRequest(prompt="x", lora="a", **FLUX_P),
                               GenerationRequest(prompt="y", lora="b", **FLUX_P)])
    with pytest.raises(LoraError, match="already loaded"):
        engine.load_lora(str(tmp_path / "late.safetensors"))
    engine.loras.unload("late")
    assert engine.loras.names == ["a", "b"]
    merged = Engine.from_pretrained(flux["repo"], dtype="fp32", device="cpu", loras=[(str(flux["a"]), 0.8)])
    with pytest.raises(LoraError, match="merged its LoRAs"):
        merged.validate(GenerationRequest(prompt="x", lora="a:0.5"))
    assert merged.validate(GenerationRequest(prompt="x", lora="a:0.8")).lora == LoraSet((("a", 0.8),))
    with pytest.raises(LoraError, match="fixed"):
        merged.load_lora(str(flux["b"]))


def test_bad_files_name_the_first_offending_key(flux: dict, tmp_path: Path) -> None:
    model = Engine.from_pretrained(flux["repo"], dtype="fp32", device="cpu").pipeline.components.transformer
    good = {"transformer.proj_out.lora_A.weight": torch.zeros(2, 32),
            "transformer.proj_out.lora_B.weight": torch.zeros(16, 2)}
    cases = {
        "matches no layer": {**good, "transformer.blocks.9.attn.to_q.lora_A.weight": torch.zeros(2, 32),
                             "transformer.blocks.9.attn.to_q.lora_B.weight": torch.zeros(32, 2)},
        "does not have": {"lora_unet_double_blocks_7_img_attn_proj.lora_down.weight": torch.zeros(2, 32),
                          "lora_unet_double_blocks_7_img_attn_proj.lora_up.weight": torch.zeros(32, 2)},
        "do not fit": {"transformer.x_embedder.lora_A.weight": torch.zeros(2, 17),
                       "transformer.x_embedder.lora_B.weight": torch.zeros(32, 2)},
        "both a down": {"transformer.x_embedder.lora_A.weight": torch.zeros(2, 16)},
        "not a LoRA tensor": {**good, "transformer.x_embedder.weight": torch.zeros(32, 16)},
        "DoRA": {**good, "transformer.proj_out.lora_magnitude_vector": torch.zeros(16)},
        "no transformer LoRA": {"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 3)},
    }
    first_key = {"matches no layer": "transformer.blocks.9.attn.to_q.lora_A.weight",
                 "does not have": "lora_unet_double_blocks_7_img_attn_proj.lora_down.weight",
                 "do not fit": "transformer.x_embedder.lora_B.weight"}
    for message, state in cases.items():
        save_file(state, tmp_path / "bad.safetensors")
        with pytest.raises(LoraError, match=message) as e:
            load_lora(tmp_path / "bad.safetensors", model)
        if message in first_key:
            assert repr(first_key[message]) in str(e.value)
    with pytest.raises(LoraError, match="no such file"):
        load_lora(tmp_path / "missing.safetensors", model)
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(LoraError, match="not a readable safetensors"):
        load_lora(tmp_path / "junk.safetensors", model)


def test_unmerge_restores_the_weights(flux: dict) -> None:
    engine = Engine.from_pretrained(flux["repo"], dtype="fp32", device="cpu", fuse=True)
    model = engine.pipeline.components.transformer
    before = weights(engine)
    lora = load_lora(flux["kohya"], model)
    exact = merge_loras(model, [(lora, 0.9)], keep_originals=True)
    assert max(float((before[k] - v).abs().max()) for k, v in model.state_dict().items()) > 1e-3
    exact.unmerge()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    approx = merge_loras(model, [(lora, 0.9)])
    approx.unmerge()
    assert max(float((before[k] - v).abs().max()) for k, v in model.state_dict().items()) < 1e-6


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="inductor on a CPU needs a C++ compiler")
def test_flux_unmerged_compiled_switches_without_recompiling(flux: dict) -> None:
    """Compiled blocks with fused projections carrying adapters: after one LoRA run, other sets and scales
    run without compiling anything new, and equal eager."""
    import torch._dynamo

    loras = [(str(flux["a"]), 0.8), (str(flux["b"]), 0.5)]
    engine = Engine.from_pretrained(flux["repo"], dtype="fp32", device="cpu", compile=True, fuse=True,
                                    lora_mode="unmerged", loras=loras)
    eager = Engine.from_pretrained(flux["repo"], dtype="fp32", device="cpu", lora_mode="unmerged", loras=loras)
    p = {**FLUX_P, "num_inference_steps": 1}
    first = pixels(engine, lora="a:0.8", **p)
    with torch._dynamo.config.patch(error_on_recompile=True):
        stacked = pixels(engine, lora=["b:0.5", "a:0.8"], **p)
        again = pixels(engine, lora="a:0.8", **p)
    diffs = [max_diff(stacked, pixels(eager, **p)), max_diff(again, pixels(eager, lora="a:0.8", **p))]
    print(f"FLUX compiled unmerged LoRA vs eager: max pixel diff {max(diffs) * 255:.2e} / 255")
    assert max(diffs) <= TOL and np.array_equal(first, again)


# ----------------------------------------------------------------------------------------------------------
# Wan and Qwen-Image


def test_wan_merged_unmerged_and_comfyui_match_diffusers(tmp_path: Path) -> None:
    repo = fixture_path("wan-t2v")
    model = WanTransformer3DModel.from_pretrained(repo / "transformer")
    state, cfg = peft_lora(model, 4, 4, 4.0)
    lora = save_diffusers(WanPipeline, tmp_path / "wan_style", state, cfg)
    pipe = WanPipeline.from_pretrained(repo, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(lora), adapter_name="s")
    expected = reference(pipe, {"s": 0.7}, **WAN_P)
    assert max_diff(expected, reference(pipe, {}, **WAN_P)) > 0.02
    merged = Engine.from_pretrained(str(repo), dtype="fp32", device="cpu", loras=[(str(lora), 0.7)])
    unmerged = Engine.from_pretrained(str(repo), dtype="fp32", device="cpu", fuse=True, lora_mode="unmerged",
                                      loras=[(str(lora), 0.7)])
    for name, engine in (("merged", merged), ("unmerged+fused", unmerged)):
        diff = max_diff(pixels(engine, **WAN_P), expected)
        print(f"Wan {name} LoRA vs diffusers: max pixel diff {diff * 255:.2e} / 255")
        assert diff <= TOL
    # ComfyUI layout of the same tensors (+ a diff_b bias update, - a zero norm diff): same weights
    save_file(comfyui_wan(state, 1.0), tmp_path / "comfy.safetensors")
    comfy = Engine.from_pretrained(str(repo), dtype="fp32", device="cpu",
                                   loras=[(str(tmp_path / "comfy.safetensors"), 0.7)])
    assert comfy.list_loras()[0]["layout"] == "comfyui" and comfy.list_loras()[0]["skipped_tensors"] == 1
    wa, wb = weights(comfy), weights(merged)
    bias_key = "blocks.0.ffn.net.2.bias"
    bias_delta = torch.linspace(-0.1, 0.1, wa[bias_key].shape[0]) * 0.7
    assert torch.allclose(wa.pop(bias_key) - wb.pop(bias_key), bias_delta, atol=1e-6)
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-6
    # musubi-tuner's kohya spelling of the same names (lora_unet_blocks_0_self_attn_q)
    musubi = {}
    for key, value in comfyui_wan(state, 1.0).items():
        module, _, suffix = key.removeprefix("diffusion_model.").partition(".lora_")
        if not suffix:
            module, _, suffix = module.rpartition(".")
            suffix = suffix if suffix in ("alpha", "diff_b", "diff") else None
            if suffix is None:
                continue
            musubi[f"lora_unet_{module.replace('.', '_')}.{suffix}"] = value
        else:
            musubi[f"lora_unet_{module.replace('.', '_')}.lora_{suffix}"] = value
    save_file(musubi, tmp_path / "musubi.safetensors")
    kohya = Engine.from_pretrained(str(repo), dtype="fp32", device="cpu",
                                   loras=[(str(tmp_path / "musubi.safetensors"), 0.7)])
    assert kohya.list_loras()[0]["layout"] == "kohya"
    wc = weights(comfy)
    assert all(torch.equal(v, wc[k]) for k, v in weights(kohya).items())


def test_qwen_image_merged_and_unmerged_match_diffusers(tmp_path: Path) -> None:
    repo = fixture_path("qwen-image")
    model = QwenImageTransformer2DModel.from_pretrained(repo / "transformer")
    lora = save_diffusers(QwenImagePipeline, tmp_path / "qwen_style", *peft_lora(model, 5, 4, 8.0))
    pipe = QwenImagePipeline.from_pretrained(repo, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(lora), adapter_name="s")
    expected = reference(pipe, {"s": 1.2}, **QWEN_P)
    assert max_diff(expected, reference(pipe, {}, **QWEN_P)) > 0.02
    for mode in ("merged", "unmerged"):
        engine = Engine.from_pretrained(str(repo), dtype="fp32", device="cpu", lora_mode=mode, fuse=mode == "unmerged",
                                        loras=[f"{lora}:1.2"])
        diff = max_diff(pixels(engine, **QWEN_P), expected)
        print(f"Qwen-Image {mode} LoRA vs diffusers: max pixel diff {diff * 255:.2e} / 255")
        assert diff <= TOL


# ----------------------------------------------------------------------------------------------------------
# Values, CLI, several processes


def test_lora_set_and_spec_values() -> None:
    s = LoraSet.parse(["b:0.5", {"name": "a", "scale": 0.8}])
    assert s == LoraSet.parse({"a": 0.8, "b": 0.5}) == LoraSet((("b", 0.5), ("a", 0.8)))
    assert hash(s) == hash(LoraSet.parse(["a:0.8", "b:0.5"])) and str(s) == "a:0.8,b:0.5"
    assert LoraSet.parse("a") == LoraSet((("a", 1.0),)) and not LoraSet.parse([]) and not LoraSet.parse(["a:0"])
    assert LoraSet.parse(["a:0.5", "a:0.25"]) == LoraSet((("a", 0.75),))
    for bad in ("a:x", 3, [{"name": "a", "weight": 1}], "../etc", "a:inf"):
        with pytest.raises(LoraError):
            LoraSet.parse(bad)
    assert LoraSpec.parse("/x/y/style.safetensors:0.6") == LoraSpec("/x/y/style.safetensors", 0.6, "style")
    assert LoraSpec.parse("/x/my lora/pytorch_lora_weights.safetensors").name == "my_lora"
    assert LoraSpec.parse("c:/odd:path").path == "c:/odd:path"
    assert LoraSpec.coerce(("p.safetensors", 2)) == LoraSpec("p.safetensors", 2.0)
    req = GenerationRequest(prompt="x", lora=["a:1"])
    from diffserve.config import ModelDefaults, resolve_request

    defaults = ModelDefaults(kind="image", height=32, width=32, num_inference_steps=2, guidance_scale=1.0)
    assert resolve_request(req, defaults, seed=1).lora == LoraSet((("a", 1.0),))
    assert resolve_request(GenerationRequest(prompt="x"), defaults, seed=1).lora is None


def test_cli_lora_flags() -> None:
    from diffserve.cli import build_parser
    from diffserve.cli_args import lora_options

    args = build_parser().parse_args(["generate", "--prompt", "x", "--lora-path", "a.safetensors:0.5",
                                      "--lora-path", "b.safetensors", "--lora-mode", "unmerged"])
    assert lora_options(args) == {"loras": (LoraSpec("a.safetensors", 0.5), LoraSpec("b.safetensors", 1.0)),
                                  "lora_mode": "unmerged"}
    args = build_parser().parse_args(["generate", "--prompt", "x"])
    assert lora_options(args) == {"loras": (), "lora_mode": "merged"}


def test_parallel_u2_with_merged_lora_equals_single_process(flux: dict) -> None:
    from diffserve.parallel import ParallelConfig

    lora = [(str(flux["a"]), 0.8)]
    single = Engine.from_pretrained(flux["repo"], dtype="fp32", device="cpu", loras=lora)
    p = dict(height=20, width=12, num_inference_steps=2, max_sequence_length=7, seed=3)
    expected = np.asarray(single.generate_batch([GenerationRequest(prompt=PROMPT, **p)])[0].images[0], dtype=int)
    engine = Engine.from_pretrained(flux["repo"], dtype="fp32", device="cpu", loras=lora,
                                    parallel=ParallelConfig(num_gpus=2, ulysses_degree=2))
    try:
        got = np.asarray(engine.generate_batch([GenerationRequest(prompt=PROMPT, **p)])[0].images[0], dtype=int)
        assert [i["name"] for i in engine.list_loras()] == ["a"]
        with pytest.raises(LoraError, match="fixed"):  # every rank refuses, the front reports it
            engine.load_lora(str(flux["b"]))
    finally:
        engine.close()
    diff = int(np.abs(got - expected).max())
    print(f"FLUX U2 (gloo) with a merged LoRA vs one process: max |uint8 diff| = {diff}")
    assert diff <= 1
