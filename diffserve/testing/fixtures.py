"""Random-weight, diffusers-format model repos ("fixtures") for tests and GPU benchmarks.

Every repo is built from the real diffusers / transformers classes, so file layout, config keys and
weight key names are those of the real Hugging Face checkpoints; only the weights are random (drawn
deterministically from a seed) and, at ``scale="tiny"``, the widths / depths are shrunk. Configs start
from the real files in ``model_configs/<repo>/`` and override only the size fields, so everything else
(scheduler settings, VAE scaling / shift factors, Wan latent statistics, activation functions, special
token ids, ...) is the real value.

Tiny weights are the default init plus N(0, 0.1) noise on every parameter (norm scales and biases
included) and a x3 gain on the conditioning projections, so that every weight and every input visibly
changes the output (see :func:`_spread_tiny_weights`). Each component is built right after
``torch.manual_seed(seed)``, so its weights depend on nothing but the seed and its own config, and two
builds with the same seed are byte-identical.

``scale="full"`` builds the same components at the real sizes with default inits, one at a time,
directly on ``device`` in ``dtype`` (never a CPU fp32 copy first; every component, text encoders and VAE
included, is written in ``dtype``, whereas e.g. the real Wan repos keep UMT5 and the VAE in fp32), with
sharded safetensors. Tokenizers are always the tiny ones from :mod:`.tiny_tokenizers` (their ids fit
any embedding size). Measured on one H200 with bf16 (diffusers 0.42.1, torch 2.11): ``flux-dev`` builds
in 50 s (peak 22 GiB GPU, 10 GiB host RSS) into 33.7 GB, ``wan-i2v`` in 58 s (31 GiB GPU) into 45.7 GB,
``fastwan-t2v`` in 23 s into 14.6 GB; each loaded back into its diffusers pipeline and generated.
CLI: ``python -m diffserve.testing.fixtures flux-dev /data/flux-dev --scale full --device cuda
--dtype bf16``.

Fixtures (``scale="tiny"``; widths are chosen so the engine's shape plumbing is exercised):

* ``flux-dev`` / ``flux-schnell``: FluxTransformer2DModel (2 double + 2 single blocks, 2 heads x 16,
  in_channels 16, rope axes (4, 4, 8), guidance embedder only for dev), AutoencoderKL with two blocks
  (8, 16) -> vae_scale_factor 2 and 4 latent channels (FLUX's 0.3611 / 0.1159 scaling / shift),
  CLIPTextModel (hidden 32), T5EncoderModel (d_model 32, gated-gelu), the real scheduler configs.
* ``wan-t2v``: WanTransformer3DModel (2 layers, 2 heads x 12, text_dim 32), AutoencoderKLWan
  (base_dim 3, the real 16-channel latents_mean / latents_std), UMT5EncoderModel (d_model 32),
  UniPCMultistepScheduler with the real Wan2.1 config (flow_prediction, flow_shift 3.0).
* ``wan-i2v``: as wan-t2v plus in_channels 36, image_dim 16, added_kv_proj_dim 24 (the added K/V
  image cross-attention of the real I2V-14B), a CLIPVisionModelWithProjection (hidden 16, 32 px,
  patch 4) and a CLIPImageProcessor at 32 px.
* ``fastwan-t2v``: FastVideo/FastWan2.1-T2V-1.3B-Diffusers, see below.
* ``hunyuan-video``: hunyuanvideo-community/HunyuanVideo: HunyuanVideoTransformer3DModel (2 dual + 2 single
  blocks, 2 refiner blocks, 2 heads x 12, RoPE 4/4/4, patch 2, guidance embedder), LlamaModel (3 layers,
  hidden 32: the pipeline reads the third hidden state from the end) with the tiny LLaMA tokenizer (whose
  tokens for the real prompt template's prefix are exactly the 95 the pipeline crops), CLIPTextModel
  (hidden 32) for the pooled vector, AutoencoderKLHunyuanVideo with four 4-channel blocks (the real 8x
  spatial / 4x temporal compression, 16 latent channels, scaling 0.476986), the real scheduler config
  (flow-match Euler, shift 7.0).
* ``qwen-image`` / ``qwen-image-edit``: Qwen/Qwen-Image and Qwen/Qwen-Image-Edit: QwenImageTransformer2DModel
  (2 blocks, 4 heads x 16, RoPE 4/6/6, in_channels 64), AutoencoderKLQwenImage (base_dim 3, the real
  16-channel latent statistics, 8x), Qwen2_5_VLForConditionalGeneration (text: 2 layers, hidden 16, 2:1
  grouped heads, the real 152064-entry vocabulary and special token ids; vision: 2 blocks of 16, the real
  patch / merge / window sizes) with the tiny Qwen2 BPE tokenizer (its tokens for the real templates'
  system turns are exactly the 34 / 64 the pipelines drop), the real scheduler config (dynamic shift,
  shift_terminal 0.02). The edit repo adds ``processor/`` (that tokenizer and the real Qwen2-VL image
  processor config capped at 112x112 pixels). ``qwen-image-edit-plus`` (Qwen-Image-Edit-2509, several input
  images) is the edit repo under ``QwenImageEditPlusPipeline``: the same component layout is assumed (its
  own configs are not in ``model_configs/``).
* ``wan-t2v-14b``: ``scale="full"`` only (Wan2.1-T2V-14B-Diffusers).

What the FastWan2.1-T2V-1.3B-Diffusers repo looks like (researched from public sources, not from the
repo itself, which is not reachable from here):

* ``model_index.json`` names ``"_class_name": "WanDMDPipeline"`` with the Wan2.1 T2V component list.
  Sure: FastVideo's pipeline registry falls back from ``wandmdpipeline`` in model_index to
  ``FastWan2_1_T2V_480P_Config`` (hao-ai-lab/FastVideo ``fastvideo/configs/pipelines/registry.py``), its
  v2 registry says "FastWan: detected by pipeline class" for ``WanDMDPipeline``, and SGLang scripts run
  FastWan with ``--pipeline WanDMDPipeline``. diffusers has no such class: load it with
  ``WanPipeline.from_pretrained`` (not ``DiffusionPipeline``). No ``_name_or_path`` key was seen, so none
  is written.
* ``scheduler/`` is the base model's UniPCMultistepScheduler (solver_type bh2), copied unchanged --
  fairly sure: the model card of a FastVideo export that copied "model_index.json, scheduler/,
  text_encoder/, tokenizer/, vae/ from FastWan2.1-T2V-1.3B-Diffusers" says "That copied base-model
  scheduler is UniPCMultistepScheduler with solver_type=bh2, but it is not the online validation
  solver" (huggingface.co/yitongl/5090_test). Its ``flow_shift`` is assumed to be the base's 3.0
  (not confirmed). The fixture therefore ships the real Wan2.1-T2V-1.3B scheduler config.
* The schedule FastWan is actually sampled with lives in code, not in the repo: FastVideo's
  ``WanDMDPipeline.initialize_pipeline`` replaces the scheduler by
  ``FlowMatchEulerDiscreteScheduler(shift=pipeline_config.flow_shift)`` with ``flow_shift = 8.0`` and
  ``dmd_denoising_steps = [1000, 757, 522]`` (``FastWan2_1_T2V_480P_Config`` in
  ``fastvideo/configs/pipelines/wan.py``), 3 steps at 61 x 448 x 832 by default (``FastWanT2V480PConfig``
  in ``fastvideo/configs/sample/wan.py``); SGLang's copy does the same. Sure. See
  :data:`FASTWAN_DMD_SCHEDULE`.
* The transformer is a Wan 1.3B (same config) trained with Video Sparse Attention, and its weights carry
  an extra gate projection per block, ``blocks.N.attn1.to_gate_compress.{weight,bias}`` (dim x dim, with
  bias) that diffusers' WanTransformer3DModel does not have (it warns and ignores them on load). Fairly
  sure of the key names: SGLang's VSA Wan block registers it with prefix ``attn1.to_gate_compress`` and
  its design notes name exactly these checkpoint keys; FastVideo's porting notes say a non-strict load
  is needed to skip them. The fixture adds these keys (random weights).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import fcntl
import functools
import hashlib
import importlib.metadata
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

FIXTURE_VERSION = "1"
"""Hashed into the cache folder names. The builder's source is hashed too, so bump this only when the
output changes for another reason (e.g. a behaviour change in a dependency that keeps its version)."""

FIXTURES: tuple[str, ...] = ("flux-dev", "flux-schnell", "wan-t2v", "wan-i2v", "fastwan-t2v", "hunyuan-video",
                             "qwen-image", "qwen-image-edit", "qwen-image-edit-plus")
"""Fixtures that exist at ``scale="tiny"`` (and ``"full"``)."""
FULL_ONLY: tuple[str, ...] = ("wan-t2v-14b",)
"""Repos that can only be built at ``scale="full"``."""

Scale = Literal["tiny", "full"]

CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
CACHE_ENV = "DIFFSERVE_FIXTURE_CACHE"

FASTWAN_DMD_SCHEDULE: dict[str, Any] = {
    "scheduler": "FlowMatchEulerDiscreteScheduler",
    "shift": 8.0,
    "dmd_denoising_steps": [1000, 757, 522],
    "num_inference_steps": 3,
    "num_frames": 61,
    "height": 448,
    "width": 832,
}
"""How FastVideo samples FastWan2.1-T2V-1.3B (not stored in the repo; see the module docstring)."""


@dataclass(frozen=True)
class RepoSpec:
    """Which real repo a fixture mirrors and how it differs from it."""

    name: str
    family: Literal["flux", "wan", "hunyuan", "qwen"]
    config_repo: str
    hub_id: str
    pipeline_class: str | None = None
    """Override for model_index.json's ``_class_name`` (None: keep the real file's)."""
    vsa_gates: bool = False
    """Add FastWan's ``attn1.to_gate_compress`` weights to every transformer block."""
    tiny: bool = True


