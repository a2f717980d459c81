"""The explicit mapping from a checkpoint's `model_index.json` `_class_name` to our recipe: the pipeline
builder, and the validation stage made from the repo's config files alone (so a request is checked, and
the model's defaults are known, before any weight is read)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from diffserve.config import EngineConfig, GenerationRequest, ModelDefaults
from diffserve.errors import CheckpointError
from diffserve.layers.attention import AttentionOp
from diffserve.models.loader import ModelIndex
from diffserve.pipelines.base import ComposedPipeline, InputValidationStage, PipelineState
from diffserve.pipelines.flux import build_flux_pipeline, flux_decode_bytes, flux_input_stage
from diffserve.pipelines.hunyuan_video import (
    build_hunyuan_video_pipeline,
    hunyuan_video_input_stage,
    untiled_decode_bytes,
)
from diffserve.pipelines.qwen_image import (
    EDIT,
    EDIT_PLUS,
    T2I,
    build_qwen_image_edit_pipeline,
    build_qwen_image_edit_plus_pipeline,
    build_qwen_image_pipeline,
    qwen_decode_bytes,
    qwen_input_stage,
)
from diffserve.pipelines.wan import (
    WAN_VAE_DTYPE,
    build_wan_i2v_pipeline,
    build_wan_t2v_pipeline,
    wan_decode_bytes,
    wan_input_stage,
)

Builder = Callable[[ModelIndex, EngineConfig, AttentionOp], ComposedPipeline]
InputStageReader = Callable[[ModelIndex], InputValidationStage]
# (VAE config, frames, height, width, VAE dtype) -> estimated peak bytes of one output's untiled decode
DecodeEstimate = Callable[[Mapping[str, Any], int, int, int, torch.dtype], int]


@dataclass(frozen=True)
class Recipe:
    """How checkpoints of one pipeline class run. `build` loads the pipeline (weights and all);
    `input_stage` makes the same first stage from the repo's config files only (model_index.json, the
    transformer, VAE and scheduler configs, diffserve_defaults.json). `decode_bytes` is the decode stage's own
    untiled-decode estimate, which the memory planner reads too; `vae_dtype` the VAE's precision when
    `--vae-dtype` is not given (None: the engine's dtype)."""

    build: Builder
    input_stage: InputStageReader
    decode_bytes: DecodeEstimate
    vae_dtype: torch.dtype | None = None


RECIPES: dict[str, Recipe] = {
    "FluxPipeline": Recipe(build_flux_pipeline, flux_input_stage, flux_decode_bytes),
    "WanPipeline": Recipe(build_wan_t2v_pipeline, functools.partial(wan_input_stage, i2v=False), wan_decode_bytes,
                          WAN_VAE_DTYPE),
    # FastWan: Wan2.1 T2V weights, distilled few-step schedule
    "WanDMDPipeline": Recipe(build_wan_t2v_pipeline, functools.partial(wan_input_stage, i2v=False), wan_decode_bytes,
                             WAN_VAE_DTYPE),
    "WanImageToVideoPipeline": Recipe(build_wan_i2v_pipeline, functools.partial(wan_input_stage, i2v=True),
                                      wan_decode_bytes, WAN_VAE_DTYPE),
    "HunyuanVideoPipeline": Recipe(build_hunyuan_video_pipeline, hunyuan_video_input_stage,
                                   untiled_decode_bytes),
    "QwenImagePipeline": Recipe(build_qwen_image_pipeline, functools.partial(qwen_input_stage, variant=T2I),
                                qwen_decode_bytes),
    "QwenImageEditPipeline": Recipe(build_qwen_image_edit_pipeline,
                                    functools.partial(qwen_input_stage, variant=EDIT), qwen_decode_bytes),
    # Qwen-Image-Edit-2509: several images
    "QwenImageEditPlusPipeline": Recipe(build_qwen_image_edit_plus_pipeline,
                                        functools.partial(qwen_input_stage, variant=EDIT_PLUS),
                                        qwen_decode_bytes),
}


def recipe_for(index: ModelIndex) -> Recipe:
    """The recipe of the checkpoint's pipeline class; a CheckpointError naming the supported ones."""
    recipe = RECIPES.get(index.pipeline_class)
    if recipe is None:
        raise CheckpointError(
            f"{index.root}: pipeline class {index.pipeline_class!r} is not supported; "
            f"supported: {', '.join(sorted(RECIPES))}"
        )
    return recipe


def build_pipeline(index: ModelIndex, cfg: EngineConfig, attention: AttentionOp) -> ComposedPipeline:
    """Load the checkpoint's pipeline (its weights included)."""
    return recipe_for(index).build(index, cfg, attention)


def input_stage_from_configs(index: ModelIndex) -> InputValidationStage:
    """The checkpoint's validation stage, read from its config files alone (no weight is read)."""
    return recipe_for(index).input_stage(index)


def defaults_from_configs(index: ModelIndex) -> ModelDefaults:
    """The checkpoint's `ModelDefaults` (what a request may ask and gets when it leaves a field out), read
    from its config files alone; equal to the loaded pipeline's `defaults`."""
    return input_stage_from_configs(index).defaults


def validate_from_configs(index: ModelIndex, requests: list[GenerationRequest]) -> list[GenerationRequest]:
    """Fill defaults and validate `requests` as the loaded pipeline's first stage would, before any weight is
    read (raises InvalidRequestError)."""
    state = PipelineState(requests=list(requests), device=torch.device("cpu"), dtype=torch.float32)
    input_stage_from_configs(index).run(state)
    return state.requests
