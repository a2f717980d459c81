"""Train diffserve's embedded text-to-video model (Wan2.1 architecture) on procedural moving-shape clips,
within a wall-clock budget, and write it as a diffusers-format ``WanPipeline`` repo.

    python -m tools.train_embedded.video --out outputs/embedded-video --minutes 9 --device cuda [--resume]

Phases (time-based), as the image trainer (``tools/train_embedded/image.py``, whose data stream, clock, EMA,
checkpointing and evaluation are reused from ``common.py``): the causal 3D VAE (``AutoencoderKLWan``, L1 +
L2 + small KL on 9-frame 64 x 64 clips, 9 frames -> 3 latent frames, 64 -> 8 pixels) gets ``vae_fraction``
of the training window, then its per-channel latent mean / std become the VAE config's ``latents_mean`` /
``latents_std``, then the ``WanTransformer3DModel`` is trained jointly with a tiny UMT5 encoder with flow
matching as diffserve's Wan pipeline samples it (flow UniPC): x_t = (1 - s) x0 + s noise, target
noise - x0, timestep 1000 s, text states masked and zero-padded to ``max_sequence_length``. Writes
``OUT/repo`` (fp16 weights, EMA), ``OUT/state.pt``, and evaluates through diffserve's Engine.
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

REPO_BUDGET_MB = 20.0
REFERENCE = "Wan2.1-T2V-1.3B-Diffusers"  # the configs (model_index, scheduler, components) we start from


@dataclass(frozen=True)
class VideoConfig(C.TrainSettings):
    """Model sizes and training settings (stored in state.pt; a resumed run keeps them); the fields both
    trainers share are in `common.TrainSettings`."""

    size: int = 64
    frames: int = 9  # 4k + 1 frames: (frames - 1) / 4 + 1 latent frames
    fps: int = 8
    vae_base: int = 16
    vae_mult: tuple[int, ...] = (1, 2, 4, 4)  # 3 down-samplings: spatial factor 8
    vae_res_blocks: int = 1
    temporal_down: tuple[bool, ...] = (False, True, True)  # temporal factor 4
    z_dim: int = 8
    ffn_dim: int = 768
    layers: int = 6
    vae_batch: int = 128  # H200: 16 and 64 clips both ~6.5 it/s (launch-bound), 256 3 it/s
    vae_lr: float = 5e-4  # 1e-3 (batch 128) and 2e-3 (batch 256) collapsed to a constant output at ~step 200
    dit_batch: int = 256
    vae_fraction: float = 0.8  # of the first run's window; a --resume run then trains the transformer
    chunk: int = 64
    video_pool: int = 8192
    latent_pool: int = 65536
    min_fill: int = 1024
    stats_videos: int = 2048


PRESETS: dict[str, VideoConfig] = {
    "default": VideoConfig(),
    "tiny": VideoConfig(vae_base=4, z_dim=4, t5_dim=32, t5_heads=2, heads=2, head_dim=12, ffn_dim=32, layers=1,
                        vae_batch=2, dit_batch=8, warmup_steps=5, chunk=8, video_pool=64, latent_pool=128,
                        min_fill=16, steps_default=4, stats_videos=16, vae_fraction=0.3),
}
_TUPLES = {"vae_mult", "temporal_down"}


# ------------------------------------------------------------------------------------------ models


def build_vae(cfg: VideoConfig):
    from diffusers import AutoencoderKLWan

    conf = C.real_config(REFERENCE, "vae") | dict(
        base_dim=cfg.vae_base, z_dim=cfg.z_dim, dim_mult=list(cfg.vae_mult), num_res_blocks=cfg.vae_res_blocks,
        temperal_downsample=list(cfg.temporal_down), latents_mean=[0.0] * cfg.z_dim,
        latents_std=[1.0] * cfg.z_dim)
    return AutoencoderKLWan.from_config(conf)


def build_text_encoder(cfg: VideoConfig):
    """Tiny UMT5EncoderModel: Wan2.1's config with the sizes replaced, dropout off."""
    from transformers import UMT5Config, UMT5EncoderModel

    from diffserve.testing.tiny_tokenizers import T5_VOCAB_SIZE

    conf = C.real_config(REFERENCE, "text_encoder") | dict(
        d_model=cfg.t5_dim, d_kv=cfg.t5_dim // cfg.t5_heads, d_ff=2 * cfg.t5_dim, num_layers=cfg.t5_layers,
        num_decoder_layers=cfg.t5_layers, num_heads=cfg.t5_heads, vocab_size=T5_VOCAB_SIZE, dropout_rate=0.0)
    return UMT5EncoderModel(UMT5Config(**conf))