SPECS: dict[str, RepoSpec] = {
    "flux-dev": RepoSpec("flux-dev", "flux", "FLUX.1-dev", "black-forest-labs/FLUX.1-dev"),
    "flux-schnell": RepoSpec("flux-schnell", "flux", "FLUX.1-schnell", "black-forest-labs/FLUX.1-schnell"),
    "wan-t2v": RepoSpec("wan-t2v", "wan", "Wan2.1-T2V-1.3B-Diffusers", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"),
    "wan-t2v-14b": RepoSpec("wan-t2v-14b", "wan", "Wan2.1-T2V-14B-Diffusers", "Wan-AI/Wan2.1-T2V-14B-Diffusers",
                            tiny=False),
    "wan-i2v": RepoSpec("wan-i2v", "wan", "Wan2.1-I2V-14B-480P-Diffusers", "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers"),
    "fastwan-t2v": RepoSpec("fastwan-t2v", "wan", "Wan2.1-T2V-1.3B-Diffusers",
                            "FastVideo/FastWan2.1-T2V-1.3B-Diffusers", pipeline_class="WanDMDPipeline",
                            vsa_gates=True),
    "hunyuan-video": RepoSpec("hunyuan-video", "hunyuan", "HunyuanVideo", "hunyuanvideo-community/HunyuanVideo"),
    "qwen-image": RepoSpec("qwen-image", "qwen", "Qwen-Image", "Qwen/Qwen-Image"),
    "qwen-image-edit": RepoSpec("qwen-image-edit", "qwen", "Qwen-Image-Edit", "Qwen/Qwen-Image-Edit"),
    # Qwen-Image-Edit-2509: the Qwen-Image-Edit layout and configs under QwenImageEditPlusPipeline (assumed: its
    # configs are not in model_configs/)
    "qwen-image-edit-plus": RepoSpec("qwen-image-edit-plus", "qwen", "Qwen-Image-Edit", "Qwen/Qwen-Image-Edit-2509",
                                     pipeline_class="QwenImageEditPlusPipeline"),
}

# Size overrides applied to the real configs at scale="tiny". Every other field keeps its real value.
_TINY_CLIP_TEXT = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 2,
                   "projection_dim": 32}
