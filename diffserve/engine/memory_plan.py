"""`--max-gpu-memory`: choosing the offloads (`diffserve.engine.offload`) that fit a GPU memory budget.

The model's footprint is read before any weight is: parameter counts from the safetensors headers of each
component, activation sizes from the model's default request (`Footprint.from_checkpoint`). `choose_plan` is a
pure function of the footprint and the budget: of every combination of text-encoder offload, VAE offload and
a share of streamed DiT blocks whose estimated peak fits, the one that moves the fewest bytes per
generation (streamed blocks move every model call; the encoders and the VAE once per generation).

Peak estimate of a plan, the largest of its three phases (a component offloaded is on the device only in
its phase):
    text encoding  resident DiT + text encoders + resident VAE
    denoising      resident DiT + resident text encoders + resident VAE + the DiT's activations
    decoding       resident DiT + resident text encoders + VAE + the decode's activations
(the decode's activations: the model's decode stage's own untiled estimate, `Recipe.decode_bytes`, at the VAE's
precision, or TILED_DECODE_BYTES where that is less, as `--vae-tiling auto` would tile)
where the resident DiT is its non-repeated parameters, the blocks not streamed and, when streaming, two
slots per block list the size of the largest block. A plan fits when its peak is at most FIT_SHARE of the budget (room for the allocator's
fragmentation and the CUDA context).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from diffserve.config import EngineConfig, GenerationRequest, ModelDefaults, OffloadConfig, PlanSize
from diffserve.models.dits.flux import FluxTransformer
from diffserve.models.dits.hunyuan_video import HunyuanVideoTransformer
from diffserve.models.dits.qwen_image import QwenImageTransformer
from diffserve.models.dits.wan import WanTransformer
from diffserve.models.loader import ModelIndex, read_json

log = logging.getLogger(__name__)

GIB = 2**30
FIT_SHARE = 0.9
ACTIVATION_FACTOR = 12  # live (tokens, hidden) activations at a block's peak: residual, norm, q/k/v, MLP (4x)
TILED_DECODE_BYTES = 2 * GIB  # a tiled decode's peak (`--vae-tiling auto` tiles a decode that would not fit)
SHARES = tuple(k / 20 for k in range(21))  # streamed shares of the DiT's blocks the planner considers
SLOTS = 2

def dit_layout(class_name: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(repeated block lists, block submodules kept resident when streaming) of the DiT diffserve builds for a
    checkpoint whose transformer config names diffusers' `class_name`, as that DiT declares them
    (`REPEATED_BLOCKS`, `STREAM_RESIDENT`); nothing streamable for a class diffserve does not build."""
    ours = {"FluxTransformer2DModel": FluxTransformer, "WanTransformer3DModel": WanTransformer,
            "QwenImageTransformer2DModel": QwenImageTransformer,
            "HunyuanVideoTransformer3DModel": HunyuanVideoTransformer}.get(class_name)
    if ours is None:
        return (), ()
    return tuple(ours.REPEATED_BLOCKS), tuple(getattr(ours, "STREAM_RESIDENT", ()))


