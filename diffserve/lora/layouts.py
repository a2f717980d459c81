"""Key layouts of LoRA files other than diffusers': the original (BFL / Wan) module names that kohya
(`lora_unet_double_blocks_0_img_attn_qkv`) and ComfyUI (`diffusion_model.double_blocks.0.img_attn.qkv`)
LoRAs use, mapped to our checkpoint names.

A rule matches a module name with its dots written as underscores (kohya's flattening), so one rule serves
both spellings. A rule may name several targets: the LoRA's up matrix then stacks their output rows in
that order (FLUX's fused img_attn.qkv = to_q, to_k, to_v; single-block linear1 = to_q, to_k, to_v,
proj_mlp). Sources: the FLUX (black-forest-labs/flux) and Wan2.1 (Wan-Video/Wan2.1) reference module
names, as diffusers' own converters map them (diffusers/loaders/lora_conversion_utils.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from diffserve.models.dits.flux import FluxTransformer
from diffserve.models.dits.wan import WanTransformer


@dataclass(frozen=True)
class Rule:
    """`pattern` (a regex over the underscore-flattened name) -> checkpoint names, `{0}` = the block index.
    `swap_halves`: the original layer's output halves are in the opposite order to ours (FLUX's final
    AdaLN: BFL (shift, scale), diffusers (scale, shift))."""

    pattern: str
    targets: tuple[str, ...]
    swap_halves: bool = False


def _block(prefix: str, ours: str, pairs: dict[str, str | tuple[str, ...]]) -> tuple[Rule, ...]:
    """Rules for one block kind: original sub-name -> our sub-name(s) under `ours.{i}`."""
    rules = []
    for theirs, mine in pairs.items():
        names = (mine,) if isinstance(mine, str) else mine
        flat = theirs.replace(".", "_")
        rules.append(Rule(rf"{prefix}_(\d+)_{flat}", tuple(f"{ours}.{{0}}.{m}" for m in names)))
    return tuple(rules)


FLUX_RULES: tuple[Rule, ...] = (
    *_block("double_blocks", "transformer_blocks", {
        "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
        "img_attn.proj": "attn.to_out.0",
        "img_mlp.0": "ff.net.0.proj",
        "img_mlp.2": "ff.net.2",
        "img_mod.lin": "norm1.linear",
        "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
        "txt_attn.proj": "attn.to_add_out",
        "txt_mlp.0": "ff_context.net.0.proj",
        "txt_mlp.2": "ff_context.net.2",
        "txt_mod.lin": "norm1_context.linear",
    }),
    *_block("single_blocks", "single_transformer_blocks", {
        "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
        "linear2": "proj_out",
        "modulation.lin": "norm.linear",
    }),
    Rule("img_in", ("x_embedder",)),
    Rule("txt_in", ("context_embedder",)),
    Rule("time_in_in_layer", ("time_text_embed.timestep_embedder.linear_1",)),
    Rule("time_in_out_layer", ("time_text_embed.timestep_embedder.linear_2",)),
    Rule("vector_in_in_layer", ("time_text_embed.text_embedder.linear_1",)),
    Rule("vector_in_out_layer", ("time_text_embed.text_embedder.linear_2",)),
    Rule("guidance_in_in_layer", ("time_text_embed.guidance_embedder.linear_1",)),
    Rule("guidance_in_out_layer", ("time_text_embed.guidance_embedder.linear_2",)),
    Rule("final_layer_linear", ("proj_out",)),
    Rule("final_layer_adaLN_modulation_1", ("norm_out.linear",), swap_halves=True),
)
"""FLUX.1 in BFL's names (kohya sd-scripts / ai-toolkit / ComfyUI FLUX LoRAs)."""

WAN_RULES: tuple[Rule, ...] = (
    *_block("blocks", "blocks", {
        "self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v",
        "self_attn.o": "attn1.to_out.0",
        "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k", "cross_attn.v": "attn2.to_v",
        "cross_attn.o": "attn2.to_out.0",
        "cross_attn.k_img": "attn2.add_k_proj", "cross_attn.v_img": "attn2.add_v_proj",
        "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2",
    }),
    Rule("time_projection_1", ("condition_embedder.time_proj",)),
    Rule("head_head", ("proj_out",)),
    Rule("text_embedding_0", ("condition_embedder.text_embedder.linear_1",)),
    Rule("text_embedding_2", ("condition_embedder.text_embedder.linear_2",)),
    Rule("time_embedding_0", ("condition_embedder.time_embedder.linear_1",)),
    Rule("time_embedding_2", ("condition_embedder.time_embedder.linear_2",)),
    Rule("img_emb_proj_1", ("condition_embedder.image_embedder.ff.net.0.proj",)),
    Rule("img_emb_proj_3", ("condition_embedder.image_embedder.ff.net.2",)),
)
"""Wan2.1 in the original repo's names (ComfyUI `diffusion_model.*`, musubi-tuner `lora_unet_*`)."""

ORIGINAL_LAYOUTS: dict[type[nn.Module], tuple[Rule, ...]] = {FluxTransformer: FLUX_RULES, WanTransformer: WAN_RULES}
"""Model class -> its original-name rules. Families not listed (Qwen-Image: its original names are the
diffusers names) are matched by checkpoint names only."""


def flat(name: str) -> str:
    """A module name as kohya writes it: dots as underscores."""
    return name.replace(".", "_")


def rules_for(model: nn.Module) -> tuple[Rule, ...]:
    return next((rules for cls, rules in ORIGINAL_LAYOUTS.items() if isinstance(model, cls)), ())


def match_rules(flat_name: str, rules: tuple[Rule, ...]) -> tuple[tuple[str, ...], bool] | None:
    """(checkpoint names, swap_halves) of the first rule matching `flat_name` entirely, else None."""
    for rule in rules:
        m = re.fullmatch(rule.pattern, flat_name)
        if m:
            return tuple(t.format(*m.groups()) for t in rule.targets), rule.swap_halves
    return None