_TINY_T5 = {"d_model": 32, "d_kv": 8, "d_ff": 37, "num_layers": 2, "num_decoder_layers": 2, "num_heads": 4,
            "relative_attention_num_buckets": 8}
_TINY_CLIP_VISION = {"hidden_size": 16, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "projection_dim": 16, "image_size": 32, "patch_size": 4}
_TINY_FLUX = {"in_channels": 16, "num_layers": 2, "num_single_layers": 2, "attention_head_dim": 16,
              "num_attention_heads": 2, "joint_attention_dim": _TINY_T5["d_model"],
              "pooled_projection_dim": _TINY_CLIP_TEXT["hidden_size"], "axes_dims_rope": [4, 4, 8]}
_TINY_FLUX_VAE = {"block_out_channels": [8, 16], "down_block_types": ["DownEncoderBlock2D"] * 2,
                  "up_block_types": ["UpDecoderBlock2D"] * 2, "layers_per_block": 1, "latent_channels": 4,
                  "norm_num_groups": 4, "sample_size": 32}
_TINY_WAN = {"num_attention_heads": 2, "attention_head_dim": 12, "ffn_dim": 32, "num_layers": 2,
             "text_dim": _TINY_T5["d_model"], "rope_max_seq_len": 32}
_TINY_WAN_I2V = {"image_dim": _TINY_CLIP_VISION["hidden_size"],
                 "added_kv_proj_dim": _TINY_WAN["num_attention_heads"] * _TINY_WAN["attention_head_dim"]}
