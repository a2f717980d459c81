"""Flow-match sigma schedule, Euler step and sampler against diffusers' FlowMatchEulerDiscreteScheduler, with
the sigmas and mu each reference pipeline passes (FLUX, Qwen-Image, HunyuanVideo)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift as qwen_calculate_shift

import diffserve.testing
from diffserve.schedulers.flow_match import (
    FlowMatchConfig,
    FlowMatchEulerSampler,
    euler_step,
    flow_match_sigmas,
    resolution_mu,
    sigmas_to_timesteps,
)

CONFIGS = Path(diffserve.testing.__file__).parent / "model_configs"


@pytest.mark.parametrize("model", ["FLUX.1-dev", "FLUX.1-schnell"])
@pytest.mark.parametrize("steps,seq_len", [(28, 4096), (4, 1024), (1, 16), (50, 256)])
def test_sigmas_match_diffusers(model: str, steps: int, seq_len: int) -> None:
    raw = json.loads((CONFIGS / model / "scheduler/scheduler_config.json").read_text())
    ref = FlowMatchEulerDiscreteScheduler.from_config(raw)
    cfg = FlowMatchConfig.from_dict(raw)
    mu = calculate_shift(seq_len, cfg.base_image_seq_len, cfg.max_image_seq_len, cfg.base_shift, cfg.max_shift)
    assert resolution_mu(seq_len, cfg) == mu
    ref.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    sigmas = flow_match_sigmas(steps, cfg, seq_len)
    assert torch.equal(sigmas, ref.sigmas)
    assert torch.equal(sigmas_to_timesteps(sigmas, cfg), ref.timesteps)


def test_euler_step_matches_diffusers() -> None:
    raw = json.loads((CONFIGS / "FLUX.1-dev/scheduler/scheduler_config.json").read_text())
    ref = FlowMatchEulerDiscreteScheduler.from_config(raw)
    ref.set_timesteps(sigmas=np.linspace(1.0, 1 / 4, 4), mu=0.8)
    cfg = FlowMatchConfig.from_dict(raw)
    sigmas = flow_match_sigmas(4, cfg, 0)
    sigmas = ref.sigmas  # same by the test above; use the reference's for the step check
    x = torch.randn(2, 8, 4, dtype=torch.bfloat16)
    for i, t in enumerate(ref.timesteps):
        v = torch.randn(2, 8, 4, dtype=torch.bfloat16)
        expected = ref.step(v, t, x, return_dict=False)[0]
        got = euler_step(x, v, sigmas[i], sigmas[i + 1])
        assert torch.equal(got, expected)
        x = expected


def _raw(model: str) -> dict:
    return json.loads((CONFIGS / model / "scheduler/scheduler_config.json").read_text())


def _qwen_mu(raw: dict, seq_len: int) -> float:
    """What QwenImagePipeline passes as mu (its calculate_shift over the scheduler config's fields)."""
    return qwen_calculate_shift(seq_len, raw.get("base_image_seq_len", 256), raw.get("max_image_seq_len", 4096),
                                raw.get("base_shift", 0.5), raw.get("max_shift", 1.15))


def _hunyuan_base(steps: int) -> np.ndarray:
    """What HunyuanVideoPipeline passes as sigmas."""
    return np.linspace(1.0, 0.0, steps + 1)[:-1]


def _check_steps(sampler: FlowMatchEulerSampler, ref: FlowMatchEulerDiscreteScheduler, dtype: torch.dtype) -> None:
    """Every step of the sampler equals the reference scheduler's `step` bit for bit."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 4, generator=g).to(dtype)
    for i, t in enumerate(ref.timesteps):
        v = torch.randn(2, 8, 4, generator=g).to(dtype)
        expected = ref.step(v, t, x, return_dict=False)[0]
        got = sampler.step(v, i, x)
        assert got.dtype == expected.dtype and torch.equal(got, expected), i
        x = expected


@pytest.mark.parametrize("model", ["Qwen-Image", "Qwen-Image-Edit"])
@pytest.mark.parametrize("steps,seq_len", [(50, 4096), (30, 6032), (4, 1024), (2, 16), (20, 8192)])
def test_qwen_dynamic_shift_and_terminal_match_diffusers(model: str, steps: int, seq_len: int) -> None:
    raw = _raw(model)
    cfg = FlowMatchConfig.from_dict(raw)
    assert cfg.shift_terminal == 0.02 and cfg.time_shift_type == "exponential" and cfg.use_dynamic_shifting
    mu = _qwen_mu(raw, seq_len)
    assert resolution_mu(seq_len, cfg) == mu
    ref = FlowMatchEulerDiscreteScheduler.from_config(raw)
    ref.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    sampler = FlowMatchEulerSampler.create(steps, cfg, torch.device("cpu"), image_seq_len=seq_len)
    assert torch.equal(sampler.sigmas, ref.sigmas) and torch.equal(sampler.timesteps, ref.timesteps)
    assert sampler.sigmas[-2].item() == pytest.approx(0.02, abs=1e-6)  # stretched to shift_terminal
    _check_steps(sampler, ref, torch.bfloat16)


@pytest.mark.parametrize("steps", [50, 30, 7, 2, 1])
def test_hunyuan_static_shift_matches_diffusers(steps: int) -> None:
    raw = _raw("HunyuanVideo")
    cfg = FlowMatchConfig.from_dict(raw)
    assert cfg.shift == 7.0 and not cfg.use_dynamic_shifting
    ref = FlowMatchEulerDiscreteScheduler.from_config(raw)
    ref.set_timesteps(sigmas=_hunyuan_base(steps))
    sampler = FlowMatchEulerSampler.create(steps, cfg, torch.device("cpu"), base_sigmas=_hunyuan_base(steps))
    assert torch.equal(sampler.sigmas, ref.sigmas) and torch.equal(sampler.timesteps, ref.timesteps)
    assert sampler.timesteps[0].item() == 1000.0
    _check_steps(sampler, ref, torch.float32)


@pytest.mark.parametrize("terminal", [None, 0.1])
def test_linear_time_shift_matches_diffusers(terminal: float | None) -> None:
    raw = {**_raw("Qwen-Image"), "time_shift_type": "linear", "shift_terminal": terminal}
    ref = FlowMatchEulerDiscreteScheduler.from_config(raw)
    ref.set_timesteps(sigmas=np.linspace(1.0, 1 / 12, 12), mu=1.7)
    sampler = FlowMatchEulerSampler.create(12, FlowMatchConfig.from_dict(raw), torch.device("cpu"), mu=1.7)
    assert torch.equal(sampler.sigmas, ref.sigmas) and torch.equal(sampler.timesteps, ref.timesteps)
    _check_steps(sampler, ref, torch.float32)


def test_unsupported_options_rejected() -> None:
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        FlowMatchConfig.from_dict({"use_karras_sigmas": True})
    for key in ("invert_sigmas", "stochastic_sampling", "use_beta_sigmas", "use_exponential_sigmas"):
        with pytest.raises(ValueError, match=key):
            FlowMatchConfig.from_dict({key: True})
    with pytest.raises(ValueError, match="time_shift_type='cosine' is not supported"):
        FlowMatchConfig.from_dict({"time_shift_type": "cosine"})
    with pytest.raises(ValueError, match="shift_terminal"):
        FlowMatchConfig.from_dict({"shift_terminal": 1.0})


def test_schedule_argument_errors() -> None:
    qwen = FlowMatchConfig.from_dict(_raw("Qwen-Image"))
    with pytest.raises(ValueError, match="needs mu or the image sequence length"):
        flow_match_sigmas(4, qwen)
    with pytest.raises(ValueError, match="3 base sigmas given for 4 steps"):
        flow_match_sigmas(4, qwen, 256, base_sigmas=np.linspace(1, 0.1, 3))
    with pytest.raises(ValueError, match="last sigma is 1"):  # one step from sigma 1: nothing to stretch
        flow_match_sigmas(1, qwen, 256)
