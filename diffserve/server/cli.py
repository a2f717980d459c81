"""`diffserve serve`: the OpenAI-compatible HTTP server (FastAPI on uvicorn, model in a worker process).

Exit status: 0 after a graceful shutdown (SIGTERM / SIGINT; a second SIGINT forces it), 1 when the model
cannot be loaded, or reloaded after its worker died (three tries in a row; an outside supervisor should then
restart the server), or the port cannot be bound (a busy port is found before the model loads, in one
line), 2 for bad flags.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from diffserve.cli_args import (
    MODEL_DEFAULTS_HELP,
    add_engine_args,
    check_port_free,
    lora_options,
    memory_options,
)
from diffserve.errors import UserError

FAULT_INJECTION_ENV = "DIFFSERVE_SERVER_FAULT_INJECTION"


def add_serve_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `serve` on the top-level parser's subcommands."""
    p = subparsers.add_parser(
        "serve", help="serve the model over an OpenAI-compatible HTTP API",
        description="Serve one model over an OpenAI-compatible HTTP API (images, image edits, video jobs). "
                    "The model runs in a worker process fed by a batching queue. A request that leaves a field "
                    "out gets the model's default (GET /v1/models lists them).",
        epilog=MODEL_DEFAULTS_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_args(p)
    net = p.add_argument_group("server")
    net.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    net.add_argument("--port", type=int, default=30000, help="port to bind (default 30000)")
    net.add_argument("--api-key", default=os.environ.get("DIFFSERVE_API_KEY"),
                     help="require 'Authorization: Bearer KEY' on every /v1 route (default: $DIFFSERVE_API_KEY; "
                          "none: open)")
    net.add_argument("--served-model-name", default=None,
                     help="the model id clients use (default: the model folder's name)")
    net.add_argument("--output-dir", type=Path, default=Path("outputs") / "server",
                     help="where url images and videos are written (default outputs/server)")
    net.add_argument("--allow-url-inputs", action="store_true",
                     help="fetch input images given as http(s) URLs (never from loopback or private addresses)")
    net.add_argument("--max-upload-mb", type=float, default=20.0,
                     help="largest request body accepted, in MiB; larger ones get 413 (default 20)")
    net.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                     help="server log level (default info)")
    net.add_argument("--metrics-require-key", action="store_true",
                     help="GET /metrics needs the API key too (default: open, like /health)")
    net.add_argument("--docs", action=argparse.BooleanOptionalAction, default=True,
                     help="serve GET /openapi.json and GET /docs (default on). /docs is a plain HTML reference "
                          "rendered by the server: FastAPI's Swagger UI and ReDoc load their assets from a CDN, "
                          "which fails offline, and no installed package ships them")
    net.add_argument("--playground", action=argparse.BooleanOptionalAction, default=True,
                     help="serve the web playground at GET / (default on): a page that calls this API from the "
                          "browser with the API key typed into it (the page itself needs no key)")
    net.add_argument("--allowed-origins", default="",
                     help="comma-separated origins allowed to call the API from a browser (CORS), e.g. "
                          "https://app.example.com; default: none (no CORS headers)")
    out = p.add_argument_group("outputs and jobs")
    out.add_argument("--job-ttl", type=_duration, default=24 * 3600.0,
                     help="how long finished video jobs, their MP4s and url images are kept, e.g. 3600, 90m, 24h, "
                          "7d (default 24h); jobs and outputs survive restarts in --output-dir")
    out.add_argument("--output-quota-gb", type=float, default=10.0,
                     help="space for output files (on disk, or under the --output-storage prefix); beyond it the "
                          "oldest are removed, their jobs with them "
                          "(default 10)")
    out.add_argument("--output-storage", default=None, metavar="s3://BUCKET/PREFIX",
                     help="keep url images and video MP4s in an S3-compatible bucket under PREFIX instead of "
                          "--output-dir (the job database stays in --output-dir); clients are redirected to "
                          "presigned URLs. Region and credentials: the usual AWS_* variables. Needs boto3 "
                          "(pip install 'diffserve[s3]'). Default: local disk")
    out.add_argument("--s3-endpoint-url", default=None, metavar="URL",
                     help="endpoint of an S3-compatible service other than AWS (MinIO, R2, Ceph), e.g. "
                          "http://127.0.0.1:9000; clients must reach it too (default: AWS, or "
                          "$AWS_ENDPOINT_URL_S3)")
    q = p.add_argument_group("queue and batching")
    q.add_argument("--max-queue", type=int, default=256,
                   help="requests that may wait; more get 429 (default 256)")
    q.add_argument("--max-batch-size", type=int, default=8,
                   help="outputs denoised together in one batch, also the largest n per request (default 8)")
    q.add_argument("--batch-wait-ms", type=float, default=5.0,
                   help="how long a request waits for compatible ones to batch with (default 5 ms)")
    q.add_argument("--shutdown-grace", type=float, default=30.0,
                   help="seconds the running batch may finish in at shutdown before it is cancelled (default 30)")
    q.add_argument("--max-queue-mb", type=float, default=256.0,
                   help="memory the waiting requests may hold (prompts, compressed input images); more get 429 "
                        "(default 256)")
    q.add_argument("--max-request-cost", type=float, default=None,
                   help="largest request accepted, in megapixel-steps: n x width x height x frames x steps / 1e6 "
                        "(default: 8x the model's default request; GET /v1/models shows it)")
    w = p.add_argument_group("worker watchdog")
    w.add_argument("--worker-heartbeat-timeout", type=float, default=30.0,
                   help="seconds without a heartbeat after which a loaded worker is killed and restarted "
                        "(default 30)")
    w.add_argument("--batch-timeout-base", type=float, default=300.0,
                   help="fixed part of every batch's deadline, in seconds; the rest is 4x its expected time "
                        "from its size and steps at the measured speed (default 300)")
    w.add_argument("--cancel-grace", type=float, default=30.0,
                   help="seconds a fully cancelled batch may run on before the worker is restarted to stop it; "
                        "at least as long as the model took to load (default 30)")
    lo = p.add_argument_group("LoRA adapters and output metadata")
    lo.add_argument("--lora-dir", type=Path, default=None, metavar="DIR",
                    help="load every LoRA in DIR (.safetensors files, diffusers LoRA folders) as adapters that "
                         "requests select by name (their lora field; GET /v1/loras lists them), and let POST "
                         "/v1/loras load more from DIR while serving (paths outside it are refused); needs "
                         "--lora-mode unmerged")
    lo.add_argument("--metadata", action=argparse.BooleanOptionalAction, default=True,
                    help="write the generation parameters (prompt, negative prompt, seed, steps, guidance, size, "
                         "model, LoRAs) into the images and MP4s served, as diffserve generate does (PNG text "
                         "chunks, MP4 tags, JPEG comment); --no-metadata: leave them out (default on)")
    return p


