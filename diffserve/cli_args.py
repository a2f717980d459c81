"""Command-line arguments shared by `diffserve generate` (`diffserve.cli`) and `diffserve serve`
(`diffserve.server.cli`): which model to load and how. `diffserve.parallel.mesh.parallel_config_from_args`
reads the multi-GPU group back."""

from __future__ import annotations

import argparse

MODEL_DEFAULTS_HELP = """\
model defaults (what a flag left out becomes; each reference pipeline's own):
  FLUX.1-dev            1024x1024, 28 steps, guidance 3.5 (embedded in the model, no negative prompt)
  FLUX.1-schnell        1024x1024, 4 steps, no guidance
  Wan2.1 T2V / I2V      832x480, 81 frames at 16 fps, 50 steps, CFG 5.0 (negative prompt: empty if not given)
  HunyuanVideo          1280x720, 129 frames at 24 fps, 50 steps, guidance 6.0 (embedded)
  Qwen-Image            1024x1024, 50 steps, true CFG 4.0 (runs when a negative prompt is given)
  Qwen-Image-Edit       an input image required (--image-path, or the upload); size: the input's aspect
                        ratio at about 1024x1024 pixels; 50 steps, true CFG 4.0 (with a negative prompt)"""
"""The `--help` epilog of generate and serve: each family's defaults (a request field left out gets them)."""


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """Add the "model and engine" and "multi-GPU" argument groups to a subcommand's parser."""
    g = p.add_argument_group("model and engine")
    g.add_argument("--model-path", default=None,
                   help="diffusers-format model folder, or a Hugging Face repo id (org/name) resolved through "
                        "the local hub cache (HF_HUB_OFFLINE honoured), or embedded:image / embedded:video; default: "
                        "diffserve's embedded image model (its video model when a video is asked for)")
    g.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None,
                   help="weights and activations precision (default: bf16 on CUDA, fp32 on CPU)")
    g.add_argument("--device", default=None, help="torch device, e.g. cuda, cuda:1, cpu (default: cuda if present)")
    g.add_argument("--attention-backend", choices=("sdpa", "cudnn", "flash", "efficient", "math", "fa3"),
                   default=None, help="attention kernel (default: the fastest one for the device)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the repeated transformer blocks (slower start, faster steps)")
    g.add_argument("--fuse", action=argparse.BooleanOptionalAction, default=None,
                   help="lossless kernel fusions: projections that read the same input as one matrix multiply, "
                        "GELU inside the matrix multiply (default: on with --compile on CUDA)")
    g.add_argument("--vae-dtype", choices=("bf16", "fp16", "fp32"), default=None,
                   help="VAE precision (default: the reference's: fp32 for Wan, the model dtype for FLUX)")
    par = p.add_argument_group("multi-GPU (docs/PARALLEL.md)")
    par.add_argument("--num-gpus", type=int, default=None,
                     help="processes / GPUs in all (default: the product of the settings below, else 1)")
    par.add_argument("--ulysses-degree", type=int, default=None,
                     help="Ulysses sequence parallelism (all-to-all over heads) inside a replica")
    par.add_argument("--ring-degree", type=int, default=None,
                     help="Ring sequence parallelism (K/V passed round the ranks) inside a replica")
    par.add_argument("--enable-cfg-parallel", action="store_true",
                     help="run the conditional and unconditional CFG branches on two rank groups")
    par.add_argument("--dp-size", type=int, default=1,
                     help="independent pipeline replicas behind one scheduler (default 1); "
                          "cfg x ring x ulysses = num-gpus / dp-size")
