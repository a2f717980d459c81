"""HunyuanVideo against diffusers on the tiny `hunyuan-video` repo (fp32, CPU): the transformer (padded text
masks included), the text conditioning, whole videos, and the CLI and server end to end."""

from __future__ import annotations

import io
import time
from pathlib import Path

import av
import numpy as np
import openai
import pytest
import torch
from diffusers import HunyuanVideoPipeline, HunyuanVideoTransformer3DModel
from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoRotaryPosEmbed
from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

import diffserve.testing
from diffserve import Engine, GenerationRequest
from diffserve.cli import main
from diffserve.config import ModelDefaults, guidance_scales
from diffserve.errors import InvalidRequestError
from diffserve.layers.attention import AttentionOp
from diffserve.media import read_metadata
from diffserve.models.dits.hunyuan_video import (
    HunyuanVideoConfig,
    HunyuanVideoTransformer,
    hunyuan_rope,
    refiner_key_mask,
)
from diffserve.models.loader import load_dit, read_json
from diffserve.pipelines import hunyuan_video as recipe
from diffserve.pipelines.base import PipelineState
from diffserve.server.testing import start_server
from diffserve.testing import tiny_tokenizers
from diffserve.testing.fixtures import fixture_path

PROMPTS = ("a red fox trotting through a snowy pine forest at golden hour", "a cat")
PARAMS = dict(height=32, width=32, num_frames=5, num_inference_steps=3, guidance_scale=6.0, max_sequence_length=24)
NEGATIVES = ("blurry, low quality, static frames", "")  # the empty one still runs true CFG, as in the reference


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def repo() -> Path:
    return fixture_path("hunyuan-video")


@pytest.fixture(scope="module")
def models(repo: Path) -> tuple[HunyuanVideoTransformer3DModel, HunyuanVideoTransformer]:
    ref = HunyuanVideoTransformer3DModel.from_pretrained(repo / "transformer").eval()
    cfg = HunyuanVideoConfig.from_dict(read_json(repo / "transformer" / "config.json"))
    ours = load_dit(lambda: HunyuanVideoTransformer(cfg, AttentionOp()), repo / "transformer", torch.float32,
                    torch.device("cpu"))
    return ref, ours


def _inputs(ref: HunyuanVideoTransformer3DModel, text_len: int = 12) -> dict[str, torch.Tensor]:
    """Two samples: latents (2, C, 3, 8, 8), the second sample's text right-padded after 5 tokens."""
    c = ref.config
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(2, text_len)
    mask[1, 5:] = 0
    return {"hidden_states": torch.randn(2, c.in_channels, 3, 8, 8, generator=g),
            "timestep": torch.tensor([999.0, 321.5]),
            "encoder_hidden_states": torch.randn(2, text_len, c.text_embed_dim, generator=g),
            "encoder_attention_mask": mask,
            "pooled_projections": torch.randn(2, c.pooled_projection_dim, generator=g),
            "guidance": torch.tensor([6000.0, 3500.0])}