def lora_dir_entries(folder: Path) -> list[Path]:
    """The LoRAs of a --lora-dir, sorted: its .safetensors files and its folders holding one (a diffusers
    LoRA folder); hidden entries are skipped."""
    def is_lora(entry: Path) -> bool:
        if entry.is_dir():
            return any(entry.glob("*.safetensors"))
        return entry.is_file() and entry.suffix == ".safetensors"

    return [entry for entry in sorted(folder.iterdir()) if not entry.name.startswith(".") and is_lora(entry)]


def _lora_settings(args: argparse.Namespace) -> dict[str, object]:
    """The worker's LoRA settings: --lora-path / --lora-mode, and the LoRAs of --lora-dir (a one-line UserError
    for a --lora-dir that is not a folder or comes without --lora-mode unmerged, or two LoRAs of one name)."""
    from diffserve.lora.spec import LoraSpec

    settings = lora_options(args)
    found: tuple[LoraSpec, ...] = ()
    if args.lora_dir is not None:
        if settings["lora_mode"] != "unmerged":
            raise UserError("--lora-dir loads adapters that each request selects by name; it needs "
                            "--lora-mode unmerged")
        if not args.lora_dir.is_dir():
            raise UserError(f"--lora-dir {args.lora_dir}: not a folder")
        found = tuple(LoraSpec(path=str(p)) for p in lora_dir_entries(args.lora_dir))
    names = [s.name for s in (*settings["loras"], *found)]  # type: ignore[misc]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UserError(f"two LoRAs are named {dupes[0]!r} (names come from file names, in --lora-path and "
                        "--lora-dir); rename one")
    return {**settings, "lora_dir_loras": found}


def _duration(text: str) -> float:
    """A duration in seconds from "3600", "90s", "90m", "24h" or "7d"."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    value, unit = (text[:-1], text[-1]) if text and text[-1] in units else (text, "s")
    try:
        seconds = float(value) * units[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration (e.g. 3600, 90m, 24h, 7d)") from None
    if not seconds > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive duration")
    return seconds


def _check_args(args: argparse.Namespace) -> None:
    for name, low in (("max_queue", 1), ("max_batch_size", 1)):
        if getattr(args, name) < low:
            raise UserError(f"--{name.replace('_', '-')} must be at least {low}")
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port {args.port} is not a port number")
    if args.max_upload_mb <= 0 or args.batch_wait_ms < 0 or args.shutdown_grace < 0:
        raise UserError("--max-upload-mb must be positive; --batch-wait-ms and --shutdown-grace not negative")
    positive = ("max_queue_mb", "output_quota_gb", "worker_heartbeat_timeout", "batch_timeout_base", "cancel_grace")
    for name in positive:
        if not getattr(args, name) > 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive")
    if args.max_request_cost is not None and not args.max_request_cost > 0:
        raise UserError("--max-request-cost must be positive")
    _check_storage_args(args)
    try:
        args.output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create --output-dir {args.output_dir}: {e.strerror or e}") from None
    if not os.access(args.output_dir, os.W_OK):
        raise UserError(f"--output-dir {args.output_dir} is not writable")


def _check_storage_args(args: argparse.Namespace) -> None:
    """--output-storage is an s3:// URL naming a bucket, boto3 is installed; --s3-endpoint-url goes with it."""
    if args.output_storage is None:
        if args.s3_endpoint_url is not None:
            raise UserError("--s3-endpoint-url is only used with --output-storage s3://BUCKET/PREFIX")
        return
    from diffserve.server.storage_s3 import parse_s3_url, require_boto3

    parse_s3_url(args.output_storage)
    require_boto3()
    if args.s3_endpoint_url is not None and not args.s3_endpoint_url.startswith(("http://", "https://")):
        raise UserError(f"--s3-endpoint-url {args.s3_endpoint_url!r} is not accepted: give an http:// or "
                        "https:// URL")