def transformer_config(cfg: VideoConfig) -> dict:
    return C.real_config(REFERENCE, "transformer") | dict(
        in_channels=cfg.z_dim, out_channels=cfg.z_dim, num_attention_heads=cfg.heads,
        attention_head_dim=cfg.head_dim, ffn_dim=cfg.ffn_dim, num_layers=cfg.layers, text_dim=cfg.t5_dim)


@torch.no_grad()
def build_transformer(cfg: VideoConfig, zero_init: bool = True):
    """diffusers WanTransformer3DModel; with `zero_init` the output projection starts at zero."""
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel.from_config(transformer_config(cfg))
    if zero_init:
        model.proj_out.weight.zero_()
        model.proj_out.bias.zero_()
    return model


def model_sizes(cfg: VideoConfig) -> dict[str, int]:
    """Parameter counts per component (built on the meta device)."""
    with torch.device("meta"):
        return {"transformer": C.count_params(build_transformer(cfg, zero_init=False)),
                "vae": C.count_params(build_vae(cfg)), "text_encoder": C.count_params(build_text_encoder(cfg))}


def latent_frames(cfg: VideoConfig) -> int:
    return (cfg.frames - 1) // 2 ** sum(cfg.temporal_down) + 1


def latent_size(cfg: VideoConfig) -> int:
    return cfg.size // 2 ** (len(cfg.vae_mult) - 1)


# ------------------------------------------------------------------------------------------- data


def render_videos(rng: np.random.Generator, n: int, size: int, frames: int) -> tuple[np.ndarray, list[str]]:
    videos, captions, _ = C.shapes_module().make_video_batch(rng, n, num_frames=frames, size=size, split="train")
    return videos, list(captions)


