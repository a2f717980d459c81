"""Unmerged mode: the weights stay as loaded and every adapted layer adds its LoRA updates at run time,
so the active adapters can change per batch.

Each target layer (after the engine's kernel fusions: a fused q/k/v projection is one layer) is wrapped
once, holding every loaded adapter's factors stacked along the rank (`down` (R, in), `up` (out, R); the
updates of a fused projection's parts are concatenated along the rank with their rows placed in `up`, so
one pair of GEMMs serves all parts and all adapters). Which adapters act, and how strongly, is a float32
tensor of per-adapter scales shared by all wrappers (`LoraControl`), written in place when the batch's
`LoraSet` changes: switching adapters or scales never retraces a compiled block. The one Python flag is
`LoraControl.active` (some adapter has a non-zero scale): with none active the wrappers run the plain layer
(same kernels as without adapters: the GELU epilogue stays), so torch.compile holds two variants of a block,
with and without LoRA. The price of stacking: a layer's LoRA work is over the rank of all loaded adapters
(inactive ones at scale 0), not only the active ones; loading or removing an adapter rebuilds the stacks
(and retraces once under compile).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from diffserve.layers.linear import ConcatLinear, GeluLinear
from diffserve.lora.formats import LoraLayer, LoraWeights
from diffserve.lora.targets import AdaptedLayer, Target, linear_targets


class LoraControl:
    """Shared by the adapted layers of one model: `scales` (A,) float32, the scale of each loaded adapter
    (0: inactive), and `active`, whether any is non-zero."""

    def __init__(self, device: torch.device) -> None:
        self.scales = torch.zeros(0, device=device)
        self.active = False

    def set_scales(self, scales: Sequence[float]) -> None:
        """Write the per-adapter scales (same count as loaded adapters) in place."""
        values = torch.tensor(list(scales), dtype=torch.float32)
        if values.shape != self.scales.shape:
            self.scales = values.to(self.scales.device)
        else:
            self.scales.copy_(values)
        self.active = bool((values != 0).any())


class LoraAdapter(AdaptedLayer):
    """A layer plus the stacked LoRA factors of every loaded adapter that targets it."""

    def __init__(self, base: nn.Module, control: LoraControl, down: torch.Tensor, up: torch.Tensor,
                 rows: torch.Tensor, scaling: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.base = base
        self.control = control
        self.register_buffer("lora_down", down, persistent=False)  # (R, in)
        self.register_buffer("lora_up", up, persistent=False)  # (out, R)
        self.register_buffer("lora_rows", rows, persistent=False)  # (R,) adapter index of each rank row
        self.register_buffer("lora_scaling", scaling, persistent=False)  # (R,) alpha / r of each rank row
        self.register_buffer("lora_bias", bias, persistent=False)  # (A, out) bias update per adapter, or None

    def project_down(self, *inputs: torch.Tensor) -> torch.Tensor:
        """The inputs through `down`: (..., in) -> (..., R)."""
        return F.linear(inputs[0], self.lora_down)

    def delta(self, *inputs: torch.Tensor) -> torch.Tensor:
        """The summed LoRA updates of the active adapters: (..., out), in the inputs' dtype."""
        dtype = inputs[0].dtype
        s = (self.control.scales[self.lora_rows] * self.lora_scaling).to(dtype)  # (R,)
        out = F.linear(self.project_down(*inputs) * s, self.lora_up)
        if self.lora_bias is not None:
            out = out + self.control.scales.to(dtype) @ self.lora_bias
        return out


class LoraLinear(LoraAdapter):
    """nn.Linear + LoRA: base(x) + delta(x)."""

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.control.active:
            out = out + self.delta(x)
        return out


