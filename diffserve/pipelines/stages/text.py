"""Prompt encoders shared by pipelines: CLIP pooled vectors, T5 hidden states, UMT5 (Wan) embeddings."""

from __future__ import annotations

import html
import re

import torch


def repeat_per_output(x: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """(R, ...) one row per request -> (sum(counts), ...) one row per output sample."""
    return x.repeat_interleave(torch.tensor(counts, device=x.device), dim=0)


@torch.no_grad()
def clip_pooled(tokenizer, encoder, prompts: list[str], device: torch.device) -> torch.Tensor:
    """CLIP text tower pooled output (B, D), prompts padded/truncated to the tokenizer's 77 tokens."""
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return encoder(ids.to(device), output_hidden_states=False).pooler_output.to(encoder.dtype)


@torch.no_grad()
def t5_hidden_states(tokenizer, encoder, prompts: list[str], max_length: int, device: torch.device) -> torch.Tensor:
    """T5 encoder last hidden state (B, max_length, D); padding tokens are not masked (as FLUX was trained)."""
    ids = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                    return_tensors="pt").input_ids
    return encoder(ids.to(device), output_hidden_states=False)[0].to(encoder.dtype)


def clean_prompt(text: str) -> str:
    """Wan's prompt cleaning: ftfy fixes (when installed), HTML unescape twice, whitespace collapsed."""
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


@torch.no_grad()
def umt5_embeddings(tokenizer, encoder, prompts: list[str], max_length: int, device: torch.device) -> torch.Tensor:
    """(B, max_length, D) UMT5 states with the attention mask applied, padding positions zeroed."""
    tok = tokenizer([clean_prompt(p) for p in prompts], padding="max_length", max_length=max_length,
                    truncation=True, add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    mask = tok.attention_mask.to(device)
    states = encoder(tok.input_ids.to(device), mask).last_hidden_state.to(encoder.dtype)
    return states * mask[..., None].to(states.dtype)
