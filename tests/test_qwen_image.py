"""Qwen-Image, Qwen-Image-Edit and Qwen-Image-Edit-2509 (Edit-Plus) against diffusers on the tiny repos (fp32,
CPU): the transformer, the text conditioning, whole pipelines, batching, defaults, the CLI and the HTTP
server (text-to-image and edit side by side).

The edit pipeline always resizes the input image to about 1024x1024 pixels (as the reference), so every
edit run VAE-encodes a megapixel image: the edit tests run the pipeline as few times as they can."""

from __future__ import annotations

import base64
import io
import json
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import torch
from diffusers import (
    QwenImageEditPipeline,
    QwenImageEditPlusPipeline,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
)
from PIL import Image

from diffserve import Engine, GenerationRequest
from diffserve.cli import main
from diffserve.config import size_for_aspect
from diffserve.errors import InvalidRequestError
from diffserve.media import to_pil_images
from diffserve.models.dits.qwen_image import QwenImageConfig, QwenImageTransformer, image_rope, text_rope
from diffserve.models.loader import load_dit
from diffserve.pipelines.base import PipelineState
from diffserve.pipelines.qwen_image import (
    EDIT,
    EDIT_DROP,
    EDIT_TEMPLATE,
    T2I_DROP,
    T2I_TEMPLATE,
    condition_images,
    load_processor,
)
from diffserve.testing.fixtures import CONFIG_DIR, fixture_path

