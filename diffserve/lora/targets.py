"""Where a LoRA can act: every Linear-like layer of a loaded DiT, by its checkpoint name.

A LoRA names layers as the checkpoint does (`transformer_blocks.0.attn.to_q`). After the engine's kernel
fusions (`diffserve.engine.optimize`) some of those layers no longer exist as modules: a `Projections`
group lives on as one concatenated Linear (`attn.fused["to_q+to_k+to_v"]`, to_q owning its first rows),
and a split `ConcatLinear` computes its output as a sum of per-input pieces. `linear_targets` maps every
checkpoint name to the module that computes it *now* and the output rows it owns there, so merging and
the unmerged adapters work the same before and after the fusions.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from diffserve.layers.linear import ConcatLinear, GeluLinear, Projections


@dataclass(frozen=True)
class Target:
    """One checkpoint Linear: computed by the module at `path`, output rows [row_start, row_stop) of it."""

    name: str  # checkpoint name, e.g. "transformer_blocks.0.attn.to_q"
    path: str  # module path of the layer computing it now (the fused Linear's path after fusion)
    row_start: int
    row_stop: int
    in_features: int

    @property
    def out_features(self) -> int:
        return self.row_stop - self.row_start


class AdaptedLayer(nn.Module):
    """Marker base of the LoRA-carrying wrappers (`diffserve.lora.adapters`): `base` is the wrapped layer."""

    base: nn.Module


def layer_shape(module: nn.Module) -> tuple[int, int] | None:
    """(in_features, out_features) of a layer a LoRA may act on (nn.Linear, GeluLinear, ConcatLinear, or an
    adapter wrapping one); None for anything else."""
    if isinstance(module, AdaptedLayer):
        return layer_shape(module.base)
    if type(module) in (nn.Linear, GeluLinear):
        return module.in_features, module.out_features
    if isinstance(module, ConcatLinear):
        out = module.pieces[0].out_features if module.pieces is not None else module.weight.shape[0]
        return sum(module.in_parts), out
    return None


def linear_targets(model: nn.Module) -> dict[str, Target]:
    """Checkpoint name -> `Target` for every layer of `model` a LoRA may act on, fused or not."""
    out: dict[str, Target] = {}
    _walk(model, "", out)
    return out


def _walk(module: nn.Module, prefix: str, out: dict[str, Target]) -> None:
    shape = layer_shape(module)
    if shape is not None:
        name = prefix.removesuffix(".")
        out[name] = Target(name, name, 0, shape[1], shape[0])
        return  # its children (a ConcatLinear's pieces, an adapter's base) are part of it
    if isinstance(module, Projections):
        for key, fused in module.fused.items():
            shape = layer_shape(fused)
            assert shape is not None, f"{prefix}fused.{key} is not a Linear"
            start = 0
            for part, size in zip(key.split("+"), module.fused_sizes[key], strict=True):
                name = f"{prefix}{part}"
                out[name] = Target(name, f"{prefix}fused.{key}", start, start + size, shape[0])
                start += size
    for child_name, child in module.named_children():
        if isinstance(module, Projections) and child is module.fused:
            continue
        _walk(child, f"{prefix}{child_name}.", out)
