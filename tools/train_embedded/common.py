"""Pieces shared by the embedded-model trainers: wall-clock budgets, the procedural data stream and the
on-device replay pool, EMA, learning-rate schedule, logging, checkpoint and diffusers-repo writing.

Data: ``tools.train_embedded.shapes`` renders scenes on the CPU. :class:`Feeder` runs a ``DataLoader`` over
:class:`ChunkStream` (chunk ``k`` of the stream is rendered from ``np.random.default_rng([seed, k])``, so
the stream is a pure function of the seed and resumes at any chunk) in background workers, and the
training loop moves whatever chunks are ready into a :class:`RingPool` on the device, from which it
samples its batches. Training speed therefore never waits on rendering (after the initial fill), and a
slow renderer only means more reuse of pool entries.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

SHAPES_MODULE = "tools.train_embedded.shapes"
T5_LENGTHS = (32, 64, 128, 256)
"""T5 sequence lengths `choose_t5_length` picks from (the pipeline pads every prompt to this length)."""

Render = Callable[[np.random.Generator, int], tuple[np.ndarray, list[str]]]
"""``render(rng, n) -> (uint8 pixels (n, ..., 3), captions)``: one chunk of training data."""


def shapes_module() -> ModuleType:
    """``tools.train_embedded.shapes`` (the procedural scene generator and its checkers)."""
    try:
        return importlib.import_module(SHAPES_MODULE)
    except ImportError as e:
        raise RuntimeError(f"{SHAPES_MODULE} is needed for training data ({e})") from None


def has_shapes() -> bool:
    try:
        shapes_module()
    except RuntimeError:
        return False
    return True


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Clock:
    """Wall-clock budget of this process: `left()` seconds until `deadline`."""

    def __init__(self, budget_s: float, start: float | None = None) -> None:
        self.start = time.monotonic() if start is None else start
        self.deadline = self.start + budget_s

    def now(self) -> float:
        return time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.deadline - time.monotonic()


def setup_torch(device: torch.device) -> None:
    """TF32 matmuls and cuDNN autotuning on CUDA; nothing device-specific is assumed otherwise."""
    torch.set_float32_matmul_precision("high")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        # The first H100 run failed in the transformer's first backward (CUBLAS_STATUS_EXECUTION_FAILED,
        # an asynchronous error from an earlier kernel); torch 2.11 routes SDPA to cuDNN there, whose
        # backward is the prime suspect at these small head sizes, so training uses flash / mem-efficient.
        torch.backends.cuda.enable_cudnn_sdp(False)


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; plain fp32 elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------- text


class Tokenize:
    """Tokenize captions exactly as diffserve's FLUX text stage does: CLIP padded to 77 and T5 padded to
    ``t5_length`` (both ``padding="max_length"``, truncated). Returns int16 id tensors."""

    def __init__(self, t5_length: int) -> None:
        from diffserve.testing.tiny_tokenizers import build_clip_tokenizer, build_t5_tokenizer

        self.clip = build_clip_tokenizer()
        self.t5 = build_t5_tokenizer()
        self.t5_length = t5_length

    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        clip = self.clip(captions, padding="max_length", max_length=self.clip.model_max_length, truncation=True,
                         return_tensors="pt").input_ids
        t5 = self.t5(captions, padding="max_length", max_length=self.t5_length, truncation=True,
                     return_tensors="pt").input_ids
        return clip.to(torch.int16), t5.to(torch.int16)

    def t5_token_count(self, caption: str) -> int:
        return len(self.t5(caption).input_ids)


def choose_t5_length(captions: list[str]) -> int:
    """The smallest of `T5_LENGTHS` that holds every caption's T5 tokens (with ``</s>``)."""
    tok = Tokenize(T5_LENGTHS[-1])
    longest = max(tok.t5_token_count(c) for c in captions)
    for n in T5_LENGTHS:
        if longest <= n:
            return n
    return T5_LENGTHS[-1]


# --------------------------------------------------------------------------------------------- data


