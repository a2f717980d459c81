"""Train diffserve's embedded text-to-image model (FLUX architecture, schnell-like: no guidance embedding)
on procedural shape scenes, within a wall-clock budget, and write it as a diffusers-format FLUX repo.

    python -m tools.train_embedded.image --out outputs/embedded-image --minutes 8.5 --device cuda [--resume]

Phases (time-based): the VAE (``AutoencoderKL``, L1 + L2 + small KL) gets ``vae_fraction`` of the training
window, then its latent mean / std become the VAE's ``shift_factor`` / ``scaling_factor``, then the FLUX
transformer is trained jointly with the tiny CLIP and T5 text encoders with FLUX's rectified-flow loss
(x_t = (1 - s) x0 + s noise, target noise - x0, timestep s) on packed latents, with EMA. Writes
``OUT/repo`` (the model, weights in fp16), ``OUT/state.pt`` (to resume), and evaluates held-out prompts
through diffserve's Engine. See ``tools/train_embedded/README.md``.
"""

from __future__ import annotations

import time

_T0 = time.monotonic()  # the budget counts from here (before the heavy imports)

import argparse
import functools
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tools.train_embedded import common as C

REPO_BUDGET_MB = 15.0
REFERENCE = "FLUX.1-schnell"  # the configs (model_index, scheduler, encoders) the small model starts from
CLIP_LENGTH = 77  # the pipeline pads CLIP prompts to the tokenizer's model_max_length


@dataclass(frozen=True)
class ImageConfig(C.TrainSettings):
    """Model sizes and training settings (stored in state.pt; a resumed run keeps them); the fields both
    trainers share are in `common.TrainSettings`."""

    image_size: int = 64
    vae_channels: tuple[int, ...] = (32, 64, 64)  # 3 blocks: spatial factor 4
    vae_layers: int = 1
    vae_groups: int = 16
    latent_channels: int = 4
    clip_dim: int = 64
    clip_layers: int = 2
    clip_heads: int = 2
    double_blocks: int = 2
    single_blocks: int = 4
    rope_axes: tuple[int, int, int] = (4, 14, 14)
    dit_batch: int = 512  # the eager step is launch-bound on an H100: a larger batch costs little
    train_text: bool = True
    shift: float = 1.0  # scheduler shift (no dynamic shifting), used alike for training and sampling
    image_pool: int = 65536
    stats_images: int = 8192


PRESETS: dict[str, ImageConfig] = {
    "default": ImageConfig(),
    "tiny": ImageConfig(vae_channels=(8, 16, 16), vae_groups=4, clip_dim=32, t5_dim=32, t5_heads=2, heads=2,
                        head_dim=16, double_blocks=1, single_blocks=1, rope_axes=(4, 4, 8), vae_batch=8,
                        dit_batch=16, warmup_steps=5, chunk=16, image_pool=512, latent_pool=512, min_fill=64,
                        steps_default=4, stats_images=128),
}


# ------------------------------------------------------------------------------------------ models


def build_vae(cfg: ImageConfig):
    from diffusers import AutoencoderKL

    n = len(cfg.vae_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(cfg.vae_channels),
        layers_per_block=cfg.vae_layers, latent_channels=cfg.latent_channels, norm_num_groups=cfg.vae_groups,
        sample_size=cfg.image_size, scaling_factor=1.0, shift_factor=0.0, force_upcast=True,
        use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=False,
    )