def _ours(model: HunyuanVideoTransformer, inp: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(inp["hidden_states"], inp["timestep"], inp["encoder_hidden_states"], inp["encoder_attention_mask"],
                 inp["pooled_projections"], inp["guidance"])


# ----------------------------------------------------------------------------------------------------------
# Transformer


@torch.no_grad()
def test_transformer_matches_diffusers_with_padded_text(models) -> None:
    ref, ours = models
    inp = _inputs(ref)
    expected = ref(**inp, return_dict=False)[0]
    got = _ours(ours, inp)
    err = rel_err(got, expected)
    print(f"HunyuanVideo transformer fp32 relative error (batch 2, padded text): {err:.3e}")
    assert got.shape == expected.shape == inp["hidden_states"].shape
    assert expected.abs().mean() > 1e-2
    assert err <= 1e-5
    # the padded sample alone, its padding dropped (no mask at all), gives what the reference's mask gives
    short = {k: v[1:] for k, v in inp.items()}
    short["encoder_hidden_states"] = short["encoder_hidden_states"][:, :5]
    trimmed = ours(short["hidden_states"], short["timestep"], short["encoder_hidden_states"], None,
                   short["pooled_projections"], short["guidance"])
    err_trim = rel_err(trimmed, expected[1:])
    print(f"HunyuanVideo transformer: trimmed text vs the reference's masked padding: {err_trim:.3e}")
    assert err_trim <= 1e-5
    # the text matters, and so does the embedded guidance
    assert rel_err(_ours(ours, {**inp, "guidance": inp["guidance"] * 0}), expected) > 1e-3
    assert rel_err(_ours(ours, {**inp, "encoder_hidden_states": inp["encoder_hidden_states"].flip(1)}), expected) > 1e-3


@torch.no_grad()
def test_kernel_fusions_apply_and_keep_the_output(models, repo: Path) -> None:
    """The engine's fusions reach every q/k/v group, tanh-GELU input projection and [attention, MLP]
    output projection of the model, and leave the output unchanged."""
    from diffserve.engine.optimize import fuse_epilogues, fuse_projections

    ref, ours = models
    cfg = HunyuanVideoConfig.from_dict(read_json(repo / "transformer" / "config.json"))
    fused = load_dit(lambda: HunyuanVideoTransformer(cfg, AttentionOp()), repo / "transformer", torch.float32,
                     torch.device("cpu"))
    n_dual, n_single, n_refiner = cfg.num_layers, cfg.num_single_layers, cfg.num_refiner_layers
    assert fuse_projections(fused) == 2 * n_dual + n_single + n_refiner
    assert fuse_epilogues(fused) == 2 * n_dual + 2 * n_single  # ff, ff_context; proj_mlp, proj_out
    inp = _inputs(ref)
    assert rel_err(_ours(fused, inp), _ours(ours, inp)) <= 1e-6


@torch.no_grad()
def test_refiner_key_mask_equals_reference_square_mask_on_real_tokens(models) -> None:
    """The reference's square refiner mask with key 0 forced visible, as a key mask: same real rows."""
    ref, ours = models
    inp = _inputs(ref)
    args = (inp["encoder_hidden_states"], inp["timestep"], inp["encoder_attention_mask"])
    expected, got = ref.context_embedder(*args), ours.context_embedder(*args)
    real = inp["encoder_attention_mask"].bool()
    assert rel_err(got[real], expected[real]) <= 1e-6
    assert refiner_key_mask(torch.tensor([[0, 0, 1]])).tolist() == [[True, False, True]]


def test_rope_tables_bit_equal_to_diffusers(models) -> None:
    ref, _ = models
    c = ref.config
    for frames, h, w in ((3, 8, 8), (2, 6, 10)):
        x = torch.zeros(1, c.in_channels, frames, h, w)
        expected = HunyuanVideoRotaryPosEmbed(c.patch_size, c.patch_size_t, list(c.rope_axes_dim), c.rope_theta)(x)
        grid = (frames // c.patch_size_t, h // c.patch_size, w // c.patch_size)
        got = hunyuan_rope(grid, tuple(c.rope_axes_dim), c.rope_theta, x.device)
        assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


def test_real_config_keys_and_parameter_count() -> None:
    path = Path(diffserve.testing.__file__).parent / "model_configs" / "HunyuanVideo" / "transformer" / "config.json"
    with torch.device("meta"):
        ours = HunyuanVideoTransformer(HunyuanVideoConfig.from_json(path))
        ref = HunyuanVideoTransformer3DModel.from_config(HunyuanVideoTransformer3DModel.load_config(str(path.parent)))
    ours_sd, ref_sd = ours.state_dict(), ref.state_dict()
    assert set(ours_sd) == set(ref_sd)
    assert all(ours_sd[k].shape == ref_sd[k].shape for k in ref_sd)
    n = sum(p.numel() for p in ours.parameters())
    print(f"HunyuanVideo: {n / 1e9:.3f} B parameters")
    assert n == sum(p.numel() for p in ref.parameters()) and 12.5e9 < n < 13.5e9
    assert list(ours.buffers()) == []


def test_config_and_input_errors(models) -> None:
    raw = read_json(Path(diffserve.testing.__file__).parent / "model_configs" / "HunyuanVideo" / "transformer"
                    / "config.json")
    with pytest.raises(ValueError, match="unknown config keys"):
        HunyuanVideoConfig.from_dict({**raw, "use_magic": True})
    with pytest.raises(ValueError, match="image_condition_type"):
        HunyuanVideoConfig.from_dict({**raw, "image_condition_type": "token_replace"})
    _, ours = models
    inp = _inputs(models[0])
    with pytest.raises(ValueError, match="divisible"):
        _ours(ours, {**inp, "hidden_states": inp["hidden_states"][..., :7]})
    with pytest.raises(ValueError, match="guidance"):
        _ours(ours, {**inp, "guidance": None})


# ----------------------------------------------------------------------------------------------------------
# Text conditioning


def test_template_and_tiny_tokenizer_crop(repo: Path) -> None:
    """The recipe's template is the reference's, and the tiny tokenizer, like the real one, spends exactly
    the cropped 95 tokens on the template's prefix (so the crop keeps exactly the prompt)."""
    assert recipe.PROMPT_TEMPLATE == DEFAULT_PROMPT_TEMPLATE["template"] == tiny_tokenizers.HUNYUAN_VIDEO_TEMPLATE
    assert recipe.CROP_START == DEFAULT_PROMPT_TEMPLATE["crop_start"] == tiny_tokenizers.HUNYUAN_VIDEO_CROP_START
    engine = Engine.from_pretrained(str(repo), dtype="fp32", device="cpu")
    tok = engine.pipeline.components.tokenizer
    assert len(tok(recipe.PROMPT_TEMPLATE.split("{}")[0]).input_ids) == recipe.CROP_START
    ids = tok(recipe.PROMPT_TEMPLATE.format("a cat")).input_ids[recipe.CROP_START:]
    assert tok.convert_ids_to_tokens(ids) == ["a", "▁cat", "<|eot_id|>"]


@torch.no_grad()
def test_text_embeddings_and_mask_exact(repo: Path) -> None:
    ref = HunyuanVideoPipeline.from_pretrained(repo)
    c = Engine.from_pretrained(str(repo), dtype="fp32", device="cpu").pipeline.components
    prompts = list(PROMPTS)
    expected, expected_pooled, expected_mask = ref.encode_prompt(prompts, device="cpu", max_sequence_length=256)
    embeds, mask = recipe.llama_prompt_embeds(c.tokenizer, c.text_encoder, prompts, 256, torch.device("cpu"))
    pooled = recipe.clip_pooled(c.tokenizer_2, c.text_encoder_2, prompts, torch.device("cpu"))
    assert embeds.shape == expected.shape == (2, 256, 32)
    assert torch.equal(embeds, expected) and torch.equal(mask, expected_mask) and torch.equal(pooled, expected_pooled)
    assert mask.sum(1).tolist()[1] < mask.sum(1).tolist()[0] < 256  # both padded, by different amounts
    text, text_mask = recipe.trim_text_padding(embeds, mask)
    n = int(mask.sum(1).max())
    assert torch.equal(text, embeds[:, :n]) and torch.equal(text_mask, mask[:, :n].bool())
    one, none = recipe.trim_text_padding(embeds[:1], mask[:1])
    assert one.shape[1] == int(mask[0].sum()) and none is None


# ----------------------------------------------------------------------------------------------------------
# Whole videos, defaults, CLI, server


def test_video_matches_diffusers(repo: Path) -> None:
    """Two prompts of different lengths in one batch (the shorter one masked), each with its own seed."""
    ref = HunyuanVideoPipeline.from_pretrained(repo)
    ref.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(s) for s in (3, 4)]
    expected = ref(prompt=list(PROMPTS), generator=gens, output_type="np", **PARAMS).frames
    engine = Engine.from_pretrained(str(repo), dtype="fp32", device="cpu")
    reqs = [GenerationRequest(prompt=p, seed=s, **PARAMS) for p, s in zip(PROMPTS, (3, 4), strict=True)]
    state = PipelineState(requests=reqs, device=torch.device("cpu"), dtype=torch.float32)
    engine.pipeline(state)
    got = state.pixels.permute(0, 2, 3, 4, 1).numpy()  # (B, F, H, W, 3)
    diff = float(np.abs(got - expected).max())
    print(f"HunyuanVideo pipeline max pixel difference: {diff:.3e} (x255 = {diff * 255:.4f})")
    assert got.shape == expected.shape == (2, 5, 32, 32, 3)
    assert float(expected.std()) > 0.05 and float(np.abs(expected[0] - expected[1]).mean()) > 0.01
    assert diff <= 1 / 255


def test_true_cfg_video_matches_diffusers(repo: Path) -> None:
    """True CFG (a negative prompt per request, true_cfg_scale 4) on top of the embedded guidance 6.0: two
    transformer passes per step, against diffusers' true_cfg_scale; the two prompts' negatives differ in
    length (one empty), so the uncond branch keeps its own mask."""
    ref = HunyuanVideoPipeline.from_pretrained(repo)
    ref.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(s) for s in (3, 4)]
    expected = ref(prompt=list(PROMPTS), negative_prompt=list(NEGATIVES), true_cfg_scale=4.0, generator=gens,
                   output_type="np", **PARAMS).frames
    plain = ref(prompt=list(PROMPTS), generator=[torch.Generator().manual_seed(s) for s in (3, 4)],
                output_type="np", **PARAMS).frames
    engine = Engine.from_pretrained(str(repo), dtype="fp32", device="cpu")
    reqs = [GenerationRequest(prompt=p, negative_prompt=n, seed=s, true_cfg_scale=4.0, **PARAMS)
            for p, n, s in zip(PROMPTS, NEGATIVES, (3, 4), strict=True)]
    state = PipelineState(requests=reqs, device=torch.device("cpu"), dtype=torch.float32)
    engine.pipeline(state)
    assert state.uncond is not None and "text_mask" in state.uncond
    got = state.pixels.permute(0, 2, 3, 4, 1).numpy()  # (B, F, H, W, 3)
    diff = float(np.abs(got - expected).max())
    print(f"HunyuanVideo true CFG max pixel difference: {diff:.3e} (x255 = {diff * 255:.4f})")
    assert got.shape == expected.shape == (2, 5, 32, 32, 3)
    assert float(np.abs(expected - plain).mean()) > 0.01  # true CFG changes the video
    assert diff <= 1 / 255


