"""`diffserve` command line: generate (prompts to files, no server), serve (HTTP API), models (what this
machine can run)."""

from __future__ import annotations

import argparse
import json
import secrets
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from diffserve.cli_args import (
    MODEL_DEFAULTS_HELP,
    SuggestingParser,
    add_engine_args,
    lora_options,
    memory_options,
)
from diffserve.errors import InvalidRequestError, UserError

IMAGE_FORMATS = ("png", "jpeg", "webp")  # kept equal to diffserve.media's lists (imported lazily there)
VIDEO_FORMATS = ("mp4", "gif", "webp", "frames")
# GenerationRequest fields a flag (and a --prompt-file JSON line) sets; image_path is loaded into `image`
REQUEST_FIELDS = ("prompt", "negative_prompt", "height", "width", "num_inference_steps", "guidance_scale",
                  "true_cfg_scale", "seed", "num_outputs", "num_frames", "fps", "max_sequence_length")
PROMPT_FILE_KEYS = (*REQUEST_FIELDS, "image_path")

if TYPE_CHECKING:
    from diffserve.config import GenerationRequest, PlanSize
    from diffserve.engine.engine import GenerationResult, LocalEngine
    from diffserve.engine.parallel_engine import ParallelEngine
    from diffserve.models.loader import ModelIndex


def _add_generate_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (defaults come from the model)")
    prompts = g.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", default=None, help="text prompt")
    prompts.add_argument("--prompt-file", type=Path, default=None,
                         help="several prompts, one per line (blank lines skipped); a line that starts with { is a "
                              "JSON object with 'prompt' and any of its own " + ", ".join(PROMPT_FILE_KEYS[1:])
                              + " (JSONL), which override the flags for that line")
    g.add_argument("--negative-prompt", default=None,
                   help="negative prompt (models with classifier-free guidance; Qwen-Image runs its true CFG only "
                        "with one: ' ' is enough; HunyuanVideo with --true-cfg-scale > 1)")
    g.add_argument("--height", type=int, default=None, help="output height in pixels (multiple of 16 for real models)")
    g.add_argument("--width", type=int, default=None, help="output width in pixels (multiple of 16 for real models)")
    g.add_argument("--num-inference-steps", type=int, default=None, help="denoising steps (1-1000)")
    g.add_argument("--guidance-scale", type=float, default=None,
                   help="guidance scale (0-100): CFG for Wan, embedded for FLUX.1-dev and HunyuanVideo, true CFG "
                        "for Qwen-Image (diffusers' true_cfg_scale)")
    g.add_argument("--true-cfg-scale", type=float, default=None,
                   help="true CFG against --negative-prompt (1-100, 1: off), as diffusers' true_cfg_scale: "
                        "HunyuanVideo runs it on top of its embedded guidance (two passes per step); for Qwen-Image "
                        "it is the same setting as --guidance-scale; other models refuse it")
    g.add_argument("--seed", type=int, default=None,
                   help="seed of the first output (default, or -1: random); output k of the run gets SEED+k "
                        "(a --prompt-file line may set its own; the count goes on from it), and every output's "
                        "seed is printed, so any one can be made again alone")
    g.add_argument("--num-outputs", type=int, default=1, help="images/videos per prompt (1-16), one seed each")
    g.add_argument("--num-frames", type=int, default=None, help="video models: frames, 4k+1 (e.g. 81)")
    g.add_argument("--fps", type=int, default=None, help="video models: frame rate of the written video")
    g.add_argument("--image-path", action="append", default=None,
                   help="input image for image-to-video / edit models: a file, an http(s) URL or a data URI; "
                        "repeat it for models that take several (Qwen-Image-Edit-2509); without --height/--width "
                        "those models take the output size from the image's aspect ratio")
    g.add_argument("--max-sequence-length", type=int, default=None, help="text tokens (default: the model's)")
    o = p.add_argument_group("output")
    dest = o.add_mutually_exclusive_group()
    dest.add_argument("--output-dir", type=Path, default=None,
                      help="folder for the outputs, created if missing (default: ./outputs); each is named "
                           "seedSEED-TIME-ID_0.EXT, so runs never overwrite each other")
    dest.add_argument("--output-path", type=Path, default=None,
                      help="exact output file, its folder created if missing; with several outputs (--num-outputs, "
                           "--prompt-file) NAME_0.EXT, NAME_1.EXT ... beside it, in prompt then seed order")
    o.add_argument("--output-format", choices=sorted(set(IMAGE_FORMATS + VIDEO_FORMATS)), default=None,
                   help="images: png|jpeg|webp (default png); videos: mp4|gif|webp|frames (default mp4); default "
                        "with --output-path: its extension")
    o.add_argument("--no-metadata", dest="metadata", action="store_false",
                   help="do not write the prompt, seed, steps, guidance, size and model into the files (PNG text "
                        "chunks, MP4 tags, JPEG/GIF comment)")


