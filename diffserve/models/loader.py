"""Checkpoint loading: resolve a local folder or Hugging Face repo id, read `model_index.json`, load
our own DiTs strictly from (sharded) safetensors, and load the reused components (text encoders,
tokenizers, VAE, scheduler) through an explicit mapping of the classes we accept."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from safetensors.torch import load_file
from torch import nn

from diffserve.errors import CheckpointError

M = TypeVar("M", bound=nn.Module)

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"


@dataclass(frozen=True)
class ModelIndex:
    """The parsed `model_index.json`: the pipeline class and each component's (library, class)."""

    root: Path
    pipeline_class: str
    components: dict[str, tuple[str, str] | None]

    def component_class(self, name: str) -> str:
        entry = self.components.get(name)
        if entry is None:
            raise CheckpointError(f"{self.root}: model_index.json has no component {name!r}")
        return entry[1]

    def folder(self, name: str) -> Path:
        path = self.root / name
        if not path.is_dir():
            raise CheckpointError(f"{self.root}: component folder {name!r} is missing (model_index.json lists it)")
        return path


def _looks_like_repo_id(s: str) -> bool:
    parts = s.split("/")
    return len(parts) == 2 and all(parts) and not s.startswith((".", "~", "/")) and ":" not in s


def resolve_model_path(path_or_id: str) -> Path:
    """A local folder as is; `org/name` through huggingface_hub (its cache, HF_HUB_OFFLINE honoured)."""
    local = Path(path_or_id).expanduser()
    if local.is_dir():
        return local.resolve()
    if local.exists():
        raise CheckpointError(f"--model-path {path_or_id!r} is a file; give the model folder (with model_index.json)")
    if not _looks_like_repo_id(path_or_id):
        raise CheckpointError(
            f"--model-path {path_or_id!r}: no such folder, and not a Hugging Face repo id (org/name)"
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(path_or_id))
    except LocalEntryNotFoundError as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        hint = "it is not in the local Hugging Face cache" + (" and HF_HUB_OFFLINE is set" if offline else
                                                              " and the hub could not be reached")
        raise CheckpointError(f"model {path_or_id!r}: {hint} ({type(e).__name__})") from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise CheckpointError(f"model {path_or_id!r} could not be fetched from the hub: {e}") from None


def read_model_index(root: Path) -> ModelIndex:
    path = root / "model_index.json"
    if not path.is_file():
        raise CheckpointError(f"{root}: no model_index.json; a diffusers-format model folder is expected")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if "_class_name" not in raw:
        raise CheckpointError(f"{path}: missing _class_name")
    comps: dict[str, tuple[str, str] | None] = {}
    for key, value in raw.items():
        if key.startswith("_"):
            continue
        if isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value):
            comps[key] = (value[0], value[1])
        elif isinstance(value, list) and all(v is None for v in value):
            comps[key] = None
    return ModelIndex(root=root, pipeline_class=raw["_class_name"], components=comps)


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def load_safetensors(folder: Path, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Load `diffusion_pytorch_model.safetensors` or all shards listed in its `.index.json`."""
    single, index = folder / WEIGHTS_NAME, folder / WEIGHTS_INDEX_NAME
    dev = str(device)
    if single.is_file():
        return load_file(single, device=dev)
    if index.is_file():
        weight_map: dict[str, str] = read_json(index).get("weight_map", {})
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise CheckpointError(f"{folder}: weight shard(s) missing: {', '.join(missing)}")
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_file(folder / shard, device=dev))
        return state
    raise CheckpointError(f"{folder}: no weights ({WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME})")


def check_state_dict(module: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Every key accounted for: raise CheckpointError listing missing, unexpected and mis-shaped keys."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = sorted(
        f"{k} (checkpoint {tuple(state[k].shape)}, model {tuple(expected[k].shape)})"
        for k in set(expected) & set(state)
        if tuple(state[k].shape) != tuple(expected[k].shape)
    )
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if keys:
            shown = ", ".join(keys[:4]) + (f", ... ({len(keys)} in all)" if len(keys) > 4 else "")
            problems.append(f"{label} keys: {shown}")
    if problems:
        raise CheckpointError(f"{where}: weights do not match the model config; " + "; ".join(problems))


def load_dit(build: Callable[[], M], folder: Path, dtype: torch.dtype, device: torch.device, *,
             keep_fp32: Callable[[str], bool] | None = None,
             drop_keys: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None) -> M:
    """Build a DiT on the meta device and load its weights strictly (assign=True), in `dtype` on `device`.

    `drop_keys` removes checkpoint tensors the model documents as unused; `keep_fp32(name)` keeps the
    named parameters in float32 (as the reference keeps e.g. Wan's norms and time embedder)."""
    with torch.device("meta"):
        module = build()
    state = load_safetensors(folder, device if device.type == "cuda" else "cpu")
    if drop_keys is not None:
        state = drop_keys(state)
    check_state_dict(module, state, str(folder))

    def target(name: str, v: torch.Tensor) -> torch.dtype:
        if not v.is_floating_point():
            return v.dtype
        return torch.float32 if keep_fp32 is not None and keep_fp32(name) else dtype

    state = {k: v.to(device=device, dtype=target(k, v)) for k, v in state.items()}
    module.load_state_dict(state, strict=True, assign=True)
    return module.eval().requires_grad_(False)


# The reused component classes we load, by library; anything else in model_index.json is refused.
ALLOWED_CLASSES: dict[str, tuple[str, ...]] = {
    "transformers": ("CLIPTextModel", "CLIPTextModelWithProjection", "T5EncoderModel", "UMT5EncoderModel",
                     "CLIPVisionModel", "CLIPVisionModelWithProjection", "CLIPTokenizer", "CLIPTokenizerFast",
                     "T5Tokenizer", "T5TokenizerFast", "CLIPImageProcessor", "LlamaModel", "LlamaTokenizer",
                     "LlamaTokenizerFast", "Qwen2_5_VLForConditionalGeneration", "Qwen2Tokenizer",
                     "Qwen2TokenizerFast"),
    "diffusers": ("AutoencoderKL", "AutoencoderKLWan", "AutoencoderKLHunyuanVideo", "AutoencoderKLQwenImage",
                  "FlowMatchEulerDiscreteScheduler", "UniPCMultistepScheduler"),
}


def _component_class(library: str, name: str) -> type | None:
    if name not in ALLOWED_CLASSES.get(library, ()):
        return None
    import importlib

    return getattr(importlib.import_module(library), name)


def load_component(index: ModelIndex, name: str, dtype: torch.dtype | None = None,
                   device: torch.device | None = None):
    """Load a reused component (tokenizer, text/image encoder, VAE, scheduler) by its model_index class."""
    library, cls_name = index.components.get(name) or (None, None)
    if library is None:
        raise CheckpointError(f"{index.root}: model_index.json has no component {name!r}")
    cls = _component_class(library, cls_name)
    if cls is None:
        raise CheckpointError(f"{index.root}: component {name!r} has class {library}.{cls_name}, "
                              f"which diffserve does not load")
    folder = index.folder(name)
    try:
        if "Tokenizer" in cls_name or "Processor" in cls_name:
            return cls.from_pretrained(folder)
        if "Scheduler" in cls_name:
            return cls.from_pretrained(folder)
        dtype_kw = "dtype" if library == "transformers" else "torch_dtype"
        model = cls.from_pretrained(folder, **{dtype_kw: dtype})
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{folder}: could not load {cls_name}: {str(e).splitlines()[0]}") from None
    if device is not None:
        model = model.to(device)
    return model.eval().requires_grad_(False)
