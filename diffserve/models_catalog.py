"""What models this machine can run, and what each accepts: `diffserve models` and the model cards of
GET /v1/models. Everything here is read from the repos' config files; no weight is loaded.

A model card (`model_card`) is a JSON-ready dict: the model's id, kind and pipeline class, its `defaults`
(every `ModelDefaults` field: what a request that leaves a field out gets) and `accepts` (the accepted
ranges, spelled out: size multiple and bounds, steps, guidance, text tokens, frames, fps, input images).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffserve.config import MAX_OUTPUTS, MAX_STEPS, ModelDefaults
from diffserve.errors import UserError


@dataclass(frozen=True)
class CatalogEntry:
    """One model found on this machine: how to name it (`--model-path`), where it is, and its card (None
    with `error` saying why when its config files cannot be read or its pipeline class is not supported)."""

    name: str
    source: str  # "embedded", "hub cache" or "folder"
    path: Path
    card: dict[str, Any] | None
    error: str | None = None


def accepted_ranges(d: ModelDefaults) -> dict[str, Any]:
    """What a request may ask of a model with defaults `d` (the rules of `diffserve.config.resolve_request`)."""
    out: dict[str, Any] = {
        "size": {"multiple": d.size_multiple, "min": d.min_size, "max": d.max_size},
        "num_inference_steps": ({"fixed": d.fixed_steps} if d.fixed_steps is not None else {"min": 1, "max": MAX_STEPS}),
        "guidance_scale": {"min": 0.0, "max": 100.0, "meaning": d.guidance},
        "max_sequence_length": {"min": 1, "max": d.max_sequence_length_limit or d.max_sequence_length},
        "num_outputs": {"min": 1, "max": MAX_OUTPUTS},
        "negative_prompt": d.uses_negative_prompt,
        "image": {"required": d.needs_image, "accepted": d.accepts_image or d.needs_image,
                  "max_images": d.max_images if (d.accepts_image or d.needs_image) else 0,
                  "size_from_image_area": d.size_from_image_area},
    }
    if d.true_cfg_scale is not None:  # a scale of its own, on top of embedded guidance (HunyuanVideo)
        out["true_cfg_scale"] = {"min": 1.0, "max": 100.0, "meaning": "true CFG against the negative prompt"}
    elif d.guidance == "true_cfg":  # Qwen-Image: diffusers' name of its guidance_scale
        out["true_cfg_scale"] = {"min": 1.0, "max": 100.0, "meaning": "same as guidance_scale"}
    if d.kind == "video":
        out["num_frames"] = {"min": d.min_frames, "max": d.max_frames, "rule": "4k+1"}
        out["fps"] = {"min": 1, "max": 120}
    return out


def model_card(defaults: ModelDefaults, *, model_id: str, pipeline: str | None = None,
               created: int | None = None) -> dict[str, Any]:
    """The OpenAI-style model object of GET /v1/models (and `diffserve models --json`), with diffserve's
    `kind`, `pipeline`, `defaults` (all ModelDefaults fields) and `accepts` (`accepted_ranges`)."""
    card: dict[str, Any] = {"id": model_id, "object": "model", "owned_by": "diffserve", "kind": defaults.kind,
                            "pipeline": pipeline, "defaults": dataclasses.asdict(defaults),
                            "accepts": accepted_ranges(defaults)}
    if created is not None:
        card["created"] = created
    return card


def card_for_folder(root: Path, model_id: str) -> dict[str, Any]:
    """The model card of a diffusers-format folder, from its config files (CheckpointError when they cannot
    be read or its pipeline class is not supported)."""
    from diffserve.models.loader import read_model_index
    from diffserve.pipelines.registry import defaults_from_configs

    index = read_model_index(root)
    return model_card(defaults_from_configs(index), model_id=model_id, pipeline=index.pipeline_class)


def _entry(name: str, source: str, root: Path) -> CatalogEntry:
    try:
        return CatalogEntry(name, source, root, card_for_folder(root, name))
    except UserError as e:
        return CatalogEntry(name, source, root, None, error=str(e))


def hub_cache_snapshots(cache_dir: Path | None = None) -> dict[str, Path]:
    """Repo id -> snapshot folder of every diffusers-format model (one with model_index.json) in the Hugging
    Face hub cache (`cache_dir`, default: huggingface_hub's, HF_HUB_CACHE honoured): the snapshot `main`
    points to, else the newest one."""
    if cache_dir is None:
        from huggingface_hub import constants

        cache_dir = Path(constants.HF_HUB_CACHE)
    found: dict[str, Path] = {}
    for repo in sorted(cache_dir.glob("models--*")):
        snapshots = [s for s in (repo / "snapshots").glob("*") if (s / "model_index.json").is_file()]
        if not snapshots:
            continue
        ref = repo / "refs" / "main"
        main = repo / "snapshots" / ref.read_text().strip() if ref.is_file() else None
        chosen = main if main in snapshots else max(snapshots, key=lambda s: s.stat().st_mtime)
        found[repo.name.removeprefix("models--").replace("--", "/")] = chosen
    return found


def list_models(extra_paths: list[str] = (), cache_dir: Path | None = None) -> list[CatalogEntry]:
    """The embedded models, the diffusers-format models in the hub cache, and `extra_paths` (folders or
    cached repo ids), each with its card or the reason it has none."""
    from diffserve.embedded import EMBEDDED, embedded_model

    entries = [_entry(f"embedded:{kind}", "embedded", path) for kind in EMBEDDED
               if (path := embedded_model(kind)) is not None]  # type: ignore[arg-type]
    cached = hub_cache_snapshots(cache_dir)
    entries += [_entry(repo_id, "hub cache", root) for repo_id, root in cached.items()]
    for given in extra_paths:
        if given in cached or given.startswith("embedded:"):
            continue
        from diffserve.models.loader import resolve_model_path

        try:
            entries.append(_entry(given, "folder", resolve_model_path(given)))
        except UserError as e:
            entries.append(CatalogEntry(given, "folder", Path(given), None, error=str(e)))
    return entries


def describe(card: dict[str, Any]) -> list[str]:
    """A card as two indented lines of text: the defaults, and what is accepted."""
    d, a = card["defaults"], card["accepts"]
    video = card["kind"] == "video"
    guidance = f"guidance {d['guidance_scale']:g}" + (f" ({d['guidance']})" if d.get("guidance") else "")
    if d.get("true_cfg_scale") is not None:
        guidance += f", true CFG {d['true_cfg_scale']:g}" + (" (off)" if d["true_cfg_scale"] <= 1 else "")
    size = f"{d['width']}x{d['height']}"
    if a["image"]["size_from_image_area"]:
        size += f" (with an input image: its aspect ratio at ~{a['image']['size_from_image_area']} pixels)"
    frames = f", {d['num_frames']} frames at {d['fps']} fps" if video else ""
    defaults = f"{size}{frames}, {d['num_inference_steps']} steps, {guidance}, {d['max_sequence_length']} text tokens"
    s = a["size"]
    steps = a["num_inference_steps"]
    steps_text = f"exactly {steps['fixed']} steps" if "fixed" in steps else f"steps {steps['min']}-{steps['max']}"
    image = a["image"]
    image_text = ("input image required" + (f" (up to {image['max_images']})" if image["max_images"] > 1 else "")
                  if image["required"] else "input image optional" if image["accepted"] else "no input image")
    parts = [f"width/height multiple of {s['multiple']} in {s['min']}-{s['max']}", steps_text,
             "guidance 0-100", f"text tokens 1-{a['max_sequence_length']['max']}"]
    if d.get("true_cfg_scale") is not None:
        parts.append("true_cfg_scale 1-100 (with a negative prompt)")
    if video:
        f = a["num_frames"]
        parts.append(f"frames 4k+1 in {f['min']}-{f['max']}, fps 1-120")
    parts += [image_text, "negative prompt" if a["negative_prompt"] else "no negative prompt"]
    return [f"    defaults: {defaults}", f"    accepts:  {'; '.join(parts)}"]


def format_catalog(entries: list[CatalogEntry]) -> str:
    """The text `diffserve models` prints: one block per model."""
    if not entries:
        return "no models found (no embedded model shipped, none in the Hugging Face cache)"
    lines = []
    for e in entries:
        if e.card is None:
            lines.append(f"{e.name}  [{e.source}]  not usable: {e.error}")
            continue
        lines.append(f"{e.name}  [{e.source}]  {e.card['kind']}, {e.card['pipeline']}  ({e.path})")
        lines += describe(e.card)
    return "\n".join(lines)
