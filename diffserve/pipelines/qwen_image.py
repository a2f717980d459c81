"""Qwen-Image (text -> image) and Qwen-Image-Edit (image + text -> image), as lists of stages.

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
(`QwenImageTransformer.finish`).

Request fields: `guidance_scale` is the reference's `true_cfg_scale` (default 4.0); as in the reference,
guidance runs only when the request has a negative prompt (" " is enough) and the scale is above 1.
`max_sequence_length` (default 512) truncates the text-to-image conditioning; editing never truncates
(as the reference: its conditioning holds the image tokens).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

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
TOKENIZER_MAX_LENGTH = 1024  # prompt tokens kept after the template's prefix (T2I truncation)
DEFAULT_SAMPLE_SIZE = 128  # latent pixels: 1024 px at the VAE factor 8
EDIT_AREA = 1024 * 1024  # pixels of the reference image (and of the default output) when editing
TRUE_CFG_SCALE = 4.0


@dataclass
class QwenImageComponents:
    tokenizer: object
    text_encoder: torch.nn.Module
    transformer: QwenImageTransformer
    vae: torch.nn.Module
    scheduler: FlowMatchConfig
    processor: object | None = None  # Qwen2-VL processor (editing): image placeholders + vision inputs

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


def reference_size(image: object) -> tuple[int, int]:
    """(width, height) the reference image is resized to when editing: the input's aspect ratio at about
    EDIT_AREA pixels, in multiples of 32 (the reference's rule)."""
    w, h = image.size  # type: ignore[attr-defined]
    return size_for_aspect(EDIT_AREA, w / h, 32)


def reference_images(requests: list[GenerationRequest], vae_scale_factor: int) -> list[object]:
    """Each request's input image resized to its `reference_size` (PIL, as the reference resizes it)."""
    from diffusers.image_processor import VaeImageProcessor

    pre = VaeImageProcessor(vae_scale_factor=vae_scale_factor * 2)
    out = []
    for r in requests:
        width, height = reference_size(r.image)
        out.append(pre.resize(r.image, height, width))
    return out


class QwenTextEncodingStage(PipelineStage):
    """cond (and uncond, for true CFG): "text" (B, T, D) conditioning in the transformer dtype and, when
    some position of the batch is padding, "text_mask" (B, T) bool."""

    name = "text_encoding"

    def __init__(self, c: QwenImageComponents, edit: bool) -> None:
        self.c, self.edit = c, edit

    def _encode(self, state: PipelineState, prompts: list[str], images: list[object] | None) -> Cond:
        c, counts = self.c, [r.num_outputs for r in state.requests]
        if images is None:
            inputs = c.tokenizer([T2I_TEMPLATE.format(p) for p in prompts], max_length=TOKENIZER_MAX_LENGTH + T2I_DROP,
                                 padding=True, truncation=True, return_tensors="pt")
            embeds, mask = qwen_prompt_embeds(c.text_encoder, inputs, T2I_DROP, state.device)
            n = state.request.max_sequence_length
            embeds, mask = embeds[:, :n], mask[:, :n]
        else:
            inputs = c.processor(text=[EDIT_TEMPLATE.format(p) for p in prompts], images=images, padding=True,
                                 return_tensors="pt")
            embeds, mask = qwen_prompt_embeds(c.text_encoder, inputs, EDIT_DROP, state.device)
        dt = c.transformer.img_in.weight.dtype
        cond = {"text": repeat_per_output(embeds.to(dt), counts)}  # (B, T, D)
        if not bool(mask.all()):  # the one host sync: a mask only where a batch mixes prompt lengths
            cond["text_mask"] = repeat_per_output(mask, counts)
        return cond

    def run(self, state: PipelineState) -> None:
        images = reference_images(state.requests, self.c.vae_scale_factor) if self.edit else None
        state.cond = self._encode(state, [r.prompt for r in state.requests], images)
        r = state.request
        if r.negative_prompt is not None and r.guidance_scale > 1.0:
            state.uncond = self._encode(state, [q.negative_prompt or "" for q in state.requests], images)


# ---------------------------------------------------------------------------------------------------------
# Latents, schedule, denoising


class QwenEditImageStage(PipelineStage):
    """Editing: each input image at its reference size, VAE-encoded (distribution mode), normalised with
    the per-channel latent statistics and packed -> image_cond "ref_latents" (B, N_ref, 4z) and "ref_grid"
    (2,) its token rows and columns (a CPU tensor)."""

    name = "image_encoding"

    def __init__(self, c: QwenImageComponents) -> None:
        self.c = c

    @torch.no_grad()
    def run(self, state: PipelineState) -> None:
        from diffusers.image_processor import VaeImageProcessor

        c, f = self.c, self.c.vae_scale_factor
        images = reference_images(state.requests, f)
        width, height = reference_size(state.request.image)
        pixels = VaeImageProcessor(vae_scale_factor=f * 2).preprocess(images, height, width)  # (R, 3, H, W)
        pixels = pixels.unsqueeze(2).to(state.device, state.dtype)  # (R, 3, 1, H, W)
        z = c.vae.encode(pixels.to(c.vae.dtype)).latent_dist.mode()  # (R, z, 1, H/f, W/f)
        mean, std = c.latent_stats(z.device, z.dtype)
        z = ((z - mean) / std)[:, :, 0]
        counts = [r.num_outputs for r in state.requests]
        state.image_cond["ref_latents"] = repeat_per_output(pack_latents(z).to(state.dtype), counts)
        state.image_cond["ref_grid"] = torch.tensor([z.shape[2] // 2, z.shape[3] // 2])


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
    """The token grids the transformer's RoPE needs: the output image, then the reference image (editing)."""
    f = 2 * vae_scale_factor
    shapes: list[ImageShape] = [(1, state.request.height // f, state.request.width // f)]
    if "ref_grid" in state.image_cond:
        rows, cols = state.image_cond["ref_grid"].tolist()
        shapes.append((1, rows, cols))
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
        image = vae.decode(z / (1.0 / std) + mean, return_dict=False)[0][:, :, 0]
        state.pixels = (image / 2 + 0.5).clamp(0, 1).float()  # (B, 3, H, W)


# ---------------------------------------------------------------------------------------------------------
# Validation, defaults, loading


class QwenInputStage(InputValidationStage):
    """Validation (the edit model's default size comes from the input image, `size_from_image_area`) plus
    two rules of Qwen's: a schedule stretched to `shift_terminal` needs 2 steps or more (with one, the
    reference's sigmas are NaN), and the edit requests of one batch share the reference image size."""

    def __init__(self, defaults: ModelDefaults, edit: bool, scheduler: FlowMatchConfig) -> None:
        super().__init__(defaults)
        self.edit, self.scheduler = edit, scheduler

    def run(self, state: PipelineState) -> None:
        super().run(state)
        if self.scheduler.shift_terminal and state.request.num_inference_steps < 2:  # type: ignore[operator]
            raise InvalidRequestError("num_inference_steps=1 is not accepted: this model's schedule (stretched to "
                                      "shift_terminal) needs at least 2 steps", param="num_inference_steps")
        if self.edit and len({reference_size(r.image) for r in state.requests}) > 1:
            raise InvalidRequestError("edit requests batched together must have input images of the same aspect "
                                      "ratio (they are resized to the same reference size)", param="image")


def qwen_defaults(c: QwenImageComponents, edit: bool, overrides: dict | None = None) -> ModelDefaults:
    """Reference defaults: 50 steps, true CFG 4.0 (with a negative prompt), 512 text tokens; 1024x1024
    for text-to-image; editing: the input image's aspect ratio at about 1024x1024 pixels."""
    f = c.vae_scale_factor
    base = ModelDefaults(
        kind="image", height=DEFAULT_SAMPLE_SIZE * f, width=DEFAULT_SAMPLE_SIZE * f, num_inference_steps=50,
        guidance_scale=TRUE_CFG_SCALE, size_multiple=2 * f, min_size=2 * f, max_size=max(4096, 4 * f),
        max_sequence_length=512, needs_image=edit, accepts_image=edit, uses_negative_prompt=True,
        size_from_image_area=EDIT_AREA if edit else None, guidance="true_cfg",
    )
    return replace_defaults(base, overrides or {})


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
    dt, dev = cfg.dtype, cfg.device
    folder = index.folder("transformer")
    tcfg = QwenImageConfig.from_dict(read_json(folder / "config.json"))
    return QwenImageComponents(
        tokenizer=load_component(index, "tokenizer"),
        text_encoder=load_component(index, "text_encoder", dt, dev),
        transformer=load_dit(lambda: QwenImageTransformer(tcfg, attention), folder, dt, dev),
        vae=load_component(index, "vae", cfg.vae_dtype or dt, dev),
        scheduler=FlowMatchConfig.from_dict(read_json(index.folder("scheduler") / "scheduler_config.json")),
        processor=load_processor(index.folder("processor")) if edit else None,
    )


def _build(index: ModelIndex, cfg: EngineConfig, attention: AttentionOp, edit: bool) -> ComposedPipeline:
    c = load_qwen_components(index, cfg, attention, edit)
    defaults = qwen_defaults(c, edit, repo_defaults(index.root))
    stages: list[PipelineStage] = [QwenInputStage(defaults, edit, c.scheduler), QwenTextEncodingStage(c, edit)]
    if edit:
        stages.append(QwenEditImageStage(c))
    stages += [QwenLatentStage(c), QwenTimestepStage(c), DenoisingStage(QwenImagePredictor(c), NormRescaledCfg()),
               QwenDecodingStage(c)]
    return ComposedPipeline("QwenImageEditPipeline" if edit else "QwenImagePipeline", stages, defaults, components=c)


def build_qwen_image_pipeline(index: ModelIndex, cfg: EngineConfig, attention: AttentionOp) -> ComposedPipeline:
    return _build(index, cfg, attention, edit=False)


def build_qwen_image_edit_pipeline(index: ModelIndex, cfg: EngineConfig, attention: AttentionOp) -> ComposedPipeline:
    return _build(index, cfg, attention, edit=True)