def _add_models_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the models this machine can run, with their defaults and ranges",
                       description="List the embedded models and the diffusers-format models in the Hugging Face "
                                   "cache (HF_HUB_CACHE honoured) with their kind, pipeline, defaults and accepted "
                                   "ranges, read from their config files (nothing is loaded).")
    p.add_argument("--model-path", action="append", default=[],
                   help="also describe this model folder or hub id (repeatable)")
    p.add_argument("--json", action="store_true", help="print the model cards as JSON, as GET /v1/models does")


def build_parser() -> SuggestingParser:
    parser = SuggestingParser(prog="diffserve", description="Fast diffusion inference and serving.")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="run generations and write the results to files",
                         description="Generate from one prompt (--prompt) or several (--prompt-file) in this "
                                     "process and write the outputs. Every request and output check runs from the "
                                     "model's config files before any weight is read.",
                         epilog=MODEL_DEFAULTS_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_args(gen)
    _add_generate_args(gen)
    from diffserve.server.cli import add_serve_parser

    add_serve_parser(sub)
    _add_models_parser(sub)
    parser.subcommands = dict(sub.choices)
    return parser


def read_prompt_file(path: Path) -> list[tuple[str, dict[str, object]]]:
    """The prompts of a --prompt-file as (where, fields) pairs: "FILE:LINE" and the request fields that line
    sets (a plain line: its prompt; a JSON line: its object). A one-line UserError for an unreadable file, bad
    JSON, unknown keys or a file without prompts."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--prompt-file {path}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    out: list[tuple[str, dict[str, object]]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        where, stripped = f"{path}:{number}", line.strip()
        if not stripped:
            continue
        if not stripped.startswith("{"):
            out.append((where, {"prompt": stripped}))
            continue
        try:
            fields = json.loads(stripped)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: not valid JSON ({e.msg}, column {e.colno})") from None
        unknown = sorted(set(fields) - set(PROMPT_FILE_KEYS)) if isinstance(fields, dict) else None
        if unknown is None or "prompt" not in fields:
            raise UserError(f"{where}: a JSON line must be an object with a 'prompt'")
        if unknown:
            raise UserError(f"{where}: unknown keys {unknown}; accepted: {', '.join(PROMPT_FILE_KEYS)}")
        out.append((where, fields))
    if not out:
        raise UserError(f"--prompt-file {path}: no prompts in it")
    return out


def _jobs(args: argparse.Namespace) -> list[tuple[str, dict[str, object], bool]]:
    """(where, fields, sets its own seed) of every prompt of the run: the flags, overridden per line by a
    --prompt-file."""
    flags = {name: getattr(args, name) for name in REQUEST_FIELDS} | {"image_path": args.image_path}
    if args.prompt_file is None:
        return [("", flags, False)]
    return [(where, flags | fields, "seed" in fields) for where, fields in read_prompt_file(args.prompt_file)]


def _batches(jobs: list[tuple[str, dict[str, object], bool]], first_seed: int,
             index: ModelIndex) -> list[list[GenerationRequest]]:
    """Each prompt's validated requests, one per output. Output k of the run gets seed first_seed + k; a
    --prompt-file line with its own seed starts from that one, and the count goes on from there."""
    images: dict[str, object] = {}
    batches, seed = [], first_seed
    for where, fields, own_seed in jobs:
        batch = _job_requests(where, fields if own_seed else fields | {"seed": seed}, index, images)
        batches.append(batch)
        seed = int(batch[-1].seed) + 1  # type: ignore[arg-type]
    return batches


def _job_requests(where: str, fields: dict[str, object], index: ModelIndex,
                  images: dict[str, object]) -> list[GenerationRequest]:
    """One validated request per output of a prompt, with seeds SEED, SEED+1, ... (SEED random when left out
    or -1), checked from the model's config files (`validate_from_configs`). `images` caches loaded inputs."""
    from diffserve.config import GenerationRequest
    from diffserve.media import load_image
    from diffserve.pipelines.registry import validate_from_configs

    given = fields.get("image_path")
    paths = [given] if isinstance(given, str) else given or []
    try:
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            raise InvalidRequestError(f"image_path must be a string or a list of strings, got {given!r}",
                                      param="image")
        loaded = [images[p] if p in images else images.setdefault(p, load_image(p)) for p in paths]
        request = GenerationRequest(**{k: v for k, v in fields.items() if k != "image_path"},  # type: ignore[arg-type]
                                    image=loaded[0] if len(loaded) == 1 else (loaded or None))
        (resolved,) = validate_from_configs(index, [request])
        seed, count = int(resolved.seed), resolved.num_outputs  # type: ignore[arg-type]
        outputs = [resolved.replace(seed=seed + i, num_outputs=1) for i in range(count)]
        return validate_from_configs(index, outputs)
    except InvalidRequestError as e:
        if not where:
            raise
        raise InvalidRequestError(f"{where}: {e}", param=e.param) from None