_TINY_WAN_VAE = {"base_dim": 3, "dim_mult": [1, 1, 1, 1], "num_res_blocks": 1}
# HunyuanVideo: a 3-layer LLaMA (the pipeline reads the third hidden state from the end), CLIP-L -> the tiny
# CLIP, a DiT of 2 dual + 2 single blocks (2 heads x 12, RoPE 4/4/4) and the smallest causal 3-D VAE that
# keeps the real 8x spatial / 4x temporal compression and 16 latent channels (four blocks of 4 channels).
_TINY_LLAMA = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 3, "num_attention_heads": 2,
               "num_key_value_heads": 1, "head_dim": 16, "max_position_embeddings": 512}
_TINY_HUNYUAN = {"num_attention_heads": 2, "attention_head_dim": 12,
                 "num_layers": 2, "num_single_layers": 2, "text_embed_dim": _TINY_LLAMA["hidden_size"],
                 "pooled_projection_dim": _TINY_CLIP_TEXT["hidden_size"], "rope_axes_dim": [4, 4, 4]}
_TINY_HUNYUAN_VAE = {"block_out_channels": [4, 4, 4, 4], "layers_per_block": 1, "norm_num_groups": 2}
_TINY_IMAGE_PROCESSOR = {"crop_size": {"height": 32, "width": 32}, "size": {"shortest_edge": 32}}
# Qwen-Image: Qwen2.5-VL with a 2-layer text model (hidden 16, GQA 2:1 heads, M-RoPE sections 1/1/2) and a
# 2-block vision tower (patch 14, merge 2 and window 112 as the real one; its last block full attention); a
# DiT of 2 blocks, 4 heads x 16, RoPE 4/6/6; the Wan-style VAE at base_dim 3 (real 16-channel latent
# statistics, 8x compression); the vision processor capped at 112x112 pixels (a few vision tokens).
_TINY_QWEN_TEXT = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                   "num_key_value_heads": 1, "max_window_layers": 2,
                   "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"}}
_TINY_QWEN_VISION = {"depth": 2, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2,
                     "out_hidden_size": _TINY_QWEN_TEXT["hidden_size"], "fullatt_block_indexes": [1]}
_TINY_QWEN = {"num_layers": 2, "attention_head_dim": 16, "num_attention_heads": 4,
              "joint_attention_dim": _TINY_QWEN_TEXT["hidden_size"], "axes_dims_rope": [4, 6, 6]}
_TINY_QWEN_VAE = {"base_dim": 3, "dim_mult": [1, 1, 1, 1], "num_res_blocks": 1}
_TINY_QWEN_PROCESSOR = {"max_pixels": 112 * 112, "size": {"longest_edge": 112 * 112, "shortest_edge": 56 * 56}}

# Metadata keys of the real config files that must not be passed on (they describe the original save).
_META_KEYS = ("_class_name", "_diffusers_version", "_name_or_path", "architectures", "transformers_version",
              "torch_dtype", "dtype")


@dataclass
class Component:
    """One subfolder of a repo: what to build (``kind``) and from which config."""

    name: str
    kind: str
    config: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)


def read_config(repo: str, component: str | None = None) -> dict[str, Any]:
    """A real config file from ``model_configs/<repo>/`` (``model_index.json`` if ``component`` is None)."""
    folder = CONFIG_DIR / repo
    if component is None:
        path = folder / "model_index.json"
    elif component == "scheduler":
        path = folder / component / "scheduler_config.json"
    elif component in ("image_processor", "processor"):
        path = folder / component / "preprocessor_config.json"
    else:
        path = folder / component / "config.json"
    return json.loads(path.read_text())


def _strip_meta(config: Mapping[str, Any]) -> dict[str, Any]:
    return {k: copy.deepcopy(v) for k, v in config.items() if k not in _META_KEYS}


