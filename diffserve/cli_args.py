"""Command-line arguments shared by `diffserve generate` (`diffserve.cli`) and `diffserve serve`
(`diffserve.server.cli`): which model to load and how. `diffserve.parallel.mesh.parallel_config_from_args`
reads the multi-GPU group back. Also the parser class of every subcommand (`SuggestingParser`: a mistyped
flag gets a did-you-mean) and the busy-port check of `serve` (`check_port_free`)."""

from __future__ import annotations

import argparse
import difflib
import errno
import re
import socket
from typing import NoReturn

from diffserve.accel.cache_config import DEFAULT_THRESHOLD, StepCacheConfig
from diffserve.errors import UserError

MODEL_DEFAULTS_HELP = """\
model defaults (what a flag left out becomes; each reference pipeline's own):
  FLUX.1-dev            1024x1024, 28 steps, guidance 3.5 (embedded in the model, no negative prompt)
  FLUX.1-schnell        1024x1024, 4 steps, no guidance
  Wan2.1 T2V / I2V      832x480, 81 frames at 16 fps, 50 steps, CFG 5.0 (negative prompt: empty if not given);
                        I2V: size from the input image's aspect ratio at 832x480's pixel count
  HunyuanVideo          1280x720, 129 frames at 24 fps, 50 steps, guidance 6.0 (embedded); true CFG off
                        (--true-cfg-scale > 1 with --negative-prompt: two passes per step, as diffusers)
  Qwen-Image            1024x1024, 50 steps, true CFG 4.0 (runs when a negative prompt is given; --guidance-scale
                        and --true-cfg-scale both set it)
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
    g.add_argument("--attention-backend", choices=("sdpa", "cudnn", "flash", "efficient", "math", "fa3", "sage"),
                   default=None, help="attention kernel (default: the fastest one for the device); sage: "
                                      "SageAttention (pip install sageattention==1.0.6), INT8 Q.K^T: lossy, and "
                                      "on one H100 slower than fa3 (FLUX.1-dev 0.142 vs 0.125 s/step); not under "
                                      "--ring-degree > 1")
    g.add_argument("--fp8", choices=("off", "linear", "attention", "all"), default="off",
                   help="lossy FP8 (e4m3) compute, off by default: linear = the transformer blocks' matrix "
                        "multiplies with FP8 weights and per-token FP8 activations (relative error of a layer "
                        "~4%%; measured on one H100 with --compile: FLUX.1-dev 1.28x faster per step at PSNR 47.9 "
                        "dB against the bf16 output, 8 GiB less memory; Wan2.1-1.3B only 1.04x, its step being "
                        "attention-bound), attention = FlashAttention 3's FP8 kernels (needs --attention-backend "
                        "fa3; no faster than bf16 FA3 at FLUX's shape), all = both. Needs a GPU with FP8 "
                        "(compute capability 8.9+) "
                        "and bf16; pays off with --compile (the quantization fuses into the kernels around the "
                        "multiply); weights are quantized at load, so it is fixed for the engine and cannot "
                        "change per request")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the repeated transformer blocks (slower start, faster steps)")
    g.add_argument("--fuse", action=argparse.BooleanOptionalAction, default=None,
                   help="lossless kernel fusions: projections that read the same input as one matrix multiply, "
                        "GELU inside the matrix multiply (default: on with --compile on CUDA)")
    g.add_argument("--vae-dtype", choices=("bf16", "fp16", "fp32"), default=None,
                   help="VAE precision (default: the reference's: fp32 for Wan, the model dtype for FLUX)")
    g.add_argument("--lora-path", action="append", default=None, metavar="PATH[:SCALE]",
                   help="a LoRA to apply at SCALE (default 1.0): a .safetensors file or a diffusers LoRA folder, in "
                        "diffusers/PEFT, kohya or ComfyUI keys; repeat it to stack several. Requests name it by its "
                        "file name (without .safetensors)")
    g.add_argument("--lora-mode", choices=("merged", "unmerged"), default="merged",
                   help="merged (default): LoRAs added into the weights at start-up (no cost per step); unmerged: "
                        "kept as adapters each request may switch (its lora field) and more may be loaded later")
    mem = p.add_argument_group("memory (README: running big models on small cards)")
    mem.add_argument("--vae-tiling", choices=("auto", "on", "off"), default="auto",
                     help="decode with the VAE in overlapping tiles (close to the untiled decode, not bit-exact); "
                          "auto (default): tiled where the untiled decode is estimated not to fit the free GPU "
                          "memory, never on a CPU")
    mem.add_argument("--text-encoder-cpu-offload", action="store_true",
                     help="keep the text (and image) encoders in pinned host memory; they go to the GPU for the "
                          "encoding stage only")
    mem.add_argument("--vae-cpu-offload", action="store_true",
                     help="keep the VAE in pinned host memory; it goes to the GPU for encoding/decoding only")
    mem.add_argument("--dit-cpu-offload", action="store_true",
                     help="stream the transformer's blocks from pinned host memory, block by block (the next "
                          "block's weights are copied while the current one computes); the rest stays on the GPU")
    mem.add_argument("--max-gpu-memory", default=None, metavar="GiB|auto",
                     help="pick the cheapest of the offloads above that fits this many GiB of GPU memory (auto: the "
                          "card's memory), estimated from the weights' sizes and the activations of the largest "
                          "request (see --plan-size); offload flags given are always applied")
    mem.add_argument("--plan-size", default=None, metavar="HxW[xF]",
                     help="with --max-gpu-memory: the largest request the plan must fit, e.g. 720x1280x81 (default: "
                          "generate plans for its own largest batch; serve for the model's default size, and warns "
                          "when a batch is larger)")
    sc = p.add_argument_group("step cache (lossy, off by default; BENCHMARKS.md has its fidelity)")
    sc.add_argument("--step-cache", choices=("none", "fbcache"), default="none",
                    help="reuse work across denoising steps: fbcache runs the first transformer block every step "
                         "and skips the others while its output changes little, adding the residual they added "
                         "last time. Faster, but the output is no longer the uncached one (lossy). none (default): "
                         "every block every step")
    sc.add_argument("--cache-threshold", type=float, default=None, metavar="T",
                    help="with --step-cache: skip when the first block's residual changed by less than T (relative "
                         "L1) since the last full step; higher = faster and further from the uncached output, 0 = "
                         f"never skip (default {DEFAULT_THRESHOLD:g}; a server request may set its own with "
                         f"cache_threshold; accepted 0-10, useful about 0.03-0.3)")
    sc.add_argument("--cache-warmup", type=int, default=None, metavar="STEPS",
                    help="with --step-cache: the first STEPS steps always run every block (more = closer to the "
                         f"uncached output, slower; default {StepCacheConfig.warmup_steps})")
    sc.add_argument("--cache-max-skip", type=int, default=None, metavar="N",
                    help="with --step-cache: at most N steps in a row reuse the cache, then one runs every block "
                         f"(more = faster, further from the uncached output; default {StepCacheConfig.max_skip})")
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


def lora_options(args: argparse.Namespace) -> dict[str, object]:
    """The LoRA keyword arguments of `Engine.from_pretrained` from parsed --lora-path / --lora-mode."""
    from diffserve.lora.spec import LoraSpec

    return {"loras": tuple(LoraSpec.parse(text) for text in args.lora_path or ()), "lora_mode": args.lora_mode}


def memory_options(args: argparse.Namespace) -> dict[str, object]:
    """The memory keyword arguments of `Engine.from_pretrained` from the parsed memory flags."""
    limit = args.max_gpu_memory
    if limit is not None and limit != "auto":
        try:
            limit = float(limit)
        except ValueError:
            raise UserError(f"--max-gpu-memory {limit!r} is not accepted: give GiB (a number > 0) or auto",
                            param="max_gpu_memory") from None
    from diffserve.config import PlanSize

    plan_size = PlanSize.parse(args.plan_size) if args.plan_size is not None else None
    if plan_size is not None and limit is None:
        raise UserError("--plan-size needs --max-gpu-memory (it says what the memory plan must fit)",
                        param="plan_size")
    return {"vae_tiling": {"auto": None, "on": True, "off": False}[args.vae_tiling],
            "text_encoder_cpu_offload": args.text_encoder_cpu_offload, "vae_cpu_offload": args.vae_cpu_offload,
            "dit_cpu_offload": args.dit_cpu_offload, "max_gpu_memory": limit, "plan_size": plan_size}


def step_cache_options(args: argparse.Namespace) -> dict[str, object]:
    """The `step_cache` keyword argument of `Engine.from_pretrained` from --step-cache and its settings
    (UserError when a setting is given without --step-cache, or is out of range)."""
    given = {"cache_threshold": args.cache_threshold, "cache_warmup": args.cache_warmup,
             "cache_max_skip": args.cache_max_skip}
    if args.step_cache == "none":
        extra = [k for k, v in given.items() if v is not None]
        if extra:
            raise UserError(f"--{extra[0].replace('_', '-')} needs --step-cache fbcache (the step cache is off "
                            f"by default)", param=extra[0])
        return {"step_cache": StepCacheConfig()}
    settings = {"threshold": args.cache_threshold, "warmup_steps": args.cache_warmup, "max_skip": args.cache_max_skip}
    return {"step_cache": StepCacheConfig(mode=args.step_cache, **{k: v for k, v in settings.items() if v is not None})}


def _words(flag: str, plural: bool = False) -> set[str]:
    """A flag's words without plural s: --num-inference-steps -> {num, inference, step} (`plural`: as typed)."""
    return {w if plural else w.rstrip("s") for w in re.split(r"[-_]", flag.lstrip("-")) if w}