class LoraGeluLinear(LoraLinear):
    """GeluLinear + LoRA: the update is added before the GELU (so without the GEMM epilogue while active)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.control.active:
            return self.base(x)
        base = self.base
        return F.gelu(F.linear(x, base.weight, base.bias) + self.delta(x), approximate=base.approximate)


class LoraConcatLinear(LoraAdapter):
    """ConcatLinear + LoRA: `down` reads the concatenated inputs, applied per input (no concatenation)."""

    def project_down(self, *parts: torch.Tensor) -> torch.Tensor:
        out, start = None, 0
        for x in parts:
            y = F.linear(x, self.lora_down[:, start: start + x.shape[-1]])
            out = y if out is None else out + y
            start += x.shape[-1]
        return out

    def forward(self, *parts: torch.Tensor) -> torch.Tensor:
        out = self.base(*parts)
        if self.control.active:
            out = out + self.delta(*parts)
        return out


def _wrapper_class(base: nn.Module) -> type[LoraAdapter]:
    if isinstance(base, GeluLinear):
        return LoraGeluLinear
    if isinstance(base, ConcatLinear):
        return LoraConcatLinear
    return LoraLinear


@dataclass
class _Block:
    """One rank block of a layer's stack: an adapter's LoraLayer, with its up rows placed in the layer."""

    adapter: int
    layer: LoraLayer
    placements: list[tuple[slice, slice]]  # (rows of the layer, rows of layer.up)


def _blocks_by_path(targets: dict[str, Target], adapters: Sequence[LoraWeights]) -> dict[str, list[_Block]]:
    """Module path -> the rank blocks it carries, in adapter order."""
    out: dict[str, list[_Block]] = {}
    for a, weights in enumerate(adapters):
        for layer in weights.layers:
            by_path: dict[str, _Block] = {}
            start = 0
            for name, size in zip(layer.targets, layer.row_sizes, strict=True):
                t = targets[name]
                block = by_path.setdefault(t.path, _Block(a, layer, []))
                block.placements.append((slice(t.row_start, t.row_stop), slice(start, start + size)))
                start += size
            for path, block in by_path.items():
                out.setdefault(path, []).append(block)
    return out


def _stack(blocks: list[_Block], out_features: int, n_adapters: int, like: torch.Tensor) -> dict[str, torch.Tensor | None]:
    """The stacked factors of a layer's rank blocks, in `like`'s dtype and device."""
    downs, ups, rows, scaling = [], [], [], []
    bias = None
    for b in blocks:
        r = b.layer.rank
        up = torch.zeros(out_features, r, dtype=torch.float32)
        for layer_rows, up_rows in b.placements:
            up[layer_rows] = b.layer.up[up_rows].float()
            if b.layer.bias is not None:
                bias = torch.zeros(n_adapters, out_features) if bias is None else bias
                bias[b.adapter, layer_rows] += b.layer.bias[up_rows].float()
        downs.append(b.layer.down.float())
        ups.append(up)
        rows += [b.adapter] * r
        scaling += [b.layer.scaling] * r
    dev, dt = like.device, like.dtype
    return {"down": torch.cat(downs).to(dev, dt), "up": torch.cat(ups, dim=1).to(dev, dt),
            "rows": torch.tensor(rows, dtype=torch.long, device=dev),
            "scaling": torch.tensor(scaling, dtype=torch.float32, device=dev),
            "bias": bias.to(dev, dt) if bias is not None else None}


def _replace(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def _base_of(module: nn.Module) -> nn.Module:
    return module.base if isinstance(module, AdaptedLayer) else module


@torch.no_grad()
def install_adapters(model: nn.Module, adapters: Sequence[LoraWeights], control: LoraControl) -> int:
    """Wrap every layer some adapter targets (rebuilding existing wrappers, unwrapping layers no adapter
    targets any more), adapters indexed in the given order. Returns the number of wrapped layers."""
    targets = linear_targets(model)
    blocks = _blocks_by_path(targets, adapters)
    for path in sorted({t.path for t in targets.values()}):
        current = model.get_submodule(path)
        base = _base_of(current)
        if path not in blocks:
            if current is not base:
                _replace(model, path, base)
            continue
        like = next(base.parameters())
        out_features = max(t.row_stop for t in targets.values() if t.path == path)
        tensors = _stack(blocks[path], out_features, len(adapters), like)
        _replace(model, path, _wrapper_class(base)(base, control, **tensors))
    control.set_scales([0.0] * len(adapters))
    return len(blocks)


def remove_adapters(model: nn.Module) -> None:
    """Put every wrapped layer back as it was."""
    install_adapters(model, [], LoraControl(torch.device("cpu")))
