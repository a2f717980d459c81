"""What the step cache costs on the embedded trained models: checker pass rate, PSNR / SSIM against the
uncached output, cache-hit fraction and speed, for several thresholds.

    python -m tools.cache_fidelity                      # both models, CPU, the default thresholds
    python -m tools.cache_fidelity --models image --n 64 --thresholds 0.05,0.1,0.2 --max-skip 3

Each model is loaded once with a step cache (`StepCacheConfig("fbcache", ...)`); the reference run sets
`cache_threshold=0` per request (the cache off: bit-exact with an engine without one), then every threshold
runs the same held-out prompts with the same seeds (prompt i: seed SEED0 + i, one request per call as the
CLI sends them). The held-out prompts are colour/shape/position (video: colour/shape/motion) combinations
never seen in training, scored by the shapes checker of `tools.train_embedded.shapes`. Prints a markdown
table per model (the one in BENCHMARKS.md, "Step cache on the embedded trained models").
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from diffserve.accel.cache_config import StepCacheConfig
from diffserve.accel.fidelity import psnr, ssim
from diffserve.config import GenerationRequest
from tools.train_embedded.shapes import caption, check_image, check_video, sample_scene

SEED0 = 100
DEFAULT_THRESHOLDS = (0.03, 0.05, 0.08, 0.12, 0.2)


@dataclass
class Run:
    """One setting's outputs over the prompts."""

    outputs: list[np.ndarray]
    passed: list[bool]
    hits: list[float]
    denoise_s: float  # mean seconds of the denoising stage per output
    total_s: float  # mean seconds end to end per output


def run_prompts(engine, prompts: list[str], scenes: list, threshold: float, video: bool) -> Run:
    """Generate every prompt (one request per call) with `cache_threshold=threshold`, and check each output."""
    check = check_video if video else check_image
    outs, passed, hits, den, tot = [], [], [], 0.0, 0.0
    for i, (p, scene) in enumerate(zip(prompts, scenes, strict=True)):
        start = time.perf_counter()
        res = engine.generate_batch([GenerationRequest(prompt=p, seed=SEED0 + i, cache_threshold=threshold)])[0]
        tot += time.perf_counter() - start
        den += res.timings["denoising"]
        out = np.asarray(res.videos[0]) if res.videos else np.asarray(res.images[0].convert("RGB"))
        outs.append(out)
        passed.append(bool(check(out, scene).ok))
        hits.append(res.cache_hit_fraction or 0.0)
    n = len(prompts)
    return Run(outs, passed, hits, den / n, tot / n)


def pooled_psnr(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """PSNR of the mean squared error over every output (finite unless all are identical)."""
    mse = np.mean([np.mean((x.astype(np.float64) - y.astype(np.float64)) ** 2) for x, y in zip(a, b)])
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def row(name: str, run: Run, ref: Run) -> str:
    """One markdown row: setting, pass rate, delta, hit fraction, PSNR (pooled, worst), SSIM, speed."""
    n = len(run.passed)
    rate, ref_rate = sum(run.passed) / n, sum(ref.passed) / n
    worst = min(psnr(x, y) for x, y in zip(run.outputs, ref.outputs))
    mean_ssim = float(np.mean([ssim(x, y) for x, y in zip(run.outputs, ref.outputs)]))
    return (f"| {name} | {rate:.1%} | {100 * (rate - ref_rate):+.1f} | {np.mean(run.hits):.2f} | "
            f"{pooled_psnr(run.outputs, ref.outputs):.1f} | {worst:.1f} | {mean_ssim:.4f} | "
            f"{1000 * run.denoise_s:.0f} | {ref.denoise_s / run.denoise_s:.2f}x | {ref.total_s / run.total_s:.2f}x |")


def evaluate(model: str, n: int, thresholds: list[float], warmup: int, max_skip: int, device: str,
             seed: int, fp8: bool = False) -> list[str]:
    """The table's lines for one embedded model ("image" or "video")."""
    from diffserve import Engine

    video = model == "video"
    cache = StepCacheConfig("fbcache", threshold=0.0, warmup_steps=warmup, max_skip=max_skip)
    engine = Engine.from_pretrained(f"embedded:{model}", device=device, step_cache=cache)
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng, "heldout", video=video) for _ in range(n)]
    prompts = [caption(s) for s in scenes]
    run_prompts(engine, prompts[:2], scenes[:2], 0.0, video)  # warm-up (allocator, kernels)
    ref = run_prompts(engine, prompts, scenes, 0.0, video)
    steps = engine.defaults.num_inference_steps
    lines = [(f"embedded:{model}: {n} held-out prompts, {steps} steps, warm-up {warmup}, at most {max_skip} cached "
             f"steps in a row, {device}, torch {torch.__version__}"),
             ("| threshold | pass rate | vs off (points) | cache hits | PSNR dB (pooled) | PSNR dB (worst) | SSIM | "
             "denoise ms | denoise speed-up | end-to-end speed-up |"),
             "|---|---|---|---|---|---|---|---|---|---|",
             (f"| off | {sum(ref.passed) / n:.1%} | | 0.00 | inf | inf | 1.0000 | {1000 * ref.denoise_s:.0f} | 1.00x | "
             f"1.00x |")]
    for th in thresholds:
        lines.append(row(f"{th:g}", run_prompts(engine, prompts, scenes, th, video), ref))
        print(lines[-1], flush=True)
    if fp8:  # the same engine with its blocks' GEMMs in FP8 (the CPU runs torch._scaled_mm's math)
        from diffserve.layers.fp8 import quantize_fp8

        transformer = engine.pipeline.components.transformer
        n_layers = quantize_fp8(getattr(transformer, "model", transformer))  # under the step cache's stand-in
        for th in (0.0, *thresholds):
            name = f"FP8 ({n_layers} layers)" + (f" + {th:g}" if th else "")
            lines.append(row(name, run_prompts(engine, prompts, scenes, th, video), ref))
            print(lines[-1], flush=True)
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.cache_fidelity", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="image,video", help="comma-separated: image, video")
    p.add_argument("--n", type=int, default=None, help="held-out prompts per model (default: image 64, video 32)")
    p.add_argument("--thresholds", default=",".join(f"{t:g}" for t in DEFAULT_THRESHOLDS))
    p.add_argument("--warmup", type=int, default=StepCacheConfig.warmup_steps)
    p.add_argument("--max-skip", type=int, default=StepCacheConfig.max_skip)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=2026, help="seed of the scene sampler")
    p.add_argument("--fp8", action="store_true",
                   help="then quantize the blocks' GEMMs to FP8 (diffserve.layers.fp8) and run again, alone and "
                        "with each threshold")
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)
    thresholds = [float(t) for t in args.thresholds.split(",") if t]
    tables = []
    for model in args.models.split(","):
        n = args.n or (64 if model == "image" else 32)
        tables.append("\n".join(evaluate(model, n, thresholds, args.warmup, args.max_skip, args.device, args.seed,
                                          args.fp8)))
    print("\n\n" + "\n\n".join(tables))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
