"""Wan2.1 text-to-video and image-to-video, and FastWan (few-step distilled Wan), as lists of stages.

Recipe: UMT5 prompt embeddings (and negative prompt for CFG) -> [I2V: CLIP image tokens, VAE-encoded
first frame + mask] -> float32 Gaussian latents (B, 16, (F-1)/4+1, H/8, W/8) -> the checkpoint's sampler
(flow UniPC, or the distilled few-step schedule) -> the shared denoising stage with our Wan transformer, CFG
as uncond + s * (cond - uncond) -> latents * std + mean -> Wan VAE decode.

Which sampler a checkpoint runs is chosen from the checkpoint itself (no user flag), `schedule_from_checkpoint`:
- Wan2.1 checkpoints (`WanPipeline`, `WanImageToVideoPipeline`) ship a flow-prediction
  `UniPCMultistepScheduler` (flow_shift 3.0): `schedulers.unipc.UniPCSampler` runs it.
- FastWan checkpoints (FastVideo's few-step DMD-distilled Wan2.1, `model_index.json` class
  `WanDMDPipeline`; their `scheduler/` folder is the base model's UniPC config, which is *not* what they
  were distilled for) run the distilled schedule (`schedulers.dmd`): denoising steps (1000, 757, 522) read
  as positions in a 1000-step flow-match table with shift 8.0 ("warped" steps: model timesteps 1000, 961.4,
  897.3), each step predicting x0 = x - sigma * v and re-noising it to the next step's sigma with fresh
  Gaussian noise (seeded with the request's seed + 1); no classifier-free guidance by default. Source:
  FastVideo's Wan DMD pipeline config (dmd_denoising_steps, flow shift 8, warp_denoising_step) and its
  `pred_noise_to_pred_video` / `add_noise`; defaults 3 steps at 61 x 448 x 832.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

from diffserve.config import EngineConfig, GenerationRequest, ModelDefaults
from diffserve.errors import CheckpointError, InvalidRequestError
from diffserve.layers.attention import AttentionOp
from diffserve.models.dits.wan import WanConfig, WanTransformer
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
from diffserve.pipelines.stages.text import repeat_per_output, umt5_embeddings
from diffserve.pipelines.stages.vae_tiling import (
    decode_bytes,
    set_tiling,
    use_tiling,
    widest_decoder_channels,
)
from diffserve.schedulers.dmd import DMDSampler, dmd_schedule
from diffserve.schedulers.guidance import ClassifierFreeGuidance
from diffserve.schedulers.sampler import Sampler
from diffserve.schedulers.unipc import UniPCSampler

FASTWAN_DMD_STEPS = (1000, 757, 522)  # the denoising steps FastWan was distilled for
FASTWAN_SHIFT = 8.0


@dataclass(frozen=True)
class WanSchedule:
    """Which sampler a Wan checkpoint runs (`kind`), and the request defaults that go with it."""

    kind: Literal["unipc", "dmd"]
    scheduler_config: dict
    default_steps: int
    default_guidance: float
    default_size: tuple[int, int, int] = (480, 832, 81)  # height, width, frames

    def new_sampler(self, steps: int, device: torch.device, requests: list[GenerationRequest]) -> Sampler:
        """A fresh sampler for one batch."""
        if self.kind == "unipc":
            return UniPCSampler(self.scheduler_config, steps, device)
        if self.kind == "dmd":
            if steps != len(FASTWAN_DMD_STEPS):
                raise InvalidRequestError(
                    f"num_inference_steps={steps} is not accepted: this few-step distilled (FastWan) model runs "
                    f"its {len(FASTWAN_DMD_STEPS)}-step schedule; use {len(FASTWAN_DMD_STEPS)}",
                    param="num_inference_steps")
            timesteps, sigmas = dmd_schedule(FASTWAN_DMD_STEPS, FASTWAN_SHIFT)
            seeds = [(int(r.seed) + 1, r.num_outputs) for r in requests]  # type: ignore[arg-type]
            return DMDSampler(timesteps.to(device), sigmas, seeds)
        raise CheckpointError(f"unknown Wan schedule kind {self.kind!r}")


def schedule_from_checkpoint(index: ModelIndex) -> WanSchedule:
    """The schedule the checkpoint asks for: its pipeline class first (FastWan), then its scheduler."""
    raw = read_json(index.folder("scheduler") / "scheduler_config.json")
    if index.pipeline_class == "WanDMDPipeline":
        return WanSchedule("dmd", raw, default_steps=len(FASTWAN_DMD_STEPS), default_guidance=1.0,
                           default_size=(448, 832, 61))
    cls = raw.get("_class_name")
    if cls == "UniPCMultistepScheduler":
        return WanSchedule("unipc", raw, default_steps=50, default_guidance=5.0)
    raise CheckpointError(f"{index.root}: Wan scheduler {cls!r} is not supported; supported: UniPCMultistepScheduler "
                          f"(Wan2.1) or a WanDMDPipeline (FastWan) checkpoint")


@dataclass
class WanComponents:
    tokenizer: object
    text_encoder: torch.nn.Module
    transformer: WanTransformer
    vae: torch.nn.Module
    schedule: WanSchedule
    image_encoder: torch.nn.Module | None = None
    image_processor: object | None = None
    vae_tiling: bool | None = None  # EngineConfig.vae_tiling

    @property
    def scale_spatial(self) -> int:
        return int(getattr(self.vae.config, "scale_factor_spatial", 8))

    @property
    def scale_temporal(self) -> int:
        return int(getattr(self.vae.config, "scale_factor_temporal", 4))

    def latent_stats(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel latent mean and std, shaped (1, z, 1, 1, 1)."""
        z = self.vae.config.z_dim
        mean = torch.tensor(self.vae.config.latents_mean).view(1, z, 1, 1, 1).to(device, dtype)
        std = torch.tensor(self.vae.config.latents_std).view(1, z, 1, 1, 1).to(device, dtype)
        return mean, std