def test_true_cfg_scale_per_family() -> None:
    """HunyuanVideo takes true_cfg_scale as a field of its own; Qwen-Image as its guidance_scale; the others
    refuse it by name; the range is 1-100."""
    hunyuan = ModelDefaults(kind="video", height=32, width=32, num_inference_steps=2, guidance_scale=6.0,
                            guidance="embedded", true_cfg_scale=1.0)
    qwen = ModelDefaults(kind="image", height=32, width=32, num_inference_steps=2, guidance_scale=4.0,
                         guidance="true_cfg")
    wan = ModelDefaults(kind="video", height=32, width=32, num_inference_steps=2, guidance_scale=5.0, guidance="cfg")
    assert guidance_scales(GenerationRequest(prompt="x"), hunyuan) == (6.0, 1.0)
    given = GenerationRequest(prompt="x", negative_prompt="", true_cfg_scale=5, guidance_scale=3.0)
    assert guidance_scales(given, hunyuan) == (3.0, 5.0)
    with pytest.raises(InvalidRequestError, match="needs a negative_prompt"):  # refused before queueing
        guidance_scales(given.replace(negative_prompt=None), hunyuan)
    with pytest.raises(InvalidRequestError, match="negative prompt only for true CFG"):
        guidance_scales(given.replace(true_cfg_scale=None), hunyuan)
    assert guidance_scales(GenerationRequest(prompt="x", negative_prompt="blurry"), qwen) == (4.0, None)
    assert guidance_scales(GenerationRequest(prompt="x", true_cfg_scale=2.5), qwen) == (2.5, None)
    assert guidance_scales(GenerationRequest(prompt="x", true_cfg_scale=2.5, guidance_scale=2.5), qwen) == (2.5, None)
    assert guidance_scales(GenerationRequest(prompt="x"), wan) == (5.0, None)
    with pytest.raises(InvalidRequestError, match="both name its true CFG scale") as e:
        guidance_scales(GenerationRequest(prompt="x", true_cfg_scale=2.5, guidance_scale=3.0), qwen)
    assert e.value.param == "true_cfg_scale"
    with pytest.raises(InvalidRequestError, match="taken by HunyuanVideo .* and Qwen-Image"):
        guidance_scales(GenerationRequest(prompt="x", true_cfg_scale=2.0), wan)
    for bad in (0.5, 101, "4", True):
        with pytest.raises(InvalidRequestError, match="between 1 \\(off\\) and 100"):
            guidance_scales(given.replace(true_cfg_scale=bad), hunyuan)


