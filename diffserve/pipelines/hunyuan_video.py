"""HunyuanVideo text-to-video as a list of stages.

Recipe: the prompt in HunyuanVideo's chat template through the LLaMA text encoder (third hidden state from
the end, the template's first 95 tokens cropped, 256 tokens right-padded with a mask) and CLIP-L's pooled
vector -> float32 Gaussian latents (B, 16, (F-1)/4+1, H/8, W/8) -> flow-match Euler over
linspace(1, 0, n+1)[:-1] with the checkpoint's static shift (7.0) -> our transformer with the guidance
scale embedded (guidance x 1000, one branch) -> latents / scaling_factor -> the causal 3-D VAE
(tiled where the untiled decode would not fit).

True CFG (diffusers' `true_cfg_scale`, off by default): with a negative prompt and `true_cfg_scale` > 1 the
negative prompt is encoded like the prompt and the transformer runs a second branch on it, with the same
embedded guidance; the two are combined as uncond + true_cfg_scale * (cond - uncond)
(`TrueCfgOverEmbedded`), so `--enable-cfg-parallel` can split them. Requests that give one of the two
without the other are refused (`diffserve.config.guidance_scales`) rather than silently run without it.

Text padding: the reference runs the DiT on all 256 text positions with a key mask. Masked keys receive
exactly zero attention weight, so the positions after the batch's longest real prompt cannot change any
real token's output; `trim_text_padding` drops them before the DiT (a batch of one then has no padding
and no mask at all, so the fast unmasked kernels run). Only rounding in the attention sums can differ.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from diffserve.config import EngineConfig, GenerationRequest, ModelDefaults
from diffserve.layers.attention import AttentionOp
from diffserve.models.dits.hunyuan_video import HunyuanVideoConfig, HunyuanVideoTransformer
from diffserve.models.loader import ModelIndex, load_component, load_dit, read_json
from diffserve.pipelines.base import (
    ComposedPipeline,
    InputValidationStage,
    PipelineStage,
    PipelineState,
    replace_defaults,
    repo_defaults,
)
from diffserve.pipelines.stages.denoise import Cond, DenoisingStage, PredictFn
from diffserve.pipelines.stages.latents import initial_noise, video_latent_shape
from diffserve.pipelines.stages.text import clip_pooled, repeat_per_output
from diffserve.pipelines.stages.vae_tiling import decode_bytes, use_tiling
from diffserve.schedulers.flow_match import FlowMatchConfig, FlowMatchEulerSampler
from diffserve.schedulers.guidance import TrueCfgOverEmbedded

PROMPT_TEMPLATE = (
    "<|start_header_id|>system<|end_header_id|>\n\nDescribe the video by detailing the following aspects: "
    "1. The main content and theme of the video."
    "2. The color, shape, size, texture, quantity, text, and spatial relationships of the objects."
    "3. Actions, events, behaviors temporal relationships, physical movement changes of the objects."
    "4. background environment, light, style and atmosphere."
    "5. camera angles, movements, and transitions used in the video:<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
)
"""The chat template the LLaMA encoder reads the prompt in (HunyuanVideo's own)."""
CROP_START = 95  # template tokens before the prompt (with BOS), dropped from the encoder output
HIDDEN_STATE_FROM_END = 3  # the reference skips the last 2 layers: hidden_states[-3]
TEXT_TOKENS = 256  # prompt tokens after the crop (the reference's max_sequence_length)
GUIDANCE_MULTIPLIER = 1000.0  # the guidance embedder takes the scale x 1000, like a timestep


@dataclass
class HunyuanVideoComponents:
    tokenizer: object
    text_encoder: torch.nn.Module
    tokenizer_2: object
    text_encoder_2: torch.nn.Module
    transformer: HunyuanVideoTransformer
    vae: torch.nn.Module
    scheduler: FlowMatchConfig
    vae_tiling: bool | None = None  # EngineConfig.vae_tiling

    @property
    def scale_spatial(self) -> int:
        return int(self.vae.config.spatial_compression_ratio)

    @property
    def scale_temporal(self) -> int:
        return int(self.vae.config.temporal_compression_ratio)


# ----------------------------------------------------------------------------------------------------------
# Text


@torch.no_grad()
def llama_prompt_embeds(tokenizer, encoder, prompts: list[str], max_length: int,
                        device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The LLaMA conditioning: prompts in `PROMPT_TEMPLATE`, tokenized to CROP_START + max_length tokens
    (right padding, truncated), the encoder's third hidden state from the end, the first CROP_START
    positions cropped -> embeddings (B, max_length, D) in the encoder's dtype and mask (B, max_length) int64
    (1 = real token)."""
    tok = tokenizer([PROMPT_TEMPLATE.format(p) for p in prompts], max_length=CROP_START + max_length,
                    padding="max_length", truncation=True, return_attention_mask=True, return_tensors="pt")
    ids, mask = tok.input_ids.to(device), tok.attention_mask.to(device)
    states = encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    embeds = states[-HIDDEN_STATE_FROM_END].to(encoder.dtype)
    return embeds[:, CROP_START:], mask[:, CROP_START:]


def trim_text_padding(embeds: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Drop the text positions after the batch's last real token: embeds (B, T, D), mask (B, T) ->
    (B, T', D) and the (B, T') bool mask, or None when every kept position is real. Exact for the DiT
    (those positions are masked keys in every attention; module docstring). One host sync."""
    real = mask.bool()
    ends = (real * torch.arange(1, real.shape[1] + 1, device=real.device)).amax(dim=1)  # last real position + 1
    end, fewest = torch.stack([ends.max(), real.sum(dim=1).min()]).tolist()  # the one host sync
    keep = max(int(end), 1)
    return embeds[:, :keep], (None if fewest == keep else real[:, :keep])


def uses_true_cfg(request: GenerationRequest) -> bool:
    """Whether a (validated) request runs true CFG: a negative prompt and true_cfg_scale > 1, as diffusers."""
    return request.negative_prompt is not None and (request.true_cfg_scale or 1.0) > 1.0


class HunyuanTextEncodingStage(PipelineStage):
    """cond (and uncond, the negative prompts, for true CFG): "text" (B, T', text_dim) LLaMA states with
    trailing padding trimmed, "text_mask" (B, T') bool (absent when every position is real), "pooled"
    (B, 768) CLIP vector; all in the transformer dtype."""

    name = "text_encoding"

    def __init__(self, c: HunyuanVideoComponents) -> None:
        self.c = c

    def _encode(self, state: PipelineState, prompts: list[str]) -> Cond:
        c, counts = self.c, [r.num_outputs for r in state.requests]
        dt = c.transformer.proj_out.weight.dtype
        embeds, mask = llama_prompt_embeds(c.tokenizer, c.text_encoder, prompts, state.request.max_sequence_length,
                                           state.device)
        text, text_mask = trim_text_padding(repeat_per_output(embeds.to(dt), counts), repeat_per_output(mask, counts))
        pooled = clip_pooled(c.tokenizer_2, c.text_encoder_2, prompts, state.device)
        cond = {"text": text, "pooled": repeat_per_output(pooled.to(dt), counts)}
        if text_mask is not None:
            cond["text_mask"] = text_mask
        return cond

    def run(self, state: PipelineState) -> None:
        state.cond = self._encode(state, [r.prompt for r in state.requests])
        if uses_true_cfg(state.request):
            state.uncond = self._encode(state, [r.negative_prompt or "" for r in state.requests])


# ----------------------------------------------------------------------------------------------------------
# Latents, schedule, denoising


class HunyuanLatentStage(PipelineStage):
    name = "latent_preparation"

    def __init__(self, c: HunyuanVideoComponents) -> None:
        self.c = c

    def run(self, state: PipelineState) -> None:
        r, c = state.request, self.c
        shape = video_latent_shape(c.transformer.cfg.in_channels, int(r.num_frames), r.height, r.width,  # type: ignore[arg-type]
                                   c.scale_temporal, c.scale_spatial)
        state.latents = initial_noise(state.requests, shape, state.device, torch.float32)


class HunyuanTimestepStage(PipelineStage):
    """Flow-match Euler over linspace(1, 0, n+1)[:-1] with the checkpoint's static shift."""

    name = "timestep_preparation"

    def __init__(self, c: HunyuanVideoComponents) -> None:
        self.c = c

    def run(self, state: PipelineState) -> None:
        n = state.request.num_inference_steps
        sampler = FlowMatchEulerSampler.create(n, self.c.scheduler, state.device,
                                               base_sigmas=np.linspace(1.0, 0.0, n + 1)[:-1])
        state.sampler, state.sigmas, state.timesteps = sampler, sampler.sigmas, sampler.timesteps


class HunyuanPredictor:
    """The model call for the shared denoising stage: one branch's conditioning with the guidance scale
    embedded (guidance_scale x 1000 in the transformer dtype, as the reference makes it; the same for the
    true-CFG branch). The latents enter in the transformer dtype and the timestep in the latents' dtype, as
    in the reference loop."""

    def __init__(self, c: HunyuanVideoComponents) -> None:
        self.c = c

    def prepare(self, state: PipelineState) -> PredictFn:
        model = self.c.transformer  # read now: a parallel transform may have replaced it
        dt = model.proj_out.weight.dtype
        batch = state.batch_size
        guidance = torch.full((batch,), state.request.guidance_scale, device=state.device, dtype=dt)
        guidance = guidance * GUIDANCE_MULTIPLIER

        def predict(x: torch.Tensor, i: int, t: torch.Tensor, cond: Cond) -> torch.Tensor:
            return model(x.to(dt), t.expand(batch).to(x.dtype), cond["text"], cond.get("text_mask"),
                         cond["pooled"], guidance)

        return predict


# ----------------------------------------------------------------------------------------------------------
# Decoding


def untiled_decode_bytes(vae_config: Mapping[str, Any], frames: int, height: int, width: int,
                         dtype: torch.dtype) -> int:
    """A rough peak-memory estimate of decoding one video without tiling (`stages.vae_tiling.decode_bytes`):
    about four activations of the VAE's full-resolution stage (block_out_channels[0] channels over F x H x W)
    alive at once, plus the float32 output."""
    return decode_bytes(int(vae_config["block_out_channels"][0]), frames, height, width, dtype)


def use_vae_tiling(setting: bool | None, vae, frames: int, height: int, width: int, device: torch.device) -> bool:
    """The engine's `vae_tiling` if set; otherwise tiled only on CUDA when the untiled decode is estimated
    not to fit in 90% of the free device memory (`stages.vae_tiling.use_tiling`)."""
    return use_tiling(setting, untiled_decode_bytes(vae.config, frames, height, width, vae.dtype), device)


class HunyuanDecodingStage(PipelineStage):
    name = "decoding"

    def __init__(self, c: HunyuanVideoComponents) -> None:
        self.c = c

    @torch.no_grad()
    def run(self, state: PipelineState) -> None:
        assert state.latents is not None
        vae, r = self.c.vae, state.request
        if use_vae_tiling(self.c.vae_tiling, vae, int(r.num_frames), r.height, r.width, state.device):  # type: ignore[arg-type]
            vae.enable_tiling()
        else:
            vae.disable_tiling()
        z = state.latents.to(vae.dtype) / vae.config.scaling_factor
        video = vae.decode(z, return_dict=False)[0]
        state.pixels = (video / 2 + 0.5).clamp(0, 1).float()  # (B, 3, F, H, W)


# ----------------------------------------------------------------------------------------------------------
# Building


def hunyuan_video_defaults(scale_spatial: int, patch_size: int) -> ModelDefaults:
    """Reference defaults: 720x1280, 129 frames, 50 steps, embedded guidance 6.0, 24 fps, 256 text tokens;
    true CFG off (true_cfg_scale 1.0; it takes a negative prompt)."""
    return ModelDefaults(
        kind="video", height=720, width=1280, num_frames=129, fps=24, num_inference_steps=50, guidance_scale=6.0,
        size_multiple=scale_spatial * patch_size, min_size=scale_spatial * 2, max_size=2048,
        max_sequence_length=TEXT_TOKENS, min_frames=1, max_frames=257, guidance="embedded",
        uses_negative_prompt=True, true_cfg_scale=1.0,
    )


def hunyuan_video_defaults_from_configs(index: ModelIndex) -> ModelDefaults:
    """`hunyuan_video_defaults` from the repo's config files alone, no weight read: the VAE's spatial
    compression, the transformer's patch size and the repo's diffserve_defaults.json."""
    vae = read_json(index.folder("vae") / "config.json")
    tcfg = HunyuanVideoConfig.from_dict(read_json(index.folder("transformer") / "config.json"))
    base = hunyuan_video_defaults(int(vae.get("spatial_compression_ratio", 8)), tcfg.patch_size)
    return replace_defaults(base, repo_defaults(index.root))


def hunyuan_video_input_stage(index: ModelIndex) -> InputValidationStage:
    """The pipeline's validation stage from the config files alone (it runs before any weight is read). The
    rule that a negative prompt and true_cfg_scale > 1 come together is the request's (`resolve_request`), so
    the server checks it before queueing."""
    return InputValidationStage(hunyuan_video_defaults_from_configs(index))


def load_hunyuan_video_components(index: ModelIndex, cfg: EngineConfig,
                                  attention: AttentionOp) -> HunyuanVideoComponents:
    dt = cfg.dtype
    folder = index.folder("transformer")
    tcfg = HunyuanVideoConfig.from_dict(read_json(folder / "config.json"))
    return HunyuanVideoComponents(
        tokenizer=load_component(index, "tokenizer"),
        text_encoder=load_component(index, "text_encoder", dt, cfg.load_device("text_encoder")),
        tokenizer_2=load_component(index, "tokenizer_2"),
        text_encoder_2=load_component(index, "text_encoder_2", dt, cfg.load_device("text_encoder_2")),
        transformer=load_dit(lambda: HunyuanVideoTransformer(tcfg, attention), folder, dt,
                             cfg.load_device("transformer")),
        vae=load_component(index, "vae", cfg.vae_dtype or dt, cfg.load_device("vae")),
        scheduler=FlowMatchConfig.from_dict(read_json(index.folder("scheduler") / "scheduler_config.json")),
        vae_tiling=cfg.vae_tiling,
    )


def build_hunyuan_video_pipeline(index: ModelIndex, cfg: EngineConfig, attention: AttentionOp) -> ComposedPipeline:
    validation = hunyuan_video_input_stage(index)  # from the config files: a bad repo fails before the weights load
    c = load_hunyuan_video_components(index, cfg, attention)
    stages: list[PipelineStage] = [
        validation, HunyuanTextEncodingStage(c), HunyuanLatentStage(c), HunyuanTimestepStage(c),
        DenoisingStage(HunyuanPredictor(c), TrueCfgOverEmbedded()), HunyuanDecodingStage(c),
    ]
    return ComposedPipeline("HunyuanVideoPipeline", stages, validation.defaults, components=c)