def build_text_encoders(cfg: ImageConfig):
    """Tiny CLIPTextModel and T5EncoderModel: FLUX.1's configs with the sizes replaced, dropout off."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from diffserve.testing.tiny_tokenizers import CLIP_VOCAB_SIZE, T5_VOCAB_SIZE

    clip = C.real_config(REFERENCE, "text_encoder") | dict(
        hidden_size=cfg.clip_dim, intermediate_size=4 * cfg.clip_dim, num_hidden_layers=cfg.clip_layers,
        num_attention_heads=cfg.clip_heads, projection_dim=cfg.clip_dim, vocab_size=CLIP_VOCAB_SIZE)
    t5 = C.real_config(REFERENCE, "text_encoder_2") | dict(
        d_model=cfg.t5_dim, d_kv=cfg.t5_dim // cfg.t5_heads, d_ff=2 * cfg.t5_dim, num_layers=cfg.t5_layers,
        num_decoder_layers=cfg.t5_layers, num_heads=cfg.t5_heads, vocab_size=T5_VOCAB_SIZE, dropout_rate=0.0)
    return CLIPTextModel(CLIPTextConfig(**clip)), T5EncoderModel(T5Config(**t5))


def transformer_config(cfg: ImageConfig) -> dict:
    return C.real_config(REFERENCE, "transformer") | dict(
        in_channels=4 * cfg.latent_channels, num_layers=cfg.double_blocks, num_single_layers=cfg.single_blocks,
        attention_head_dim=cfg.head_dim, num_attention_heads=cfg.heads, joint_attention_dim=cfg.t5_dim,
        pooled_projection_dim=cfg.clip_dim, guidance_embeds=False, axes_dims_rope=list(cfg.rope_axes))


@torch.no_grad()
def build_transformer(cfg: ImageConfig, zero_init: bool = True):
    """diffusers FluxTransformer2DModel; with `zero_init` the AdaLN modulations and the output projection
    start at zero (adaLN-Zero, as DiT), so every block starts as the identity."""
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel.from_config(transformer_config(cfg))
    if zero_init:
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and (name == "proj_out" or name.endswith(("norm1.linear",
                                                     "norm1_context.linear", "norm.linear", "norm_out.linear"))):
                mod.weight.zero_()
                mod.bias.zero_()
    return model


def model_sizes(cfg: ImageConfig) -> dict[str, int]:
    """Parameter counts per component (built on the meta device)."""
    with torch.device("meta"):
        clip, t5 = build_text_encoders(cfg)
        return {"transformer": C.count_params(build_transformer(cfg, zero_init=False)),
                "vae": C.count_params(build_vae(cfg)), "text_encoder": C.count_params(clip),
                "text_encoder_2": C.count_params(t5)}


# ------------------------------------------------------------------------------------------- state


def render_images(rng: np.random.Generator, n: int, size: int) -> tuple[np.ndarray, list[str]]:
    images, captions, _ = C.shapes_module().make_image_batch(rng, n, size=size, split="train")
    return images, list(captions)


@dataclass
class Progress(C.Progress):
    """The run's counters and the VAE's latent shift / scale (saved in state.pt)."""

    latent_shift: float = 0.0
    latent_scale: float = 1.0


@dataclass
class Run:
    """Models, optimizers, EMA, RNG and progress of a training run; `state()` / `load_run` use state.pt."""

    cfg: ImageConfig
    device: torch.device
    seed: int
    vae: torch.nn.Module
    clip: torch.nn.Module
    t5: torch.nn.Module
    dit: torch.nn.Module
    gen: torch.Generator
    p: Progress = field(default_factory=Progress)
    vae_opt: torch.optim.Optimizer | None = None
    dit_opt: torch.optim.Optimizer | None = None
    ema: C.EMA | None = None

    def trainable(self) -> dict[str, torch.nn.Parameter]:
        mods = {"dit": self.dit} | ({"clip": self.clip, "t5": self.t5} if self.cfg.train_text else {})
        return {f"{m}.{k}": p for m, mod in mods.items() for k, p in mod.named_parameters()}

    MODULES = ("vae", "clip", "t5", "dit")

    def state(self) -> dict:
        return C.run_state(self, self.MODULES)


def new_run(cfg: ImageConfig, device: torch.device, seed: int) -> Run:
    """Models initialised from `seed` (each component from its own derived seed)."""
    torch.manual_seed(seed)
    vae = build_vae(cfg)
    torch.manual_seed(seed + 1)
    clip, t5 = build_text_encoders(cfg)
    torch.manual_seed(seed + 2)
    dit = build_transformer(cfg)
    run = Run(cfg, device, seed, vae.to(device), clip.to(device), t5.to(device), dit.to(device),
              torch.Generator(device).manual_seed(seed + 3))
    run.vae_opt = C.adamw([{"params": list(run.vae.parameters()), "lr": cfg.vae_lr}], device)
    return run


def load_run(sd: dict, device: torch.device) -> Run:
    cfg = C.config_from_state(ImageConfig, sd, {"vae_channels", "rope_axes"})
    run = new_run(cfg, device, int(sd["seed"]))
    C.restore_run(run, sd, Run.MODULES)
    run.vae.register_to_config(scaling_factor=run.p.latent_scale, shift_factor=run.p.latent_shift)
    if run.p.phase == "dit":
        start_dit(run)
        run.dit_opt.load_state_dict(sd["dit_opt"])
        run.ema.load_state_dict(sd["ema"])
    return run


def start_dit(run: Run) -> None:
    """Optimizer and EMA of the transformer (and of the text encoders when they are trained)."""
    text = [p for m in (run.clip, run.t5) for p in m.parameters()]
    for p in text:
        p.requires_grad_(run.cfg.train_text)
    groups = [{"params": list(run.dit.parameters()), "lr": run.cfg.dit_lr}]
    if run.cfg.train_text:
        groups.append({"params": text, "lr": run.cfg.text_lr})
    run.dit_opt = C.adamw(groups, run.device)
    run.ema = C.EMA(run.trainable(), run.cfg.ema_decay)


# ------------------------------------------------------------------------------------------ phases


def train_vae(run: Run, feeder: C.Feeder, clock: C.Clock, train_end: float, args: argparse.Namespace) -> C.RingPool:
    """Train the VAE until its time target, then fix the latent shift / scale and move to the DiT phase.
    Returns the image pool (with token ids), which starts the DiT's latent pool."""
    cfg, s = run.cfg, run.cfg.image_size
    pool = C.RingPool(cfg.image_pool, {"images": ((s, s, 3), torch.uint8), "clip": ((CLIP_LENGTH,), torch.int16),
                                       "t5": ((cfg.t5_length,), torch.int16)}, run.device)
    return C.vae_loop(run, pool, C.to_unit, "images", feeder, clock, train_end, args,
                      lambda pool: finish_vae(run, pool))