def _sized(repo: str, component: str, scale: Scale, *overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The real config of ``component``, with the size ``overrides`` applied when ``scale == "tiny"``."""
    config = _strip_meta(read_config(repo, component))
    if scale == "tiny":
        for o in overrides:
            config.update(copy.deepcopy(dict(o)))
    return config


def component_plan(name: str, scale: Scale = "tiny") -> list[Component]:
    """The components of repo ``name`` with the configs they are built from, in model_index order."""
    spec = _spec(name, scale)
    repo = spec.config_repo
    from .tiny_tokenizers import CLIP_VOCAB_SIZE, LLAMA_VOCAB_SIZE, T5_VOCAB_SIZE

    t5_tiny = {**_TINY_T5, "vocab_size": T5_VOCAB_SIZE}
    if spec.family == "flux":
        return [
            _scheduler(repo),
            Component("text_encoder", "clip_text", _sized(repo, "text_encoder", scale,
                                                          _TINY_CLIP_TEXT, {"vocab_size": CLIP_VOCAB_SIZE})),
            Component("text_encoder_2", "t5", _sized(repo, "text_encoder_2", scale, t5_tiny)),
            Component("tokenizer", "clip_tokenizer", {}),
            Component("tokenizer_2", "t5_tokenizer", {}),
            Component("transformer", "flux_transformer", _sized(repo, "transformer", scale, _TINY_FLUX)),
            Component("vae", "flux_vae", _sized(repo, "vae", scale, _TINY_FLUX_VAE)),
        ]
    if spec.family == "hunyuan":
        llama_ids = {"vocab_size": LLAMA_VOCAB_SIZE, "bos_token_id": 1, "eos_token_id": 2}
        return [
            _scheduler(repo),
            Component("text_encoder", "llama", _sized(repo, "text_encoder", scale, _TINY_LLAMA, llama_ids)),
            Component("text_encoder_2", "clip_text", _sized(repo, "text_encoder_2", scale,
                                                            _TINY_CLIP_TEXT, {"vocab_size": CLIP_VOCAB_SIZE})),
            Component("tokenizer", "llama_tokenizer", {}),
            Component("tokenizer_2", "clip_tokenizer", {}),
            Component("transformer", "hunyuan_transformer", _sized(repo, "transformer", scale, _TINY_HUNYUAN)),
            Component("vae", "hunyuan_vae", _sized(repo, "vae", scale, _TINY_HUNYUAN_VAE)),
        ]
    if spec.family == "qwen":
        return _qwen_plan(repo, scale)
    i2v = (CONFIG_DIR / repo / "image_encoder").is_dir()
    plan = []
    if i2v:
        plan += [
            Component("image_encoder", "clip_vision", _sized(repo, "image_encoder", scale, _TINY_CLIP_VISION)),
            Component("image_processor", "clip_image_processor",
                      _sized(repo, "image_processor", scale, _TINY_IMAGE_PROCESSOR)),
        ]
    plan += [
        _scheduler(repo),
        Component("text_encoder", "umt5", _sized(repo, "text_encoder", scale, t5_tiny)),
        Component("tokenizer", "t5_tokenizer", {}),
        Component("transformer", "wan_transformer",
                  _sized(repo, "transformer", scale, _TINY_WAN, _TINY_WAN_I2V if i2v else {}),
                  {"vsa_gates": spec.vsa_gates}),
        Component("vae", "wan_vae", _sized(repo, "vae", scale, _TINY_WAN_VAE)),
    ]
    return plan


def _qwen_plan(repo: str, scale: Scale) -> list[Component]:
    """Qwen-Image / Qwen-Image-Edit (the edit repo adds the Qwen2-VL `processor`). The Qwen2.5-VL config
    nests its text and vision configs, so their size overrides are applied inside them too."""
    text = _sized(repo, "text_encoder", scale, _TINY_QWEN_TEXT)
    if scale == "tiny":
        text["text_config"].update(copy.deepcopy(_TINY_QWEN_TEXT))
        text["text_config"]["layer_types"] = text["text_config"]["layer_types"][:_TINY_QWEN_TEXT["num_hidden_layers"]]
        text["vision_config"].update(copy.deepcopy(_TINY_QWEN_VISION))
    tokenizer_config = json.loads((CONFIG_DIR / "Qwen-Image-Edit" / "tokenizer" / "tokenizer_config.json").read_text())
    added = {"added_tokens": {int(i): (t["content"], t["special"])
                              for i, t in tokenizer_config["added_tokens_decoder"].items()}}
    plan = []
    if (CONFIG_DIR / repo / "processor").is_dir():
        processor = _sized(repo, "processor", scale, _TINY_QWEN_PROCESSOR)
        plan.append(Component("processor", "qwen2_vl_processor", processor, {**added, "repo": repo}))
    plan += [
        _scheduler(repo),
        Component("text_encoder", "qwen2_5_vl", text),
        Component("tokenizer", "qwen2_tokenizer", {}, added),
        Component("transformer", "qwen_transformer", _sized(repo, "transformer", scale, _TINY_QWEN)),
        Component("vae", "qwen_vae", _sized(repo, "vae", scale, _TINY_QWEN_VAE)),
    ]
    return plan


def _scheduler(repo: str) -> Component:
    """The real scheduler config, at every scale."""
    real = read_config(repo, "scheduler")
    return Component("scheduler", "scheduler", _strip_meta(real), {"class": real["_class_name"]})


def _spec(name: str, scale: Scale) -> RepoSpec:
    if name not in SPECS:
        raise ValueError(f"unknown fixture {name!r}; known: {sorted(SPECS)}")
    if scale not in ("tiny", "full"):
        raise ValueError(f"scale must be 'tiny' or 'full', not {scale!r}")
    spec = SPECS[name]
    if scale == "tiny" and not spec.tiny:
        raise ValueError(f"{name!r} exists only at scale='full'")
    return spec


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def construct_model(component: Component, *, seed: int = 0, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Build the (random-weight) model of ``component`` directly on ``device`` in ``dtype``.

    The global RNG is re-seeded first, so a component's weights depend only on ``seed`` and its config.
    ``device="meta"`` builds the module structure without allocating weights (used to check full-size
    configs on machines without a GPU).
    """
    import diffusers
    import transformers

    torch.manual_seed(seed)
    cfg = copy.deepcopy(component.config)
    with torch.device(device), _default_dtype(dtype):
        kind = component.kind
        if kind == "clip_text":
            model = transformers.CLIPTextModel(transformers.CLIPTextConfig(**cfg))
        elif kind == "clip_vision":
            model = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**cfg))
        elif kind == "t5":
            model = transformers.T5EncoderModel(transformers.T5Config(**cfg))
        elif kind == "umt5":
            model = transformers.UMT5EncoderModel(transformers.UMT5Config(**cfg))
        elif kind == "flux_transformer":
            model = diffusers.FluxTransformer2DModel.from_config(cfg)
        elif kind == "flux_vae":
            model = diffusers.AutoencoderKL.from_config(cfg)
        elif kind == "wan_transformer":
            model = diffusers.WanTransformer3DModel.from_config(cfg)
            if component.extra.get("vsa_gates"):
                _add_vsa_gates(model)
        elif kind == "wan_vae":
            model = diffusers.AutoencoderKLWan.from_config(cfg)
        elif kind == "llama":
            model = transformers.LlamaModel(transformers.LlamaConfig(**cfg))
        elif kind == "hunyuan_transformer":
            model = diffusers.HunyuanVideoTransformer3DModel.from_config(cfg)
        elif kind == "hunyuan_vae":
            model = diffusers.AutoencoderKLHunyuanVideo.from_config(cfg)
        elif kind == "qwen2_5_vl":  # the nested configs' own dtypes (vision: float32) would override `dtype`
            cfg.update({k: _strip_meta(cfg[k]) for k in ("text_config", "vision_config")})
            model = transformers.Qwen2_5_VLForConditionalGeneration(transformers.Qwen2_5_VLConfig(**cfg))
        elif kind == "qwen_transformer":  # keeps the real file's unused pooled_projection_dim in its config
            model = diffusers.QwenImageTransformer2DModel.from_config(cfg)
        elif kind == "qwen_vae":
            model = diffusers.AutoencoderKLQwenImage.from_config(cfg)
        else:
            raise ValueError(f"{component.name!r} ({kind}) is not a model")
    return model.eval()


