"""Wan2.1 text-to-video and image-to-video, and FastWan (few-step distilled Wan), as lists of stages.

Recipe: UMT5 prompt embeddings (and negative prompt for CFG) -> [I2V: CLIP image tokens, VAE-encoded
first frame + mask] -> float32 Gaussian latents (B, 16, (F-1)/4+1, H/8, W/8) -> the checkpoint's scheduler
(flow UniPC, or the distilled few-step schedule) -> denoising with our Wan transformer, CFG as
uncond + s * (cond - uncond) -> latents * std + mean -> Wan VAE decode.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffserve.config import EngineConfig, ModelDefaults
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
from diffserve.pipelines.stages.latents import initial_noise
from diffserve.pipelines.stages.text import repeat_per_output, umt5_embeddings
from diffserve.pipelines.wan_schedules import WanSchedule, schedule_from_checkpoint


@dataclass
class WanComponents:
    tokenizer: object
    text_encoder: torch.nn.Module
    transformer: WanTransformer
    vae: torch.nn.Module
    schedule: WanSchedule
    image_encoder: torch.nn.Module | None = None
    image_processor: object | None = None

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
        f_lat = (int(r.num_frames) - 1) // c.scale_temporal + 1  # type: ignore[arg-type]
        shape = (c.vae.config.z_dim, f_lat, r.height // c.scale_spatial, r.width // c.scale_spatial)
        state.latents = initial_noise(state.requests, shape, state.device, torch.float32)


class WanTimestepStage(PipelineStage):
    name = "timestep_preparation"

    def __init__(self, c: WanComponents) -> None:
        self.c = c

    def run(self, state: PipelineState) -> None:
        state.sampler = self.c.schedule.new_sampler(state.request.num_inference_steps, state.device, state.requests)
        state.timesteps = state.sampler.timesteps  # type: ignore[attr-defined]


class WanDenoisingStage(PipelineStage):
    name = "denoising"
    cfg_parallel = None  # set by diffserve.parallel.cfg: runs the two CFG branches on two ranks

    def __init__(self, c: WanComponents) -> None:
        self.c = c

    @torch.no_grad()
    def run(self, state: PipelineState) -> None:
        assert state.latents is not None and state.timesteps is not None and state.sampler is not None
        model, x, sampler = self.c.transformer, state.latents, state.sampler
        dt = model.patch_embedding.weight.dtype
        scale = state.request.guidance_scale
        img = state.image_cond.get("image_context")
        cond = state.image_cond.get("condition")
        total = len(state.timesteps)
        for i, t in enumerate(state.timesteps):
            state.check_cancelled()
            inp = (torch.cat([x, cond], dim=1) if cond is not None else x).to(dt)
            ts = t.expand(x.shape[0])
            if state.uncond is not None and self.cfg_parallel is not None:
                branch = lambda ctx, inp=inp, ts=ts: model(inp, ts, ctx, img)
                v = self.cfg_parallel(branch, state.cond["context"], state.uncond["context"], scale)
            else:
                v = model(inp, ts, state.cond["context"], img)
                if state.uncond is not None:
                    v_u = model(inp, ts, state.uncond["context"], img)
                    v = v_u + scale * (v - v_u)
            x = sampler.step(v, t, x, return_dict=False)[0]  # type: ignore[attr-defined]
            state.step_done(i + 1, total)
        state.latents = x


class WanDecodingStage(PipelineStage):
    name = "decoding"

    def __init__(self, c: WanComponents) -> None:
        self.c = c

    @torch.no_grad()
    def run(self, state: PipelineState) -> None:
        assert state.latents is not None
        vae = self.c.vae
        z = state.latents.to(vae.dtype)
        mean, std = self.c.latent_stats(z.device, z.dtype)
        video = vae.decode(z / (1.0 / std) + mean, return_dict=False)[0]
        state.pixels = (video / 2 + 0.5).clamp(0, 1).float()  # (B, 3, F, H, W)


def wan_defaults(c: WanComponents, i2v: bool) -> ModelDefaults:
    """Reference defaults: 480x832, 81 frames, 16 fps, 512 text tokens; steps and guidance from the
    schedule (50 steps, CFG 5.0 for Wan2.1; the distilled schedule's own for FastWan)."""
    height, width, frames = c.schedule.default_size
    return ModelDefaults(
        kind="video", height=height, width=width, num_frames=frames, fps=16,
        num_inference_steps=c.schedule.default_steps, guidance_scale=c.schedule.default_guidance,
        size_multiple=c.scale_spatial * c.transformer.cfg.patch_size[1], min_size=c.scale_spatial * 2,
        max_size=2048, max_sequence_length=512, min_frames=1, max_frames=257,
        needs_image=i2v, accepts_image=i2v, uses_negative_prompt=True,
        fixed_steps=c.schedule.default_steps if c.schedule.kind == "dmd" else None,
    )


def load_wan_components(index: ModelIndex, cfg: EngineConfig, attention: AttentionOp, i2v: bool) -> WanComponents:
    dt, dev = cfg.dtype, cfg.device
    folder = index.folder("transformer")
    tcfg = WanConfig.from_dict(read_json(folder / "config.json"))
    comps = WanComponents(
        tokenizer=load_component(index, "tokenizer"),
        text_encoder=load_component(index, "text_encoder", dt, dev),
        transformer=load_dit(lambda: WanTransformer(tcfg, attention), folder, dt, dev,
                             keep_fp32=WanTransformer.keeps_fp32, drop_keys=WanTransformer.drop_unused_keys),
        # decoded in fp32 as the reference examples do, unless the engine asks for another precision
        vae=load_component(index, "vae", cfg.vae_dtype or torch.float32, dev),
        schedule=schedule_from_checkpoint(index),
    )
    if i2v and index.components.get("image_encoder") is not None:
        comps.image_encoder = load_component(index, "image_encoder", dt, dev)
        comps.image_processor = load_component(index, "image_processor")
    return comps


def _build(index: ModelIndex, cfg: EngineConfig, attention: AttentionOp, i2v: bool) -> ComposedPipeline:
    c = load_wan_components(index, cfg, attention, i2v)
    defaults = replace_defaults(wan_defaults(c, i2v), repo_defaults(index.root))
    stages: list[PipelineStage] = [InputValidationStage(defaults), WanTextEncodingStage(c)]
    if i2v:
        stages.append(WanImageEncodingStage(c))
    stages += [WanLatentStage(c), WanTimestepStage(c), WanDenoisingStage(c), WanDecodingStage(c)]
    name = "WanImageToVideoPipeline" if i2v else "WanPipeline"
    return ComposedPipeline(name, stages, defaults, components=c)


def build_wan_t2v_pipeline(index: ModelIndex, cfg: EngineConfig, attention: AttentionOp) -> ComposedPipeline:
    return _build(index, cfg, attention, i2v=False)


def build_wan_i2v_pipeline(index: ModelIndex, cfg: EngineConfig, attention: AttentionOp) -> ComposedPipeline:
    return _build(index, cfg, attention, i2v=True)
