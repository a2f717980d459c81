"""The LoRAs one engine has loaded, by name, and how they are applied (`LoraRegistry`).

Two modes (`EngineConfig.lora_mode`):

* "merged": the start-up LoRAs are added into the weights before the kernel fusions
  (`diffserve.lora.merge`); steps cost what they cost without LoRA. Requests cannot choose: a request's
  `lora` must be left out or name exactly the merged set.
* "unmerged": adapters wrap the target layers (`diffserve.lora.adapters`, installed after the fusions) and
  each batch runs with the `LoraSet` its requests ask for; more adapters can be loaded while serving
  (`load`). A request that leaves `lora` out gets the start-up set at the start-up scales (so one command
  line gives the same picture in both modes); an empty set is the base model.

Requests in one batch must ask for the same set (`LoraSet` is hashable: the server's batch key includes it).
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from torch import nn

from diffserve.lora.adapters import LoraControl, install_adapters
from diffserve.lora.formats import LoraWeights, load_lora
from diffserve.lora.merge import merge_loras
from diffserve.lora.spec import LoraError, LoraSet, LoraSpec, resolve_lora

log = logging.getLogger(__name__)

LoraMode = Literal["merged", "unmerged"]
LORA_MODES: tuple[str, ...] = ("merged", "unmerged")


@dataclass(frozen=True)
class LoadedLora:
    """A loaded adapter: its name, where it came from, the scale it was loaded with, its mapped weights."""

    spec: LoraSpec
    weights: LoraWeights

    @property
    def name(self) -> str:
        return self.spec.name

    def info(self, mode: str, default: bool) -> dict[str, object]:
        """What GET /v1/loras shows for it."""
        w = self.weights
        return {"name": self.name, "path": self.spec.path, "scale": self.spec.scale, "mode": mode,
                "layout": w.layout, "layers": len(w.layers), "targets": len(w.targets),
                "target_modules": target_families(w.targets),
                "ranks": sorted({layer.rank for layer in w.layers}), "default": default,
                "skipped_tensors": len(w.skipped)}


def target_families(targets: Iterable[str]) -> list[str]:
    """The layers a LoRA changes with their block index folded, distinct and sorted:
    'transformer_blocks.3.attn.to_q' -> 'transformer_blocks.*.attn.to_q'."""
    return sorted({re.sub(r"\.\d+\.", ".*.", t, count=1) for t in targets})


def _log_loaded(item: LoadedLora, mode: str) -> None:
    """One line per loaded adapter (INFO); a WARNING when tensors were skipped (text encoder, zero diffs)."""
    level = logging.WARNING if item.weights.skipped else logging.INFO
    log.log(level, "LoRA %r (%s, scale %g): %s", item.name, mode, item.spec.scale, item.weights.summary())


class LoraRegistry:
    """Loaded adapters of one model (a DiT inside an engine) by name; applies them in `mode`."""

    def __init__(self, model: nn.Module, mode: str = "merged") -> None:
        if mode not in LORA_MODES:
            raise LoraError(f"lora mode must be one of {', '.join(LORA_MODES)}; got {mode!r}", param="lora_mode")
        self.model = model
        self.mode: LoraMode = mode  # type: ignore[assignment]
        self._loaded: dict[str, LoadedLora] = {}
        self._default = LoraSet()
        self._active: LoraSet | None = None
        self._control: LoraControl | None = None
        self._lock = threading.Lock()

    # -- loading --------------------------------------------------------------------------------------

    def load_startup(self, specs: Sequence[LoraSpec]) -> list[LoadedLora]:
        """Load the start-up LoRAs (merged mode: into the weights; unmerged: as adapters) and make them the
        default set. Names must be distinct."""
        names = [s.name for s in specs]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise LoraError(f"two LoRAs are named {dupes[0]!r}; rename one file (names come from file names)",
                            param="lora")
        mapped = [LoadedLora(s, load_lora(s.path, self.model)) for s in specs]
        with self._lock:
            for item in mapped:
                self._loaded[item.name] = item
            if self.mode == "merged":
                merge_loras(self.model, [(m.weights, m.spec.scale) for m in mapped])
            else:
                self._install()
            self._default = LoraSet(tuple((s.name, s.scale) for s in specs))
        for m in mapped:
            _log_loaded(m, self.mode)
        return mapped

    def load(self, spec: LoraSpec, replace: bool = False) -> LoadedLora:
        """Load one more adapter while running (unmerged mode only); it becomes selectable by name but is
        not part of the default set. `replace` swaps an adapter of the same name."""
        if self.mode != "unmerged":
            raise LoraError("LoRAs merged at start-up are fixed; start the engine with lora_mode='unmerged' "
                            "(--lora-mode unmerged) to load adapters while running", param="lora")
        item = LoadedLora(spec, load_lora(spec.path, self.model))
        _log_loaded(item, self.mode)
        with self._lock:
            if spec.name in self._loaded and not replace:
                raise LoraError(f"a LoRA named {spec.name!r} is already loaded", param="lora")
            self._loaded[spec.name] = item
            self._install()
        return item

    def unload(self, name: str) -> None:
        """Remove an adapter (unmerged mode; not one of the default set)."""
        with self._lock:
            if self.mode != "unmerged" or name in self._default.names:
                raise LoraError(f"LoRA {name!r} cannot be removed (merged, or part of the start-up set)",
                                param="lora")
            if name not in self._loaded:
                raise LoraError(f"no LoRA named {name!r} is loaded", param="lora")
            del self._loaded[name]
            self._install()

    def _install(self) -> None:
        if self._control is None:
            self._control = LoraControl(next(self.model.parameters()).device)
        install_adapters(self.model, [m.weights for m in self._loaded.values()], self._control)
        self._active = None  # the scales were reset

    # -- listing --------------------------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        return list(self._loaded)

    @property
    def default_set(self) -> LoraSet:
        """What a request that leaves `lora` out runs with."""
        return self._default

    def list(self) -> list[dict[str, object]]:
        """One dict per loaded adapter (name, path, scale, mode, layout, sizes, whether in the default set)."""
        return [m.info(self.mode, m.name in self._default.names) for m in self._loaded.values()]

    # -- per batch ------------------------------------------------------------------------------------

    def resolve(self, value: object) -> LoraSet:
        """The set a request's `lora` field asks for (None: the default set), checked against what is
        loaded and the mode."""
        return resolve_lora(value, self._loaded, self._default, self.mode)

    def activate(self, lora_set: LoraSet) -> None:
        """Make `lora_set` the adapters the next batches run with (unmerged mode; merged: a no-op)."""
        if self.mode != "unmerged" or self._control is None:
            return
        with self._lock:
            if lora_set == self._active:
                return
            scale = dict(lora_set.items)
            self._control.set_scales([scale.get(name, 0.0) for name in self._loaded])
            self._active = lora_set