TINY_WEIGHT_NOISE = 0.1
"""Std of the Gaussian noise added to every tiny weight (norm scales and biases included)."""
_CONDITIONING_GAIN = {
    "flux_transformer": (3.0, ("context_embedder", "add_v_proj")),
    "wan_transformer": (3.0, ("attn2.to_v", "attn2.to_out", "attn2.add_v_proj")),
    "hunyuan_transformer": (3.0, ("context_embedder.proj_in", "add_v_proj")),
    # QK-normed attention: the text keys' norm scale decides how much the text weighs against thousands of
    # reference-image tokens when editing
    "qwen_transformer": (4.0, ("txt_in", "add_v_proj", "norm_added_k")),
}
"""Extra gain on the projections that carry text / image conditioning into the latent stream."""


@torch.no_grad()
def _spread_tiny_weights(model: torch.nn.Module, kind: str) -> None:
    """Make tiny random models sensitive to every input and every weight.

    Default inits leave norm scales at 1 and many biases at 0 (so an engine that skipped them would go
    unnoticed) and, at these widths, let the prompt move a DiT's output by only ~3%. Adding N(0, 0.1)
    noise to all parameters and a x3 gain on the conditioning value / output projections gives outputs
    of unit scale that change by 10-20% with the prompt. Draws continue the component's seeded RNG.
    """
    gain, patterns = _CONDITIONING_GAIN.get(kind, (1.0, ()))
    for name, param in model.named_parameters():
        if not param.is_floating_point():
            continue
        param.add_(torch.randn_like(param) * TINY_WEIGHT_NOISE)
        if any(p in name for p in patterns):
            param.mul_(gain)


