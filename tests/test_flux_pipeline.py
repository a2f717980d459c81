"""Whole FLUX pipeline against diffusers.FluxPipeline on tiny repos (fp32, CPU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline

from diffserve import Engine, GenerationRequest
from diffserve.pipelines.base import PipelineState

PROMPT = "a red circle in the top left on a white background"


def _ours_pixels(engine: Engine, **params) -> tuple[np.ndarray, dict[str, float]]:
    state = PipelineState(requests=[GenerationRequest(prompt=PROMPT, **params)], device=torch.device("cpu"),
                          dtype=torch.float32)
    timings = engine.pipeline(state)
    return state.pixels.permute(0, 2, 3, 1).numpy(), timings


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_pipeline_matches_diffusers(variant: str, request: pytest.FixtureRequest) -> None:
    repo: Path = request.getfixturevalue(f"flux_{variant}_repo")
    params = dict(height=48, width=32, num_inference_steps=3, guidance_scale=3.5, seed=7, num_outputs=2,
                  max_sequence_length=64)
    ref = FluxPipeline.from_pretrained(repo, torch_dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    expected = ref(PROMPT, height=48, width=32, num_inference_steps=3, guidance_scale=3.5,
                   num_images_per_prompt=2, generator=torch.Generator().manual_seed(7), max_sequence_length=64,
                   output_type="np").images
    engine = Engine.from_pretrained(str(repo), dtype="fp32", device="cpu")
    got, timings = _ours_pixels(engine, **params)
    diff = float(np.abs(got - expected).max())
    print(f"FLUX-{variant} pipeline max pixel difference: {diff:.3e} (x255 = {diff * 255:.4f})")
    assert got.shape == expected.shape == (2, 48, 32, 3)
    assert float(expected.std()) > 0.01  # a real picture, not a constant
    assert diff <= 1 / 255
    assert set(timings) == {"input_validation", "text_encoding", "latent_preparation", "timestep_preparation",
                            "denoising", "decoding"}
    # and the PIL images the user gets equal diffusers' PIL output to within one level
    pil = engine.generate(PROMPT, **params).images
    ref_pil = ref(PROMPT, height=48, width=32, num_inference_steps=3, guidance_scale=3.5, num_images_per_prompt=2,
                  generator=torch.Generator().manual_seed(7), max_sequence_length=64).images
    for a, b in zip(pil, ref_pil):
        assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 1


def test_defaults_from_checkpoint(flux_dev_repo: Path, flux_schnell_repo: Path) -> None:
    dev = Engine.from_pretrained(str(flux_dev_repo), dtype="fp32", device="cpu")
    schnell = Engine.from_pretrained(str(flux_schnell_repo), dtype="fp32", device="cpu")
    f = dev.pipeline.components.vae_scale_factor
    assert (dev.defaults.height, dev.defaults.width) == (128 * f, 128 * f)
    assert (dev.defaults.num_inference_steps, dev.defaults.guidance_scale) == (28, 3.5)
    assert dev.defaults.max_sequence_length == 512
    assert (schnell.defaults.num_inference_steps, schnell.defaults.max_sequence_length) == (4, 256)


def test_seed_reproducible_and_batch_independent(flux_dev_repo: Path) -> None:
    engine = Engine.from_pretrained(str(flux_dev_repo), dtype="fp32", device="cpu")
    p = dict(height=32, width=32, num_inference_steps=2)
    a = engine.generate(PROMPT, seed=3, **p)
    b = engine.generate(PROMPT, seed=3, **p)
    c = engine.generate(PROMPT, seed=4, **p)
    assert np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))
    assert not np.array_equal(np.asarray(a.images[0]), np.asarray(c.images[0]))
    batched = engine.generate_batch([GenerationRequest(prompt=PROMPT, seed=3, **p),
                                     GenerationRequest(prompt="a blue square", seed=4, **p)])
    diff = np.abs(np.asarray(batched[0].images[0], dtype=int) - np.asarray(a.images[0], dtype=int)).max()
    assert diff <= 1
    assert batched[0].seed == 3 and batched[1].seed == 4
    assert a.timings["total"] > 0 and a.peak_memory_bytes
