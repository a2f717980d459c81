"""The explicit mapping from a checkpoint's `model_index.json` `_class_name` to our pipeline builder."""

from __future__ import annotations

from collections.abc import Callable

from diffserve.config import EngineConfig
from diffserve.errors import CheckpointError
from diffserve.layers.attention import AttentionOp
from diffserve.models.loader import ModelIndex
from diffserve.pipelines.base import ComposedPipeline
from diffserve.pipelines.flux import build_flux_pipeline
from diffserve.pipelines.hunyuan_video import build_hunyuan_video_pipeline
from diffserve.pipelines.qwen_image import (
    build_qwen_image_edit_pipeline,
    build_qwen_image_edit_plus_pipeline,
    build_qwen_image_pipeline,
)
from diffserve.pipelines.wan import build_wan_i2v_pipeline, build_wan_t2v_pipeline

Builder = Callable[[ModelIndex, EngineConfig, AttentionOp], ComposedPipeline]

PIPELINES: dict[str, Builder] = {
    "FluxPipeline": build_flux_pipeline,
    "WanPipeline": build_wan_t2v_pipeline,
    "WanDMDPipeline": build_wan_t2v_pipeline,  # FastWan: Wan2.1 T2V weights, distilled few-step schedule
    "WanImageToVideoPipeline": build_wan_i2v_pipeline,
    "HunyuanVideoPipeline": build_hunyuan_video_pipeline,
    "QwenImagePipeline": build_qwen_image_pipeline,
    "QwenImageEditPipeline": build_qwen_image_edit_pipeline,
    "QwenImageEditPlusPipeline": build_qwen_image_edit_plus_pipeline,  # Qwen-Image-Edit-2509: several images
}


def build_pipeline(index: ModelIndex, cfg: EngineConfig, attention: AttentionOp) -> ComposedPipeline:
    builder = PIPELINES.get(index.pipeline_class)
    if builder is None:
        raise CheckpointError(
            f"{index.root}: pipeline class {index.pipeline_class!r} is not supported; "
            f"supported: {', '.join(sorted(PIPELINES))}"
        )
    return builder(index, cfg, attention)
