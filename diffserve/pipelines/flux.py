"""FLUX.1 text-to-image (dev and schnell), as a list of stages.

Recipe: CLIP pooled + T5 prompt embeddings -> Gaussian latents packed 2x2 into tokens -> flow-match
sigmas shifted for the resolution -> Euler denoising with our FLUX transformer in the shared denoising
stage (guidance embedded for dev) -> unpack, undo the VAE scaling/shift, VAE decode.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from diffserve.config import EngineConfig, ModelDefaults
from diffserve.errors import InvalidRequestError
from diffserve.layers.attention import AttentionOp
from diffserve.models.dits.flux import FluxConfig, FluxTransformer
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
from diffserve.pipelines.stages.latents import initial_noise
from diffserve.pipelines.stages.text import clip_pooled, repeat_per_output, t5_hidden_states
from diffserve.pipelines.stages.vae_tiling import (
    decode_bytes,
    set_tiling,
    use_tiling,
    widest_decoder_channels,
)
from diffserve.schedulers.flow_match import FlowMatchConfig, FlowMatchEulerSampler
from diffserve.schedulers.guidance import EmbeddedGuidance, Guidance, NoGuidance

DEFAULT_SAMPLE_SIZE = 128  # latent pixels: 1024 px at the usual VAE factor 8


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, C*4): 2x2 patches become tokens."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, h/2 * w/2, C*4) -> (B, C, h, w), the inverse of `pack_latents`."""
    b, _, ch = x.shape
    x = x.view(b, h // 2, w // 2, ch // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, ch // 4, h, w)


def image_ids(h2: int, w2: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(h2*w2, 3) RoPE positions of the packed tokens: (0, row, col)."""
    ids = torch.zeros(h2, w2, 3)
    ids[..., 1] = torch.arange(h2)[:, None]
    ids[..., 2] = torch.arange(w2)[None, :]
    return ids.reshape(h2 * w2, 3).to(device=device, dtype=dtype)


@dataclass
class FluxComponents:
    tokenizer: object
    text_encoder: torch.nn.Module
    tokenizer_2: object
    text_encoder_2: torch.nn.Module
    transformer: FluxTransformer
    vae: torch.nn.Module
    scheduler: FlowMatchConfig
    vae_tiling: bool | None = None  # EngineConfig.vae_tiling

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


class FluxTextEncodingStage(PipelineStage):
    name = "text_encoding"

    def __init__(self, c: FluxComponents) -> None:
        self.c = c

    def run(self, state: PipelineState) -> None:
        prompts = [r.prompt for r in state.requests]
        counts = [r.num_outputs for r in state.requests]
        pooled = clip_pooled(self.c.tokenizer, self.c.text_encoder, prompts, state.device)
        embeds = t5_hidden_states(self.c.tokenizer_2, self.c.text_encoder_2, prompts,
                                  state.request.max_sequence_length, state.device)
        state.cond = {
            "prompt_embeds": repeat_per_output(embeds.to(state.dtype), counts),  # (B, T, 4096)
            "pooled": repeat_per_output(pooled.to(state.dtype), counts),  # (B, 768)
        }


class FluxLatentStage(PipelineStage):
    name = "latent_preparation"

    def __init__(self, c: FluxComponents) -> None:
        self.c = c

    def run(self, state: PipelineState) -> None:
        f = self.c.vae_scale_factor
        h, w = state.request.height // f, state.request.width // f
        channels = self.c.transformer.cfg.in_channels // 4
        noise = initial_noise(state.requests, (channels, h, w), state.device, state.dtype)
        state.latents = pack_latents(noise)  # (B, N, C*4)
        state.image_cond["img_ids"] = image_ids(h // 2, w // 2, state.device, state.dtype)


class FluxTimestepStage(PipelineStage):
    """Flow-match Euler over the default sigmas, shifted for the number of image tokens."""

    name = "timestep_preparation"

    def __init__(self, c: FluxComponents) -> None:
        self.c = c

    def run(self, state: PipelineState) -> None:
        assert state.latents is not None
        sampler = FlowMatchEulerSampler.create(state.request.num_inference_steps, self.c.scheduler, state.device,
                                               image_seq_len=state.latents.shape[1])
        state.sampler, state.sigmas, state.timesteps = sampler, sampler.sigmas, sampler.timesteps


class FluxPredictor:
    """FLUX's model call for the shared denoising stage. The guidance scale (dev) is a model input, so the
    stage's guidance is `EmbeddedGuidance` and there is one branch, `state.cond`.

    Every step's AdaNorm outputs are computed once per generation in `prepare` (same values as per step;
    the ~3.2 B modulation weights are read once per generation instead of once per step)."""

    def __init__(self, c: FluxComponents) -> None:
        self.c = c

    def prepare(self, state: PipelineState) -> PredictFn:
        assert state.latents is not None and state.sampler is not None
        model, x = self.c.transformer, state.latents  # read now: a parallel transform may have replaced it
        batch, pooled = x.shape[0], state.cond["pooled"]
        txt_ids = torch.zeros(state.cond["prompt_embeds"].shape[1], 3, device=state.device, dtype=state.dtype)
        img_ids = state.image_cond["img_ids"]
        guidance = None
        if model.cfg.guidance_embeds:
            guidance = torch.full((batch,), state.request.guidance_scale, device=state.device, dtype=torch.float32)
        table = model.step_modulations(state.sampler.timesteps.to(x.dtype) / 1000, pooled, guidance)

        def predict(x: torch.Tensor, i: int, t: torch.Tensor, cond: Cond) -> torch.Tensor:
            return model(x, cond["prompt_embeds"], cond["pooled"], t.expand(batch).to(x.dtype) / 1000, img_ids,
                         txt_ids, guidance, modulation=table.rows(i * batch, (i + 1) * batch))

        return predict


def flux_guidance(c: FluxComponents) -> Guidance:
    """dev embeds the guidance scale in the model; schnell (timestep-distilled) takes none."""
    return EmbeddedGuidance() if c.transformer.cfg.guidance_embeds else NoGuidance()


class FluxDecodingStage(PipelineStage):
    name = "decoding"

    def __init__(self, c: FluxComponents) -> None:
        self.c = c

    @torch.no_grad()
    def run(self, state: PipelineState) -> None:
        assert state.latents is not None
        f, vae = self.c.vae_scale_factor, self.c.vae
        z = unpack_latents(state.latents, state.request.height // f, state.request.width // f)
        z = z / vae.config.scaling_factor + vae.config.shift_factor
        r = state.request
        estimate = flux_decode_bytes(vae.config, 1, r.height, r.width, vae.dtype) * z.shape[0]
        set_tiling(vae, use_tiling(self.c.vae_tiling, estimate, state.device))
        image = vae.decode(z.to(vae.dtype), return_dict=False)[0]
        state.pixels = (image / 2 + 0.5).clamp(0, 1).float()  # (B, 3, H, W)


def flux_decode_bytes(vae_config: Mapping[str, Any], frames: int, height: int, width: int,
                      dtype: torch.dtype) -> int:
    """Estimated peak bytes of one image's untiled decode (AutoencoderKL; `frames` is ignored)."""
    return decode_bytes(widest_decoder_channels(vae_config["block_out_channels"]), 1, height, width, dtype)


def load_flux_components(index: ModelIndex, cfg: EngineConfig, attention: AttentionOp) -> FluxComponents:
    dt = cfg.dtype
    folder = index.folder("transformer")
    tcfg = FluxConfig.from_dict(read_json(folder / "config.json"))
    return FluxComponents(
        tokenizer=load_component(index, "tokenizer"),
        text_encoder=load_component(index, "text_encoder", dt, cfg.load_device("text_encoder")),
        tokenizer_2=load_component(index, "tokenizer_2"),
        text_encoder_2=load_component(index, "text_encoder_2", dt, cfg.load_device("text_encoder_2")),
        transformer=load_dit(lambda: FluxTransformer(tcfg, attention), folder, dt, cfg.load_device("transformer")),
        vae=load_component(index, "vae", cfg.vae_dtype or dt, cfg.load_device("vae")),
        scheduler=FlowMatchConfig.from_dict(read_json(index.folder("scheduler") / "scheduler_config.json")),
        vae_tiling=cfg.vae_tiling,
    )


class FluxInputStage(InputValidationStage):
    """Validation plus FLUX's own rule: it has no negative-prompt path (guidance is embedded)."""

    def run(self, state: PipelineState) -> None:
        super().run(state)
        if any(r.negative_prompt for r in state.requests):
            raise InvalidRequestError("FLUX.1 does not use a negative prompt (its guidance is distilled into the "
                                      "model); leave negative_prompt out", param="negative_prompt")


def flux_defaults(vae_scale_factor: int, guidance_embeds: bool, overrides: dict | None = None) -> ModelDefaults:
    """Reference defaults: dev 1024^2, 28 steps, guidance 3.5, 512 T5 tokens; schnell (no guidance
    embedding: timestep-distilled) 4 steps, 256 tokens. `overrides` (a repo's diffserve_defaults.json)
    may set height, width, num_inference_steps, guidance_scale, max_sequence_length."""
    f = vae_scale_factor
    base = ModelDefaults(
        kind="image", height=DEFAULT_SAMPLE_SIZE * f, width=DEFAULT_SAMPLE_SIZE * f,
        num_inference_steps=28 if guidance_embeds else 4, guidance_scale=3.5 if guidance_embeds else 0.0,
        size_multiple=2 * f, min_size=2 * f, max_size=max(4096, 4 * f),
        max_sequence_length=512 if guidance_embeds else 256, guidance="embedded" if guidance_embeds else "none",
    )
    return replace_defaults(base, overrides or {})


def flux_defaults_from_configs(index: ModelIndex) -> ModelDefaults:
    """`flux_defaults` from the repo's config files alone, no weight read: the VAE's downsampling factor
    (2 ** (blocks - 1), as the loaded VAE gives it), the transformer's guidance embedding and the repo's
    diffserve_defaults.json."""
    vae = read_json(index.folder("vae") / "config.json")
    tcfg = FluxConfig.from_dict(read_json(index.folder("transformer") / "config.json"))
    factor = 2 ** (len(vae.get("block_out_channels", (64,))) - 1)  # AutoencoderKL's default: one block
    return flux_defaults(factor, tcfg.guidance_embeds, repo_defaults(index.root))


def flux_input_stage(index: ModelIndex) -> FluxInputStage:
    """The pipeline's validation stage from the config files alone (it runs before any weight is read)."""
    return FluxInputStage(flux_defaults_from_configs(index))


def build_flux_pipeline(index: ModelIndex, cfg: EngineConfig, attention: AttentionOp) -> ComposedPipeline:
    validation = flux_input_stage(index)  # from the config files: a bad repo fails before the weights load
    c = load_flux_components(index, cfg, attention)
    stages: list[PipelineStage] = [
        validation, FluxTextEncodingStage(c), FluxLatentStage(c), FluxTimestepStage(c),
        DenoisingStage(FluxPredictor(c), flux_guidance(c)), FluxDecodingStage(c),
    ]
    return ComposedPipeline("FluxPipeline", stages, validation.defaults, components=c)