def plan_tokens(height: int, width: int, num_frames: int | None) -> int:
    """Image/video tokens of one output as the planner counts them: 16x16 pixels (an 8x VAE and 2x2 patches)
    per token and, for video, one latent frame per 4 frames plus the first."""
    return (((num_frames or 1) - 1) // 4 + 1) * (height // 16) * (width // 16)


def planned_size(given: PlanSize | None, d: ModelDefaults) -> PlanSize:
    """The batch the plan must fit: `given` (its frames defaulting to the model's), else the default request."""
    if given is None:
        return PlanSize(d.height, d.width, d.num_frames)
    frames = (given.num_frames or d.num_frames) if d.num_frames else None
    return dataclasses.replace(given, num_frames=frames)


def size_tokens(size: PlanSize) -> int:
    """Image/video tokens of a whole batch of `size`."""
    return plan_tokens(size.height, size.width, size.num_frames) * size.batch


def beyond_plan(planned: PlanSize, d: ModelDefaults, requests: list[GenerationRequest]) -> str | None:
    """A warning when a batch has more image/video tokens than the `--max-gpu-memory` plan was made for
    (its activations may not fit the budget); None when it fits the plan."""
    asked = [PlanSize(r.height or d.height, r.width or d.width, (r.num_frames or d.num_frames) if d.num_frames else None,
                      batch=r.num_outputs or 1) for r in requests]
    if sum(size_tokens(a) for a in asked) <= size_tokens(planned):
        return None
    return (f"this batch ({', '.join(a.describe() for a in asked)}) is larger than the --max-gpu-memory plan's "
            f"{planned.describe()}: its peak may exceed the budget; start with --plan-size for the largest "
            "request (plan_size= in Python)")


@dataclass(frozen=True)
class Footprint:
    """Device bytes of a model's parts at the precision they run in."""

    text_encoders: int  # all text (and image) encoders
    vae: int
    dit_other: int  # the DiT's non-repeated parameters (and those kept resident when streaming)
    dit_blocks: int  # the streamable parameters of all repeated blocks
    dit_block_max: int  # the largest block's streamable parameters
    denoise_activations: int
    decode_activations: int  # a decode's peak as planned: the untiled one, or a tiled one where that is less
    model_calls: int = 1  # DiT calls per generation (steps x CFG branches): how often streamed blocks move
    dit_lists: int = 1  # repeated block lists (each streams through its own slots)
    decode_untiled: int = 0  # the untiled decode's estimated peak
    planned: PlanSize | None = None  # the batch the activations were sized for (from_checkpoint)

    @classmethod
    def from_checkpoint(cls, index: ModelIndex, cfg: EngineConfig) -> Footprint:
        """Read from the repo's headers and config files; no weight is read. Activations are those of
        `cfg.offload.plan_size` (default: the model's default request)."""
        from diffserve.pipelines.registry import defaults_from_configs, recipe_for

        nbytes = torch.finfo(cfg.dtype).bits // 8
        recipe = recipe_for(index)
        vae_dtype = cfg.vae_dtype or recipe.vae_dtype or cfg.dtype
        encoders = sum(folder_numel(index.folder(n)) for n in ("text_encoder", "text_encoder_2", "image_encoder")
                       if index.components.get(n) is not None) * nbytes
        vae = folder_numel(index.folder("vae")) * (torch.finfo(vae_dtype).bits // 8)
        tfolder = index.folder("transformer")
        tconf = read_json(tfolder / "config.json")
        lists, keep = dit_layout(tconf.get("_class_name", ""))
        blocks, other = block_numels(folder_shapes(tfolder), lists, keep)
        d = defaults_from_configs(index)
        size = planned_size(cfg.offload.plan_size, d)
        tokens = (plan_tokens(size.height, size.width, size.num_frames) + d.max_sequence_length) * size.batch
        hidden = int(tconf.get("num_attention_heads", 1)) * int(tconf.get("attention_head_dim", 1))
        untiled = recipe.decode_bytes(read_json(index.folder("vae") / "config.json"), size.num_frames or 1,
                                      size.height, size.width, vae_dtype) * size.batch  # the decode stage's own
        calls = d.num_inference_steps * (2 if d.guidance in ("cfg", "true_cfg") else 1)
        return cls(text_encoders=encoders, vae=vae, dit_other=other * nbytes, dit_blocks=sum(blocks.values()) * nbytes,
                   dit_block_max=max(blocks.values(), default=0) * nbytes, dit_lists=max(1, len(lists)),
                   denoise_activations=tokens * hidden * nbytes * ACTIVATION_FACTOR,
                   decode_activations=min(untiled, TILED_DECODE_BYTES), model_calls=calls, decode_untiled=untiled,
                   planned=size)


@dataclass(frozen=True)
class Plan:
    """What to offload, its estimated peak device bytes and bytes moved per generation."""

    text_encoder: bool
    vae: bool
    dit: float  # share of the repeated blocks streamed
    peak: int
    moved: int
    fits: bool = True

    def describe(self) -> str:
        parts = [name for name, on in (("text encoders", self.text_encoder), ("VAE", self.vae)) if on]
        if self.dit:
            parts.append("all DiT blocks streamed" if self.dit >= 1 else f"{self.dit:.0%} of the DiT blocks streamed")
        return (", ".join(parts) or "nothing offloaded") + f" (estimated peak {self.peak / GIB:.1f} GiB)"


def _streamed(fp: Footprint, dit: float) -> int:
    return math.ceil(dit * fp.dit_blocks) if dit else 0


def _dit_resident(fp: Footprint, dit: float) -> int:
    slots = SLOTS * fp.dit_block_max * fp.dit_lists if dit else 0
    return fp.dit_other + fp.dit_blocks - _streamed(fp, dit) + slots


def plan_cost(fp: Footprint, text_encoder: bool, vae: bool, dit: float) -> Plan:
    """The peak (module docstring) and bytes moved per generation of one combination."""
    streamed, dit_resident = _streamed(fp, dit), _dit_resident(fp, dit)
    te_resident = 0 if text_encoder else fp.text_encoders
    vae_resident = 0 if vae else fp.vae
    peak = max(dit_resident + fp.text_encoders + vae_resident,
               dit_resident + te_resident + vae_resident + fp.denoise_activations,
               dit_resident + te_resident + fp.vae + fp.decode_activations)
    moved = text_encoder * fp.text_encoders + vae * fp.vae + streamed * fp.model_calls
    return Plan(text_encoder, vae, dit, peak, moved)


def choose_plan(fp: Footprint, budget: int, floor: OffloadConfig | None = None) -> Plan:
    """The combination that fits FIT_SHARE x `budget` bytes and moves the fewest bytes (ties: the fewest
    offloads); the offloads in `floor` are always on. When none fits: everything offloaded, `fits` False."""
    floor = floor or OffloadConfig()
    candidates = [plan_cost(fp, te, vae, share)
                  for te in sorted({floor.text_encoder, True}) for vae in sorted({floor.vae, True})
                  for share in SHARES if share >= floor.dit]
    fitting = [p for p in candidates if p.peak <= FIT_SHARE * budget]
    if not fitting:
        return dataclasses.replace(plan_cost(fp, True, True, 1.0), fits=False)
    return min(fitting, key=lambda p: (p.moved, p.text_encoder + p.vae + p.dit))


def untiled_decode_fits(fp: Footprint, plan: Plan, budget: int) -> bool:
    """Whether the untiled decode of the default request fits FIT_SHARE x `budget` beside what the plan keeps
    resident while decoding."""
    te_resident = 0 if plan.text_encoder else fp.text_encoders
    return _dit_resident(fp, plan.dit) + te_resident + fp.vae + fp.decode_untiled <= FIT_SHARE * budget


def resolve_offload(cfg: EngineConfig, index: ModelIndex) -> EngineConfig:
    """The engine config with `--max-gpu-memory` turned into offloads (unchanged without it; "auto": the
    card's total memory; on a CPU "auto" offloads nothing). `--vae-tiling auto` becomes on when the untiled
    decode would not fit the budget (auto alone looks at the card's free memory, which a budget below the
    card's size does not limit)."""
    limit = cfg.offload.max_gpu_memory
    if limit is None or (limit == "auto" and cfg.device.type != "cuda"):
        return cfg
    if limit == "auto":
        budget = torch.cuda.get_device_properties(cfg.device).total_memory
    else:
        budget = int(float(limit) * GIB)
    fp = Footprint.from_checkpoint(index, cfg)
    plan = choose_plan(fp, budget, cfg.offload)
    planned = fp.planned
    assert planned is not None  # from_checkpoint sets it
    if plan.fits:
        log.info("--max-gpu-memory %s, planned for %s: %s", limit, planned.describe(), plan.describe())
    else:
        log.warning("--max-gpu-memory %s, planned for %s: no plan fits the estimate; offloading everything: %s",
                    limit, planned.describe(), plan.describe())
    off = dataclasses.replace(cfg.offload, text_encoder=plan.text_encoder, vae=plan.vae, dit=plan.dit,
                              plan_size=planned)
    tiling = cfg.vae_tiling
    if tiling is None and not untiled_decode_fits(fp, plan, budget):
        tiling = True
        log.info("--max-gpu-memory %s: the VAE decodes tiled (the untiled decode would not fit)", limit)
    return dataclasses.replace(cfg, offload=off, vae_tiling=tiling)


# ----------------------------------------------------------------------------------------------------------
# Safetensors headers


def safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor name -> shape, from a .safetensors file's header alone."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return {k: v["shape"] for k, v in header.items() if k != "__metadata__"}


def folder_shapes(folder: Path) -> dict[str, list[int]]:
    """Every tensor shape of the .safetensors files of a component folder."""
    out: dict[str, list[int]] = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update(safetensors_shapes(path))
    return out


def folder_numel(folder: Path) -> int:
    """Elements of every tensor of a component folder."""
    return sum(math.prod(shape) for shape in folder_shapes(folder).values())


def block_numels(shapes: dict[str, list[int]], lists: tuple[str, ...],
                 keep: tuple[str, ...]) -> tuple[dict[tuple[str, int], int], int]:
    """Split a DiT's tensors into its repeated blocks' streamable elements ({(list, index): elements}) and
    the rest (non-repeated tensors and the block submodules in `keep`)."""
    blocks: dict[tuple[str, int], int] = {}
    other = 0
    for name, shape in shapes.items():
        parts = name.split(".")
        n = math.prod(shape)
        if len(parts) >= 3 and parts[0] in lists and parts[1].isdigit() and parts[2] not in keep:
            key = (parts[0], int(parts[1]))
            blocks[key] = blocks.get(key, 0) + n
        else:
            other += n
    return blocks, other
