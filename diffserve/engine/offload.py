"""CPU offload: running a model whose weights do not all fit on the GPU (docs/DESIGN-NOTES.md: "CPU offload
is a transform after loading").

Two mechanisms, applied by `apply_offload` after the model is built, fused, LoRA-merged and compiled (the last
start-up transform):

* Stage offload (`--text-encoder-cpu-offload`, `--vae-cpu-offload`): a module's weights live in host memory
  (pinned on a GPU machine); `OffloadedStage` wraps each pipeline stage that uses the module, puts the weights
  on the device for that stage (one asynchronous copy per tensor) and points them back at the host copies
  after it (no copy back: the weights never change).
* Block streaming (`--dit-cpu-offload`): the DiT's repeated blocks (`REPEATED_BLOCKS`) keep their weights in
  host memory. A few sets of device buffers ("slots") hold the blocks about to run: the tensors of block i
  *are* views of slot i mod S for good (assigned once), so they never change identity or address, and a
  block's weights are copied into its slot (`Tensor.copy_`) on a side CUDA stream while the previous block
  computes; events order the copy after the slot's previous reader and the block after its copy. Each
  streamed block is replaced in its ModuleList by a `StreamedBlock` that shares the block's children (the
  same parameter names) and, when called, makes the block resident, starts the next one's copy and calls
  the block (its compiled forward, when compiled). Non-repeated parts, and the block submodules a model
  calls outside the block's forward (`STREAM_RESIDENT`, FLUX's modulation norms), stay on the device.

On a CPU device the same code runs with host-to-host copies and no streams, so CPU tests exercise it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from diffserve.config import EngineConfig
from diffserve.errors import UserError
from diffserve.pipelines.base import ComposedPipeline, PipelineStage, PipelineState

TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "image_encoder")
"""Component attributes `--text-encoder-cpu-offload` keeps in host memory (the image encoder of image-to-video
models goes with them: it too runs once per request, before denoising)."""

VAES = ("vae",)
"""Component attributes `--vae-cpu-offload` keeps in host memory."""

STAGE_COMPONENTS: dict[str, tuple[str, ...]] = {
    "text_encoding": ("text_encoder", "text_encoder_2"),
    "image_encoding": ("image_encoder", "vae"),  # Wan I2V: CLIP + VAE encode; Qwen edit: VAE encode
    "decoding": ("vae",),
}
"""Which component attributes each stage (by name) uses; an offloaded component is on the device only
during these stages."""


def host_copy(t: torch.Tensor, pin: bool) -> torch.Tensor:
    """`t` in host memory: pinned (a copy) when `pin`, else the CPU tensor itself (a copy only when `t` is
    elsewhere)."""
    host = t.detach() if t.device.type == "cpu" else t.detach().to("cpu")
    return host.pin_memory() if pin and not host.is_pinned() else host


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    """The module's parameters and buffers, each once (tied weights are one tensor)."""
    seen: dict[int, torch.Tensor] = {}
    for t in (*module.parameters(), *module.buffers()):
        seen.setdefault(id(t), t)
    return list(seen.values())


# ----------------------------------------------------------------------------------------------------------
# Stage offload


class ModuleOffload:
    """One module kept in host memory and put on `device` while a stage that uses it runs."""

    def __init__(self, name: str, module: nn.Module, device: torch.device) -> None:
        self.name, self.module, self.device = name, module, device
        self.tensors = _tensors(module)
        self.homes = [host_copy(t, pin=device.type == "cuda") for t in self.tensors]
        self.resident = False
        self.unload()

    @torch.no_grad()
    def load(self) -> None:
        """Weights onto the device (asynchronous from pinned memory; ordered on the current stream)."""
        for t, home in zip(self.tensors, self.homes, strict=True):
            t.data = home.to(self.device, non_blocking=True)
        self.resident = True

    def unload(self) -> None:
        """Weights back to their host copies (no copy: the device memory is released)."""
        for t, home in zip(self.tensors, self.homes, strict=True):
            t.data = home
        self.resident = False


class OffloadedStage(PipelineStage):
    """A stage whose modules are loaded for its run and unloaded after it (also when it raises)."""

    def __init__(self, inner: PipelineStage, modules: Sequence[ModuleOffload]) -> None:
        self.inner, self.modules, self.name = inner, list(modules), inner.name

    def run(self, state: PipelineState) -> None:
        try:
            for m in self.modules:
                m.load()
            self.inner.run(state)
        finally:
            for m in self.modules:
                m.unload()