class Tokenize:
    """Tokenize captions as diffserve's Wan text stage does (cleaned, padded to ``t5_length``, truncated):
    int16 ids and the attention mask."""

    def __init__(self, t5_length: int) -> None:
        from diffserve.testing.tiny_tokenizers import build_t5_tokenizer

        self.tok, self.t5_length = build_t5_tokenizer(), t5_length

    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        from diffserve.pipelines.stages.text import clean_prompt

        t = self.tok([clean_prompt(c) for c in captions], padding="max_length", max_length=self.t5_length,
                     truncation=True, add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        return t.input_ids.to(torch.int16), t.attention_mask.to(torch.int16)


def video_unit(videos: torch.Tensor) -> torch.Tensor:
    """uint8 (B, F, H, W, 3) -> float (B, 3, F, H, W) in [-1, 1]."""
    return C.to_unit(videos).transpose(1, 2)


# ------------------------------------------------------------------------------------------- state


@dataclass
class Progress(C.Progress):
    """The run's counters and the VAE's per-channel latent mean / std (saved in state.pt)."""

    latents_mean: list = field(default_factory=list)
    latents_std: list = field(default_factory=list)


@dataclass
class Run:
    cfg: VideoConfig
    device: torch.device
    seed: int
    vae: torch.nn.Module
    umt5: torch.nn.Module
    dit: torch.nn.Module
    gen: torch.Generator
    p: Progress = field(default_factory=Progress)
    vae_opt: torch.optim.Optimizer | None = None
    dit_opt: torch.optim.Optimizer | None = None
    ema: C.EMA | None = None

    def trainable(self) -> dict[str, torch.nn.Parameter]:
        mods = {"dit": self.dit, "umt5": self.umt5}
        return {f"{m}.{k}": p for m, mod in mods.items() for k, p in mod.named_parameters()}

    MODULES = ("vae", "umt5", "dit")

    def state(self) -> dict:
        return C.run_state(self, self.MODULES)

    def latent_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, z, 1, 1, 1) per-channel mean and std on the device."""
        shape = (1, self.cfg.z_dim, 1, 1, 1)
        return (torch.tensor(self.p.latents_mean, device=self.device).view(shape),
                torch.tensor(self.p.latents_std, device=self.device).view(shape))


def new_run(cfg: VideoConfig, device: torch.device, seed: int) -> Run:
    torch.manual_seed(seed)
    vae = build_vae(cfg)
    torch.manual_seed(seed + 1)
    umt5 = build_text_encoder(cfg)
    torch.manual_seed(seed + 2)
    dit = build_transformer(cfg)
    run = Run(cfg, device, seed, vae.to(device), umt5.to(device), dit.to(device),
              torch.Generator(device).manual_seed(seed + 3))
    run.vae_opt = C.adamw([{"params": list(run.vae.parameters()), "lr": cfg.vae_lr}], device)
    return run


def load_run(sd: dict, device: torch.device) -> Run:
    cfg = C.config_from_state(VideoConfig, sd, _TUPLES)
    run = new_run(cfg, device, int(sd["seed"]))
    C.restore_run(run, sd, Run.MODULES)
    if run.p.phase == "dit":
        run.vae.register_to_config(latents_mean=run.p.latents_mean, latents_std=run.p.latents_std)
        start_dit(run)
        run.dit_opt.load_state_dict(sd["dit_opt"])
        run.ema.load_state_dict(sd["ema"])
    return run


@torch.no_grad()
def init_from_repo(run: Run, repo: Path) -> None:
    """Start a new run from the weights of a repo this trainer wrote (its VAE, text encoder and transformer;
    shapes must match the run's config). The VAE phase then continues from them with fresh optimizer
    state, and the latent statistics are measured again when it ends."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5EncoderModel

    parts = {"vae": (AutoencoderKLWan, "vae"), "umt5": (UMT5EncoderModel, "text_encoder"),
             "dit": (WanTransformer3DModel, "transformer")}
    for name, (cls, sub) in parts.items():
        sd = cls.from_pretrained(repo / sub).state_dict()
        try:
            getattr(run, name).load_state_dict(sd)
        except RuntimeError as e:
            raise SystemExit(f"--init-from {repo}: {sub} does not match this run's config: {e}") from e
    run.p.history.append(["init_from", str(repo)])
    C.log(f"initialised the VAE, text encoder and transformer from {repo}")


def start_dit(run: Run) -> None:
    """Optimizer and EMA of the transformer and the text encoder."""
    groups = [{"params": list(run.dit.parameters()), "lr": run.cfg.dit_lr},
              {"params": list(run.umt5.parameters()), "lr": run.cfg.text_lr}]
    run.dit_opt = C.adamw(groups, run.device)
    run.ema = C.EMA(run.trainable(), run.cfg.ema_decay)


# ------------------------------------------------------------------------------------------ phases


def train_vae(run: Run, feeder: C.Feeder, clock: C.Clock, train_end: float, args: argparse.Namespace) -> C.RingPool:
    """Train the VAE until its time target, then fix the latent statistics and move to the DiT phase.
    Returns the clip pool (with token ids), which starts the DiT's latent pool."""
    cfg, s = run.cfg, run.cfg.size
    pool = C.RingPool(cfg.video_pool, {"videos": ((cfg.frames, s, s, 3), torch.uint8),
                                       "t5": ((cfg.t5_length,), torch.int16),
                                       "mask": ((cfg.t5_length,), torch.int16)}, run.device)
    return C.vae_loop(run, pool, video_unit, "clips", feeder, clock, train_end, args,
                      lambda pool: finish_vae(run, pool))


@torch.no_grad()
def encode_latents(run: Run, videos: torch.Tensor) -> torch.Tensor:
    """uint8 (B, F, H, W, 3) clips -> VAE posterior modes (B, z, F_lat, h, w), float32, unnormalised."""
    with C.autocast(run.device):
        return run.vae.encode(video_unit(videos.to(run.device))).latent_dist.mode().float()


@torch.no_grad()
def finish_vae(run: Run, pool: C.RingPool) -> None:
    """Per-channel latent statistics -> the VAE config's latents_mean / latents_std, as Wan's VAE."""
    p = run.p
    run.vae.eval()
    n = min(pool.count, run.cfg.stats_videos)
    z = torch.cat([encode_latents(run, pool.data["videos"][i:min(i + 128, n)]) for i in range(0, n, 128)])
    p.latents_mean = [round(v, 5) for v in z.mean((0, 2, 3, 4)).tolist()]
    p.latents_std = [round(max(v, 1e-3), 5) for v in z.std((0, 2, 3, 4)).tolist()]
    run.vae.register_to_config(latents_mean=p.latents_mean, latents_std=p.latents_std)
    C.log(f"vae done: {p.vae_step} steps in {p.vae_seconds:.0f}s; latents mean {p.latents_mean} std {p.latents_std}")
    p.phase = "dit"
    start_dit(run)


def latent_pool(run: Run, videos: C.RingPool | None, feeder: C.Feeder) -> tuple[C.RingPool, Callable]:
    """The DiT's pool of normalised latents (x0) with token ids and masks, started from the VAE phase's
    clips. Returns it and the function that adds a feeder chunk to it."""
    cfg, p = run.cfg, run.p
    h, f_lat = latent_size(cfg), latent_frames(cfg)
    pool = C.RingPool(cfg.latent_pool, {"x0": ((cfg.z_dim, f_lat, h, h), torch.float16),
                                        "t5": ((cfg.t5_length,), torch.int16),
                                        "mask": ((cfg.t5_length,), torch.int16)}, run.device)
    mean, std = run.latent_stats()

    def add(px: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> None:
        for i in range(0, px.shape[0], 256):
            z = encode_latents(run, px[i:i + 256])
            pool.add(x0=(z - mean) / std, t5=ids[i:i + 256], mask=mask[i:i + 256])

    def ingest(item) -> None:
        add(*item[1:])
        p.next_chunk = feeder.next_chunk

    if videos is not None:
        add(*(videos.data[k][:videos.count] for k in ("videos", "t5", "mask")))
    while pool.count < min(cfg.min_fill, cfg.latent_pool):
        ingest(feeder.get())
    return pool, ingest


def text_states(umt5: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """UMT5 states with padding zeroed, as diffserve's ``umt5_embeddings``."""
    mask = mask.long()
    return umt5(ids.long(), mask).last_hidden_state * mask[..., None].to(torch.float32)


def dit_loss(run: Run, batch: dict[str, torch.Tensor], model: torch.nn.Module | None = None) -> torch.Tensor:
    """Flow matching as the flow UniPC scheduler samples it: x_t = (1 - s) x0 + s noise; the transformer
    predicts noise - x0 at timestep 1000 s."""
    cfg, dev = run.cfg, run.device
    x0 = batch["x0"].float()
    noise = torch.randn(x0.shape, generator=run.gen, device=dev)
    s = torch.sigmoid(torch.randn(x0.shape[0], generator=run.gen, device=dev) * cfg.sigma_logit_std)
    s = cfg.shift * s / (1 + (cfg.shift - 1) * s)
    sb = s.view(-1, 1, 1, 1, 1)
    xt = (1 - sb) * x0 + sb * noise
    with C.autocast(dev):
        context = text_states(run.umt5, batch["t5"], batch["mask"])
        v = (model or run.dit)(hidden_states=xt, timestep=s * 1000.0, encoder_hidden_states=context,
                               return_dict=False)[0]
    return F.mse_loss(v.float(), noise - x0)


def train_dit(run: Run, feeder: C.Feeder, clock: C.Clock, train_end: float, args: argparse.Namespace,
              videos: C.RingPool | None) -> None:
    """Train the transformer and the text encoder with EMA until `train_end`."""
    start = clock.now()
    pool, ingest = latent_pool(run, videos, feeder)
    del videos
    C.log(f"dit: pool {pool.count} latents after {clock.now() - start:.1f}s; {train_end - clock.now():.0f}s to train")
    run.vae.eval().requires_grad_(False)
    run.dit.train()
    run.umt5.train()
    C.dit_loop(run, pool, ingest, feeder, clock, train_end, args,
               lambda batch, model: dit_loss(run, batch, model))


# ---------------------------------------------------------------------------------------- export


def defaults_for(cfg: VideoConfig) -> dict:
    """The request defaults the model was trained for (``diffserve_defaults.json``)."""
    return {"height": cfg.size, "width": cfg.size, "num_frames": cfg.frames, "fps": cfg.fps,
            "num_inference_steps": cfg.steps_default, "guidance_scale": 1.0, "max_sequence_length": cfg.t5_length}


def export_repo(run: Run, out: Path) -> Path:
    """Write OUT/repo: a diffusers-format WanPipeline folder (fp16 weights, EMA), replacing an older one."""
    from diffusers import UniPCMultistepScheduler

    from diffserve.testing.tiny_tokenizers import build_t5_tokenizer

    cfg, tmp = run.cfg, out / "repo.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    umt5 = C.ema_module(run.umt5, build_text_encoder(cfg), run.ema, "umt5")
    dit = C.ema_module(run.dit, build_transformer(cfg, zero_init=False), run.ema, "dit")
    vae = C.ema_module(run.vae, build_vae(cfg), None, "vae")
    vae.register_to_config(latents_mean=run.p.latents_mean, latents_std=run.p.latents_std)
    dit.half().save_pretrained(tmp / "transformer")
    vae.half().save_pretrained(tmp / "vae")
    C.save_transformers_model(umt5.half(), tmp / "text_encoder")
    build_t5_tokenizer().save_pretrained(tmp / "tokenizer")
    sched = {k: v for k, v in C.real_config(REFERENCE, "scheduler").items() if not k.startswith("_")}
    UniPCMultistepScheduler.from_config(sched | {"flow_shift": cfg.shift}).save_pretrained(tmp / "scheduler")
    return C.finish_repo(tmp, out, REFERENCE, defaults_for(cfg), REPO_BUDGET_MB)


# --------------------------------------------------------------------------------------------- CLI


def sample_captions(preset: VideoConfig, seed: int) -> list[str]:
    shapes, rng = C.shapes_module(), np.random.default_rng([seed, 10**9])
    return [shapes.caption(shapes.sample_scene(rng, "train", video=True)) for _ in range(2048)]


def make_feeder(run: Run, args: argparse.Namespace) -> C.Feeder:
    render = functools.partial(render_videos, size=run.cfg.size, frames=run.cfg.frames)
    return C.Feeder(render, Tokenize(run.cfg.t5_length), run.seed, run.p.next_chunk, run.cfg.chunk, args.workers)


def start_from(run: Run, args: argparse.Namespace) -> None:
    if args.init_from is not None:
        init_from_repo(run, args.init_from)


def evaluate(repo: Path, device: torch.device, run: Run, n: int, out: Path) -> dict:
    return C.evaluate_repo(repo, device, run.seed, n, out, run.cfg.size, video=True, frames=run.cfg.frames)


PARTS = C.TrainerParts(
    presets=PRESETS, sample_captions=sample_captions, new_run=new_run, load_run=load_run, make_feeder=make_feeder,
    train_vae=train_vae, train_dit=train_dit, export_repo=export_repo,
    model_sizes=model_sizes, evaluate=evaluate, eval_seconds_each=0.5, start_from=start_from)


def prepare_run(args: argparse.Namespace, device: torch.device) -> Run:
    """Resume OUT/state.pt, or start a new run (``--init-from``: from a written repo's weights)."""
    return C.prepare_run(PARTS, args, device)


def main(argv: list[str] | None = None) -> int:
    p = C.base_parser("python -m tools.train_embedded.video", __doc__.split("\n\n")[0])
    p.set_defaults(eval_images=0)
    p.add_argument("--eval-videos", type=int, default=32, help="prompts per split generated at the end (0: none)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="default", help="model sizes (tiny: CPU tests)")
    p.add_argument("--init-from", type=Path, default=None,
                   help="start a new run from the weights of a repo this trainer wrote (continues its VAE)")
    args = p.parse_args(argv)
    clock = C.Clock(args.minutes * 60, start=_T0 if argv is None else None)
    return C.run_main(PARTS, args, clock, args.eval_videos)


if __name__ == "__main__":
    sys.exit(main())