class WanTextEncodingStage(PipelineStage):
    name = "text_encoding"

    def __init__(self, c: WanComponents) -> None:
        self.c = c

    def run(self, state: PipelineState) -> None:
        counts = [r.num_outputs for r in state.requests]
        n = state.request.max_sequence_length
        dt = self.c.transformer.condition_embedder.text_embedder.linear_1.weight.dtype

        def encode(prompts: list[str]) -> torch.Tensor:
            e = umt5_embeddings(self.c.tokenizer, self.c.text_encoder, prompts, n, state.device)
            return repeat_per_output(e.to(dt), counts)  # (B, L, 4096)

        state.cond = {"context": encode([r.prompt for r in state.requests])}
        if state.request.guidance_scale > 1.0:
            state.uncond = {"context": encode([r.negative_prompt or "" for r in state.requests])}


class WanImageEncodingStage(PipelineStage):
    """I2V: CLIP penultimate-layer tokens of the input image, and the VAE latents of the first frame
    followed by zero frames, with Wan's 4-channel first-frame mask in front: (B, 4 + 16, F_lat, h, w)."""

    name = "image_encoding"

    def __init__(self, c: WanComponents) -> None:
        self.c = c

    @torch.no_grad()
    def run(self, state: PipelineState) -> None:
        from diffusers.video_processor import VideoProcessor

        c, r = self.c, state.request
        counts = [q.num_outputs for q in state.requests]
        images = [q.image for q in state.requests]
        dt = c.transformer.patch_embedding.weight.dtype
        if c.transformer.cfg.image_dim is not None and c.image_encoder is not None:
            pix = c.image_processor(images=images, return_tensors="pt").pixel_values
            enc = c.image_encoder(pixel_values=pix.to(state.device, c.image_encoder.dtype), output_hidden_states=True)
            state.image_cond["image_context"] = repeat_per_output(enc.hidden_states[-2].to(dt), counts)
        frames = int(r.num_frames)  # type: ignore[arg-type]
        pre = VideoProcessor(vae_scale_factor=c.scale_spatial)
        first = pre.preprocess(images, height=r.height, width=r.width).to(state.device, torch.float32)
        video = torch.cat([first.unsqueeze(2), first.new_zeros(first.shape[0], 3, frames - 1, r.height, r.width)], 2)
        latent = c.vae.encode(video.to(c.vae.dtype)).latent_dist.mode().to(torch.float32)
        mean, std = c.latent_stats(state.device, torch.float32)
        latent = (latent - mean) * (1.0 / std)
        t, f_lat = c.scale_temporal, latent.shape[2]
        mask = torch.zeros(latent.shape[0], t, f_lat, latent.shape[3], latent.shape[4], device=state.device)
        mask[:, :, 0] = 1  # the first latent frame holds the given image (4 video frames per latent frame)
        state.image_cond["condition"] = repeat_per_output(torch.cat([mask, latent], dim=1), counts)


