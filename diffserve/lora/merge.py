"""Merged mode: LoRA updates added into the weights (no cost per step).

`merge_loras` adds scale * scaling * up @ down (and any bias update) to every target layer, wherever it
lives (`diffserve.lora.targets`): a plain Linear, rows of a fused projection, or the column blocks of a
split `ConcatLinear`. The engine merges before its kernel fusions, so the fused projections are built from
the merged weights; merging after them gives the same weights. The update is computed in float32 and added
to the weight in its own dtype.

`MergedLoras.unmerge` undoes a merge: exactly, from the original rows kept on the CPU
(`keep_originals=True`), or by subtracting the same updates (exact in float32, to the last bit of the
weight's dtype otherwise).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from diffserve.layers.linear import ConcatLinear
from diffserve.lora.formats import LoraLayer, LoraWeights
from diffserve.lora.targets import AdaptedLayer, Target, linear_targets


def _weight_blocks(module: nn.Module) -> list[tuple[nn.Module, int]]:
    """(Linear-like holding `weight`/`bias`, first input column) blocks that make up a layer's weight."""
    if isinstance(module, AdaptedLayer):
        return _weight_blocks(module.base)
    if isinstance(module, ConcatLinear) and module.pieces is not None:
        starts = [sum(module.in_parts[:i]) for i in range(len(module.in_parts))]
        return list(zip(module.pieces, starts, strict=True))
    return [(module, 0)]


@torch.no_grad()
def add_delta(model: nn.Module, target: Target, delta: torch.Tensor, bias: torch.Tensor | None) -> None:
    """weight[target rows] += delta (rows, in); bias[target rows] += bias. In place, in the weight's dtype."""
    module = model.get_submodule(target.path)
    rows = slice(target.row_start, target.row_stop)
    for i, (block, col) in enumerate(_weight_blocks(module)):
        w = block.weight
        w[rows] += delta[:, col: col + w.shape[1]].to(device=w.device, dtype=w.dtype)
        if bias is not None and i == 0:
            if block.bias is None:
                raise ValueError(f"LoRA bias update for {target.name}, which has no bias")
            block.bias[rows] += bias.to(device=block.bias.device, dtype=block.bias.dtype)


def _row_blocks(layer: LoraLayer) -> list[tuple[str, slice]]:
    """(target name, rows of the layer's up matrix) for each of its targets."""
    out, start = [], 0
    for name, size in zip(layer.targets, layer.row_sizes, strict=True):
        out.append((name, slice(start, start + size)))
        start += size
    return out


@dataclass
class MergedLoras:
    """What `merge_loras` added, to undo it. `originals`: target name -> its rows before the merge
    (weight blocks, bias), kept on the CPU, when asked for."""

    model: nn.Module
    loras: list[tuple[LoraWeights, float]]
    originals: dict[str, tuple[list[torch.Tensor], torch.Tensor | None]] | None = field(default=None)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the weights: the kept originals (exact), else subtract the same updates."""
        targets = linear_targets(self.model)
        if self.originals is not None:
            for name, (weights, bias) in self.originals.items():
                t = targets[name]
                rows = slice(t.row_start, t.row_stop)
                for i, ((block, _), w) in enumerate(zip(_weight_blocks(self.model.get_submodule(t.path)), weights,
                                                        strict=True)):
                    block.weight[rows] = w.to(block.weight.device)
                    if bias is not None and i == 0:
                        block.bias[rows] = bias.to(block.bias.device)
        else:
            _apply(self.model, targets, [(w, -s) for w, s in self.loras])
        self.loras = []


def _apply(model: nn.Module, targets: dict[str, Target], loras: Sequence[tuple[LoraWeights, float]]) -> None:
    device = next(model.parameters()).device  # the updates are computed where the weights are
    for weights, scale in loras:
        for layer in weights.layers:
            delta = layer.delta(scale, device)
            bias = layer.bias.float() * scale if layer.bias is not None else None
            for name, rows in _row_blocks(layer):
                add_delta(model, targets[name], delta[rows], bias[rows] if bias is not None else None)


@torch.no_grad()
def merge_loras(model: nn.Module, loras: Sequence[tuple[LoraWeights, float]],
                keep_originals: bool = False) -> MergedLoras:
    """Add each (LoRA, scale) into `model`'s weights, in place. `keep_originals` copies the touched rows to
    the CPU first so `unmerge` restores them bit for bit."""
    targets = linear_targets(model)
    originals = None
    if keep_originals:
        originals = {}
        for name in sorted({n for w, _ in loras for n in w.targets}):
            t = targets[name]
            rows = slice(t.row_start, t.row_stop)
            blocks = _weight_blocks(model.get_submodule(t.path))
            bias = blocks[0][0].bias
            originals[name] = ([b.weight[rows].cpu().clone() for b, _ in blocks],
                               bias[rows].cpu().clone() if bias is not None else None)
    _apply(model, targets, loras)
    return MergedLoras(model, list(loras), originals)