@torch.no_grad()
def encode_latents(run: Run, images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) images -> VAE posterior modes (B, C, h, w), float32, unscaled."""
    with C.autocast(run.device):
        return run.vae.encode(C.to_unit(images.to(run.device))).latent_dist.mode().float()


@torch.no_grad()
def finish_vae(run: Run, pool: C.RingPool) -> None:
    """Latent statistics -> the VAE's shift_factor (mean) and scaling_factor (1 / std), as FLUX's VAE."""
    p = run.p
    run.vae.eval()
    n = min(pool.count, run.cfg.stats_images)
    z = torch.cat([encode_latents(run, pool.data["images"][i:min(i + 512, n)]) for i in range(0, n, 512)])
    p.latent_shift, p.latent_scale = float(z.mean()), float(1.0 / z.std())
    run.vae.register_to_config(scaling_factor=p.latent_scale, shift_factor=p.latent_shift)
    C.log(f"vae done: {p.vae_step} steps in {p.vae_seconds:.0f}s; latent mean {p.latent_shift:.4f} std "
          f"{1 / p.latent_scale:.4f} (per channel {[round(v, 3) for v in z.std((0, 2, 3)).tolist()]})")
    p.phase = "dit"
    start_dit(run)


def latent_pool(run: Run, images: C.RingPool | None, feeder: C.Feeder) -> tuple[C.RingPool, Callable]:
    """The DiT's pool of packed, scaled latents (x0) with token ids, started from the VAE phase's images.
    Returns it and the function that adds a feeder chunk to it."""
    from diffserve.pipelines.flux import pack_latents

    cfg, p = run.cfg, run.p
    n_tok, ch = (cfg.image_size // vae_factor(cfg) // 2) ** 2, 4 * cfg.latent_channels
    pool = C.RingPool(cfg.latent_pool, {"x0": ((n_tok, ch), torch.float16), "clip": ((CLIP_LENGTH,), torch.int16),
                                        "t5": ((cfg.t5_length,), torch.int16)}, run.device)

    def add(px: torch.Tensor, clip_ids: torch.Tensor, t5_ids: torch.Tensor) -> None:
        for i in range(0, px.shape[0], 1024):
            z = encode_latents(run, px[i:i + 1024])
            pool.add(x0=pack_latents((z - p.latent_shift) * p.latent_scale), clip=clip_ids[i:i + 1024],
                     t5=t5_ids[i:i + 1024])

    def ingest(item) -> None:
        add(*item[1:])
        p.next_chunk = feeder.next_chunk

    if images is not None:
        add(*(images.data[k][:images.count] for k in ("images", "clip", "t5")))
    while pool.count < min(cfg.min_fill, cfg.latent_pool):
        ingest(feeder.get())
    return pool, ingest


def vae_factor(cfg: ImageConfig) -> int:
    return 2 ** (len(cfg.vae_channels) - 1)


def dit_loss(run: Run, batch: dict[str, torch.Tensor], img_ids: torch.Tensor, txt_ids: torch.Tensor,
             model: torch.nn.Module | None = None) -> torch.Tensor:
    """FLUX rectified flow: x_t = (1 - s) x0 + s noise; the transformer (`model`, default `run.dit`)
    predicts noise - x0 at timestep s."""
    cfg, dev = run.cfg, run.device
    x0 = batch["x0"].float()
    noise = torch.randn(x0.shape, generator=run.gen, device=dev)
    s = torch.sigmoid(torch.randn(x0.shape[0], generator=run.gen, device=dev) * cfg.sigma_logit_std)
    s = cfg.shift * s / (1 + (cfg.shift - 1) * s)
    xt = (1 - s)[:, None, None] * x0 + s[:, None, None] * noise
    with C.autocast(dev), torch.set_grad_enabled(cfg.train_text):
        pooled = run.clip(batch["clip"].long()).pooler_output
        context = run.t5(batch["t5"].long()).last_hidden_state
    with C.autocast(dev):
        v = (model or run.dit)(hidden_states=xt, encoder_hidden_states=context, pooled_projections=pooled, timestep=s,
                    img_ids=img_ids, txt_ids=txt_ids, return_dict=False)[0]
    return F.mse_loss(v.float(), noise - x0)


def train_dit(run: Run, feeder: C.Feeder, clock: C.Clock, train_end: float, args: argparse.Namespace,
              images: C.RingPool | None) -> None:
    """Train the transformer (and text encoders) with EMA until `train_end`."""
    from diffserve.pipelines.flux import image_ids

    cfg, dev, start = run.cfg, run.device, clock.now()
    pool, ingest = latent_pool(run, images, feeder)
    del images
    C.log(f"dit: pool {pool.count} latents after {clock.now() - start:.1f}s; {train_end - clock.now():.0f}s to train")
    h2 = cfg.image_size // vae_factor(cfg) // 2
    img_ids, txt_ids = image_ids(h2, h2, dev, torch.float32), torch.zeros(cfg.t5_length, 3, device=dev)
    run.vae.eval().requires_grad_(False)
    for m in (run.dit, run.clip, run.t5):
        m.train()
    C.dit_loop(run, pool, ingest, feeder, clock, train_end, args,
               lambda batch, model: dit_loss(run, batch, img_ids, txt_ids, model))


# ---------------------------------------------------------------------------------------- export / eval


def defaults_for(cfg: ImageConfig) -> dict:
    """The request defaults the model was trained for (``diffserve_defaults.json``, ModelDefaults names)."""
    return {"height": cfg.image_size, "width": cfg.image_size, "num_inference_steps": cfg.steps_default,
            "guidance_scale": 0.0, "max_sequence_length": cfg.t5_length}


def export_repo(run: Run, out: Path) -> Path:
    """Write OUT/repo: a diffusers-format FluxPipeline folder (fp16 weights, EMA), replacing an older one."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    cfg, tmp = run.cfg, out / "repo.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    clip, t5 = build_text_encoders(cfg)
    ema = run.ema if cfg.train_text else None
    clip, t5 = C.ema_module(run.clip, clip, ema, "clip"), C.ema_module(run.t5, t5, ema, "t5")
    dit = C.ema_module(run.dit, build_transformer(cfg, zero_init=False), run.ema, "dit")
    vae = C.ema_module(run.vae, build_vae(cfg), None, "vae")
    vae.register_to_config(scaling_factor=run.p.latent_scale, shift_factor=run.p.latent_shift)
    dit.half().save_pretrained(tmp / "transformer")
    vae.half().save_pretrained(tmp / "vae")
    C.save_transformers_model(clip.half(), tmp / "text_encoder", prefix="text_model.")
    C.save_transformers_model(t5.half(), tmp / "text_encoder_2")
    C.write_tokenizers(tmp, cfg.t5_length)
    sched = {k: v for k, v in C.real_config(REFERENCE, "scheduler").items() if not k.startswith("_")}
    FlowMatchEulerDiscreteScheduler.from_config(sched | {"shift": cfg.shift}).save_pretrained(tmp / "scheduler")
    return C.finish_repo(tmp, out, REFERENCE, defaults_for(cfg), REPO_BUDGET_MB)