class ChunkStream(torch.utils.data.IterableDataset):
    """Endless stream of rendered, tokenized chunks ``(k, pixels uint8, clip_ids, t5_ids)``.

    Chunk ``k`` comes from ``np.random.default_rng([seed, k])``; worker ``w`` of ``W`` renders chunks
    ``start + w, start + w + W, ...`` and the DataLoader hands them out round-robin, i.e. in order of ``k``.
    """

    def __init__(self, render: Render, tokenize: Tokenize, seed: int, start: int, chunk: int) -> None:
        super().__init__()
        self.render, self.tokenize, self.seed, self.start, self.chunk = render, tokenize, seed, start, chunk

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        w, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        k = self.start + w
        while True:
            pixels, captions = self.render(np.random.default_rng([self.seed, k]), self.chunk)
            clip_ids, t5_ids = self.tokenize(captions)
            yield k, torch.from_numpy(np.ascontiguousarray(pixels)), clip_ids, t5_ids
            k += n_workers


class Feeder:
    """Renders `ChunkStream` chunks in DataLoader workers; a thread keeps up to `prefetch` ready.

    `get(block)` returns the next chunk in stream order (or None when not blocking and none is ready);
    `next_chunk` is the index of the first chunk not yet handed out (what a checkpoint records).
    """

    def __init__(self, render: Render, tokenize: Tokenize, seed: int, start: int, chunk: int, workers: int,
                 prefetch: int = 16) -> None:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.next_chunk = start
        stream = ChunkStream(render, tokenize, seed, start, chunk)
        extra = dict(prefetch_factor=4, persistent_workers=False) if workers > 0 else {}
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers, **extra)
        self._it = iter(loader)  # workers start (fork) here, in the calling thread, not in the feeder thread
        self._queue: queue.Queue = queue.Queue(maxsize=prefetch)
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="chunk-feeder", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for item in self._it:
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
        except Exception as e:  # noqa: BLE001 -- surfaced in the training thread by `get`
            self._error = e

    def get(self, block: bool = True) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor] | None:
        while True:
            if self._error is not None:
                raise RuntimeError(f"data rendering failed: {self._error!r}") from self._error
            try:
                item = self._queue.get(timeout=0.2) if block else self._queue.get_nowait()
            except queue.Empty:
                if block:
                    continue
                return None
            if item[0] != self.next_chunk:
                raise RuntimeError(f"chunk {item[0]} arrived, expected {self.next_chunk}")
            self.next_chunk += 1
            return item

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(queue.Empty):
            while True:
                self._queue.get_nowait()
        self._thread.join(timeout=10)
        del self._it  # shuts the workers down