def _add_vsa_gates(transformer: torch.nn.Module) -> None:
    """Give every block FastWan's VSA gate projection, saved as ``blocks.N.attn1.to_gate_compress.*``."""
    for block in transformer.blocks:
        dim = block.attn1.to_q.in_features
        block.attn1.to_gate_compress = torch.nn.Linear(dim, dim, bias=True)


def save_component(component: Component, folder: Path, *, seed: int = 0, scale: Scale = "tiny",
                   device: str = "cpu", dtype: torch.dtype = torch.float32) -> None:
    """Build ``component`` and write it to ``folder`` with its library's own ``save_pretrained``."""
    from . import tiny_tokenizers

    kind = component.kind
    if kind == "scheduler":
        import diffusers

        cls = getattr(diffusers, component.extra["class"])
        cls.from_config(component.config).save_pretrained(folder)
    elif kind == "clip_tokenizer":
        tokenizer = tiny_tokenizers.build_clip_tokenizer()
        tokenizer.save_pretrained(folder)
        _write_clip_vocab_files(folder)
    elif kind == "t5_tokenizer":
        tiny_tokenizers.build_t5_tokenizer().save_pretrained(folder)
    elif kind == "llama_tokenizer":
        tiny_tokenizers.build_llama_tokenizer().save_pretrained(folder)
    elif kind == "qwen2_tokenizer":
        tiny_tokenizers.build_qwen2_tokenizer(component.extra["added_tokens"]).save_pretrained(folder)
        _write_bpe_vocab_files(folder, *tiny_tokenizers.qwen2_vocab_and_merges())
    elif kind == "qwen2_vl_processor":
        _save_qwen2_vl_processor(component, folder)
    elif kind == "clip_image_processor":
        from transformers import CLIPImageProcessor

        CLIPImageProcessor(**component.config).save_pretrained(folder)
    else:
        model = construct_model(component, seed=seed, device=device, dtype=dtype)
        if scale == "tiny":
            _spread_tiny_weights(model, component.kind)
        shard = {} if scale == "tiny" else {"max_shard_size": "10GB" if kind.endswith(("transformer", "vae"))
                                            else "5GB"}
        if hasattr(model, "_internal_dict"):  # diffusers ModelMixin
            model.save_pretrained(folder, safe_serialization=True, **shard)
        else:
            _save_transformers_model(model, folder, _CHECKPOINT_PREFIX.get(kind, ""), shard)
        del model


_CHECKPOINT_PREFIX = {"clip_text": "text_model."}
"""Key prefix the real checkpoints have but transformers 5 drops when saving a freshly built model."""


def _save_transformers_model(model: torch.nn.Module, folder: Path, prefix: str, shard: dict[str, str]) -> None:
    """``save_pretrained`` with the weight names of the original checkpoints, without progress bars.

    transformers 5 removed CLIPTextModel's ``text_model`` wrapper and re-adds the ``text_model.`` prefix
    on save only for models that were loaded from such a checkpoint, so it is added back explicitly.
    """
    from transformers.utils import logging as hf_logging

    state_dict = {prefix + k: v for k, v in model.state_dict().items()} if prefix else None
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(folder, state_dict=state_dict, **shard)
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _write_bpe_vocab_files(folder: Path, vocab: dict[str, int], merges: list[tuple[str, str]]) -> None:
    """``vocab.json`` / ``merges.txt`` of a byte-level BPE tokenizer (what the real repos ship besides
    ``tokenizer.json``)."""
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _save_qwen2_vl_processor(component: Component, folder: Path) -> None:
    """The edit repo's ``processor/``: the tiny Qwen2 tokenizer, the (size-capped) real
    ``preprocessor_config.json`` and the real video processor config and chat template, as in the real
    folder. It loads with transformers' own classes; the recipe builds the processor without the video
    processor (which needs torchvision)."""
    from . import tiny_tokenizers

    folder.mkdir(parents=True, exist_ok=True)
    tiny_tokenizers.build_qwen2_tokenizer(component.extra["added_tokens"]).save_pretrained(folder)
    _write_bpe_vocab_files(folder, *tiny_tokenizers.qwen2_vocab_and_merges())
    real = CONFIG_DIR / component.extra["repo"] / "processor"
    (folder / "preprocessor_config.json").write_text(json.dumps(component.config, indent=2, sort_keys=True) + "\n")
    video = json.loads((real / "video_preprocessor_config.json").read_text())
    video.update({k: v for k, v in component.config.items() if k in ("max_pixels", "size")})
    (folder / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2, sort_keys=True) + "\n")
    shutil.copyfile(real / "chat_template.jinja", folder / "chat_template.jinja")