def offload_stages(pipeline: ComposedPipeline, names: Sequence[str], device: torch.device) -> dict[str, ModuleOffload]:
    """Keep the pipeline's components `names` (attributes of `pipeline.components`; absent ones skipped) in
    host memory, and wrap every stage of `STAGE_COMPONENTS` that uses one of them. Returns the offloads by
    component name."""
    comps = pipeline.components
    offloads = {n: ModuleOffload(n, getattr(comps, n), device) for n in names
                if isinstance(getattr(comps, n, None), nn.Module)}
    for k, stage in enumerate(pipeline.stages):
        used = [offloads[n] for n in STAGE_COMPONENTS.get(stage.name, ()) if n in offloads]
        if used:
            pipeline.stages[k] = OffloadedStage(stage, used)
    return offloads


# ----------------------------------------------------------------------------------------------------------
# Block streaming


def streamed_indices(count: int, share: float) -> list[int]:
    """Which of `count` blocks to stream for a `share` of them (rounded up): spread evenly, so that each
    streamed block's copy overlaps the compute of the resident blocks before it; share 1: all."""
    k = min(count, max(0, math.ceil(share * count - 1e-9)))
    return sorted({(2 * j + 1) * count // (2 * k) for j in range(k)}) if k else []


class BlockStream:
    """The streamed blocks of one ModuleList (all of one structure): their weights in host memory, `slots`
    sets of device buffers, and the copy schedule (module docstring)."""

    def __init__(self, blocks: nn.ModuleList, indices: Sequence[int], device: torch.device, slots: int = 2,
                 keep: Sequence[str] = ()) -> None:
        if not indices:
            raise ValueError("no block to stream")
        self.device, self.indices = device, list(indices)
        self.params = {i: _streamed_params(blocks[i], keep) for i in self.indices}
        layout = [(n, p.shape, p.dtype) for n, p in self.params[self.indices[0]]]
        for i in self.indices:
            if [(n, p.shape, p.dtype) for n, p in self.params[i]] != layout:
                raise ValueError(f"block {i} differs in its parameters from block {self.indices[0]}; "
                                 f"streamed blocks must share one layout")
        pin = device.type == "cuda"
        self.homes = {i: [host_copy(p, pin) for _, p in self.params[i]] for i in self.indices}
        self.slots = [[torch.empty(shape, dtype=dtype, device=device) for _, shape, dtype in layout]
                      for _ in range(min(slots, len(self.indices)))]
        self.slot_of = {i: pos % len(self.slots) for pos, i in enumerate(self.indices)}
        self.next_of = {i: self.indices[(pos + 1) % len(self.indices)] for pos, i in enumerate(self.indices)}
        self.owner: list[int | None] = [None] * len(self.slots)  # the block each slot holds or is receiving
        for i in self.indices:
            for (_, p), buf in zip(self.params[i], self.slots[self.slot_of[i]], strict=True):
                p.data = buf  # for good: block i's parameters are slot i mod S
        self.copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.ready = [torch.cuda.Event() if self.copy_stream is not None else None for _ in self.slots]
        self.copies = 0  # blocks copied in (for tests and reports)

    @property
    def slot_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.slots[0])

    @torch.no_grad()
    def _fetch(self, i: int) -> None:
        """Start copying block i's weights into its slot, after the work queued so far (the slot's last
        reader among it) on the current stream."""
        s = self.slot_of[i]
        if self.copy_stream is None:
            for dst, src in zip(self.slots[s], self.homes[i], strict=True):
                dst.copy_(src)
        else:
            queued = torch.cuda.Event()
            queued.record(torch.cuda.current_stream(self.device))
            self.copy_stream.wait_event(queued)
            with torch.cuda.stream(self.copy_stream):
                for dst, src in zip(self.slots[s], self.homes[i], strict=True):
                    dst.copy_(src, non_blocking=True)
                self.ready[s].record(self.copy_stream)  # type: ignore[union-attr]
        self.owner[s] = i
        self.copies += 1

    def acquire(self, i: int) -> None:
        """Block i is about to run: its weights in its slot (the current stream waits for their copy), and
        the next streamed block's copy started."""
        s = self.slot_of[i]
        if self.owner[s] != i:
            self._fetch(i)
        if self.copy_stream is not None:
            torch.cuda.current_stream(self.device).wait_event(self.ready[s])  # type: ignore[arg-type]
        j = self.next_of[i]
        if self.slot_of[j] != s and self.owner[self.slot_of[j]] != j:
            self._fetch(j)


def _streamed_params(block: nn.Module, keep: Sequence[str]) -> list[tuple[str, torch.Tensor]]:
    """The block's tensors that stream: its parameters and buffers (FP8 layers keep their weights in buffers),
    all but those under the submodules named in `keep`."""
    named = [*block.named_parameters(), *block.named_buffers()]
    return [(n, t) for n, t in named if n.split(".", 1)[0] not in keep]


class StreamedBlock(nn.Module):
    """Stands in for block `index` of a streamed ModuleList. It holds the block's children, parameters and
    buffers under the same names (so the model's parameter names and submodule paths do not change) and the
    block itself as a plain attribute; calling it makes the block resident and runs the block."""

    def __init__(self, block: nn.Module, stream: BlockStream, index: int) -> None:
        super().__init__()
        for name, child in block.named_children():
            self.add_module(name, child)
        for name, p in block.named_parameters(recurse=False):
            self.register_parameter(name, p)
        for name, b in block.named_buffers(recurse=False):
            self.register_buffer(name, b)
        object.__setattr__(self, "block", block)  # not a submodule: its tensors are registered above
        self.stream, self.index = stream, index

    def forward(self, *args: object, **kwargs: object) -> object:
        self.stream.acquire(self.index)
        return self.block(*args, **kwargs)


def stream_blocks(model: nn.Module, device: torch.device, share: float = 1.0, slots: int = 2) -> list[BlockStream]:
    """Block-stream a `share` of each of the model's `REPEATED_BLOCKS` lists (at least one block each), keep
    everything else on `device`. The model may be on the CPU or on the device; its streamed weights end in
    host memory. Returns one BlockStream per list."""
    keep = tuple(getattr(type(model), "STREAM_RESIDENT", ()))
    streams = []
    for name in type(model).REPEATED_BLOCKS:  # type: ignore[attr-defined]
        blocks: nn.ModuleList = getattr(model, name)
        indices = streamed_indices(len(blocks), share)
        if not indices:
            continue
        stream = BlockStream(blocks, indices, device, slots, keep)
        for i in indices:
            blocks[i] = StreamedBlock(blocks[i], stream, i)
        streams.append(stream)
    model.to(device)  # the rest (streamed parameters already point at device slots)
    return streams


# ----------------------------------------------------------------------------------------------------------
# The transform


@dataclass
class Offloaded:
    """What `apply_offload` did: the stage offloads by component name and the DiT's block streams."""

    modules: dict[str, ModuleOffload] = field(default_factory=dict)
    streams: list[BlockStream] = field(default_factory=list)

    def describe(self) -> str:
        parts = [f"{name} in host memory" for name in self.modules]
        for s in self.streams:
            parts.append(f"{len(s.indices)} blocks streamed through {len(s.slots)} slots of "
                         f"{s.slot_bytes / 2**20:.0f} MiB")
        return ", ".join(parts) or "nothing offloaded"


def check_offload(cfg: EngineConfig) -> None:
    """One-line UserErrors for the combinations offload does not support (before anything loads)."""
    if not (cfg.offload.text_encoder or cfg.offload.vae or cfg.offload.dit):
        return
    if cfg.device.type not in ("cuda", "cpu"):
        raise UserError(f"CPU offload runs on CUDA devices (or the CPU), not {cfg.device.type}", param="device")
    if cfg.offload.dit and cfg.lora_mode == "unmerged":
        raise UserError("--dit-cpu-offload does not combine with --lora-mode unmerged (adapters are installed "
                        "into the blocks while serving); use --lora-mode merged", param="dit_cpu_offload")


def apply_offload(pipeline: ComposedPipeline, cfg: EngineConfig) -> Offloaded:
    """Apply the offloads `cfg.offload` asks for to a built pipeline (after every other start-up transform:
    block streaming replaces the streamed blocks in their lists). Components the recipe loaded on the host
    (`EngineConfig.load_device`) stay there; the rest of the DiT goes to the device."""
    check_offload(cfg)
    names = (TEXT_ENCODERS if cfg.offload.text_encoder else ()) + (VAES if cfg.offload.vae else ())
    done = Offloaded(modules=offload_stages(pipeline, names, cfg.device))
    if cfg.offload.dit:
        transformer = pipeline.components.transformer  # type: ignore[union-attr]
        done.streams = stream_blocks(transformer, cfg.device, cfg.offload.dit)
    return done