def test_defaults_and_validation(repo: Path) -> None:
    engine = Engine.from_pretrained(str(repo), dtype="fp32", device="cpu")
    d = engine.defaults
    assert (d.kind, d.height, d.width, d.num_frames, d.fps) == ("video", 720, 1280, 129, 24)
    assert (d.num_inference_steps, d.guidance_scale, d.max_sequence_length, d.size_multiple) == (50, 6.0, 256, 16)
    assert (d.guidance, d.uses_negative_prompt, d.true_cfg_scale) == ("embedded", True, 1.0)
    for frames in (8, 0, 1000):
        with pytest.raises(InvalidRequestError, match="4k\\+1"):
            engine.validate(GenerationRequest(prompt="x", num_frames=frames))
    with pytest.raises(InvalidRequestError, match="negative prompt only for true CFG") as e:
        engine.validate(GenerationRequest(prompt="x", negative_prompt="blurry"))
    assert e.value.param == "negative_prompt"
    with pytest.raises(InvalidRequestError, match="needs a negative_prompt") as e:
        engine.validate(GenerationRequest(prompt="x", true_cfg_scale=3.0))
    assert e.value.param == "true_cfg_scale"
    assert engine.validate(GenerationRequest(prompt="x", num_frames=33)).num_frames == 33
    resolved = engine.validate(GenerationRequest(prompt="x", negative_prompt="", true_cfg_scale=3))
    assert (resolved.true_cfg_scale, resolved.guidance_scale, resolved.negative_prompt) == (3.0, 6.0, "")
    with pytest.raises(InvalidRequestError, match="share"):  # true CFG and plain requests are not batched together
        engine.pipeline.validate([GenerationRequest(prompt="x"), resolved])