# --------------------------------------------------------------------------------------------- CLI


def sample_captions(preset: ImageConfig, seed: int) -> list[str]:
    return render_images(np.random.default_rng([seed, 10**9]), 2048, preset.image_size)[1]


def make_feeder(run: Run, args: argparse.Namespace) -> C.Feeder:
    return C.Feeder(functools.partial(render_images, size=run.cfg.image_size), C.Tokenize(run.cfg.t5_length),
                    run.seed, run.p.next_chunk, run.cfg.chunk, args.workers)


def evaluate(repo: Path, device: torch.device, run: Run, n: int, out: Path) -> dict:
    return C.evaluate_repo(repo, device, run.seed, n, out, run.cfg.image_size)


PARTS = C.TrainerParts(
    presets=PRESETS, sample_captions=sample_captions, new_run=new_run, load_run=load_run, make_feeder=make_feeder,
    train_vae=train_vae, train_dit=train_dit, export_repo=export_repo,
    model_sizes=model_sizes, evaluate=evaluate, eval_seconds_each=0.15)


def main(argv: list[str] | None = None) -> int:
    p = C.base_parser("python -m tools.train_embedded.image", __doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="default", help="model sizes (tiny: CPU tests)")
    args = p.parse_args(argv)
    clock = C.Clock(args.minutes * 60, start=_T0 if argv is None else None)
    return C.run_main(PARTS, args, clock, args.eval_images)


if __name__ == "__main__":
    sys.exit(main())
