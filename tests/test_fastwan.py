"""FastWan (few-step DMD-distilled Wan2.1): the schedule is chosen from the checkpoint, and the DMD
sampler math."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffserve import Engine, GenerationRequest
from diffserve.errors import InvalidRequestError
from diffserve.pipelines.wan import FASTWAN_DMD_STEPS, FASTWAN_SHIFT
from diffserve.schedulers.dmd import DMDSampler, dmd_schedule


def test_dmd_schedule_values() -> None:
    timesteps, sigmas = dmd_schedule(FASTWAN_DMD_STEPS, FASTWAN_SHIFT)
    # rows 0, 243, 478 of the shift-8 table: sigma = 8s / (1 + 7s) with s = 1 - row * 0.999 / 999
    expected = [8 * s / (1 + 7 * s) for s in (1.0, 1 - 243 / 1000, 1 - 478 / 1000)]
    assert sigmas.tolist()[:3] == pytest.approx(expected, abs=1e-6) and sigmas[-1] == 0
    assert timesteps.tolist() == pytest.approx([1000 * e for e in expected], abs=1e-3)


def test_dmd_sampler_recovers_clean_latents() -> None:
    """If the model predicts the exact velocity noise - x0 at every step, the sampler ends on x0."""
    timesteps, sigmas = dmd_schedule(FASTWAN_DMD_STEPS, FASTWAN_SHIFT)
    x0 = torch.randn(2, 4, 3, 2, 2)
    sampler = DMDSampler(timesteps, sigmas, [(6, 2)])
    x = torch.randn_like(x0)  # sigma 1: pure noise
    for i in range(len(sampler.timesteps)):
        s = sampler.sigmas[i]
        noise = (x - (1 - s) * x0) / s  # the noise that x carries at this sigma
        x = sampler.step(noise - x0, i, x)
    assert torch.allclose(x, x0, atol=1e-5)


def test_fastwan_checkpoint_runs_distilled_schedule(tmp_path) -> None:
    from diffserve.testing.fixtures import fixture_path

    engine = Engine.from_pretrained(str(fixture_path("fastwan-t2v")), dtype="fp32", device="cpu")
    d = engine.defaults
    assert (d.num_inference_steps, d.guidance_scale, d.height, d.width, d.num_frames) == (3, 1.0, 448, 832, 61)
    seen: list[int] = []
    res = engine.generate("a cat", height=16, width=16, num_frames=5, seed=2,
                          on_step=lambda done, total: seen.append(total))
    assert seen == [3, 3, 3] and res.videos[0].shape == (5, 16, 16, 3)
    again = engine.generate("a cat", height=16, width=16, num_frames=5, seed=2)
    assert np.array_equal(res.videos[0], again.videos[0])
    with pytest.raises(InvalidRequestError, match="3-step schedule"):
        engine.validate(GenerationRequest(prompt="a cat", num_inference_steps=8))
