"""Reading LoRA files and mapping their keys onto a model's layers.

Accepted layouts (a file may be any of them; the key spelling decides, per key):

* diffusers / PEFT: `transformer.<module>.lora_A.weight` / `.lora_B.weight` (prefix optional), with the
  alphas in the safetensors metadata `lora_adapter_metadata` (`transformer.lora_alpha`, `.alpha_pattern`,
  `.use_rslora`), as diffusers' `save_lora_weights` writes them, or as `<module>.alpha` tensors; neither
  means scale 1 (alpha = rank). PEFT's `lora_B.bias` (lora_bias) is a bias update.
* kohya (sd-scripts, ai-toolkit, musubi-tuner): `lora_unet_<module with dots as underscores>.lora_down.weight`
  / `.lora_up.weight` / `.alpha`, the module in the original names (FLUX: `double_blocks_0_img_attn_qkv`,
  Wan: `blocks_0_self_attn_q`, see `diffserve.lora.layouts`) or in ours (`lora_transformer_*`, Qwen-Image).
* ComfyUI: `diffusion_model.<original module>.lora_down.weight` / `.lora_up.weight` (or `lora_A` / `lora_B`)
  / `.alpha`, and Wan's `.diff_b` bias updates.

Every LoRA tensor must land on a layer of the model with matching shapes, else `LoraError` naming the first
offending key. Text-encoder tensors (`lora_te*`, `text_encoder*`) are skipped and reported: diffserve applies
LoRAs to the transformer only. DoRA and full-weight `.diff` tensors are refused (all-zero norm `.diff`
tensors, which some Wan LoRAs carry, are skipped).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from diffserve.lora.layouts import flat, match_rules, rules_for
from diffserve.lora.spec import LoraError
from diffserve.lora.targets import Target, linear_targets

DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"

# key suffix -> role
SUFFIXES: tuple[tuple[str, str], ...] = (
    (".lora_A.weight", "down"), (".lora_B.weight", "up"), (".lora_down.weight", "down"),
    (".lora_up.weight", "up"), (".lora.down.weight", "down"), (".lora.up.weight", "up"),
    (".lora_B.bias", "bias"), (".diff_b", "diff_b"), (".alpha", "alpha"), (".diff", "diff"),
    (".dora_scale", "dora"), (".lora_magnitude_vector", "dora"),
)
MODEL_PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.",
                  "lora_unet_", "lora_transformer_")
TEXT_ENCODER_PREFIXES = ("text_encoder.", "text_encoder_2.", "text_encoders.", "lora_te_", "lora_te1_",
                         "lora_te2_", "lora_te3_")


@dataclass(frozen=True)
class LoraLayer:
    """One low-rank update: delta W = scaling * up @ down on the layers `targets` (checkpoint names), whose
    output rows `up` stacks in that order (`row_sizes`); `bias` (sum rows,), times the adapter's scale, is
    added to their biases (PEFT's lora_B.bias with its scaling folded in, or ComfyUI's diff_b). A module with
    only a bias update has rank 0."""

    key: str  # the file's module key, for messages
    targets: tuple[str, ...]
    row_sizes: tuple[int, ...]
    down: torch.Tensor  # (r, in)
    up: torch.Tensor  # (sum row_sizes, r)
    scaling: float  # alpha / r (alpha / sqrt(r) for rsLoRA)
    bias: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self, scale: float = 1.0, device: torch.device | None = None) -> torch.Tensor:
        """The weight update scale * scaling * up @ down (sum rows, in), in float32 on `device`."""
        up, down = self.up.to(device=device, dtype=torch.float32), self.down.to(device=device, dtype=torch.float32)
        return (up @ down) * (scale * self.scaling)


@dataclass(frozen=True)
class LoraWeights:
    """A LoRA file mapped onto one model: its layers, the layout it was read in, and what was skipped."""

    path: str
    layout: str  # "diffusers", "kohya" or "comfyui"
    layers: tuple[LoraLayer, ...]
    skipped: tuple[str, ...] = field(default=())  # keys not applied (text encoder, zero norm diffs)

    @property
    def targets(self) -> set[str]:
        return {t for layer in self.layers for t in layer.targets}

    def summary(self) -> str:
        ranks = sorted({layer.rank for layer in self.layers})
        text = (f"{Path(self.path).name}: {self.layout} layout, {len(self.layers)} layers, "
                f"{len(self.targets)} targets, rank {'/'.join(map(str, ranks))}")
        if self.skipped:
            text += f"; skipped {len(self.skipped)} tensors (text encoder / zero diffs, e.g. {self.skipped[0]})"
        return text


def lora_file(path: str | Path) -> Path:
    """The .safetensors file of a LoRA path: the file itself, or in a folder diffusers'
    `pytorch_lora_weights.safetensors` or its only .safetensors file."""
    p = Path(path).expanduser()
    if p.is_file():
        return p
    if p.is_dir():
        if (p / DIFFUSERS_WEIGHT_NAME).is_file():
            return p / DIFFUSERS_WEIGHT_NAME
        found = sorted(p.glob("*.safetensors"))
        if len(found) == 1:
            return found[0]
        raise LoraError(f"LoRA folder {str(p)!r} holds {len(found)} .safetensors files; give the file",
                        param="lora")
    raise LoraError(f"LoRA {str(path)!r}: no such file or folder", param="lora")


def read_lora_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors on the CPU, diffusers' LoRA metadata or {}) of a LoRA safetensors file."""
    from safetensors import SafetensorError, safe_open

    file = lora_file(path)
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iteration
    except (SafetensorError, OSError) as e:
        raise LoraError(f"LoRA {str(file)!r} is not a readable safetensors file: {e}", param="lora") from None
    try:
        adapter_meta = json.loads(meta[METADATA_KEY]) if METADATA_KEY in meta else {}
    except json.JSONDecodeError:
        raise LoraError(f"LoRA {str(file)!r}: its {METADATA_KEY} metadata is not JSON", param="lora") from None
    return tensors, adapter_meta