def _model_id(args: argparse.Namespace) -> str:
    if args.served_model_name:
        return args.served_model_name
    path = Path(args.model_path)
    return path.resolve().name if path.exists() else args.model_path


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the server until SIGTERM / SIGINT."""
    import uvicorn

    from diffserve.embedded import resolve_model_arg
    from diffserve.parallel.mesh import parallel_config_from_args
    from diffserve.server.app import create_app
    from diffserve.server.messages import WorkerConfig
    from diffserve.server.runtime import Runtime, ServerConfig
    from diffserve.server.supervisor import MAX_LOAD_FAILURES
    from diffserve.server.watchdog import WatchdogConfig

    args.model_path = resolve_model_arg(args.model_path, "image")
    _check_args(args)
    try:
        check_port_free(args.host, args.port)  # before the model loads: a busy port is one line, exit 1
    except UserError as e:
        print(f"diffserve: error: {e}", file=sys.stderr)
        return 1
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    faults = os.environ.get(FAULT_INJECTION_ENV) == "1"
    from diffserve.cli_args import step_cache_options

    worker = WorkerConfig(model_path=args.model_path, dtype=args.dtype, device=args.device,
                          **step_cache_options(args),  # type: ignore[arg-type]
                          attention_backend=args.attention_backend, compile=getattr(args, "compile", False),
                          fuse=args.fuse, vae_dtype=args.vae_dtype, fp8=args.fp8,
                          parallel=parallel_config_from_args(args), fault_injection=faults,
                          fail_load_marker=str(args.output_dir / ".fault-fail-load") if faults else None,
                          metadata=args.metadata, **_lora_settings(args),  # type: ignore[arg-type]
                          **memory_options(args))  # type: ignore[arg-type]
    watchdog = WatchdogConfig(heartbeat_timeout_s=args.worker_heartbeat_timeout,
                              batch_base_s=args.batch_timeout_base, cancel_grace_s=args.cancel_grace)
    origins = tuple(o.strip() for o in args.allowed_origins.split(",") if o.strip())
    config = ServerConfig(
        worker=worker, model_id=_model_id(args), api_key=args.api_key or None, max_queue=args.max_queue,
        max_batch_size=args.max_batch_size, batch_wait_s=args.batch_wait_ms / 1000, output_dir=args.output_dir,
        allow_url_inputs=args.allow_url_inputs, max_upload_bytes=int(args.max_upload_mb * 2**20),
        shutdown_grace_s=args.shutdown_grace, max_queue_bytes=int(args.max_queue_mb * 2**20),
        max_request_mpx_steps=args.max_request_cost, job_ttl_s=args.job_ttl,
        output_quota_bytes=int(args.output_quota_gb * 2**30), watchdog=watchdog, lora_dir=args.lora_dir,
        metrics_require_key=args.metrics_require_key, docs=args.docs, playground=args.playground,
        allowed_origins=origins,
        output_storage=args.output_storage, s3_endpoint_url=args.s3_endpoint_url)
    fatal: list[str] = []

    def on_fatal(message: str) -> None:
        fatal.append(message)
        server.should_exit = True

    runtime = Runtime(config, on_fatal=on_fatal)
    runtime.outputs.check()  # a missing bucket or refused credentials stop the server now, in one line
    uv_config = uvicorn.Config(create_app(runtime), host=args.host, port=args.port, log_level=args.log_level,
                               timeout_graceful_shutdown=int(args.shutdown_grace) + 30)
    server = _server_class()(uv_config, runtime)
    # uvicorn re-raises the signal that stopped it once it is done; these no-op handlers make that a clean exit.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    print(f"diffserve: serving {config.model_id} on http://{args.host}:{args.port} (model loading in the worker; "
          "GET /health says when it is ready)", file=sys.stderr)
    server.run()
    if fatal:
        print(f"diffserve: error: the model could not be loaded (or reloaded after its worker died; gave up "
              f"after {MAX_LOAD_FAILURES} tries): {fatal[0]}", file=sys.stderr)
        return 1
    return 0 if server.started else 1


def _server_class():
    import uvicorn

    class _Server(uvicorn.Server):
        """uvicorn's server, starting our shutdown sequence (fail queued work, stop the worker) on a signal."""

        def __init__(self, config: uvicorn.Config, runtime) -> None:
            super().__init__(config)
            self.runtime = runtime

        def handle_exit(self, sig: int, frame) -> None:
            # Locks are taken there, so not in this signal handler.
            threading.Thread(target=self.runtime.begin_shutdown, name="diffserve-begin-shutdown").start()
            super().handle_exit(sig, frame)

    return _Server