def closest_flag(flag: str, known: list[str]) -> str | None:
    """The known flag `flag` was probably meant to be: the shortest one holding all its words (--steps ->
    --num-inference-steps), else the closest spelling (--promt -> --prompt), else None."""
    words = _words(flag)
    by_words = [k for k in known if words and words <= _words(k)]
    if by_words:  # those that hold the words as typed (plural s kept) first: --steps -> not --step-cache
        typed = [k for k in by_words if _words(flag, plural=True) <= _words(k, plural=True)]
        return min(typed or by_words, key=len)
    close = difflib.get_close_matches(flag.replace("_", "-"), known, n=1, cutoff=0.7)
    return close[0] if close else None


class SuggestingParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors name the closest known flag for each unknown one it was given, and the
    closest choice for an invalid one ("did you mean ...?"). Subparsers made from it are of this class too."""

    _given: tuple[str, ...] = ()  # the arguments of the latest parse
    subcommands: dict[str, argparse.ArgumentParser]  # the top-level parser's, by name (set by its builder)

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        import sys

        self._given = tuple(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def unknown_flags(self) -> list[str]:
        """The --flags given to this parser that name none of its options (a unique prefix names one)."""
        known = [o for o in self._option_string_actions if o.startswith("--")]
        out = []
        for token in self._given:
            flag = token.split("=", 1)[0]
            if flag.startswith("--") and flag != "--" and not any(k.startswith(flag) for k in known):
                out.append(flag)
        return out

    def suggestions(self, message: str) -> str:
        """"; did you mean ...?" hints for `message` (empty when there are none)."""
        known = [o for o in self._option_string_actions if o.startswith("--")]
        pairs = [(best, flag) for flag in self.unknown_flags() if (best := closest_flag(flag, known))]
        choice = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if choice:
            options = [c.strip(" '") for c in choice.group(2).split(",")]
            close = difflib.get_close_matches(choice.group(1), options, n=1, cutoff=0.6)
            pairs += [(close[0], choice.group(1))] if close else []
        if len(pairs) == 1:
            return f"; did you mean {pairs[0][0]}?"
        return "; did you mean " + ", ".join(f"{best} (for {given})" for best, given in pairs) + "?" if pairs else ""

    def error(self, message: str) -> NoReturn:
        super().error(message + self.suggestions(message))


def check_port_free(host: str, port: int) -> None:
    """Raise a one-line UserError when `host:port` cannot be listened on: a port in use (another server), or
    an address that is not this machine's. Binds as uvicorn does (SO_REUSEADDR), then lets go."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise UserError(f"port {port} on {host} is already in use (another diffserve serve?); stop that "
                                f"server or choose another --port") from None
            raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