PROMPTS = ("a red fox trotting through a snowy pine forest at golden hour, cinematic", "a cat")
NEGATIVE = "blurry, low quality"
CPU = torch.device("cpu")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _input_image(width: int = 80, height: int = 48) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray((rng.random((height, width, 3)) * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def t2i_repo() -> Path:
    return fixture_path("qwen-image")


@pytest.fixture(scope="module")
def edit_repo() -> Path:
    return fixture_path("qwen-image-edit")


@pytest.fixture(scope="module")
def t2i_engine(t2i_repo: Path) -> Engine:
    return Engine.from_pretrained(str(t2i_repo), dtype="fp32", device="cpu")


@pytest.fixture(scope="module")
def edit_engine(edit_repo: Path) -> Engine:
    return Engine.from_pretrained(str(edit_repo), dtype="fp32", device="cpu")


@pytest.fixture(scope="module")
def t2i_ref(t2i_repo: Path) -> QwenImagePipeline:
    ref = QwenImagePipeline.from_pretrained(t2i_repo, torch_dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    return ref


@pytest.fixture(scope="module")
def edit_ref(edit_repo: Path) -> QwenImageEditPipeline:
    # the repo's processor as the engine builds it (transformers' own loader needs torchvision for its video
    # processor); tokenizer and image processor are transformers' classes from the repo's files
    ref = QwenImageEditPipeline.from_pretrained(edit_repo, processor=load_processor(edit_repo / "processor"),
                                                torch_dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    return ref


def _run(engine: Engine, *requests: GenerationRequest) -> PipelineState:
    state = PipelineState(requests=list(requests), device=CPU, dtype=torch.float32)
    with torch.inference_mode():
        engine.pipeline(state)
    return state


# ---------------------------------------------------------------------------------------------------------
# Transformer


@pytest.fixture(scope="module")
def transformer_pair(t2i_repo: Path) -> tuple[QwenImageTransformer2DModel, QwenImageTransformer]:
    folder = t2i_repo / "transformer"
    ref = QwenImageTransformer2DModel.from_pretrained(folder, torch_dtype=torch.float32).eval()
    cfg = QwenImageConfig.from_json(folder / "config.json")
    ours = load_dit(lambda: QwenImageTransformer(cfg), folder, torch.float32, CPU)
    return ref, ours


CASES = {  # name: (text lengths per sample (padded to the longest), image grids)
    "t2i": ((7, 7), [(1, 3, 5)]),
    "padded-text": ((9, 4), [(1, 4, 3)]),
    "edit": ((6, 3), [(1, 3, 5), (1, 4, 4)]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_transformer_matches_diffusers(transformer_pair, case: str) -> None:
    ref, ours = transformer_pair
    lengths, shapes = CASES[case]
    g = torch.Generator().manual_seed(1)
    n = sum(f * h * w for f, h, w in shapes)
    x = torch.randn(2, n, 64, generator=g)
    ctx = torch.randn(2, max(lengths), 16, generator=g)
    mask = (torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]).long()
    t = torch.tensor([0.9, 0.3])
    padded = not bool(mask.all())
    with torch.no_grad():
        expected = ref(hidden_states=x, encoder_hidden_states=ctx, encoder_hidden_states_mask=mask if padded else None,
                       timestep=t, img_shapes=[shapes] * 2, return_dict=False)[0]
        got = ours(x, ctx, mask.bool() if padded else None, t, shapes)
    noise = shapes[0][0] * shapes[0][1] * shapes[0][2]
    expected = expected[:, :noise]  # the reference pipeline drops the reference image's tokens
    err = rel_err(got, expected)
    print(f"Qwen-Image transformer fp32 relative error ({case}): {err:.3e}")
    assert got.shape == expected.shape and expected.abs().mean() > 1e-2
    assert err <= 1e-5


def test_transformer_bf16_matches_diffusers(t2i_repo: Path) -> None:
    """In bf16 the tiny model moves ~17% from its fp32 output; ours follows the reference's bf16 numerics
    (which parts run in float32), so the two bf16 outputs agree far more closely than either with fp32."""
    folder = t2i_repo / "transformer"
    ref = QwenImageTransformer2DModel.from_pretrained(folder, torch_dtype=torch.bfloat16).eval()
    ours = load_dit(lambda: QwenImageTransformer(QwenImageConfig.from_json(folder / "config.json")), folder,
                    torch.bfloat16, CPU)
    g = torch.Generator().manual_seed(2)
    x, ctx = torch.randn(1, 15, 64, generator=g).bfloat16(), torch.randn(1, 5, 16, generator=g).bfloat16()
    t = torch.tensor([0.7]).bfloat16()
    with torch.no_grad():
        expected = ref(hidden_states=x, encoder_hidden_states=ctx, timestep=t, img_shapes=[[(1, 3, 5)]],
                       return_dict=False)[0]
        got = ours(x, ctx, None, t, [(1, 3, 5)])
    err = rel_err(got, expected)
    print(f"Qwen-Image transformer bf16 relative error: {err:.3e}")
    assert err < 1e-2


def test_kernel_fusions_reach_the_model(t2i_repo: Path, transformer_pair) -> None:
    """The engine's layer rewrites apply (q/k/v of each stream as one GEMM, GELU in the MLP GEMM's epilogue)
    and leave the output unchanged."""
    from diffserve.engine.optimize import fuse_epilogues, fuse_projections

    _, ours = transformer_pair
    folder = t2i_repo / "transformer"
    fused = load_dit(lambda: QwenImageTransformer(ours.cfg), folder, torch.float32, CPU)
    assert fuse_projections(fused) == 2 * ours.cfg.num_layers and fuse_epilogues(fused) == 2 * ours.cfg.num_layers
    g = torch.Generator().manual_seed(4)
    x, ctx = torch.randn(2, 15, 64, generator=g), torch.randn(2, 6, 16, generator=g)
    mask, t = torch.tensor([[True] * 6, [True] * 3 + [False] * 3]), torch.tensor([0.5, 0.2])
    with torch.no_grad():
        assert rel_err(fused(x, ctx, mask, t, [(1, 3, 5)]), ours(x, ctx, mask, t, [(1, 3, 5)])) < 1e-6


def test_rope_tables_equal_diffusers(transformer_pair) -> None:
    """Our cos/sin tables are the reference's complex frequencies, bit for bit (target + reference image)."""
    ref, ours = transformer_pair
    shapes = [(1, 5, 3), (1, 4, 7)]
    img, txt = ref.pos_embed([shapes], max_txt_seq_len=11, device=CPU)
    axes = ours.cfg.axes_dims_rope
    for (cos, sin), freqs in ((image_rope(shapes, axes), img), (text_rope(shapes, 11, axes), txt)):
        assert torch.equal(cos[:, 0::2], freqs.real) and torch.equal(sin[:, 0::2], freqs.imag)
        assert torch.equal(cos[:, 0::2], cos[:, 1::2])


def test_real_configs_and_checkpoint_keys() -> None:
    """The real configs parse (Qwen-Image's leftover pooled_projection_dim included); on the meta device our
    model has exactly diffusers' parameter names and shapes and the real 20.4 B parameters."""
    raw = json.loads((CONFIG_DIR / "Qwen-Image" / "transformer" / "config.json").read_text())
    edit = QwenImageConfig.from_json(CONFIG_DIR / "Qwen-Image-Edit" / "transformer" / "config.json")
    cfg = QwenImageConfig.from_dict(raw)
    assert cfg == QwenImageConfig(**{**edit.__dict__, "pooled_projection_dim": 768})
    with torch.device("meta"):
        ours = QwenImageTransformer(cfg)
        ref = QwenImageTransformer2DModel.from_config({k: v for k, v in raw.items() if k != "pooled_projection_dim"})
    shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert sum(math.prod(s) for s in shapes.values()) == 20_430_401_088
    for key in ("zero_cond_t", "use_additional_t_cond", "use_layer3d_rope", "guidance_embeds"):
        with pytest.raises(ValueError, match=key):
            QwenImageConfig.from_dict({**raw, key: True})


# ---------------------------------------------------------------------------------------------------------
# Text conditioning


def test_template_prefixes_are_the_dropped_tokens(t2i_ref: QwenImagePipeline) -> None:
    """The tiny tokenizer (like the real one) makes the templates' fixed prefixes exactly 34 / 64 tokens, so
    the first kept position is the prompt's (T2I) or the image block's (edit)."""
    tok = t2i_ref.tokenizer
    t2i = tok(T2I_TEMPLATE.format("dance monkey")).input_ids
    edit = tok(EDIT_TEMPLATE.format("dance monkey")).input_ids
    assert tok.decode(t2i[T2I_DROP:]).startswith("dance monkey<|im_end|>")
    assert tok.decode(t2i[:T2I_DROP]).endswith("<|im_start|>user\n")
    assert tok.convert_ids_to_tokens(edit[EDIT_DROP]) == "<|vision_start|>"
    assert tok.decode(edit[:EDIT_DROP]).endswith("<|im_start|>user\n")


def test_text_embeddings_exact_t2i(t2i_engine: Engine, t2i_ref: QwenImagePipeline) -> None:
    """Two prompts of different lengths (and their negative prompts) give exactly encode_prompt's embeddings
    and mask."""
    requests = [GenerationRequest(prompt=p, negative_prompt=NEGATIVE if i else "ugly", seed=1) for i, p in
                enumerate(PROMPTS)]
    state = PipelineState(requests=requests, device=CPU, dtype=torch.float32)
    for stage in t2i_engine.pipeline.stages[:2]:
        stage.run(state)
    with torch.no_grad():
        embeds, mask = t2i_ref.encode_prompt(list(PROMPTS), device=CPU, max_sequence_length=512)
        neg, neg_mask = t2i_ref.encode_prompt(["ugly", NEGATIVE], device=CPU, max_sequence_length=512)
    assert torch.equal(state.cond["text"], embeds) and torch.equal(state.cond["text_mask"], mask.bool())
    assert torch.equal(state.uncond["text"], neg)  # type: ignore[index]
    assert torch.equal(state.uncond["text_mask"], neg_mask.bool())  # type: ignore[index]
    alone = PipelineState(requests=requests[:1], device=CPU, dtype=torch.float32)
    for stage in t2i_engine.pipeline.stages[:2]:
        stage.run(alone)
    assert "text_mask" not in alone.cond  # one prompt: no padding, no mask (the reference passes None too)


def test_text_embeddings_exact_edit(edit_engine: Engine, edit_ref: QwenImageEditPipeline) -> None:
    image = _input_image()
    state = PipelineState(requests=[GenerationRequest(prompt=PROMPTS[1], image=image, seed=1)], device=CPU,
                          dtype=torch.float32)
    for stage in edit_engine.pipeline.stages[:2]:
        stage.run(state)
    prompt_image = condition_images(state.requests, EDIT, 8)[0]
    assert prompt_image.size == size_for_aspect(1024 * 1024, 80 / 48, 32) == (1312, 800)
    with torch.no_grad():
        embeds, mask = edit_ref.encode_prompt(PROMPTS[1], image=prompt_image, device=CPU)
    assert mask is None and "text_mask" not in state.cond
    assert torch.equal(state.cond["text"], embeds)
    ids = edit_ref.processor(text=["<|image_pad|>"], images=[prompt_image], return_tensors="pt").input_ids
    image_tokens = int((ids == 151655).sum())
    assert embeds.shape[1] > image_tokens > 0  # the vision tower's tokens are part of the conditioning


# ---------------------------------------------------------------------------------------------------------
# Pipelines


@pytest.mark.parametrize("negative", [None, NEGATIVE], ids=["no-negative", "true-cfg"])
def test_t2i_pipeline_matches_diffusers(t2i_engine: Engine, t2i_ref: QwenImagePipeline, negative: str | None) -> None:
    params = dict(height=64, width=48, num_inference_steps=3, seed=7, num_outputs=2)
    state = _run(t2i_engine, GenerationRequest(prompt=PROMPTS[0], negative_prompt=negative, guidance_scale=4.0,
                                               **params))  # type: ignore[arg-type]
    expected = t2i_ref(PROMPTS[0], negative_prompt=negative, true_cfg_scale=4.0, height=64, width=48,
                       num_inference_steps=3, num_images_per_prompt=2, generator=torch.Generator().manual_seed(7),
                       output_type="np").images
    got = state.pixels.permute(0, 2, 3, 1).numpy()  # type: ignore[union-attr]
    diff = float(np.abs(got - expected).max())
    print(f"Qwen-Image pipeline ({negative and 'true CFG'}) max pixel difference: {diff:.3e} (x255 = {diff * 255:.4f})")
    assert got.shape == expected.shape == (2, 64, 48, 3) and float(expected.std()) > 0.01
    assert diff <= 1 / 255
    assert (state.uncond is not None) == (negative is not None)


def test_batch_of_two_prompts_equals_each_alone(t2i_engine: Engine) -> None:
    p = dict(height=32, width=64, num_inference_steps=2, negative_prompt=NEGATIVE)
    requests = [GenerationRequest(prompt=PROMPTS[0], seed=3, **p), GenerationRequest(prompt=PROMPTS[1], seed=4, **p)]
    batch = _run(t2i_engine, *requests)
    assert "text_mask" in batch.cond  # the two prompts' lengths differ: the shorter is padded and masked
    for i, request in enumerate(requests):
        alone = _run(t2i_engine, request)
        diff = (batch.pixels[i] - alone.pixels[0]).abs().max().item()  # type: ignore[index]
        print(f"Qwen-Image batch vs alone, prompt {i}: max pixel difference {diff:.2e}")
        assert diff < 1e-5


def test_defaults(t2i_engine: Engine, edit_engine: Engine) -> None:
    d = t2i_engine.defaults
    assert (d.height, d.width, d.num_inference_steps, d.guidance_scale) == (1024, 1024, 50, 4.0)
    assert d.guidance == "true_cfg" and d.uses_negative_prompt and not d.accepts_image
    assert t2i_engine.validate(GenerationRequest(prompt="x")).max_sequence_length == 512
    assert t2i_engine.validate(GenerationRequest(prompt="x", max_sequence_length=1024)).max_sequence_length == 1024
    with pytest.raises(InvalidRequestError, match="between 1 and 1024"):  # the reference's own limit
        t2i_engine.validate(GenerationRequest(prompt="x", max_sequence_length=1025))
    e = edit_engine.defaults
    assert e.needs_image and e.accepts_image and e.size_from_image_area == 1024 * 1024
    req = edit_engine.validate(GenerationRequest(prompt="x", image=_input_image(48, 80)))
    assert (req.width, req.height, req.num_inference_steps, req.guidance_scale) == (800, 1312, 50, 4.0)
    req = edit_engine.validate(GenerationRequest(prompt="x", image=_input_image(48, 80), width=256))
    assert (req.width, req.height) == (256, 1312)  # a given side is kept, as the reference does


@pytest.mark.parametrize("ratio", [0.25, 9 / 16, 0.77, 1.0, 4 / 3, 1.5, 80 / 48, 16 / 9, 3.9])
def test_edit_size_rule_equals_reference(ratio: float) -> None:
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_dimensions

    width, height, _ = calculate_dimensions(1024 * 1024, ratio)
    assert size_for_aspect(1024 * 1024, ratio, 16) == (width // 16 * 16, height // 16 * 16)


# One edit with true CFG, run once by the engine and compared with diffusers, the CLI and the server; the output
# size is given (small), so the megapixel part is the reference image.
EDIT_PARAMS = dict(prompt=PROMPTS[1], negative_prompt=NEGATIVE, height=64, width=96, num_inference_steps=2, seed=7,
                   guidance_scale=3.0)


@pytest.fixture(scope="module")
def edit_ours(edit_engine: Engine) -> PipelineState:
    return _run(edit_engine, GenerationRequest(image=_input_image(), **EDIT_PARAMS))  # type: ignore[arg-type]


def _uint8(state: PipelineState) -> np.ndarray:
    return np.asarray(to_pil_images(state.pixels)[0], dtype=np.int16)  # type: ignore[arg-type]


@pytest.mark.slow
def test_edit_pipeline_matches_diffusers(edit_ours: PipelineState, edit_ref: QwenImageEditPipeline) -> None:
    expected = edit_ref(_input_image(), PROMPTS[1], negative_prompt=NEGATIVE, true_cfg_scale=3.0, height=64, width=96,
                        num_inference_steps=2, generator=torch.Generator().manual_seed(7), output_type="np").images
    state = edit_ours
    got = state.pixels.permute(0, 2, 3, 1).numpy()  # type: ignore[union-attr]
    diff = float(np.abs(got - expected).max())
    print(f"Qwen-Image-Edit pipeline max pixel difference: {diff:.3e} (x255 = {diff * 255:.4f})")
    assert got.shape == expected.shape == (1, 64, 96, 3) and float(expected.std()) > 0.01
    assert diff <= 1 / 255
    assert state.image_cond["ref_latents"].shape[1] == (800 // 16) * (1312 // 16)  # the 1312x800 reference


@pytest.mark.slow
def test_edit_plus_pipeline_matches_diffusers() -> None:
    """Edit-Plus with two input images of different aspect ratios (each appended as its own reference
    tokens, each announced as "Picture i:"); the output size defaults to the last image's aspect ratio."""
    repo = fixture_path("qwen-image-edit-plus")
    engine = Engine.from_pretrained(str(repo), dtype="fp32", device="cpu")
    images = [_input_image(80, 48), _input_image(40, 64)]
    req = engine.validate(GenerationRequest(prompt="x", image=images))
    assert (req.width, req.height) == size_for_aspect(1024 * 1024, 40 / 64, 16) == (800, 1280)
    with pytest.raises(InvalidRequestError, match="1 to 3 input images"):
        engine.validate(GenerationRequest(prompt="x", image=images * 2))
    state = _run(engine, GenerationRequest(prompt=PROMPTS[1], negative_prompt=NEGATIVE, image=images, height=64,
                                           width=48, num_inference_steps=2, seed=7))
    ref = QwenImageEditPlusPipeline.from_pretrained(repo, processor=load_processor(repo / "processor"),
                                                    torch_dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    expected = ref(images, PROMPTS[1], negative_prompt=NEGATIVE, true_cfg_scale=4.0, height=64, width=48,
                   num_inference_steps=2, generator=torch.Generator().manual_seed(7), output_type="np").images
    got = state.pixels.permute(0, 2, 3, 1).numpy()  # type: ignore[union-attr]
    diff = float(np.abs(got - expected).max())
    print(f"Qwen-Image-Edit-Plus pipeline max pixel difference: {diff:.3e} (x255 = {diff * 255:.4f})")
    assert got.shape == expected.shape == (1, 64, 48, 3) and diff <= 1 / 255
    assert state.image_cond["ref_grid"].tolist() == [[50, 82], [80, 50]]  # 1312x800 and 800x1280 references


# ---------------------------------------------------------------------------------------------------------
# CLI


def _png(path: Path, image: Image.Image) -> Path:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    path.write_bytes(buf.getvalue())
    return path


BASE_ARGS = ("--dtype", "fp32", "--device", "cpu", "--num-inference-steps", "2", "--seed", "3")


def test_cli_generate_t2i(t2i_repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "fox.png"
    code = main(["generate", "--model-path", str(t2i_repo), "--prompt", PROMPTS[0], "--negative-prompt", " ",
                 "--true-cfg-scale", "3.0", "--height", "32", "--width", "48", "--output-path", str(out), *BASE_ARGS])
    assert code == 0, capsys.readouterr().err
    assert Image.open(out).size == (48, 32)


@pytest.mark.slow
def test_cli_generate_edit(edit_repo: Path, edit_ours: PipelineState, tmp_path: Path,
                           capsys: pytest.CaptureFixture) -> None:
    src, out = _png(tmp_path / "in.png", _input_image()), tmp_path / "edited.png"
    p = EDIT_PARAMS
    code = main(["generate", "--model-path", str(edit_repo), "--prompt", p["prompt"], "--image-path", str(src),
                 "--negative-prompt", p["negative_prompt"], "--true-cfg-scale", str(p["guidance_scale"]),
                 "--height", str(p["height"]), "--width", str(p["width"]), "--output-path", str(out), *BASE_ARGS,
                 "--seed", str(p["seed"])])
    assert code == 0, capsys.readouterr().err
    assert np.abs(np.asarray(Image.open(out), dtype=np.int16) - _uint8(edit_ours)).max() <= 1


def test_cli_bad_inputs(t2i_repo: Path, edit_repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = _png(tmp_path / "in.png", _input_image())
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    cases = [
        ([str(t2i_repo), "--image-path", str(src)], "does not take an input image"),
        ([str(edit_repo)], "needs an input image"),
        ([str(edit_repo), "--image-path", str(corrupt)], "image"),
        ([str(t2i_repo), "--num-inference-steps", "1"], "at least 2 steps"),
        ([str(edit_repo), "--image-path", str(src), "--image-path", str(src)], "takes one input image"),
    ]
    for extra, message in cases:
        code = main(["generate", "--prompt", "x", "--output-dir", str(tmp_path), *BASE_ARGS, "--model-path", *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and message in err[-1] and err[-1].startswith("diffserve: error:"), err


# ---------------------------------------------------------------------------------------------------------
# HTTP server (both models, started side by side; the official openai client for the Images API)

KEY = "sk-test-qwen"


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory, t2i_repo: Path, edit_repo: Path):
    from diffserve.server.testing import start_server

    args = ("--dtype", "fp32", "--device", "cpu", "--max-batch-size", "2", "--batch-wait-ms", "200",
            "--log-level", "warning")
    started = [start_server(repo, tmp_path_factory.mktemp(name), api_key=KEY, args=args, wait=False)
               for name, repo in (("qwen-t2i", t2i_repo), ("qwen-edit", edit_repo))]
    try:
        for server in started:
            server.wait_ready()
        yield {"t2i": started[0], "edit": started[1]}
    finally:
        for server in started:
            assert server.stop() == 0, server.log()[-3000:]


def _client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=300)


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _decode(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), dtype=np.int16)


def test_server_models_show_defaults(servers) -> None:
    t2i = _client(servers["t2i"]).models.list().data[0].model_dump()
    edit = _client(servers["edit"]).models.list().data[0].model_dump()
    assert t2i["pipeline"] == "QwenImagePipeline" and edit["pipeline"] == "QwenImageEditPipeline"
    d, e = t2i["defaults"], edit["defaults"]
    assert (d["width"], d["height"], d["num_inference_steps"], d["guidance_scale"]) == (1024, 1024, 50, 4.0)
    assert d["guidance"] == e["guidance"] == "true_cfg" and d["uses_negative_prompt"]
    assert e["needs_image"] and e["size_from_image_area"] == 1024 * 1024 and not d["accepts_image"]


@pytest.mark.slow
def test_server_edit_upload_and_image_url(servers, edit_ours: PipelineState) -> None:
    """The SDK's multipart upload and a JSON body with the image as a data URL, sent together (one batch of
    two), give the in-process engine's picture for the same request."""
    image, server, p = _input_image(), servers["edit"], EDIT_PARAMS
    extra = {"num_inference_steps": p["num_inference_steps"], "seed": p["seed"], "negative_prompt": p["negative_prompt"],
             "true_cfg_scale": p["guidance_scale"]}
    size = f"{p['width']}x{p['height']}"
    data_url = "data:image/png;base64," + base64.b64encode(_png_bytes(image)).decode()

    def upload() -> str:
        res = _client(server).images.edit(image=("in.png", _png_bytes(image), "image/png"), prompt=p["prompt"],
                                          size=size, extra_body=extra)  # type: ignore[arg-type]
        return res.data[0].b64_json  # type: ignore[return-value]

    def by_url() -> str:
        with httpx.Client(base_url=server.url, headers=server.headers, timeout=300) as http:
            r = http.post("/v1/images/edits", json={"prompt": p["prompt"], "size": size,
                                                    "images": [{"image_url": data_url}], **extra})
        assert r.status_code == 200, r.text
        assert r.json()["size"] == size
        return r.json()["data"][0]["b64_json"]

    with ThreadPoolExecutor(2) as pool:
        a, b = pool.submit(upload), pool.submit(by_url)
        uploaded, referenced = _decode(a.result()), _decode(b.result())
    assert np.abs(uploaded - _uint8(edit_ours)).max() <= 1
    assert np.abs(referenced - _uint8(edit_ours)).max() <= 1


def test_server_t2i_generation(servers, t2i_engine: Engine) -> None:
    res = _client(servers["t2i"]).images.generate(
        prompt=PROMPTS[1], size="48x32", extra_body={"num_inference_steps": 2, "seed": 9, "negative_prompt": " "})
    got = _decode(res.data[0].b64_json)  # type: ignore[arg-type]
    local = t2i_engine.generate(PROMPTS[1], height=32, width=48, num_inference_steps=2, seed=9,
                                negative_prompt=" ").images[0]
    assert np.abs(got - np.asarray(local, dtype=np.int16)).max() <= 1


def test_server_bad_inputs(servers) -> None:
    from diffserve.server.testing import assert_error

    png = ("in.png", _png_bytes(_input_image()), "image/png")
    with pytest.raises(openai.BadRequestError) as e:  # an image for the text-to-image model
        _client(servers["t2i"]).images.edit(image=png, prompt="make it blue", size="32x32")
    assert "does not take an input image" in e.value.message and e.value.body["param"] == "image"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as e:  # no image for the edit model
        _client(servers["edit"]).images.generate(prompt="make it blue", size="32x32")
    assert "needs an input image" in e.value.message and e.value.body["param"] == "image"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as e:  # a corrupt upload
        _client(servers["edit"]).images.edit(image=("in.png", b"\x89PNG\r\n\x1a\nbroken", "image/png"), prompt="x")
    assert e.value.body["param"] == "image"  # type: ignore[index]
    with httpx.Client(base_url=servers["edit"].url, headers=servers["edit"].headers, timeout=60) as http:
        assert_error(http.post("/v1/images/edits", json={"prompt": "x"}), 400, param="image")
        assert_error(http.post("/v1/images/edits", json={"prompt": "x", "images": [{"file_id": "file-1"}]}), 400,
                     param="images")
        assert_error(http.post("/v1/images/edits", json={"prompt": "x", "images": [
            {"image_url": "http://example.com/a.png"}]}), 400, param="images")  # URLs are off by default
        assert_error(http.post("/v1/images/edits", data={"prompt": "x", "guidance_scale": "2",
                                                         "true_cfg_scale": "3"}, files={"image": png}), 400,
                     param="true_cfg_scale")
        assert_error(http.post("/v1/images/edits", data={"prompt": "x", "num_inference_steps": "1"},
                               files={"image": png}), 400, param="num_inference_steps")
        two = [("image[]", png), ("image[]", png)]  # Qwen-Image-Edit takes one image (Edit-Plus: up to 3)
        err = assert_error(http.post("/v1/images/edits", data={"prompt": "x"}, files=two), 400, param="image")
        assert "one input image" in err["message"]