class WanLatentStage(PipelineStage):
    name = "latent_preparation"

    def __init__(self, c: WanComponents) -> None:
        self.c = c

    def run(self, state: PipelineState) -> None:
        r, c = state.request, self.c
        shape = video_latent_shape(c.vae.config.z_dim, int(r.num_frames), r.height, r.width,  # type: ignore[arg-type]
                                   c.scale_temporal, c.scale_spatial)
        state.latents = initial_noise(state.requests, shape, state.device, torch.float32)


class WanTimestepStage(PipelineStage):
    """The checkpoint's sampler (`WanSchedule`), made fresh for the batch."""

    name = "timestep_preparation"

    def __init__(self, c: WanComponents) -> None:
        self.c = c

    def run(self, state: PipelineState) -> None:
        state.sampler = self.c.schedule.new_sampler(state.request.num_inference_steps, state.device, state.requests)
        state.timesteps = state.sampler.timesteps


class WanPredictor:
    """Wan's model call for the shared denoising stage: the latents (I2V: with the first-frame mask and
    latents in front of them on the channel axis) in the transformer's dtype, one branch's text context,
    and the I2V image tokens. CFG is the stage's (`ClassifierFreeGuidance`)."""

    def __init__(self, c: WanComponents) -> None:
        self.c = c

    def prepare(self, state: PipelineState) -> PredictFn:
        model = self.c.transformer  # read now: a parallel transform may have replaced it
        dt = model.patch_embedding.weight.dtype
        image_context = state.image_cond.get("image_context")
        condition = state.image_cond.get("condition")

        def predict(x: torch.Tensor, i: int, t: torch.Tensor, cond: Cond) -> torch.Tensor:
            inp = (torch.cat([x, condition], dim=1) if condition is not None else x).to(dt)
            return model(inp, t.expand(x.shape[0]), cond["context"], image_context)

        return predict


class WanDecodingStage(PipelineStage):
    name = "decoding"

    def __init__(self, c: WanComponents) -> None:
        self.c = c

    @torch.no_grad()
    def run(self, state: PipelineState) -> None:
        assert state.latents is not None
        vae, r = self.c.vae, state.request
        z = state.latents.to(vae.dtype)
        mean, std = self.c.latent_stats(z.device, z.dtype)
        estimate = wan_decode_bytes(vae.config, int(r.num_frames), r.height, r.width, vae.dtype) * z.shape[0]  # type: ignore[arg-type]
        set_tiling(vae, use_tiling(self.c.vae_tiling, estimate, state.device))
        video = vae.decode(z / (1.0 / std) + mean, return_dict=False)[0]
        state.pixels = (video / 2 + 0.5).clamp(0, 1).float()  # (B, 3, F, H, W)


WAN_VAE_DTYPE = torch.float32  # the VAE's precision without --vae-dtype (as diffusers' Wan examples load it)


def wan_decode_bytes(vae_config: Mapping[str, Any], frames: int, height: int, width: int,
                     dtype: torch.dtype) -> int:
    """Estimated peak bytes of one video's untiled decode: the causal VAE decodes one latent frame (4 video
    frames) at a time, so the activations span at most that many frames; the float32 output spans all."""
    channels = widest_decoder_channels([vae_config["base_dim"] * m for m in vae_config["dim_mult"]])
    temporal = int(vae_config.get("scale_factor_temporal", 4))
    return decode_bytes(channels, min(frames, temporal), height, width, dtype, output_frames=frames)