def test_vae_tiling_choice(repo: Path) -> None:
    vae = Engine.from_pretrained(str(repo), dtype="fp32", device="cpu").pipeline.components.vae
    assert recipe.use_vae_tiling(True, vae, 129, 720, 1280, torch.device("cpu"))
    assert not recipe.use_vae_tiling(None, vae, 129, 720, 1280, torch.device("cpu"))
    # the real VAE (128 channels at full resolution) in bf16 at 720p x 129 frames: far above one 80 GB card
    real = {"block_out_channels": [128, 256, 512, 512]}
    assert recipe.untiled_decode_bytes(real, 129, 720, 1280, torch.bfloat16) > 80 * 2**30


def test_cli_writes_mp4_at_model_fps(repo: Path, tmp_path: Path) -> None:
    args = ["generate", "--model-path", str(repo), "--prompt", PROMPTS[0], "--height", "32", "--width", "48",
            "--num-frames", "5", "--num-inference-steps", "2", "--seed", "1", "--dtype", "fp32",
            "--output-dir", str(tmp_path), "--output-format", "mp4", "--negative-prompt", "blurry",
            "--true-cfg-scale", "3.5"]
    assert main(args) == 0
    (written,) = list(tmp_path.iterdir())
    meta = read_metadata(written)
    assert (meta["negative_prompt"], meta["true_cfg_scale"], meta["guidance_scale"]) == ("blurry", "3.5", "6.0")
    with av.open(str(written)) as container:
        stream = container.streams.video[0]
        frames = list(container.decode(stream))
        assert len(frames) == 5 and (frames[0].width, frames[0].height) == (48, 32) and stream.average_rate == 24


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_server_video_job(repo: Path, tmp_path: Path) -> None:
    server = start_server(repo, tmp_path, args=("--dtype", "fp32", "--device", "cpu", "--log-level", "warning"))
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)
        with pytest.raises(openai.BadRequestError, match="needs a negative_prompt"):
            client.videos.create(prompt=PROMPTS[1], size="32x32", extra_body={"true_cfg_scale": 2.0})
        job = client.videos.create(prompt=PROMPTS[1], size="32x32", seconds="0.2",  # type: ignore[arg-type]
                                   extra_body={"num_inference_steps": 2, "seed": 5, "negative_prompt": "blurry",
                                               "true_cfg_scale": 2.0})
        assert job.model_dump()["num_frames"] == 5  # 0.2 s at 24 fps -> the nearest 4k+1 count
        seen, deadline = [], time.monotonic() + 120
        while (job := client.videos.retrieve(job.id)).status not in ("completed", "failed"):
            seen.append(job.progress)
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert job.status == "completed" and job.progress == 100, job.error
        mp4 = client.videos.download_content(job.id).content
        with av.open(io.BytesIO(mp4)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        assert len(frames) == 5 and frames[0].shape == (32, 32, 3)
        assert seen == sorted(seen)
    finally:
        assert server.stop() == 0
