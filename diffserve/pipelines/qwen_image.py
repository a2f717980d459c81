"""Qwen-Image (text -> image), Qwen-Image-Edit and Qwen-Image-Edit-2509 (image(s) + text -> image), as lists
of stages.

Recipe: the prompt in Qwen-Image's chat template through Qwen2.5-VL (last hidden state; the template's
system turn, 34 tokens, is dropped and each prompt keeps only its real tokens, re-padded to the batch's
longest with a key mask) -> Gaussian latents packed 2x2 into tokens -> flow-match Euler with the
resolution-dependent shift and the checkpoint's shift_terminal -> our transformer, with true CFG against
the negative prompt (two forwards per step, the combination rescaled to the conditional prediction's norm)
-> unpack, undo the per-channel latent normalisation, VAE decode.

Editing feeds the input image twice: resized to about 1024x1024 pixels at its aspect ratio, it is both in
the prompt (the template's image placeholder, read by Qwen2.5-VL's vision tower; 64 template tokens
dropped) and, VAE-encoded and normalised, packed into tokens appended after the noise tokens. The output
size defaults to that same size; the transformer's prediction for the appended tokens is dropped
(`QwenImageTransformer.finish`). Edit-Plus (Qwen-Image-Edit-2509) takes several input images: each is
announced in the prompt as "Picture i:" with its own placeholder and seen by the vision tower at about
384x384 pixels, and each is appended as VAE tokens at about 1024x1024 (its own RoPE frame index); the
output size follows the last image.

Request fields: `guidance_scale` is the reference's `true_cfg_scale` (default 4.0; a request may also give it
as `true_cfg_scale`, `diffserve.config.guidance_scales`); as in the reference,
guidance runs only when the request has a negative prompt (" " is enough) and the scale is above 1.
`max_sequence_length` (default 512) truncates the text-to-image conditioning; editing never truncates
(as the reference: its conditioning holds the image tokens).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffserve.config import EngineConfig, GenerationRequest, ModelDefaults, size_for_aspect
from diffserve.errors import CheckpointError, InvalidRequestError
from diffserve.layers.attention import AttentionOp
from diffserve.models.dits.qwen_image import ImageShape, QwenImageConfig, QwenImageTransformer
from diffserve.models.loader import ModelIndex, load_component, load_dit, read_json
from diffserve.pipelines.base import (
    ComposedPipeline,
    InputValidationStage,
    PipelineStage,
    PipelineState,
    replace_defaults,
    repo_defaults,
)
from diffserve.pipelines.flux import pack_latents, unpack_latents
from diffserve.pipelines.stages.denoise import Cond, DenoisingStage, PredictFn
from diffserve.pipelines.stages.latents import initial_noise
from diffserve.pipelines.stages.text import repeat_per_output
from diffserve.pipelines.stages.vae_tiling import set_tiling, use_tiling
from diffserve.pipelines.wan import wan_decode_bytes
from diffserve.schedulers.flow_match import FlowMatchConfig, FlowMatchEulerSampler
from diffserve.schedulers.guidance import NormRescaledCfg

T2I_TEMPLATE = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, "
                "text, spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}"
                "<|im_end|>\n<|im_start|>assistant\n")
T2I_DROP = 34  # tokens of T2I_TEMPLATE before the prompt: the system turn and "<|im_start|>user\n"
EDIT_TEMPLATE = ("<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, "
                 "objects, background), then explain how the user's text instruction should alter or modify the "
                 "image. Generate a new image that meets the user's requirements while maintaining consistency "
                 "with the original input where appropriate.<|im_end|>\n<|im_start|>user\n"
                 "<|vision_start|><|image_pad|><|vision_end|>{}<|im_end|>\n<|im_start|>assistant\n")
EDIT_DROP = 64  # tokens of EDIT_TEMPLATE before the image placeholder
EDIT_PLUS_TEMPLATE = EDIT_TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|>", "")
EDIT_PLUS_IMAGE_PROMPT = "Picture {}: <|vision_start|><|image_pad|><|vision_end|>"  # before the prompt, per image
TOKENIZER_MAX_LENGTH = 1024  # prompt tokens kept after the template's prefix (T2I truncation)
DEFAULT_SAMPLE_SIZE = 128  # latent pixels: 1024 px at the VAE factor 8
EDIT_AREA = 1024 * 1024  # pixels of the reference image (and of the default output) when editing
EDIT_PLUS_CONDITION_AREA = 384 * 384  # pixels of each input image the vision tower sees (Edit-Plus)
EDIT_PLUS_MAX_IMAGES = 3  # the input images per request Qwen-Image-Edit-2509's model card supports
TRUE_CFG_SCALE = 4.0


@dataclass(frozen=True)
class QwenVariant:
    """What tells the three pipelines apart. `max_images` 0: text-to-image; `image_prompt`: the text put
    before the prompt for each input image (its vision placeholder); `condition_area`: the pixels of each
    input image the vision tower sees (None: the reference size, EDIT_AREA)."""

    pipeline: str
    template: str
    drop: int
    max_images: int = 0
    image_prompt: str | None = None
    condition_area: int | None = None


T2I = QwenVariant("QwenImagePipeline", T2I_TEMPLATE, T2I_DROP)
EDIT = QwenVariant("QwenImageEditPipeline", EDIT_TEMPLATE, EDIT_DROP, max_images=1)
EDIT_PLUS = QwenVariant("QwenImageEditPlusPipeline", EDIT_PLUS_TEMPLATE, EDIT_DROP, EDIT_PLUS_MAX_IMAGES,
                        EDIT_PLUS_IMAGE_PROMPT, EDIT_PLUS_CONDITION_AREA)


@dataclass
class QwenImageComponents:
    tokenizer: object
    text_encoder: torch.nn.Module
    transformer: QwenImageTransformer
    vae: torch.nn.Module
    scheduler: FlowMatchConfig
    processor: object | None = None  # Qwen2-VL processor (editing): image placeholders + vision inputs
    vae_tiling: bool | None = None  # EngineConfig.vae_tiling

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** len(self.vae.config.temperal_downsample)

    def latent_stats(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel latent mean and std, shaped (1, z, 1, 1, 1)."""
        z = self.vae.config.z_dim
        mean = torch.tensor(self.vae.config.latents_mean).view(1, z, 1, 1, 1).to(device, dtype)
        std = torch.tensor(self.vae.config.latents_std).view(1, z, 1, 1, 1).to(device, dtype)
        return mean, std