def load_wan_components(index: ModelIndex, cfg: EngineConfig, attention: AttentionOp, i2v: bool) -> WanComponents:
    dt = cfg.dtype
    folder = index.folder("transformer")
    tcfg = WanConfig.from_dict(read_json(folder / "config.json"))
    comps = WanComponents(
        tokenizer=load_component(index, "tokenizer"),
        text_encoder=load_component(index, "text_encoder", dt, cfg.load_device("text_encoder")),
        transformer=load_dit(lambda: WanTransformer(tcfg, attention), folder, dt, cfg.load_device("transformer"),
                             keep_fp32=WanTransformer.keeps_fp32, drop_keys=WanTransformer.drop_unused_keys),
        # decoded in fp32 as the reference examples do, unless the engine asks for another precision
        vae=load_component(index, "vae", cfg.vae_dtype or WAN_VAE_DTYPE, cfg.load_device("vae")),
        schedule=schedule_from_checkpoint(index),
        vae_tiling=cfg.vae_tiling,
    )
    if i2v and index.components.get("image_encoder") is not None:
        comps.image_encoder = load_component(index, "image_encoder", dt, cfg.load_device("image_encoder"))
        comps.image_processor = load_component(index, "image_processor")
    return comps


def wan_defaults(schedule: WanSchedule, scale_spatial: int, patch_size: tuple[int, int, int],
                 i2v: bool) -> ModelDefaults:
    """Reference defaults: 480x832, 81 frames, 16 fps, 512 text tokens; steps and guidance from the
    schedule (50 steps, CFG 5.0 for Wan2.1; the distilled schedule's own for FastWan). Image-to-video: a
    size left out follows the input image's aspect ratio at the default size's pixel count
    (`size_from_image_area`, rounded down to the size multiple as the reference examples do)."""
    height, width, frames = schedule.default_size
    return ModelDefaults(
        kind="video", height=height, width=width, num_frames=frames, fps=16,
        num_inference_steps=schedule.default_steps, guidance_scale=schedule.default_guidance,
        size_multiple=scale_spatial * patch_size[1], min_size=scale_spatial * 2,
        max_size=2048, max_sequence_length=512, min_frames=1, max_frames=257,
        needs_image=i2v, accepts_image=i2v, uses_negative_prompt=True,
        fixed_steps=schedule.default_steps if schedule.kind == "dmd" else None, guidance="cfg",
        size_from_image_area=height * width if i2v else None, size_from_image_rounding="floor",
    )


def wan_defaults_from_configs(index: ModelIndex, i2v: bool) -> ModelDefaults:
    """`wan_defaults` from the repo's config files alone, no weight read: the schedule (scheduler config and
    pipeline class), the VAE's spatial factor, the transformer's patch size and diffserve_defaults.json (the
    image-to-video pixel budget follows an overridden default size)."""
    vae = read_json(index.folder("vae") / "config.json")
    tcfg = WanConfig.from_dict(read_json(index.folder("transformer") / "config.json"))
    base = wan_defaults(schedule_from_checkpoint(index), int(vae.get("scale_factor_spatial", 8)), tcfg.patch_size,
                        i2v)
    d = replace_defaults(base, repo_defaults(index.root))
    return replace_defaults(d, {"size_from_image_area": d.height * d.width} if i2v else {})


def wan_input_stage(index: ModelIndex, i2v: bool) -> InputValidationStage:
    """The pipeline's validation stage from the config files alone (it runs before any weight is read)."""
    return InputValidationStage(wan_defaults_from_configs(index, i2v))


def _build(index: ModelIndex, cfg: EngineConfig, attention: AttentionOp, i2v: bool) -> ComposedPipeline:
    validation = wan_input_stage(index, i2v)  # from the config files: a bad repo fails before the weights load
    c = load_wan_components(index, cfg, attention, i2v)
    stages: list[PipelineStage] = [validation, WanTextEncodingStage(c)]
    if i2v:
        stages.append(WanImageEncodingStage(c))
    stages += [WanLatentStage(c), WanTimestepStage(c),
               DenoisingStage(WanPredictor(c), ClassifierFreeGuidance()), WanDecodingStage(c)]
    name = "WanImageToVideoPipeline" if i2v else "WanPipeline"
    return ComposedPipeline(name, stages, validation.defaults, components=c)


def build_wan_t2v_pipeline(index: ModelIndex, cfg: EngineConfig, attention: AttentionOp) -> ComposedPipeline:
    return _build(index, cfg, attention, i2v=False)


def build_wan_i2v_pipeline(index: ModelIndex, cfg: EngineConfig, attention: AttentionOp) -> ComposedPipeline:
    return _build(index, cfg, attention, i2v=True)