def _write_clip_vocab_files(folder: Path) -> None:
    """Also write CLIP's ``vocab.json`` / ``merges.txt``: the real repos ship these, not tokenizer.json."""
    from .tiny_tokenizers import clip_vocab_and_merges

    vocab, merges = clip_vocab_and_merges()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _model_index(spec: RepoSpec) -> dict[str, Any]:
    """The real repo's model_index.json, with this diffusers version (and FastWan's pipeline class)."""
    index = read_config(spec.config_repo)
    index["_diffusers_version"] = importlib.metadata.version("diffusers")
    if spec.pipeline_class:
        index["_class_name"] = spec.pipeline_class
    return index


def build_repo(name: str, out_dir: str | os.PathLike[str], *, seed: int = 0, scale: Scale = "tiny",
               device: str = "cpu", dtype: torch.dtype = torch.float32) -> Path:
    """Write the random-weight repo ``name`` to ``out_dir`` (created; must not exist or be empty).

    Components are built one at a time on ``device`` in ``dtype``, saved, and freed, so peak memory is
    that of the largest component. Returns ``out_dir``.
    """
    spec = _spec(name, scale)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty")
    out.mkdir(parents=True, exist_ok=True)
    for component in component_plan(name, scale):
        save_component(component, out / component.name, seed=seed, scale=scale, device=device, dtype=dtype)
        if str(device).startswith("cuda"):
            torch.cuda.empty_cache()
    (out / "model_index.json").write_text(json.dumps(_model_index(spec), indent=2, sort_keys=True) + "\n")
    return out


def cache_root() -> Path:
    """Where :func:`fixture_path` keeps built repos: ``$DIFFSERVE_FIXTURE_CACHE`` or ~/.cache/diffserve/fixtures."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "diffserve" / "fixtures"


@functools.lru_cache(maxsize=1)
def cache_key() -> str:
    """Short hash of everything the built bytes depend on besides name and seed.

    That is :data:`FIXTURE_VERSION`, the library versions, and the builder's own source and reference
    configs, so editing the builder (even without bumping the version) never serves a stale repo.
    """
    parts = [f"fixture={FIXTURE_VERSION}"]
    for dist in ("diffusers", "transformers", "tokenizers", "torch", "safetensors"):
        try:
            parts.append(f"{dist}={importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            parts.append(f"{dist}=none")
    digest = hashlib.sha256("|".join(parts).encode())
    here = Path(__file__).resolve().parent
    for path in [here / "fixtures.py", here / "tiny_tokenizers.py", *sorted(CONFIG_DIR.rglob("*.json"))]:
        digest.update(str(path.relative_to(here)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:10]


def fixture_path(name: str, seed: int = 0) -> Path:
    """Build (once, cached on disk) and return the folder of the tiny repo ``name``.

    The repo is built into a temporary sibling folder and renamed into place, under an ``fcntl`` lock,
    so concurrent callers build it once and nobody ever sees a half-written repo.
    """
    _spec(name, "tiny")
    root = cache_root()
    final = root / f"{name}-seed{seed}-{cache_key()}"
    if (final / "model_index.json").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if (final / "model_index.json").is_file():
                return final
            for stale in root.glob(f".tmp-{final.name}-*"):  # left by a killed builder; we hold the lock
                shutil.rmtree(stale, ignore_errors=True)
            if final.exists():  # damaged by hand (we never leave partial repos): rebuild it
                shutil.rmtree(final)
            tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
            try:
                build_repo(name, tmp, seed=seed)
                os.replace(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return final


_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
           "fp16": torch.float16, "float16": torch.float16}


def main(argv: list[str] | None = None) -> int:
    """Build one repo: ``NAME OUT_DIR [--scale full] [--device cuda] [--dtype bf16] [--seed N]``."""
    parser = argparse.ArgumentParser(prog="python -m diffserve.testing.fixtures", description=main.__doc__)
    parser.add_argument("name", choices=sorted(SPECS))
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--scale", choices=("tiny", "full"), default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="fp32")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = build_repo(args.name, args.out_dir, seed=args.seed, scale=args.scale, device=args.device,
                     dtype=_DTYPES[args.dtype])
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