def _largest_batch(batches: list[list[GenerationRequest]]) -> PlanSize:
    """The run's batch with the most image/video tokens, as a memory-plan size."""
    from diffserve.config import PlanSize
    from diffserve.engine.memory_plan import size_tokens

    def size(batch: list[GenerationRequest]) -> PlanSize:
        r = batch[0]  # one prompt's outputs share their size
        return PlanSize(int(r.height), int(r.width), r.num_frames, batch=len(batch))  # type: ignore[arg-type]

    return max((size(b) for b in batches), key=size_tokens)


def _load_engine(args: argparse.Namespace, model_path: str,
                 batches: list[list[GenerationRequest]] | None = None) -> LocalEngine | ParallelEngine:
    """The engine the flags ask for (the only step that reads weights). With --max-gpu-memory and no
    --plan-size, the memory plan fits the largest of `batches`."""
    from diffserve.cli_args import step_cache_options
    from diffserve.engine.entry import Engine
    from diffserve.parallel.mesh import parallel_config_from_args

    memory = memory_options(args)
    if memory["max_gpu_memory"] is not None and memory["plan_size"] is None and batches:
        memory["plan_size"] = _largest_batch(batches)
    return Engine.from_pretrained(model_path, dtype=args.dtype, device=args.device, **step_cache_options(args),
                                  attention_backend=args.attention_backend, compile=args.compile,
                                  fuse=args.fuse, vae_dtype=args.vae_dtype, fp8=args.fp8,
                                  parallel=parallel_config_from_args(args), **lora_options(args),
                                  **memory)


def _write_result(result: GenerationResult, *, fmt: str, output_dir: Path | None, output_path: Path | None,
                  metadata: bool) -> Path:
    """Write one output (a result of one request with one output); its path."""
    from diffserve.media import write_images, write_videos

    meta = result.metadata if metadata else None
    stem = f"seed{result.seed}"
    if result.images:
        return write_images(result.images, fmt=fmt, output_dir=output_dir, output_path=output_path, stem=stem,
                            metadata=meta)[0]
    return write_videos(result.videos, fmt=fmt, fps=int(result.fps or 16), output_dir=output_dir,
                        output_path=output_path, stem=stem, metadata=meta)[0]