def split_key(key: str) -> tuple[str, str]:
    """(module stem, role) of a tensor key; LoraError for a key of no known LoRA role."""
    for suffix, role in SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    raise LoraError(f"LoRA key {key!r} is not a LoRA tensor (expected .lora_A/.lora_B/.lora_down/.lora_up"
                    f".weight, .alpha or .diff_b)", param="lora")


def strip_prefix(stem: str) -> tuple[str, str]:
    """(module name without the file's model prefix, layout the prefix implies)."""
    for prefix in MODEL_PREFIXES:
        if stem.startswith(prefix):
            layout = {"lora_unet_": "kohya", "lora_transformer_": "kohya", "diffusion_model.": "comfyui",
                      "model.diffusion_model.": "comfyui"}.get(prefix, "diffusers")
            return stem[len(prefix):], layout
    return stem, "diffusers"


@dataclass(frozen=True)
class AlphaConfig:
    """The alphas a diffusers/PEFT file declares in its metadata."""

    lora_alpha: float | None = None
    alpha_pattern: tuple[tuple[str, float], ...] = ()
    use_rslora: bool = False

    @classmethod
    def from_metadata(cls, meta: dict, prefix: str = "transformer.") -> AlphaConfig:
        """From diffusers' `lora_adapter_metadata` (keys `<prefix>lora_alpha`, ...; unprefixed keys accepted)."""
        def get(name: str) -> object:
            return meta.get(prefix + name, meta.get(name))

        if get("use_dora"):
            raise LoraError("DoRA LoRAs (use_dora) are not supported", param="lora")
        alpha = get("lora_alpha")
        pattern = get("alpha_pattern") or {}
        return cls(lora_alpha=float(alpha) if alpha is not None else None,
                   alpha_pattern=tuple((str(k), float(v)) for k, v in dict(pattern).items()),
                   use_rslora=bool(get("use_rslora")))

    def scaling(self, module: str, rank: int, alpha_tensor: torch.Tensor | None) -> float:
        """alpha / rank for `module` (alpha / sqrt(rank) with rsLoRA). The alpha is the file's tensor when it
        has one, else the alpha_pattern entry matching the module's name (PEFT's rule: the pattern matches a
        trailing run of dotted parts), else lora_alpha, else the rank (scaling 1)."""
        if alpha_tensor is not None:
            alpha = float(alpha_tensor.float().item())
        else:
            alpha = next((a for pat, a in self.alpha_pattern if re.match(rf"(.*\.)?({pat})$", module)),
                         self.lora_alpha if self.lora_alpha is not None else None)
            if alpha is None:
                return 1.0
        return alpha / (math.sqrt(rank) if self.use_rslora else rank)


def _lookup(name: str, targets: dict[str, Target], flat_names: dict[str, str],
            rules) -> tuple[tuple[str, ...], bool] | None:
    """The checkpoint names (and swap flag) a file's module name stands for, or None."""
    if name in targets:
        return (name,), False
    flat_name = flat(name)
    if flat_name in flat_names:
        return (flat_names[flat_name],), False
    return match_rules(flat_name, rules)


