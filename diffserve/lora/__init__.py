"""LoRA adapters for the DiTs, applied by the engine as a transform (never in model files).

* `spec`: `LoraSpec` (a file at a scale, `--lora-path PATH[:SCALE]`), `LoraSet` (the hashable set of named
  adapters a request asks for), `LoraError`. Pure Python.
* `formats` / `layouts`: reading LoRA files (diffusers/PEFT, kohya, ComfyUI) and mapping their keys onto a
  model's layers; `targets`: where each checkpoint layer lives after the kernel fusions.
* `merge`: merged mode (updates added into the weights); `adapters`: unmerged mode (per-batch switchable).
* `registry`: `LoraRegistry`, an engine's loaded adapters by name, with load / list / resolve / activate.

This `__init__` imports only `spec`, so configs and the server can use the value types without torch-heavy
imports.
"""

from diffserve.lora.spec import LoraError, LoraSet, LoraSpec

__all__ = ["LoraError", "LoraSet", "LoraSpec"]
