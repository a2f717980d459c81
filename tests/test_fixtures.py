"""The tiny model-repo fixtures: build, cache, load back with diffusers, determinism, real-config fidelity."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from diffserve.testing import fixtures as fx
from diffserve.testing import tiny_tokenizers as tt
from diffserve.testing.fixtures import FIXTURES, build_repo, fixture_path

PIPELINE_CLASS = {
    "flux-dev": "FluxPipeline",
    "flux-schnell": "FluxPipeline",
    "wan-t2v": "WanPipeline",
    "wan-i2v": "WanImageToVideoPipeline",
    "fastwan-t2v": "WanPipeline",  # model_index says WanDMDPipeline, which diffusers does not have
    "hunyuan-video": "HunyuanVideoPipeline",
    "qwen-image": "QwenImagePipeline",
    "qwen-image-edit": "QwenImageEditPipeline",
    "qwen-image-edit-plus": "QwenImageEditPlusPipeline",
}
MODEL_KINDS = {"clip_text", "clip_vision", "t5", "umt5", "flux_transformer", "flux_vae", "wan_transformer",
               "wan_vae", "llama", "hunyuan_transformer", "hunyuan_vae", "qwen2_5_vl", "qwen_transformer",
               "qwen_vae"}
PROMPTS = ("a photo of a cat", "a red circle on the left")


@pytest.fixture(scope="module")
def repos() -> dict[str, Path]:
    """Every tiny fixture, from the normal (shared) cache."""
    return {name: fixture_path(name) for name in FIXTURES}


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            names = f.keys()
            out.update({k: f.get_tensor(k) for k in names})
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_fixture_path_is_cached(repos: dict[str, Path]) -> None:
    start = time.perf_counter()
    again = {name: fixture_path(name) for name in FIXTURES}
    assert again == repos
    assert time.perf_counter() - start < 0.5
    for name, path in repos.items():
        assert path.name.startswith(f"{name}-seed0-") and path.parent == fx.cache_root()


@pytest.mark.parametrize("name", FIXTURES)
def test_layout_mirrors_real_repo(repos: dict[str, Path], name: str) -> None:
    spec = fx.SPECS[name]
    index = _json(repos[name] / "model_index.json")
    real = fx.read_config(spec.config_repo)
    assert {k: v for k, v in index.items() if k != "_diffusers_version"} == {
        **{k: v for k, v in real.items() if k != "_diffusers_version"}, "_class_name": spec.pipeline_class
        or real["_class_name"]}
    for component, (library, _cls) in ((k, v) for k, v in index.items() if not k.startswith("_")):
        folder = repos[name] / component
        files = {p.name for p in folder.iterdir()}
        if component == "scheduler":
            assert files == {"scheduler_config.json"}
        elif component.startswith("tokenizer"):
            assert {"tokenizer.json", "tokenizer_config.json"} <= files
        elif component == "image_processor":
            assert files == {"preprocessor_config.json"}
        elif component == "processor":  # Qwen2-VL: its tokenizer, image (and video) processor configs
            assert {"preprocessor_config.json", "tokenizer.json", "tokenizer_config.json"} <= files
        elif library == "diffusers":
            assert files == {"config.json", "diffusion_pytorch_model.safetensors"}
        else:  # Qwen2.5-VL ships its generation config too
            assert files - {"generation_config.json"} == {"config.json", "model.safetensors"}


@pytest.mark.parametrize("name", FIXTURES)
def test_configs_keep_real_values(repos: dict[str, Path], name: str) -> None:
    repo, root = fx.SPECS[name].config_repo, repos[name]
    real_sched = fx.read_config(repo, "scheduler")
    sched = _json(root / "scheduler" / "scheduler_config.json")
    assert {k: sched[k] for k in real_sched if k != "_diffusers_version"} == {
        k: v for k, v in real_sched.items() if k != "_diffusers_version"}
    vae, real_vae = _json(root / "vae" / "config.json"), fx.read_config(repo, "vae")
    keep = ("scaling_factor", "shift_factor", "force_upcast") if "shift_factor" in real_vae else (
        "latents_mean", "latents_std", "z_dim", "temperal_downsample")
    if fx.SPECS[name].family == "hunyuan":
        keep = ("scaling_factor", "spatial_compression_ratio", "temporal_compression_ratio", "act_fn")
    assert {k: vae[k] for k in keep} == {k: real_vae[k] for k in keep}
    tr, real_tr = _json(root / "transformer" / "config.json"), fx.read_config(repo, "transformer")
    for key in ("patch_size", "guidance_embeds", "out_channels", "qk_norm", "cross_attn_norm", "freq_dim"):
        if key in real_tr:
            assert tr[key] == real_tr[key], key
    if fx.SPECS[name].family == "hunyuan":
        llama, clip = _json(root / "text_encoder" / "config.json"), _json(root / "text_encoder_2" / "config.json")
        assert (llama["vocab_size"], llama["hidden_size"]) == (tt.LLAMA_VOCAB_SIZE, tr["text_embed_dim"])
        assert llama["num_hidden_layers"] >= 3  # the pipeline reads hidden_states[-3]
        assert (clip["hidden_size"], clip["hidden_act"]) == (tr["pooled_projection_dim"], "quick_gelu")
        assert tr["rope_theta"] == real_tr["rope_theta"] and tr["patch_size_t"] == real_tr["patch_size_t"]
        return
    if fx.SPECS[name].family == "qwen":
        te, real_te = _json(root / "text_encoder" / "config.json"), fx.read_config(repo, "text_encoder")
        ids = ("vocab_size", "image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id",
               "bos_token_id", "eos_token_id")
        assert {k: te[k] for k in ids} == {k: real_te[k] for k in ids}
        assert te["text_config"]["hidden_size"] == te["vision_config"]["out_hidden_size"] == tr["joint_attention_dim"]
        vision = ("patch_size", "spatial_merge_size", "temporal_patch_size", "window_size")
        assert {k: te["vision_config"][k] for k in vision} == {k: real_te["vision_config"][k] for k in vision}
        assert tr["in_channels"] == 4 * vae["z_dim"] and tr.get("pooled_projection_dim") == real_tr.get(
            "pooled_projection_dim")
        return
    text = _json(root / ("text_encoder_2" if "text_encoder_2" in fx.read_config(repo) else "text_encoder")
                 / "config.json")
    assert text["vocab_size"] == tt.T5_VOCAB_SIZE
    assert text["d_model"] == tr.get("joint_attention_dim", tr.get("text_dim"))
    assert (text["feed_forward_proj"], text["dense_act_fn"]) == ("gated-gelu", "gelu_new")


def test_checkpoint_key_names(repos: dict[str, Path]) -> None:
    clip = _tensors(repos["flux-dev"] / "text_encoder")
    assert all(k.startswith("text_model.") for k in clip)
    t5 = _tensors(repos["flux-dev"] / "text_encoder_2")
    assert "shared.weight" in t5 and "encoder.final_layer_norm.weight" in t5
    assert "encoder.embed_tokens.weight" not in t5
    dev, schnell = _tensors(repos["flux-dev"] / "transformer"), _tensors(repos["flux-schnell"] / "transformer")
    assert any(k.startswith("time_text_embed.guidance_embedder.") for k in dev)
    assert not any("guidance" in k for k in schnell)
    assert set(dev) - set(schnell) == {k for k in dev if "guidance_embedder" in k}
    i2v = _tensors(repos["wan-i2v"] / "transformer")
    assert i2v["blocks.0.attn2.add_k_proj.weight"].shape == (24, 24)
    assert i2v["condition_embedder.image_embedder.ff.net.0.proj.weight"].shape[1] == 16
    assert "vision_model.embeddings.class_embedding" in _tensors(repos["wan-i2v"] / "image_encoder")


def test_fastwan_mirrors_real_repo(repos: dict[str, Path]) -> None:
    assert _json(repos["fastwan-t2v"] / "model_index.json")["_class_name"] == "WanDMDPipeline"
    fast, base = _tensors(repos["fastwan-t2v"] / "transformer"), _tensors(repos["wan-t2v"] / "transformer")
    extra = set(fast) - set(base)
    assert extra == {f"blocks.{i}.attn1.to_gate_compress.{p}" for i in range(2) for p in ("weight", "bias")}
    assert fast["blocks.0.attn1.to_gate_compress.weight"].shape == (24, 24)
    assert set(base) <= set(fast)
    for sub in ("scheduler/scheduler_config.json", "transformer/config.json", "vae/config.json"):
        assert _json(repos["fastwan-t2v"] / sub) == _json(repos["wan-t2v"] / sub)
    assert fx.FASTWAN_DMD_SCHEDULE["dmd_denoising_steps"] == [1000, 757, 522]


def _generate(name: str, pipe, prompt: str) -> np.ndarray:
    kwargs = {"height": 16, "width": 16, "num_inference_steps": 2, "max_sequence_length": 16, "output_type": "np",
              "generator": torch.Generator().manual_seed(0)}
    if name.startswith("flux"):
        return pipe(prompt=prompt, guidance_scale=3.5, **kwargs).images
    if name == "hunyuan-video":  # embedded guidance, no negative prompt
        return pipe(prompt=prompt, num_frames=5, guidance_scale=6.0, **kwargs).frames
    if name.startswith("qwen"):  # true CFG; the edit pipeline resizes its input to about a megapixel
        if name.startswith("qwen-image-edit"):
            kwargs["image"] = _image()
        return pipe(prompt=prompt, negative_prompt="bad quality", true_cfg_scale=4.0, **kwargs).images
    kwargs.update(num_frames=5, guidance_scale=5.0, negative_prompt="bad quality")
    if name == "wan-i2v":
        kwargs["image"] = _image()
    return pipe(prompt=prompt, **kwargs).frames


def _image():
    from PIL import Image

    return Image.fromarray((np.random.default_rng(0).random((16, 16, 3)) * 255).astype(np.uint8))


@pytest.mark.parametrize("name", FIXTURES)
def test_loads_back_and_generates(repos: dict[str, Path], name: str) -> None:
    import diffusers

    extra = {}
    if name.startswith("qwen-image-edit"):  # transformers' processor loader needs torchvision (its video processor)
        from diffserve.pipelines.qwen_image import load_processor

        extra["processor"] = load_processor(repos[name] / "processor")
    pipe = getattr(diffusers, PIPELINE_CLASS[name]).from_pretrained(repos[name], **extra)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.transformer.config.num_layers == 2
    if name.startswith("qwen"):  # the real embedding rows (special tokens at their real ids), a tiny vocabulary
        assert pipe.text_encoder.config.vocab_size == 152064 and len(pipe.tokenizer) == tt.QWEN2_VOCAB_SIZE + 22
    else:
        assert len(pipe.tokenizer) == pipe.text_encoder.config.vocab_size
    first, second = (_generate(name, pipe, p) for p in PROMPTS)
    image = name.startswith(("flux", "qwen"))
    assert first.shape == ((1, 16, 16, 3) if image else (1, 5, 16, 16, 3))
    assert np.isfinite(first).all() and first.std() > 0.1
    assert np.abs(first - second).mean() > 0.02  # the prompt visibly matters


def test_tokenizers_sizes_and_round_trip(repos: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoTokenizer, CLIPTokenizer, T5TokenizerFast

    text = "A photo of a Cat, dance monkey! Zebra quizzically near 42 naïve 'bad quality' ☃"
    clip, t5 = tt.build_clip_tokenizer(), tt.build_t5_tokenizer()
    assert len(clip) == clip.vocab_size == tt.CLIP_VOCAB_SIZE and clip.model_max_length == 77
    assert len(t5) == t5.vocab_size == tt.T5_VOCAB_SIZE
    assert (t5.pad_token_id, t5.eos_token_id, t5.unk_token_id) == (0, 1, 2)
    assert clip.eos_token_id == tt.CLIP_VOCAB_SIZE - 1 and clip.bos_token_id == tt.CLIP_VOCAB_SIZE - 2
    clip_ids, t5_ids = clip(text).input_ids, t5(text).input_ids
    assert clip.unk_token_id not in clip_ids[1:-1] and max(clip_ids) == clip_ids[-1]
    assert t5_ids.count(t5.unk_token_id) == 1  # only the snowman; every ASCII/latin letter is covered
    flux, wan = repos["flux-dev"], repos["wan-t2v"]
    for folder, cls, ids in ((flux / "tokenizer", CLIPTokenizer, clip_ids),
                             (flux / "tokenizer_2", T5TokenizerFast, t5_ids),
                             (wan / "tokenizer", T5TokenizerFast, t5_ids)):
        for loaded in (AutoTokenizer.from_pretrained(folder), cls.from_pretrained(folder)):
            assert len(loaded) == len(clip if cls is CLIPTokenizer else t5)
            assert loaded(text).input_ids == ids
    # the real CLIP repos ship vocab.json + merges.txt and no tokenizer.json: that layout gives the same ids
    bare = tmp_path / "clip"
    bare.mkdir()
    for file in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        (bare / file).write_bytes((flux / "tokenizer" / file).read_bytes())
    assert CLIPTokenizer.from_pretrained(bare)(text).input_ids == clip_ids


@pytest.mark.parametrize("name", ["flux-dev", "wan-i2v"])
def test_same_seed_same_bytes_other_seed_other_weights(repos: dict[str, Path], name: str, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(fx.CACHE_ENV, str(tmp_path))
    again, other = fixture_path(name, seed=0), fixture_path(name, seed=1)
    assert again.parent == other.parent == tmp_path and again != repos[name]
    assert _files(again) == _files(repos[name])
    plan = {c.name: c.kind for c in fx.component_plan(name)}
    for component, kind in plan.items():
        if kind not in MODEL_KINDS:
            assert _files(other / component) == _files(again / component)
            continue
        a, b = _tensors(again / component), _tensors(other / component)
        assert a.keys() == b.keys()
        assert all(not torch.equal(a[k], b[k]) for k in a if a[k].numel() > 1)
        assert _json(other / component / "config.json") == _json(again / component / "config.json")


def test_components_are_seeded_independently(tmp_path: Path) -> None:
    comp = {c.name: c for c in fx.component_plan("flux-dev")}
    for component in ("vae", "transformer"):
        fx.save_component(comp[component], tmp_path / component, seed=0)
    reference = _tensors(fixture_path("flux-dev") / "transformer")
    assert all(torch.equal(v, reference[k]) for k, v in _tensors(tmp_path / "transformer").items())


def test_failed_build_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(fx.CACHE_ENV, str(tmp_path))

    def crash(name: str, out_dir: Path, **kwargs: object) -> Path:
        (Path(out_dir) / "model_index.json").write_text("{}")
        raise RuntimeError("builder crashed")

    monkeypatch.setattr(fx, "build_repo", crash)
    with pytest.raises(RuntimeError, match="builder crashed"):
        fixture_path("wan-t2v")
    assert [p.name for p in tmp_path.iterdir()] == [f".wan-t2v-seed0-{fx.cache_key()}.lock"]


def test_concurrent_callers_build_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(fx.CACHE_ENV, str(tmp_path))
    calls: list[str] = []
    real_build = fx.build_repo

    def counting_build(name: str, out_dir: Path, **kwargs: object) -> Path:
        calls.append(name)
        time.sleep(0.2)  # widen the race window
        return real_build(name, out_dir, **kwargs)

    monkeypatch.setattr(fx, "build_repo", counting_build)
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(fixture_path("flux-schnell"))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == ["flux-schnell"] and len(set(results)) == 1 and len(results) == 3
    assert not list(tmp_path.glob(".tmp-*"))


@pytest.mark.parametrize("name", [*FIXTURES, *fx.FULL_ONLY])
def test_full_scale_uses_real_configs(name: str) -> None:
    repo = fx.SPECS[name].config_repo
    for component in fx.component_plan(name, "full"):
        if component.kind.endswith("_tokenizer"):
            continue
        real = fx.read_config(repo, component.name)
        assert component.config == {k: v for k, v in real.items() if k not in fx._META_KEYS}


# parameter counts of the real checkpoints (FLUX.1 12B, T5-XXL / UMT5-XXL encoders, Wan 1.3B / 14B, CLIP-H)
FULL_PARAMS = {
    ("flux-dev", "transformer"): 11_901_408_320, ("flux-schnell", "transformer"): 11_891_178_560,
    ("flux-dev", "text_encoder"): 123_060_480, ("flux-dev", "text_encoder_2"): 4_762_310_656,
    ("flux-dev", "vae"): 83_819_683, ("wan-t2v", "transformer"): 1_418_996_800,
    ("wan-t2v", "text_encoder"): 5_680_910_336, ("wan-t2v", "vae"): 126_892_531,
    ("wan-t2v-14b", "transformer"): 14_288_491_584, ("wan-i2v", "transformer"): 16_394_878_784,
    ("wan-i2v", "image_encoder"): 632_076_800,
    ("fastwan-t2v", "transformer"): 1_418_996_800 + 30 * (1536 * 1536 + 1536),
    ("qwen-image", "transformer"): 20_430_401_088, ("qwen-image-edit", "text_encoder"): 8_292_166_656,
}


@pytest.mark.parametrize("name,component", sorted(FULL_PARAMS))
def test_full_scale_models_have_real_sizes(name: str, component: str) -> None:
    plan = {c.name: c for c in fx.component_plan(name, "full")}
    model = fx.construct_model(plan[component], device="meta", dtype=torch.bfloat16)
    params = list(model.parameters())
    assert sum(p.numel() for p in params) == FULL_PARAMS[name, component]
    assert {p.dtype for p in params} == {torch.bfloat16} and {p.device.type for p in params} == {"meta"}


def test_full_scale_light_components(tmp_path: Path) -> None:
    plan = {c.name: c for c in fx.component_plan("wan-i2v", "full")}
    for component in ("scheduler", "image_processor", "tokenizer"):
        fx.save_component(plan[component], tmp_path / component, scale="full")
    real = fx.read_config("Wan2.1-I2V-14B-480P-Diffusers", "image_processor")
    assert _json(tmp_path / "image_processor" / "preprocessor_config.json") == real
    sched = _json(tmp_path / "scheduler" / "scheduler_config.json")
    assert (sched["_class_name"], sched["flow_shift"], sched["use_flow_sigmas"]) == (
        "UniPCMultistepScheduler", 3.0, True)


def test_cli_and_argument_checks(tmp_path: Path) -> None:
    assert fx.main(["wan-t2v", str(tmp_path / "cli"), "--seed", "0"]) == 0
    assert _files(tmp_path / "cli") == _files(fixture_path("wan-t2v"))
    with pytest.raises(ValueError, match="only at scale='full'"):
        build_repo("wan-t2v-14b", tmp_path / "x")
    with pytest.raises(ValueError, match="unknown fixture"):
        fixture_path("sd15")
    with pytest.raises(FileExistsError):
        build_repo("wan-t2v", tmp_path / "cli")
