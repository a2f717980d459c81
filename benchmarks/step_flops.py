"""FLOPs of one denoising step of the full-size workloads, counted without a GPU or weights, and the floor
they imply for given matmul and attention ceilings.

    python benchmarks/step_flops.py [WORKLOAD ...] [--matmul-tflops 750] [--attention-tflops 597]

diffserve's transformer is built from the real config (diffserve/testing/model_configs) on the meta
device and called once per transformer call of a step (twice for CFG) on meta inputs of the workload's
shapes: matmuls are counted by torch's flop counter, attention at the attention seam
(benchmarks/roofline.py). The same counting runs on the GPU inside bench_e2e.py, next to measured
ceilings; this script gives the numbers anywhere, e.g. to set a target before a GPU session.

Text lengths: FLUX and Wan run their text padded to 512 tokens. Qwen-Image and HunyuanVideo run only the
real tokens of the workload's prompts, counted here with the fixtures' tokenizers (the ones the benchmark
repos ship): Qwen-Image's chat template minus its dropped prefix, for the prompt and, with true CFG, the
negative prompt (the edit template also holds the input image's vision tokens, counted with the repo's
image processor); HunyuanVideo's LLaMA template minus its 95-token crop.
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

VAE_FACTOR = 8  # spatial down-sampling of the FLUX.1, Wan2.1, Qwen-Image and HunyuanVideo VAEs
TEXT_TOKENS = 512  # FLUX.1-dev's and Wan2.1's max_sequence_length (their text is padded to it)


def text_lengths(w: Workload) -> list[int]:
    """Text tokens of each transformer call of one step (cond, then uncond under CFG) for the models that run
    only the prompt's real tokens (Qwen-Image, HunyuanVideo), with the fixtures' tokenizers."""
    from diffserve.testing.fixtures import SPECS, component_plan

    family = SPECS[w.fixture].family
    plan = {c.name: c for c in component_plan(w.fixture, w.scale)}  # type: ignore[arg-type]
    if family == "hunyuan":
        from diffserve.pipelines import hunyuan_video as hv
        from diffserve.testing.tiny_tokenizers import build_llama_tokenizer

        text = hv.PROMPT_TEMPLATE.format(w.prompt)
        limit = hv.CROP_START + hv.TEXT_TOKENS
        ids = build_llama_tokenizer()(text, max_length=limit, truncation=True).input_ids
        return [len(ids) - hv.CROP_START]
    if family != "qwen":
        raise ValueError(f"{w.fixture}: text padded to {TEXT_TOKENS} tokens, not counted per prompt")
    from diffserve.pipelines import qwen_image as q
    from diffserve.testing.tiny_tokenizers import build_qwen2_tokenizer

    tokenizer = build_qwen2_tokenizer(plan["tokenizer"].extra["added_tokens"])
    cfg = w.negative_prompt is not None and w.guidance > 1  # true CFG: an uncond call, the negative prompt
    prompts = [w.prompt] + ([w.negative_prompt or ""] if cfg else [])
    if w.image_size is None:
        return [min(len(tokenizer(q.T2I_TEMPLATE.format(p)).input_ids) - q.T2I_DROP, 512) for p in prompts]
    vision = vision_tokens(w, plan["processor"].config)
    # the template's one <|image_pad|> becomes the image's vision tokens
    return [len(tokenizer(q.EDIT_TEMPLATE.format(p)).input_ids) - 1 + vision - q.EDIT_DROP for p in prompts]


def vision_tokens(w: Workload, processor_config: dict) -> int:
    """Qwen2.5-VL tokens of the edit workload's input image: the image at its reference size (about 1024x1024
    pixels) through the repo's image processor, patches merged 2x2."""
    from transformers import Qwen2VLImageProcessor

    from diffserve.pipelines.qwen_image import reference_size

    assert w.image_size is not None
    size = reference_size(_blank(w.image_size))
    cfg = {k: v for k, v in processor_config.items() if k not in ("image_processor_type", "processor_class")}
    grid = Qwen2VLImageProcessor(**cfg)(images=[_blank(size)], return_tensors="pt")["image_grid_thw"]
    return int(grid.prod()) // cfg.get("merge_size", 2) ** 2


