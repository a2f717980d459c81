"""FLOPs of one denoising step of the full-size workloads, counted without a GPU or weights, and the floor
they imply for given matmul and attention ceilings.

    python benchmarks/step_flops.py [WORKLOAD ...] [--matmul-tflops 750] [--attention-tflops 597]

diffserve's transformer is built from the real config (diffserve/testing/model_configs) on the meta
device and called once per transformer call of a step (twice for CFG) on meta inputs of the workload's
shapes: matmuls are counted by torch's flop counter, attention at the attention seam
(benchmarks/roofline.py). The same counting runs on the GPU inside bench_e2e.py, next to measured
ceilings; this script gives the numbers anywhere, e.g. to set a target before a GPU session.
"""

from __future__ import annotations

import argparse
import json

import torch

try:
    from benchmarks import roofline
    from benchmarks.bench_e2e import WORKLOADS, Workload
except ImportError:  # run as a script
    import roofline  # type: ignore[no-redef]
    from bench_e2e import WORKLOADS, Workload  # type: ignore[no-redef]

VAE_FACTOR = 8  # spatial down-sampling of both FLUX.1's and Wan2.1's VAEs
TEXT_TOKENS = 512  # FLUX.1-dev's and Wan2.1's max_sequence_length


def build_step(w: Workload, device: torch.device | str = "meta",
               attention=None) -> tuple[torch.nn.Module, list[tuple]]:
    """diffserve's transformer for `w` (at the workload's fixture scale), on the meta device (no weights), and the argument
    tuples of one denoising step's transformer calls (FLUX: one; Wan: two, cond + uncond for CFG), as
    float32 tensors on `device` (random on a real device, empty on meta)."""
    from diffserve.layers.attention import AttentionOp
    from diffserve.testing.fixtures import SPECS, component_plan

    spec, f = SPECS[w.fixture], VAE_FACTOR
    attention = attention or AttentionOp("sdpa")
    raw = next(c.config for c in component_plan(w.fixture, w.scale) if c.name == "transformer")
    text_tokens = TEXT_TOKENS if w.scale == "full" else 8
    gen = torch.Generator("cpu").manual_seed(0)
    if spec.family == "flux":
        from diffserve.models.dits.flux import FluxConfig as Config
        from diffserve.models.dits.flux import FluxTransformer
    else:
        from diffserve.models.dits.wan import WanConfig as Config
        from diffserve.models.dits.wan import WanTransformer
    cfg = Config.from_dict(raw)

    def t(*shape: int) -> torch.Tensor:
        if torch.device(device).type == "meta":
            return torch.empty(*shape, device=device)
        return torch.randn(*shape, generator=gen, device="cpu").to(device)

    with torch.device("meta"):
        model = (FluxTransformer if spec.family == "flux" else WanTransformer)(cfg, attention)
    with torch.device(device):
        if spec.family == "flux":
            h, wd = w.height // f // 2, w.width // f // 2
            ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(h).float(), torch.arange(wd).float(),
                                              indexing="ij"), -1)
            calls = [(t(1, h * wd, cfg.in_channels), t(1, text_tokens, cfg.joint_attention_dim),
                      t(1, cfg.pooled_projection_dim), torch.full((1,), 0.5), ids.reshape(-1, 3).float(),
                      torch.zeros(text_tokens, 3), torch.full((1,), w.guidance) if cfg.guidance_embeds else None)]
        else:
            frames = (w.num_frames - 1) // 4 + 1
            x = t(1, cfg.in_channels, frames, w.height // f, w.width // f)
            ts = torch.full((1,), 500.0)
            calls = [(x, ts, t(1, text_tokens, cfg.text_dim)), (x, ts, t(1, text_tokens, cfg.text_dim))]
    return model, calls


def count_workload(w: Workload) -> roofline.StepFlops:
    """FLOPs of one denoising step of `w` at full size (FLUX: one call; Wan: two, for CFG)."""
    from diffserve.layers.attention import AttentionOp

    attention = AttentionOp("sdpa")
    model, calls = build_step(w, "meta", attention)

    def step() -> None:
        with torch.no_grad():
            for a in calls:
                model(*a)

    return roofline.count_step_flops(model, attention, step)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    full = [k for k, v in WORKLOADS.items() if v.scale == "full"]
    ap.add_argument("workloads", nargs="*", default=full, help=f"any of {', '.join(full)} (default: all)")
    ap.add_argument("--matmul-tflops", type=float, default=750.0,
                    help="matmul ceiling (H100, torch 2.11: 690-800 measured for an 8192^3 bf16 matmul)")
    ap.add_argument("--attention-tflops", type=float, default=597.0,
                    help="attention ceiling (H100: cuDNN SDPA ~585-607 at these workloads' shapes)")
    args = ap.parse_args(argv)
    if unknown := [n for n in args.workloads if n not in full]:
        ap.error(f"unknown workload(s) {', '.join(unknown)}; accepted: {', '.join(full)}")
    out = {}
    for name in args.workloads:
        flops = count_workload(WORKLOADS[name])
        floor = flops.matmul / (args.matmul_tflops * 1e12) + flops.attention / (args.attention_tflops * 1e12)
        out[name] = {"matmul_tflop": round(flops.matmul / 1e12, 2), "attention_tflop": round(flops.attention / 1e12, 2),
                     "attention_share": round(flops.attention / flops.total, 3),
                     "main_attention_shape_BLqLkHD": list(flops.main_attention_shape()),
                     "floor_s_per_step": round(floor, 4)}
        print(name, json.dumps(out[name]), flush=True)
    return out


if __name__ == "__main__":
    main()