def map_lora(tensors: dict[str, torch.Tensor], meta: dict, model: nn.Module, path: str = "<memory>") -> LoraWeights:
    """Map a LoRA state dict onto `model`'s layers (see the module docstring for the layouts)."""
    targets = linear_targets(model)
    flat_names: dict[str, str] = {}
    for name in targets:
        flat_names[flat(name)] = name if flat(name) not in flat_names else ""  # "" = ambiguous
    rules = rules_for(model)
    alphas = AlphaConfig.from_metadata(meta)
    groups: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    skipped: list[str] = []
    for key in sorted(tensors):
        if key.startswith(TEXT_ENCODER_PREFIXES):
            skipped.append(key)
            continue
        stem, role = split_key(key)
        if role == "dora":
            raise LoraError(f"LoRA key {key!r}: DoRA LoRAs are not supported", param="lora")
        if role == "diff":
            if "norm" in stem and not tensors[key].any():
                skipped.append(key)
                continue
            raise LoraError(f"LoRA key {key!r}: full-weight '.diff' updates are not supported", param="lora")
        groups.setdefault(stem, {})[role] = (key, tensors[key])
    layers, layouts = [], set()
    for stem, parts in groups.items():
        name, layout = strip_prefix(stem)
        first_key = min(k for k, _ in parts.values())
        found = _lookup(name, targets, flat_names, rules)
        if found is None:
            raise LoraError(f"LoRA key {first_key!r} matches no layer of this {type(model).__name__} "
                            f"(module {name!r})", param="lora")
        names, swap = found
        missing = [n for n in names if n not in targets]
        if missing:
            raise LoraError(f"LoRA key {first_key!r} maps to {missing[0]!r}, which this "
                            f"{type(model).__name__} does not have", param="lora")
        layers.append(_layer(first_key, name, parts, [targets[n] for n in names], swap, alphas))
        layouts.add(layout)
    if not layers:
        raise LoraError(f"LoRA {path!r} has no transformer LoRA tensors"
                        + (f" (only text-encoder ones, e.g. {skipped[0]!r})" if skipped else ""), param="lora")
    layout = "+".join(sorted(layouts))
    return LoraWeights(path=str(path), layout=layout, layers=tuple(layers), skipped=tuple(skipped))


def _layer(key: str, module: str, parts: dict[str, tuple[str, torch.Tensor]], targets: list[Target],
           swap: bool, alphas: AlphaConfig) -> LoraLayer:
    """One LoraLayer from a module's tensors, shapes checked against its targets."""
    sizes = tuple(t.out_features for t in targets)
    if "down" not in parts and "up" not in parts and "diff_b" in parts:  # a bias update only
        parts = {**parts, "down": (key, torch.zeros(0, targets[0].in_features)),
                 "up": (key, torch.zeros(sum(sizes), 0))}
    if "down" not in parts or "up" not in parts:
        have = ", ".join(k for k, _ in parts.values())
        raise LoraError(f"LoRA key {key!r}: a module needs both a down (lora_A) and an up (lora_B) matrix; "
                        f"found only {have}", param="lora")
    down, up = parts["down"][1], parts["up"][1]
    if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
        raise LoraError(f"LoRA key {parts['down'][0]!r}: down {tuple(down.shape)} and up {tuple(up.shape)} are not "
                        f"(rank, in) and (out, rank)", param="lora")
    if down.shape[1] != targets[0].in_features or up.shape[0] != sum(sizes):
        raise LoraError(f"LoRA key {parts['up'][0]!r}: shapes down {tuple(down.shape)}, up {tuple(up.shape)} do not "
                        f"fit {'+'.join(t.name for t in targets)} ({targets[0].in_features} -> {sum(sizes)})",
                        param="lora")
    alpha = parts["alpha"][1] if "alpha" in parts else None
    scaling = alphas.scaling(module, max(down.shape[0], 1), alpha)
    if "bias" in parts and "diff_b" in parts:
        raise LoraError(f"LoRA key {parts['diff_b'][0]!r}: a module has both lora_B.bias and diff_b", param="lora")
    bias_key, bias = parts.get("bias") or parts.get("diff_b") or (None, None)
    if bias is not None:
        if tuple(bias.shape) != (sum(sizes),):
            raise LoraError(f"LoRA key {bias_key!r}: bias {tuple(bias.shape)} does not fit {sum(sizes)} outputs",
                            param="lora")
        bias = bias.float() * scaling if "bias" in parts else bias
    if swap:
        up = torch.cat(up.chunk(2, dim=0)[::-1])
        bias = torch.cat(bias.chunk(2)[::-1]) if bias is not None else None
    return LoraLayer(key=key, targets=tuple(t.name for t in targets), row_sizes=sizes, down=down, up=up,
                     scaling=scaling, bias=bias)


def load_lora(path: str | Path, model: nn.Module) -> LoraWeights:
    """Read a LoRA file and map it onto `model` (a loaded DiT, with or without the kernel fusions)."""
    tensors, meta = read_lora_file(path)
    return map_lora(tensors, meta, model, str(path))