# ---------------------------------------------------------------------------------------------------------
# Text


@torch.no_grad()
def qwen_prompt_embeds(encoder: torch.nn.Module, inputs: dict[str, torch.Tensor], drop: int,
                       device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen2.5-VL's last hidden state for tokenized templates (`inputs`: input_ids, attention_mask and,
    with images, pixel_values and image_grid_thw). Each prompt keeps its real tokens after the first
    `drop`; they are stacked zero-padded to the longest -> embeds (B, T, D) in the encoder's dtype and
    mask (B, T) bool (True = real token)."""
    keys = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")
    kwargs = {k: inputs[k].to(device) for k in keys if inputs.get(k) is not None}
    states = encoder(**kwargs, output_hidden_states=True).hidden_states[-1]  # (B, L, D)
    real = kwargs["attention_mask"].bool()
    rows = [s[m][drop:] for s, m in zip(states, real, strict=True)]
    length = max(r.shape[0] for r in rows)
    embeds = states.new_zeros(len(rows), length, states.shape[-1])
    mask = torch.zeros(len(rows), length, dtype=torch.bool, device=states.device)
    for i, r in enumerate(rows):
        embeds[i, :r.shape[0]] = r
        mask[i, :r.shape[0]] = True
    return embeds, mask


def reference_size(image: object, area: int = EDIT_AREA) -> tuple[int, int]:
    """(width, height) an input image is resized to when editing: its aspect ratio at about `area` pixels,
    in multiples of 32 (the reference's rule)."""
    w, h = image.size  # type: ignore[attr-defined]
    return size_for_aspect(area, w / h, 32)


def condition_images(requests: list[GenerationRequest], variant: QwenVariant, vae_scale_factor: int) -> list:
    """The input images the vision tower sees, request by request (PIL, resized as the reference does)."""
    from diffusers.image_processor import VaeImageProcessor

    pre = VaeImageProcessor(vae_scale_factor=vae_scale_factor * 2)
    out = []
    for image in (im for r in requests for im in r.images):
        width, height = reference_size(image, variant.condition_area or EDIT_AREA)
        out.append(pre.resize(image, height, width))
    return out


def image_sizes(request: GenerationRequest, variant: QwenVariant) -> tuple[tuple[int, int], ...]:
    """The (width, height) of each input image as the VAE and the vision tower get it: what the requests of
    one batch must share."""
    area = variant.condition_area or EDIT_AREA
    return tuple(s for im in request.images for s in (reference_size(im), reference_size(im, area)))


class QwenTextEncodingStage(PipelineStage):
    """cond (and uncond, for true CFG): "text" (B, T, D) conditioning in the transformer dtype and, when
    some position of the batch is padding, "text_mask" (B, T) bool."""

    name = "text_encoding"

    def __init__(self, c: QwenImageComponents, variant: QwenVariant) -> None:
        self.c, self.variant = c, variant

    def _encode(self, state: PipelineState, prompts: list[str], images: list[object] | None) -> Cond:
        c, v, counts = self.c, self.variant, [r.num_outputs for r in state.requests]
        if images is None:
            inputs = c.tokenizer([v.template.format(p) for p in prompts], max_length=TOKENIZER_MAX_LENGTH + v.drop,
                                 padding=True, truncation=True, return_tensors="pt")
            embeds, mask = qwen_prompt_embeds(c.text_encoder, inputs, v.drop, state.device)
            n = state.request.max_sequence_length
            embeds, mask = embeds[:, :n], mask[:, :n]
        else:
            if v.image_prompt is not None:  # "Picture 1: <image> Picture 2: <image> ..." before each prompt
                prompts = ["".join(v.image_prompt.format(i + 1) for i in range(len(r.images))) + p
                           for r, p in zip(state.requests, prompts, strict=True)]
            inputs = c.processor(text=[v.template.format(p) for p in prompts], images=images, padding=True,
                                 return_tensors="pt")
            embeds, mask = qwen_prompt_embeds(c.text_encoder, inputs, v.drop, state.device)
        dt = c.transformer.img_in.weight.dtype
        cond = {"text": repeat_per_output(embeds.to(dt), counts)}  # (B, T, D)
        if not bool(mask.all()):  # the one host sync: a mask only where a batch mixes prompt lengths
            cond["text_mask"] = repeat_per_output(mask, counts)
        return cond

    def run(self, state: PipelineState) -> None:
        edit = self.variant.max_images > 0
        images = condition_images(state.requests, self.variant, self.c.vae_scale_factor) if edit else None
        state.cond = self._encode(state, [r.prompt for r in state.requests], images)
        r = state.request
        if r.negative_prompt is not None and r.guidance_scale > 1.0:
            state.uncond = self._encode(state, [q.negative_prompt or "" for q in state.requests], images)


# ---------------------------------------------------------------------------------------------------------
# Latents, schedule, denoising


class QwenEditImageStage(PipelineStage):
    """Editing: every input image at its reference size, VAE-encoded (distribution mode), normalised with
    the per-channel latent statistics and packed; a request's images one after the other -> image_cond
    "ref_latents" (B, N_ref, 4z) and "ref_grid" (K, 2) the token rows and columns of each of the K images
    (a CPU tensor)."""

    name = "image_encoding"

    def __init__(self, c: QwenImageComponents) -> None:
        self.c = c

    @torch.no_grad()
    def run(self, state: PipelineState) -> None:
        from diffusers.image_processor import VaeImageProcessor

        c, f = self.c, self.c.vae_scale_factor
        pre = VaeImageProcessor(vae_scale_factor=f * 2)
        tokens, grid = [], []
        for k, image in enumerate(state.request.images):  # the k-th image of every request: the same size
            width, height = reference_size(image)
            resized = [pre.resize(r.images[k], height, width) for r in state.requests]
            pixels = pre.preprocess(resized, height, width).unsqueeze(2)  # (R, 3, 1, H, W)
            z = c.vae.encode(pixels.to(state.device, state.dtype).to(c.vae.dtype)).latent_dist.mode()
            mean, std = c.latent_stats(z.device, z.dtype)
            z = ((z - mean) / std)[:, :, 0]  # (R, z, H/f, W/f)
            tokens.append(pack_latents(z).to(state.dtype))
            grid.append([z.shape[2] // 2, z.shape[3] // 2])
        counts = [r.num_outputs for r in state.requests]
        state.image_cond["ref_latents"] = repeat_per_output(torch.cat(tokens, dim=1), counts)
        state.image_cond["ref_grid"] = torch.tensor(grid)


class QwenLatentStage(PipelineStage):
    name = "latent_preparation"

    def __init__(self, c: QwenImageComponents) -> None:
        self.c = c

    def run(self, state: PipelineState) -> None:
        f = self.c.vae_scale_factor
        h, w = state.request.height // f, state.request.width // f
        channels = self.c.transformer.cfg.in_channels // 4
        state.latents = pack_latents(initial_noise(state.requests, (channels, h, w), state.device, state.dtype))


class QwenTimestepStage(PipelineStage):
    """Flow-match Euler over the default sigmas, shifted for the number of noise tokens, stretched to the
    checkpoint's shift_terminal."""

    name = "timestep_preparation"

    def __init__(self, c: QwenImageComponents) -> None:
        self.c = c

    def run(self, state: PipelineState) -> None:
        assert state.latents is not None
        sampler = FlowMatchEulerSampler.create(state.request.num_inference_steps, self.c.scheduler, state.device,
                                               image_seq_len=state.latents.shape[1])
        state.sampler, state.sigmas, state.timesteps = sampler, sampler.sigmas, sampler.timesteps


def image_shapes(state: PipelineState, vae_scale_factor: int) -> list[ImageShape]:
    """The token grids the transformer's RoPE needs: the output image, then each reference image (editing)."""
    f = 2 * vae_scale_factor
    shapes: list[ImageShape] = [(1, state.request.height // f, state.request.width // f)]
    if "ref_grid" in state.image_cond:
        shapes += [(1, rows, cols) for rows, cols in state.image_cond["ref_grid"].tolist()]
    return shapes


class QwenImagePredictor:
    """The model call for the shared denoising stage: the latents (with the reference tokens appended when
    editing) and one branch's text conditioning; the timestep in the latents' dtype, divided by 1000, as in
    the reference loop. The guidance combine (true CFG) is the stage's."""

    def __init__(self, c: QwenImageComponents) -> None:
        self.c = c

    def prepare(self, state: PipelineState) -> PredictFn:
        model = self.c.transformer  # read now: a parallel transform may have replaced it
        shapes = image_shapes(state, self.c.vae_scale_factor)
        ref = state.image_cond.get("ref_latents")

        def predict(x: torch.Tensor, i: int, t: torch.Tensor, cond: Cond) -> torch.Tensor:
            inp = x if ref is None else torch.cat([x, ref], dim=1)  # (B, N [+ N_ref], 4z)
            return model(inp, cond["text"], cond.get("text_mask"), t.expand(x.shape[0]).to(x.dtype) / 1000, shapes)

        return predict


class QwenDecodingStage(PipelineStage):
    name = "decoding"

    def __init__(self, c: QwenImageComponents) -> None:
        self.c = c

    @torch.no_grad()
    def run(self, state: PipelineState) -> None:
        assert state.latents is not None
        f, vae = self.c.vae_scale_factor, self.c.vae
        z = unpack_latents(state.latents, state.request.height // f, state.request.width // f)  # (B, z, h, w)
        z = z.unsqueeze(2).to(vae.dtype)  # (B, z, 1, h, w)
        mean, std = self.c.latent_stats(z.device, z.dtype)
        estimate = qwen_decode_bytes(vae.config, 1, state.request.height, state.request.width, vae.dtype) * z.shape[0]
        set_tiling(vae, use_tiling(self.c.vae_tiling, estimate, state.device))
        image = vae.decode(z / (1.0 / std) + mean, return_dict=False)[0][:, :, 0]
        state.pixels = (image / 2 + 0.5).clamp(0, 1).float()  # (B, 3, H, W)


# ---------------------------------------------------------------------------------------------------------
# Validation, defaults, loading


def qwen_decode_bytes(vae_config: Mapping[str, Any], frames: int, height: int, width: int,
                      dtype: torch.dtype) -> int:
    """Estimated peak bytes of one image's untiled decode: the Wan-architecture VAE on one frame."""
    return wan_decode_bytes(vae_config, 1, height, width, dtype)


class QwenInputStage(InputValidationStage):
    """Validation (the edit models' default size comes from the input image, `size_from_image_area`) plus
    two rules of Qwen's: a schedule stretched to `shift_terminal` needs 2 steps or more (with one, the
    reference's sigmas are NaN), and the edit requests of one batch share their images' sizes."""

    def __init__(self, defaults: ModelDefaults, variant: QwenVariant, scheduler: FlowMatchConfig) -> None:
        super().__init__(defaults)
        self.variant, self.scheduler = variant, scheduler

    def run(self, state: PipelineState) -> None:
        super().run(state)
        if self.scheduler.shift_terminal and state.request.num_inference_steps < 2:  # type: ignore[operator]
            raise InvalidRequestError("num_inference_steps=1 is not accepted: this model's schedule (stretched to "
                                      "shift_terminal) needs at least 2 steps", param="num_inference_steps")
        if len({image_sizes(r, self.variant) for r in state.requests}) > 1:
            raise InvalidRequestError("edit requests batched together must have as many input images, of the same "
                                      "aspect ratios (they are resized to the same sizes)", param="image")


def qwen_defaults(vae_scale_factor: int, variant: QwenVariant, overrides: dict | None = None) -> ModelDefaults:
    """Reference defaults: 50 steps, true CFG 4.0 (with a negative prompt), 512 text tokens; 1024x1024
    for text-to-image; editing: the (last) input image's aspect ratio at about 1024x1024 pixels."""
    f, edit = vae_scale_factor, variant.max_images > 0
    base = ModelDefaults(
        kind="image", height=DEFAULT_SAMPLE_SIZE * f, width=DEFAULT_SAMPLE_SIZE * f, num_inference_steps=50,
        guidance_scale=TRUE_CFG_SCALE, size_multiple=2 * f, min_size=2 * f, max_size=max(4096, 4 * f),
        max_sequence_length=512, max_sequence_length_limit=TOKENIZER_MAX_LENGTH, needs_image=edit, accepts_image=edit, uses_negative_prompt=True,
        size_from_image_area=EDIT_AREA if edit else None, guidance="true_cfg", max_images=max(variant.max_images, 1),
    )
    return replace_defaults(base, overrides or {})


def qwen_input_stage(index: ModelIndex, variant: QwenVariant) -> QwenInputStage:
    """The pipeline's validation stage from the config files alone (it runs before any weight is read): the
    VAE's downsampling factor (2 ** temporal stages, as the loaded VAE gives it), the scheduler config and
    the repo's diffserve_defaults.json."""
    vae = read_json(index.folder("vae") / "config.json")
    factor = 2 ** len(vae.get("temperal_downsample", (False, True, True)))  # AutoencoderKLQwenImage's default
    scheduler = FlowMatchConfig.from_dict(read_json(index.folder("scheduler") / "scheduler_config.json"))
    return QwenInputStage(qwen_defaults(factor, variant, repo_defaults(index.root)), variant, scheduler)


@functools.cache
def _processor_class() -> type:
    from transformers import Qwen2VLProcessor

    class QwenImageTextProcessor(Qwen2VLProcessor):
        """Qwen2VLProcessor without its video processor (which needs torchvision); the pipelines pass no video."""

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs) -> None:
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    return QwenImageTextProcessor


def load_processor(folder: Path) -> object:
    """The edit repo's Qwen2-VL processor: its tokenizer and image processor (the class its config names
    when that loads, else transformers' PIL implementation of it), without a video processor."""
    from transformers import AutoImageProcessor, Qwen2Tokenizer

    try:
        return _processor_class()(image_processor=AutoImageProcessor.from_pretrained(folder),
                                  tokenizer=Qwen2Tokenizer.from_pretrained(folder))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{folder}: could not load the Qwen2-VL processor: {str(e).splitlines()[0]}") from None


def load_qwen_components(index: ModelIndex, cfg: EngineConfig, attention: AttentionOp,
                         edit: bool) -> QwenImageComponents:
    dt = cfg.dtype
    folder = index.folder("transformer")
    tcfg = QwenImageConfig.from_dict(read_json(folder / "config.json"))
    return QwenImageComponents(
        tokenizer=load_component(index, "tokenizer"),
        text_encoder=load_component(index, "text_encoder", dt, cfg.load_device("text_encoder")),
        transformer=load_dit(lambda: QwenImageTransformer(tcfg, attention), folder, dt, cfg.load_device("transformer")),
        vae=load_component(index, "vae", cfg.vae_dtype or dt, cfg.load_device("vae")),
        scheduler=FlowMatchConfig.from_dict(read_json(index.folder("scheduler") / "scheduler_config.json")),
        processor=load_processor(index.folder("processor")) if edit else None,
        vae_tiling=cfg.vae_tiling,
    )


def _build(index: ModelIndex, cfg: EngineConfig, attention: AttentionOp, variant: QwenVariant) -> ComposedPipeline:
    edit = variant.max_images > 0
    validation = qwen_input_stage(index, variant)  # from the config files: a bad repo fails before the weights load
    c = load_qwen_components(index, cfg, attention, edit)
    stages: list[PipelineStage] = [validation, QwenTextEncodingStage(c, variant)]
    if edit:
        stages.append(QwenEditImageStage(c))
    stages += [QwenLatentStage(c), QwenTimestepStage(c), DenoisingStage(QwenImagePredictor(c), NormRescaledCfg()),
               QwenDecodingStage(c)]
    return ComposedPipeline(variant.pipeline, stages, validation.defaults, components=c)


def build_qwen_image_pipeline(index: ModelIndex, cfg: EngineConfig, attention: AttentionOp) -> ComposedPipeline:
    return _build(index, cfg, attention, T2I)


def build_qwen_image_edit_pipeline(index: ModelIndex, cfg: EngineConfig, attention: AttentionOp) -> ComposedPipeline:
    return _build(index, cfg, attention, EDIT)


def build_qwen_image_edit_plus_pipeline(index: ModelIndex, cfg: EngineConfig,
                                        attention: AttentionOp) -> ComposedPipeline:
    return _build(index, cfg, attention, EDIT_PLUS)