def build_step(w: Workload, device: torch.device | str = "meta",
               attention=None) -> tuple[torch.nn.Module, list[tuple]]:
    """diffserve's transformer for `w` (at the workload's fixture scale), on the meta device (no weights), and
    the argument tuples of one denoising step's transformer calls (FLUX, HunyuanVideo: one; Wan, Qwen-Image
    with a negative prompt: two, cond + uncond), as float32 tensors on `device` (random on a real device,
    empty on meta)."""
    from diffserve.layers.attention import AttentionOp
    from diffserve.testing.fixtures import SPECS, component_plan

    spec, f = SPECS[w.fixture], VAE_FACTOR
    attention = attention or AttentionOp("sdpa")
    raw = next(c.config for c in component_plan(w.fixture, w.scale) if c.name == "transformer")
    text_tokens = TEXT_TOKENS if w.scale == "full" else 8
    gen = torch.Generator("cpu").manual_seed(0)
    if spec.family == "flux":
        from diffserve.models.dits.flux import FluxConfig as Config
        from diffserve.models.dits.flux import FluxTransformer as Model
    elif spec.family == "qwen":
        from diffserve.models.dits.qwen_image import QwenImageConfig as Config  # type: ignore[assignment]
        from diffserve.models.dits.qwen_image import QwenImageTransformer as Model  # type: ignore[assignment]
    elif spec.family == "hunyuan":
        from diffserve.models.dits.hunyuan_video import HunyuanVideoConfig as Config  # type: ignore[assignment]
        from diffserve.models.dits.hunyuan_video import HunyuanVideoTransformer as Model  # type: ignore[assignment]
    else:
        from diffserve.models.dits.wan import WanConfig as Config  # type: ignore[assignment]
        from diffserve.models.dits.wan import WanTransformer as Model  # type: ignore[assignment]
    cfg = Config.from_dict(raw)

    def t(*shape: int) -> torch.Tensor:
        if torch.device(device).type == "meta":
            return torch.empty(*shape, device=device)
        return torch.randn(*shape, generator=gen, device="cpu").to(device)

    with torch.device("meta"):
        model = Model(cfg, attention)  # type: ignore[arg-type]
    with torch.device(device):
        if spec.family == "qwen":
            from diffserve.pipelines.qwen_image import reference_size

            shapes = [(1, w.height // f // 2, w.width // f // 2)]
            if w.image_size is not None:  # the reference image's tokens follow the noise tokens
                rw, rh = reference_size(_blank(w.image_size))
                shapes.append((1, rh // f // 2, rw // f // 2))
            n = sum(a * b * c for a, b, c in shapes)
            calls = [(t(1, n, cfg.in_channels), t(1, length, cfg.joint_attention_dim), None,
                      torch.full((1,), 0.5), shapes) for length in text_lengths(w)]
        elif spec.family == "hunyuan":
            assert w.num_frames is not None
            x = t(1, cfg.in_channels, (w.num_frames - 1) // 4 + 1, w.height // f, w.width // f)
            calls = [(x, torch.full((1,), 500.0), t(1, length, cfg.text_embed_dim), None,
                      t(1, cfg.pooled_projection_dim), torch.full((1,), w.guidance * 1000.0))
                     for length in text_lengths(w)]
        elif spec.family == "flux":
            h, wd = w.height // f // 2, w.width // f // 2
            ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(h).float(),
                                             torch.arange(wd).float(), indexing="ij"), -1)
            guidance = torch.full((1,), w.guidance) if cfg.guidance_embeds else None
            calls = [(t(1, h * wd, cfg.in_channels), t(1, text_tokens, cfg.joint_attention_dim),
                      t(1, cfg.pooled_projection_dim), torch.full((1,), 0.5), ids.reshape(-1, 3).float(),
                      torch.zeros(text_tokens, 3), guidance)]
        else:
            frames = (w.num_frames - 1) // 4 + 1
            x = t(1, cfg.in_channels, frames, w.height // f, w.width // f)
            ts = torch.full((1,), 500.0)
            calls = [(x, ts, t(1, text_tokens, cfg.text_dim)), (x, ts, t(1, text_tokens, cfg.text_dim))]
    return model, calls


def _blank(size: tuple[int, int]):
    from PIL import Image

    return Image.new("RGB", size)


def count_workload(w: Workload) -> roofline.StepFlops:
    """FLOPs of one denoising step of `w` (FLUX, HunyuanVideo: one call; Wan, Qwen-Image: two, for CFG)."""
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
        out[name] = {"matmul_tflop": round(flops.matmul / 1e12, 2),
                     "attention_tflop": round(flops.attention / 1e12, 2),
                     "attention_share": round(flops.attention / flops.total, 3),
                     "main_attention_shape_BLqLkHD": list(flops.main_attention_shape()),
                     "floor_s_per_step": round(floor, 4)}
        print(name, json.dumps(out[name]), flush=True)
    return out


if __name__ == "__main__":
    main()