def cmd_generate(args: argparse.Namespace) -> int:
    """Check everything that needs no weights, load the model, generate each prompt's outputs as one batch and
    write them as they come (paths on stdout; seeds, timings and memory on stderr)."""
    import torch

    from diffserve.config import parse_device
    from diffserve.embedded import resolve_model_arg
    from diffserve.engine.engine import ProgressBar
    from diffserve.media import check_output_target, numbered_paths, resolve_format
    from diffserve.models.loader import read_model_index, resolve_model_path
    from diffserve.parallel.mesh import parallel_config_from_args
    from diffserve.pipelines.registry import defaults_from_configs

    parallel_config_from_args(args)  # the layout flags alone, before any file is read
    jobs = _jobs(args)
    wants_video = args.output_format in ("mp4", "gif", "frames") or any(
        f.get("num_frames") is not None or f.get("image_path") for _, f, _ in jobs)
    model_path = resolve_model_arg(args.model_path, "video" if wants_video else "image")
    if args.device is not None:
        parse_device(args.device)
    # Before any weight is read: the model's config files, every request, the output target.
    index = read_model_index(resolve_model_path(model_path))
    kind = defaults_from_configs(index).kind
    fmt = resolve_format(args.output_format, args.output_path, kind)
    first_seed = args.seed if args.seed is not None and args.seed != -1 else secrets.randbelow(2**31)
    batches = _batches(jobs, first_seed, index)
    total = sum(len(b) for b in batches)
    output_dir = args.output_dir if args.output_dir is not None or args.output_path else Path("outputs")
    check_output_target(fmt=fmt, output_dir=output_dir, output_path=args.output_path, count=total, kind=kind)
    targets = numbered_paths(args.output_path, total, fmt) if args.output_path is not None else None

    engine = _load_engine(args, model_path, batches)
    if args.compile:
        from diffserve.engine.optimize import compile_cache_dir

        print(f"diffserve: --compile: the first generation includes the transformer blocks' compile time; "
              f"kernels are cached in {compile_cache_dir()} for later runs", file=sys.stderr)
    print(f"model: {engine.pipeline_class} from {engine.model_root} ({str(engine.config.dtype).removeprefix('torch.')}, "
          f"{engine.config.device}, attention {engine.attention.backend})", file=sys.stderr)
    off = engine.config.offload
    if getattr(engine, "offloaded", None) is not None and (off.max_gpu_memory is not None or off.text_encoder
                                                           or off.vae or off.dit):
        budget = f" (--max-gpu-memory {off.max_gpu_memory}, planned for {off.plan_size.describe()})" \
            if off.max_gpu_memory is not None and off.plan_size is not None else ""
        print(f"offload{budget}: {engine.offloaded.describe()}", file=sys.stderr)
    written = 0
    for number, batch in enumerate(batches, start=1):
        bar = ProgressBar("denoising" if len(batches) == 1 else f"prompt {number}/{len(batches)}")
        try:
            with torch.inference_mode():
                results = engine.generate_batch(batch, on_step=bar)
        finally:
            bar.close()
        for result in results:
            path = _write_result(result, fmt=fmt, output_dir=None if targets else output_dir,
                                 output_path=targets[written] if targets else None, metadata=args.metadata)
            written += 1
            print(path)
            print(f"seed {result.seed}: {path}", file=sys.stderr)
        stages = ", ".join(f"{k} {v:.3f}s" for k, v in results[0].timings.items())
        print(f"timings ({len(results)} output(s)): {stages}", file=sys.stderr)
        if results[0].cache_hit_fraction is not None:
            print(f"step cache: {results[0].cache_hit_fraction:.0%} of the model calls reused it", file=sys.stderr)
        if results[0].peak_memory_bytes:
            label = "GPU peak allocated" if engine.config.device.type == "cuda" else "process peak RSS"
            print(f"{label}: {results[0].peak_memory_bytes / 2**30:.2f} GiB", file=sys.stderr)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    """Print the models this machine can run (text, or JSON cards with --json)."""
    from diffserve.models_catalog import format_catalog, list_models

    entries = list_models(args.model_path)
    if args.json:
        data = [e.card if e.card is not None else {"id": e.name, "object": "model", "error": e.error}
                for e in entries]
        print(json.dumps({"object": "list", "data": data}, indent=2))
    else:
        print(format_catalog(entries))
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
    args, extras = parser.parse_known_args(argv)
    if extras:  # the subcommand's parser knows its flags, so it says what a mistyped one was meant to be
        parser.subcommands[args.command].error(f"unrecognized arguments: {' '.join(extras)}")
    _quiet_libraries()
    try:
        if args.command == "generate":
            return cmd_generate(args)
        if args.command == "models":
            return cmd_models(args)
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
