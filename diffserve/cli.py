"""`diffserve` command line: generate (one job, no server), serve (HTTP API)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from diffserve.cli_args import MODEL_DEFAULTS_HELP, add_engine_args
from diffserve.errors import UserError

IMAGE_FORMATS = ("png", "jpeg", "webp")  # kept equal to diffserve.media's lists (imported lazily there)
VIDEO_FORMATS = ("mp4", "gif", "webp", "frames")


def _add_generate_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (defaults come from the model)")
    g.add_argument("--prompt", required=True, help="text prompt")
    g.add_argument("--negative-prompt", default=None,
                   help="negative prompt (models with classifier-free guidance; Qwen-Image runs its true CFG only "
                        "with one: ' ' is enough)")
    g.add_argument("--height", type=int, default=None, help="output height in pixels (multiple of 16 for real models)")
    g.add_argument("--width", type=int, default=None, help="output width in pixels (multiple of 16 for real models)")
    g.add_argument("--num-inference-steps", type=int, default=None, help="denoising steps (1-1000)")
    g.add_argument("--guidance-scale", "--true-cfg-scale", dest="guidance_scale", type=float, default=None,
                   help="guidance scale (0-100); for Qwen-Image models it is diffusers' true_cfg_scale")
    g.add_argument("--seed", type=int, default=None, help="random seed (default: random, printed)")
    g.add_argument("--num-outputs", type=int, default=1, help="images/videos to generate for the prompt (1-16)")
    g.add_argument("--num-frames", type=int, default=None, help="video models: frames, 4k+1 (e.g. 81)")
    g.add_argument("--fps", type=int, default=None, help="video models: frame rate of the written video")
    g.add_argument("--image-path", action="append", default=None,
                   help="input image for image-to-video / edit models: a file, an http(s) URL or a data URI; "
                        "repeat it for models that take several (Qwen-Image-Edit-2509)")
    g.add_argument("--max-sequence-length", type=int, default=None, help="text tokens (default: the model's)")
    o = p.add_argument_group("output")
    dest = o.add_mutually_exclusive_group()
    dest.add_argument("--output-dir", type=Path, default=None, help="folder for the outputs (default: ./outputs)")
    dest.add_argument("--output-path", type=Path, default=None, help="exact output file (one output only)")
    o.add_argument("--output-format", choices=sorted(set(IMAGE_FORMATS + VIDEO_FORMATS)), default=None,
                   help="images: png|jpeg|webp (default png); videos: mp4|gif|webp|frames (default mp4)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffserve", description="Fast diffusion inference and serving.")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="run one generation and write the result to files",
                         description="Run one generation job in this process and write the outputs.",
                         epilog=MODEL_DEFAULTS_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_args(gen)
    _add_generate_args(gen)
    from diffserve.server.cli import add_serve_parser

    add_serve_parser(sub)
    return parser


def cmd_generate(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from diffserve.config import GenerationRequest
    from diffserve.embedded import resolve_model_arg
    from diffserve.engine.entry import Engine
    from diffserve.media import check_output_target, load_image, resolve_format, write_images, write_videos
    from diffserve.parallel.mesh import parallel_config_from_args

    wants_video = args.num_frames is not None or args.output_format in ("mp4", "gif", "frames") or args.image_path
    model_path = resolve_model_arg(args.model_path, "video" if wants_video else "image")
    engine = Engine.from_pretrained(model_path, dtype=args.dtype, device=args.device,
                                    attention_backend=args.attention_backend, compile=args.compile,
                                    fuse=args.fuse, vae_dtype=args.vae_dtype,
                                    parallel=parallel_config_from_args(args))
    if args.compile:
        from diffserve.engine.optimize import compile_cache_dir

        print(f"diffserve: --compile: the first generation includes the transformer blocks' compile time; "
              f"kernels are cached in {compile_cache_dir()} for later runs", file=sys.stderr)
    kind = engine.defaults.kind
    fmt = resolve_format(args.output_format, args.output_path, kind)
    images = [load_image(path) for path in args.image_path or ()]
    image = images[0] if len(images) == 1 else (images or None)
    request = engine.validate(GenerationRequest(
        prompt=args.prompt, negative_prompt=args.negative_prompt, height=args.height, width=args.width,
        num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale, seed=args.seed,
        num_outputs=args.num_outputs, num_frames=args.num_frames, fps=args.fps, image=image,
        max_sequence_length=args.max_sequence_length,
    ))
    output_dir = args.output_dir if args.output_dir is not None or args.output_path else Path("outputs")
    check_output_target(fmt=fmt, output_dir=output_dir, output_path=args.output_path, count=request.num_outputs,
                        kind=kind)
    print(f"model: {engine.pipeline_class} from {engine.model_root} ({str(engine.config.dtype).removeprefix('torch.')}, "
          f"{engine.config.device}, attention {engine.attention.backend})", file=sys.stderr)
    bar = tqdm(total=request.num_inference_steps, desc="denoising", unit="step", file=sys.stderr)

    def on_step(done: int, total: int) -> None:
        bar.update(done - bar.n)

    with torch.inference_mode():
        result = engine.generate_batch([request], on_step=on_step)[0]
    bar.close()
    stem = f"seed{result.seed}"
    if kind == "image":
        paths = write_images(result.images, fmt=fmt, output_dir=output_dir, output_path=args.output_path, stem=stem)
    else:
        paths = write_videos(result.videos, fmt=fmt, fps=int(result.fps or 16), output_dir=output_dir,
                             output_path=args.output_path, stem=stem)
    for path in paths:
        print(path)
    stages = ", ".join(f"{k} {v:.3f}s" for k, v in result.timings.items())
    print(f"seed {result.seed}; {stages}", file=sys.stderr)
    if result.peak_memory_bytes:
        label = "GPU peak allocated" if engine.config.device.type == "cuda" else "process peak RSS"
        print(f"{label}: {result.peak_memory_bytes / 2**30:.2f} GiB", file=sys.stderr)
    return 0


def _quiet_libraries() -> None:
    """Keep library chatter (load progress bars, advisory warnings) off the user's terminal."""
    import diffusers
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    diffusers.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_libraries()
    try:
        if args.command == "generate":
            return cmd_generate(args)
        if args.command == "serve":
            from diffserve.server.cli import cmd_serve

            return cmd_serve(args)
        parser.error(f"unknown command {args.command}")
    except UserError as e:
        print(f"diffserve: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("diffserve: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