class RingPool:
    """Fixed-capacity tensors on the device, filled in order and overwritten oldest first."""

    def __init__(self, capacity: int, specs: dict[str, tuple[tuple[int, ...], torch.dtype]],
                 device: torch.device) -> None:
        self.capacity, self.count, self.ptr = capacity, 0, 0
        self.data = {k: torch.empty((capacity, *shape), dtype=dt, device=device) for k, (shape, dt) in specs.items()}

    def add(self, **batch: torch.Tensor) -> None:
        n = next(iter(batch.values())).shape[0]
        idx = (self.ptr + torch.arange(n)) % self.capacity
        idx = idx.to(next(iter(self.data.values())).device)
        for k, v in batch.items():
            self.data[k][idx] = v.to(self.data[k].device, self.data[k].dtype, non_blocking=True)
        self.ptr = (self.ptr + n) % self.capacity
        self.count = min(self.capacity, self.count + n)

    def sample(self, n: int, generator: torch.Generator, keys: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
        """`n` entries drawn uniformly (with replacement) from those filled so far."""
        device = next(iter(self.data.values())).device
        idx = torch.randint(0, self.count, (n,), device=device, generator=generator)
        return {k: self.data[k][idx] for k in (keys or tuple(self.data))}


# ------------------------------------------------------------------------------------ optimisation


class EMA:
    """Exponential moving average of named parameters (fp32 shadow on the parameters' device)."""

    def __init__(self, params: dict[str, torch.nn.Parameter], decay: float) -> None:
        self.params = params
        self.decay = decay
        self.shadow = {k: p.detach().float().clone() for k, p in params.items()}
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        keys = list(self.params)
        torch._foreach_lerp_([self.shadow[k] for k in keys], [self.params[k].detach().float() for k in keys],
                             1.0 - d)

    def state_dict(self) -> dict:
        return {"shadow": self.shadow, "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, sd: dict) -> None:
        for k, v in sd["shadow"].items():
            self.shadow[k].copy_(v)
        self.updates = int(sd["updates"])

    def weights(self, prefix: str) -> dict[str, torch.Tensor]:
        """The averaged tensors whose names start with ``prefix + '.'``, with the prefix removed."""
        n = len(prefix) + 1
        return {k[n:]: v for k, v in self.shadow.items() if k.startswith(prefix + ".")}


def lr_scale(step: int, warmup_steps: int, time_frac: float, decay_from: float = 0.7,
             final: float = 0.1) -> float:
    """Linear warm-up over `warmup_steps`, constant, then linear decay to `final` over the last
    ``1 - decay_from`` of the phase's wall-clock window (`time_frac` in [0, 1])."""
    warm = min(1.0, (step + 1) / max(1, warmup_steps))
    if time_frac <= decay_from:
        return warm
    t = min(1.0, (time_frac - decay_from) / max(1e-6, 1.0 - decay_from))
    return warm * (1.0 - t * (1.0 - final))


def set_lr(opt: torch.optim.Optimizer, scale: float) -> None:
    for g in opt.param_groups:
        g["lr"] = g["base_lr"] * scale


class Meter:
    """Running loss and throughput, printed every `every_s` seconds."""

    def __init__(self, name: str, every_s: float, batch: int) -> None:
        self.name, self.every_s, self.batch = name, every_s, batch
        self.t0, self.n, self.loss_sum = time.monotonic(), 0, 0.0
        self.pending: list[torch.Tensor] = []
        self.last_loss = float("nan")

    def add(self, loss: torch.Tensor) -> None:
        self.pending.append(loss.detach())
        self.n += 1

    def maybe_print(self, step: int, extra: str = "", force: bool = False) -> None:
        dt = time.monotonic() - self.t0
        if not force and dt < self.every_s:
            return
        if self.n:
            self.last_loss = float(torch.stack(self.pending).float().mean())
        rate = self.n / max(dt, 1e-9)
        log(f"{self.name} step {step:6d}  loss {self.last_loss:.4f}  {rate:6.1f} it/s  "
            f"{rate * self.batch:8.0f} samples/s  {extra}")
        self.t0, self.n, self.pending = time.monotonic(), 0, []


# ---------------------------------------------------------------------------------------- models

_META_KEYS = ("_class_name", "_diffusers_version", "_name_or_path", "architectures", "transformers_version",
              "torch_dtype", "dtype")


def real_config(repo: str, component: str | None = None) -> dict:
    """A reference config from ``diffserve/testing/model_configs/<repo>/`` without its save metadata
    (``model_index.json`` when ``component`` is None, which keeps its ``_class_name``)."""
    from diffserve.testing.fixtures import read_config

    raw = read_config(repo, component)
    if component is None:
        return raw
    return {k: v for k, v in raw.items() if k not in _META_KEYS}


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def adamw(groups: list[dict], device: torch.device) -> torch.optim.Optimizer:
    """AdamW (betas 0.9 / 0.99, no weight decay; fused on CUDA); each group remembers its `base_lr`."""
    for g in groups:
        g["base_lr"] = g["lr"]
    return torch.optim.AdamW(groups, betas=(0.9, 0.99), weight_decay=0.0, fused=device.type == "cuda")


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 (..., H, W, 3) -> float (..., 3, H, W) in [-1, 1]."""
    return images.movedim(-1, -3).float() / 127.5 - 1.0


def ema_module(live: torch.nn.Module, fresh: torch.nn.Module, ema: EMA | None, prefix: str) -> torch.nn.Module:
    """`fresh` (built like `live`) holding `live`'s tensors with the EMA's averages in place, on the CPU."""
    state = {k: v.detach().cpu() for k, v in live.state_dict().items()}
    if ema is not None:
        state.update({k: v.cpu() for k, v in ema.weights(prefix).items()})
    fresh.load_state_dict(state, strict=True)
    return fresh.eval()


class Saver:
    """Calls `save()` every `every_s` seconds of wall time (`maybe()` once per step)."""

    def __init__(self, save: Callable[[], None], every_s: float) -> None:
        self.save, self.every_s, self.last = save, every_s, time.monotonic()

    def maybe(self) -> None:
        if time.monotonic() - self.last >= self.every_s:
            self.save()
            self.last = time.monotonic()


# ------------------------------------------------------------------------------------------ saving


def atomic_torch_save(obj: object, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_state(run, out: Path) -> None:
    """OUT/state.pt from ``run.state()`` (models, optimizers, EMA, RNG, progress)."""
    atomic_torch_save(run.state(), out / "state.pt")


def run_state(run, modules: tuple[str, ...]) -> dict:
    """What state.pt holds for a run: its config, seed and progress, the weights of `modules` (attribute
    names of `run`), both optimizers, the EMA and the RNG."""
    return {"version": 1, "config": asdict(run.cfg), "seed": run.seed, "progress": asdict(run.p),
            **{name: getattr(run, name).state_dict() for name in modules},
            "vae_opt": run.vae_opt.state_dict() if run.vae_opt else None,
            "dit_opt": run.dit_opt.state_dict() if run.dit_opt else None,
            "ema": run.ema.state_dict() if run.ema else None, "gen": run.gen.get_state()}


def config_from_state(cls: type, sd: dict, tuple_fields: set[str]) -> Any:
    """The run's config dataclass from state.pt (lists back to tuples where the config holds tuples)."""
    return cls(**{k: tuple(v) if k in tuple_fields else v for k, v in sd["config"].items()})


def restore_run(run, sd: dict, modules: tuple[str, ...]) -> None:
    """Put state.pt's weights of `modules`, progress, RNG and VAE optimizer into a freshly built `run` (the
    transformer phase's optimizer and EMA are the trainer's to restore, after it has created them)."""
    for name in modules:
        getattr(run, name).load_state_dict(sd[name])
    run.p = type(run.p)(**sd["progress"])
    try:
        run.gen.set_state(sd["gen"].cpu())  # a generator state is a CPU byte tensor, also for CUDA
    except RuntimeError:  # saved on another device type (e.g. --export-only on a CPU machine)
        log("note: the checkpoint's RNG state is from another device type; the RNG is reseeded")
    run.vae_opt.load_state_dict(sd["vae_opt"])


def replace_dir(tmp: Path, final: Path) -> None:
    """Move the finished folder `tmp` to `final`, replacing an older one."""
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def save_transformers_model(model: torch.nn.Module, folder: Path, prefix: str = "") -> None:
    """``save_pretrained`` with the original checkpoints' key prefix (``text_model.`` for CLIP text towers,
    which transformers 5 drops when saving a freshly built model), without progress bars."""
    from transformers.utils import logging as hf_logging

    state = {prefix + k: v for k, v in model.state_dict().items()} if prefix else None
    hf_logging.disable_progress_bar()
    model.save_pretrained(folder, state_dict=state)


def write_tokenizers(root: Path, t5_length: int) -> None:
    """The tiny CLIP (with the ``vocab.json`` / ``merges.txt`` real CLIP repos ship) and T5 tokenizers."""
    from diffserve.testing.tiny_tokenizers import (
        build_clip_tokenizer,
        build_t5_tokenizer,
        clip_vocab_and_merges,
    )

    build_clip_tokenizer().save_pretrained(root / "tokenizer")
    vocab, merges = clip_vocab_and_merges()
    (root / "tokenizer" / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (root / "tokenizer" / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    build_t5_tokenizer().save_pretrained(root / "tokenizer_2")


def finish_repo(tmp: Path, out: Path, reference: str, defaults: dict, budget_mb: float) -> Path:
    """Complete a repo written in `tmp` (its model_index.json from the `reference` checkpoint's, and
    diffserve_defaults.json), move it to OUT/repo in place of an older one, and log its size against
    `budget_mb`. Returns OUT/repo."""
    write_json(tmp / "model_index.json",
               real_config(reference) | {"_diffusers_version": importlib.metadata.version("diffusers")})
    write_json(tmp / "diffserve_defaults.json", defaults)
    replace_dir(tmp, out / "repo")
    mib = dir_bytes(out / "repo") / 2**20
    log(f"wrote {out / 'repo'} ({mib:.2f} MiB)" + ("" if mib <= budget_mb else
                                                   f"; WARNING: above the {budget_mb} MB budget"))
    return out / "repo"


def write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def to_uint8_hwc(images: list) -> list[np.ndarray]:
    """PIL images (or arrays) -> (H, W, 3) uint8 arrays."""
    return [np.asarray(im.convert("RGB") if hasattr(im, "convert") else im, dtype=np.uint8) for im in images]


def save_grid(images: list[np.ndarray], path: Path, cols: int = 8) -> None:
    """Tile equally sized (H, W, 3) uint8 images into one PNG."""
    from PIL import Image

    if not images:
        return
    h, w = images[0].shape[:2]
    rows = (len(images) + cols - 1) // cols
    grid = np.zeros((rows * h, cols * w, 3), dtype=np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = im[..., :3]
    Image.fromarray(grid).save(path)


# ------------------------------------------------------------------------------------- CLI / eval


def base_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The options every embedded-model trainer takes."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--out", type=Path, required=True, help="run folder: OUT/repo (the model), OUT/state.pt")
    p.add_argument("--minutes", type=float, required=True,
                   help="wall-clock budget of this process, everything included (training, saving, evaluation)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/state.pt")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-images", type=int, default=64, help="prompts per split generated at the end (0: none)")
    p.add_argument("--workers", type=int, default=max(0, min(12, (os.cpu_count() or 1) - 2)),
                   help="data rendering processes")
    p.add_argument("--save-every", type=float, default=90.0, help="seconds between state.pt checkpoints")
    p.add_argument("--log-every", type=float, default=15.0, help="seconds between log lines")
    p.add_argument("--reserve-seconds", type=float, default=None,
                   help="time kept for the final save, export and evaluation (default: 10 + 0.15 * eval images)")
    p.add_argument("--export-only", action="store_true", help="write OUT/repo from OUT/state.pt and evaluate")
    p.add_argument("--vae-seconds", type=float, default=None,
                   help="VAE phase length of a new run (default: vae_fraction of its first training window)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the transformer for training (its compile time counts against the budget)")
    return p


@torch.no_grad()
def vae_roundtrip(vae: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    """uint8 (B, H, W, 3) images (``AutoencoderKL``) or (B, F, H, W, 3) clips (``AutoencoderKLWan``)
    through the VAE (posterior mode) and back to uint8 in the same layout."""
    param = next(vae.parameters())
    x = to_unit(torch.from_numpy(np.ascontiguousarray(images)).to(param.device)).to(param.dtype)
    video = x.dim() == 5
    if video:
        x = x.transpose(1, 2)  # (B, 3, F, H, W)
    rec = vae.decode(vae.encode(x).latent_dist.mode()).sample.float().clamp(-1, 1)
    rec = rec.transpose(1, 2) if video else rec
    return ((rec + 1) * 127.5).round().to(torch.uint8).movedim(-3, -1).cpu().numpy()


def write_checked(out: Path, name: str, prompts: list[str], ok: list[bool], tiles: list[np.ndarray]) -> None:
    """``OUT/name.png`` (a grid of `tiles`) and ``OUT/name.txt`` (``ok`` / ``BAD`` and the prompt per line)."""
    save_grid(tiles, out / f"{name}.png")
    (out / f"{name}.txt").write_text("".join(f"{'ok ' if o else 'BAD'} {p}\n" for o, p in zip(ok, prompts)))


def evaluate_repo(repo: Path, device: torch.device, seed: int, n: int, out: Path, size: int,
                  video: bool = False, frames: int = 9) -> dict[str, float]:
    """Generate `n` outputs per split (held-out and training scene distributions) from the written repo
    through diffserve's Engine with the repo's own defaults, and score them with the shapes checker; for
    image models also score the shipped VAE's reconstructions of held-out scenes (the generator's ceiling).
    Writes ``OUT/samples_{split}.png/.txt`` (videos: their middle frames)."""
    from diffserve import Engine
    from diffserve.testing.batched import generate_outputs

    shapes = shapes_module()
    engine = Engine.from_pretrained(str(repo), dtype="bf16" if device.type == "cuda" else "fp32", device=str(device))
    check = shapes.check_video if video else shapes.check_image
    results: dict[str, float] = {}
    for i, split in enumerate(("heldout", "train")):
        t0, rng = time.monotonic(), np.random.default_rng([seed, 777, i])
        scenes = [shapes.sample_scene(rng, split, video=video) for _ in range(n)]
        prompts = [shapes.caption(sc) for sc in scenes]
        outs, _ = generate_outputs(engine, prompts)
        ok = [bool(check(o, sc).ok) for o, sc in zip(outs, scenes)]
        results[split] = sum(ok) / n
        write_checked(out, f"samples_{split}", prompts, ok, [o[len(o) // 2] if video else o for o in outs])
        log(f"eval {split}: {sum(ok)}/{n} pass the checker ({time.monotonic() - t0:.1f}s)")
    rng = np.random.default_rng([seed, 778])
    if video:
        clips, _, scenes = shapes.make_video_batch(rng, n, num_frames=frames, size=size, split="heldout")
    else:
        clips, _, scenes = shapes.make_image_batch(rng, n, size=size, split="heldout")
    rec = vae_roundtrip(engine.pipeline.components.vae, clips)
    results["vae_reconstruction"] = sum(bool(check(r, sc).ok) for r, sc in zip(rec, scenes)) / n
    log(f"eval vae reconstruction (held-out scenes): {results['vae_reconstruction']:.1%} pass")
    return results


def vae_step(vae: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, gen: torch.Generator,
             kl_weight: float, grad_clip: float) -> torch.Tensor:
    """One VAE training step on x in [-1, 1] (images or clips): reparameterised sample, L1 + L2
    reconstruction plus a per-element KL term; returns the loss."""
    with autocast(x.device):
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen, device=x.device)
        rec = vae.decode(z).sample.float()
    mean, logvar = post.mean.float(), post.logvar.float()
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(1).mean() / x[0].numel()
    loss = (rec - x).abs().mean() + (rec - x).pow(2).mean() + kl_weight * kl
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(vae.parameters(), grad_clip)
    opt.step()
    return loss


def vae_loop(run, pool: RingPool, to_input: Callable[[torch.Tensor], torch.Tensor], noun: str, feeder: Feeder,
             clock: Clock, train_end: float, args: argparse.Namespace,
             finish: Callable[[RingPool], None]) -> RingPool:
    """The VAE phase until its time target (or `train_end`): data chunks go into `pool` (whose fields, in
    order, are a chunk's tensors after its index; the first holds the uint8 pixels, `to_input` maps them to
    the VAE's input), steps of :func:`vae_step`, learning-rate schedule over the target, log lines, periodic
    state.pt; when the target is reached, `finish(pool)` fixes the latent statistics. Returns the pool,
    which starts the transformer's latent pool."""
    cfg, p, fields = run.cfg, run.p, tuple(pool.data)
    start, base = clock.now(), p.vae_seconds
    end = min(train_end, start + p.vae_target_seconds - base)

    def ingest(item) -> None:
        pool.add(**dict(zip(fields, item[1:])))
        p.next_chunk = feeder.next_chunk

    def sync() -> None:
        p.vae_seconds = base + clock.now() - start

    while pool.count < min(cfg.min_fill, pool.capacity):
        ingest(feeder.get())
    log(f"vae: pool {pool.count} {noun} after {clock.now() - start:.1f}s; {p.vae_target_seconds:.0f}s of VAE time")
    meter = Meter("vae", args.log_every, cfg.vae_batch)
    saver = Saver(lambda: (sync(), save_state(run, args.out)), args.save_every)
    run.vae.train()
    while clock.now() < end:
        if (item := feeder.get(block=False)) is not None:
            ingest(item)
        x = to_input(pool.sample(cfg.vae_batch, run.gen, fields[:1])[fields[0]])
        loss = vae_step(run.vae, run.vae_opt, x, run.gen, cfg.kl_weight, cfg.grad_clip)
        p.vae_step += 1
        frac = (base + clock.now() - start) / max(p.vae_target_seconds, 1e-6)
        set_lr(run.vae_opt, lr_scale(p.vae_step, cfg.warmup_steps, frac))
        meter.add(loss)
        meter.maybe_print(p.vae_step, f"pool {pool.count} chunks {feeder.next_chunk}")
        saver.maybe()
    sync()
    meter.maybe_print(p.vae_step, "(end of phase)", force=True)
    p.history.append(["vae", p.vae_step, round(p.vae_seconds, 1), meter.last_loss])
    if p.vae_seconds >= p.vae_target_seconds - 1e-3 and p.vae_step > 0:
        finish(pool)
    return pool


def dit_loop(run, pool: RingPool, ingest: Callable, feeder: Feeder, clock: Clock, train_end: float,
             args: argparse.Namespace, loss_fn: Callable[[dict, torch.nn.Module], torch.Tensor]) -> None:
    """The transformer phase's steps until `train_end`: up to two fresh data chunks into the latent pool,
    `loss_fn(batch, model)`, clipping, AdamW, EMA, learning-rate schedule over the window, log lines and
    periodic state.pt. With ``--compile`` the transformer is compiled; a failing compile goes on eagerly
    (eager errors are raised). Records the phase in ``run.p.history``."""
    cfg, p = run.cfg, run.p
    start, base = clock.now(), p.dit_seconds
    params, window = list(run.trainable().values()), max(train_end - start, 1e-6)
    model = torch.compile(run.dit) if args.compile else run.dit  # shares run.dit's parameters

    def sync() -> None:
        p.dit_seconds = base + clock.now() - start

    meter = Meter("dit", args.log_every, cfg.dit_batch)
    saver = Saver(lambda: (sync(), save_state(run, args.out)), args.save_every)
    while clock.now() < train_end:
        for _ in range(2):
            if (item := feeder.get(block=False)) is not None:
                ingest(item)
        run.dit_opt.zero_grad(set_to_none=True)
        try:
            loss = loss_fn(pool.sample(cfg.dit_batch, run.gen), model)
            loss.backward()
        except Exception as e:
            if model is run.dit:
                raise
            log(f"torch.compile failed ({type(e).__name__}: {str(e)[:300]}); continuing without it")
            model = run.dit
            continue
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        run.dit_opt.step()
        run.ema.update()
        p.dit_step += 1
        set_lr(run.dit_opt, lr_scale(p.dit_step, cfg.warmup_steps, (clock.now() - start) / window))
        meter.add(loss)
        meter.maybe_print(p.dit_step, f"pool {pool.count} chunks {feeder.next_chunk}")
        saver.maybe()
    sync()
    meter.maybe_print(p.dit_step, "(end of run)", force=True)
    p.history.append(["dit", p.dit_step, round(p.dit_seconds, 1), meter.last_loss])


# ------------------------------------------------------------------------------------------- driver


@dataclass(frozen=True)
class TrainSettings:
    """The sizes and training settings both trainers' configs have (each subclass adds its own models'
    sizes and may change a default). Stored in state.pt with the rest of the config."""

    t5_dim: int = 128
    t5_layers: int = 2
    t5_heads: int = 4
    t5_length: int = 0  # 0: the smallest of 32/64/128/256 that holds the training captions
    heads: int = 6
    head_dim: int = 32
    vae_batch: int = 64
    vae_lr: float = 1e-3
    kl_weight: float = 1e-4
    dit_batch: int = 512
    dit_lr: float = 5e-4
    text_lr: float = 2.5e-4
    ema_decay: float = 0.999
    warmup_steps: int = 200
    grad_clip: float = 1.0
    sigma_logit_std: float = 1.0
    shift: float = 1.0  # the scheduler's shift, used alike for training and sampling
    vae_fraction: float = 0.2  # of the first run's window
    chunk: int = 256
    latent_pool: int = 131072
    min_fill: int = 8192
    steps_default: int = 20


@dataclass
class Progress:
    """The counters of a run that the shared flow and loops keep (saved in state.pt); each trainer adds
    its latent statistics in a subclass."""

    phase: str = "vae"  # "vae", then "dit" once the VAE and its latent statistics are final
    next_chunk: int = 0  # first data-stream chunk not yet used
    vae_step: int = 0
    vae_seconds: float = 0.0
    vae_target_seconds: float = 0.0  # fixed by the first run
    dit_step: int = 0
    dit_seconds: float = 0.0
    runs: int = 0
    history: list = field(default_factory=list)  # [phase, step, seconds, last loss] at the end of each phase/run


@dataclass(frozen=True)
class TrainerParts:
    """What the image and the video trainer each supply to :func:`run_main`; the run's flow (resume or start,
    VAE phase then transformer phase, final state, export, evaluation) is the same for both."""

    presets: dict[str, Any]  # name -> frozen config dataclass with a `t5_length` field (0: choose)
    sample_captions: Callable[[Any, int], list[str]]  # (preset, seed) -> 2048 training captions
    new_run: Callable[[Any, torch.device, int], Any]
    load_run: Callable[[dict, torch.device], Any]
    make_feeder: Callable[[Any, argparse.Namespace], Feeder]
    train_vae: Callable[..., Any]  # (run, feeder, clock, train_end, args) -> the VAE's data pool
    train_dit: Callable[..., None]  # (run, feeder, clock, train_end, args, pool)
    export_repo: Callable[[Any, Path], Path]
    model_sizes: Callable[[Any], dict[str, int]]
    evaluate: Callable[[Path, torch.device, Any, int, Path], dict]  # (repo, device, run, n, out)
    eval_seconds_each: float  # reserved per evaluated output
    start_from: Callable[[Any, argparse.Namespace], None] | None = None  # adjusts a new run (e.g. --init-from)


def prepare_run(parts: TrainerParts, args: argparse.Namespace, device: torch.device):
    """Resume OUT/state.pt, or start a new run (choosing the T5 length from sampled captions)."""
    state_path, preset = args.out / "state.pt", parts.presets[args.preset]
    if args.resume or args.export_only:
        if not state_path.is_file():
            raise SystemExit(f"{state_path} does not exist; start without --resume")
        run = parts.load_run(torch.load(state_path, map_location=device, weights_only=False), device)
        log(f"resumed {state_path}: {run.p.phase} phase, vae step {run.p.vae_step}, dit step {run.p.dit_step}")
        if replace(run.cfg, t5_length=preset.t5_length) != preset:
            log(f"note: the checkpoint's config is not --preset {args.preset}'s; the checkpoint's is used")
        return run
    if state_path.exists():
        raise SystemExit(f"{state_path} exists; pass --resume to continue it, or choose another --out")
    if preset.t5_length == 0:
        preset = replace(preset, t5_length=choose_t5_length(parts.sample_captions(preset, args.seed)))
        log(f"T5 length {preset.t5_length} (holds the longest of 2048 sampled captions)")
    run = parts.new_run(preset, device, args.seed)
    if parts.start_from is not None:
        parts.start_from(run, args)
    return run


def train_phases(parts: TrainerParts, run, args: argparse.Namespace, clock: Clock, train_end: float) -> None:
    """The training phases of this process, then the final state.pt. The first run fixes the VAE's time."""
    run.p.runs += 1
    feeder = parts.make_feeder(run, args)
    try:
        pool = None
        if run.p.phase == "vae":
            if run.p.vae_target_seconds <= 0:
                window = max(0.0, train_end - clock.now())
                run.p.vae_target_seconds = (min(args.vae_seconds, window) if args.vae_seconds is not None
                                            else run.cfg.vae_fraction * window)
            pool = parts.train_vae(run, feeder, clock, train_end, args)
        if run.p.phase == "dit":
            parts.train_dit(run, feeder, clock, train_end, args, pool)
    finally:
        feeder.close()
    save_state(run, args.out)
    log(f"saved {args.out / 'state.pt'} ({clock.elapsed():.0f}s elapsed)")


def run_main(parts: TrainerParts, args: argparse.Namespace, clock: Clock, n_eval: int) -> int:
    """A trainer's whole process after argument parsing: train within the clock, export, evaluate."""
    device = torch.device(args.device)
    setup_torch(device)
    args.out.mkdir(parents=True, exist_ok=True)
    run = prepare_run(parts, args, device)
    sizes = parts.model_sizes(run.cfg)
    log("params: " + ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in sizes.items())
        + f"; {2 * sum(sizes.values()) / 2**20:.1f} MiB in fp16")
    reserve = args.reserve_seconds if args.reserve_seconds is not None else 10 + parts.eval_seconds_each * n_eval
    if not args.export_only:
        train_phases(parts, run, args, clock, clock.deadline - reserve)
    if run.p.phase != "dit":
        log("the VAE phase is not finished, so no repo was written: resume with a larger budget")
        return 0
    repo = parts.export_repo(run, args.out)
    info = {"seed": run.seed, "progress": asdict(run.p), "params": sizes, "config": asdict(run.cfg),
            "repo_bytes": dir_bytes(repo), "diffusers": importlib.metadata.version("diffusers")}
    if n_eval > 0 and clock.left() > 0:
        info["eval"] = parts.evaluate(repo, device, run, n_eval, args.out)
    elif n_eval > 0:
        log("no time left for the evaluation; skipped")
    write_json(args.out / "training_info.json", info)
    log(f"done in {clock.elapsed():.0f}s of {args.minutes * 60:.0f}s; repo {repo}")
    return 0
