"""The explicit mapping from a checkpoint's `model_index.json` `_class_name` to our recipe: the pipeline
builder, and the validation stage made from the repo's config files alone (so a request is checked, and
the model's defaults are known, before any weight is read)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from diffserve.config import EngineConfig, GenerationRequest, ModelDefaults
from diffserve.errors import CheckpointError
from diffserve.layers.attention import AttentionOp
from diffserve.models.loader import ModelIndex
from diffserve.pipelines.base import ComposedPipeline, InputValidationStage, PipelineState
from diffserve.pipelines.flux import build_flux_pipeline, flux_input_stage
from diffserve.pipelines.hunyuan_video import build_hunyuan_video_pipeline, hunyuan_video_input_stage
from diffserve.pipelines.qwen_image import (
    EDIT,
    EDIT_PLUS,
    T2I,
    build_qwen_image_edit_pipeline,
    build_qwen_image_edit_plus_pipeline,
    build_qwen_image_pipeline,
    qwen_input_stage,
)
from diffserve.pipelines.wan import build_wan_i2v_pipeline, build_wan_t2v_pipeline, wan_input_stage

Builder = Callable[[ModelIndex, EngineConfig, AttentionOp], ComposedPipeline]
InputStageReader = Callable[[ModelIndex], InputValidationStage]


@dataclass(frozen=True)
class Recipe:
    """How checkpoints of one pipeline class run. `build` loads the pipeline (weights and all);
    `input_stage` makes the same first stage from the repo's config files only (model_index.json, the
    transformer, VAE and scheduler configs, diffserve_defaults.json)."""

    build: Builder
    input_stage: InputStageReader


RECIPES: dict[str, Recipe] = {
    "FluxPipeline": Recipe(build_flux_pipeline, flux_input_stage),
    "WanPipeline": Recipe(build_wan_t2v_pipeline, functools.partial(wan_input_stage, i2v=False)),
    # FastWan: Wan2.1 T2V weights, distilled few-step schedule
    "WanDMDPipeline": Recipe(build_wan_t2v_pipeline, functools.partial(wan_input_stage, i2v=False)),
    "WanImageToVideoPipeline": Recipe(build_wan_i2v_pipeline, functools.partial(wan_input_stage, i2v=True)),
    "HunyuanVideoPipeline": Recipe(build_hunyuan_video_pipeline, hunyuan_video_input_stage),
    "QwenImagePipeline": Recipe(build_qwen_image_pipeline, functools.partial(qwen_input_stage, variant=T2I)),
    "QwenImageEditPipeline": Recipe(build_qwen_image_edit_pipeline,
                                    functools.partial(qwen_input_stage, variant=EDIT)),
    # Qwen-Image-Edit-2509: several images
    "QwenImageEditPlusPipeline": Recipe(build_qwen_image_edit_plus_pipeline,
                                        functools.partial(qwen_input_stage, variant=EDIT_PLUS)),
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
