"""The shared denoising stage, the guidance combines and the CFG branch runners, with toy predictors.

The norm-rescaled CFG loop is checked end to end against diffusers' QwenImagePipeline itself (a stub
transformer in place of the real one): same latents bit for bit.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import diffserve.testing
from diffserve.config import GenerationRequest, ModelDefaults
from diffserve.errors import CancelledError, UserError
from diffserve.layers.parallel import CommGroup
from diffserve.parallel.cfg import CfgParallel, install_cfg_parallel
from diffserve.pipelines.base import ComposedPipeline, InputValidationStage, PipelineState
from diffserve.pipelines.stages.denoise import Branch, Cond, DenoisingStage, PredictFn, sequential_branches
from diffserve.schedulers.flow_match import FlowMatchConfig, FlowMatchEulerSampler
from diffserve.schedulers.guidance import (
    ClassifierFreeGuidance,
    EmbeddedGuidance,
    Guidance,
    NoGuidance,
    NormRescaledCfg,
    cfg_combine,
    norm_rescaled_cfg,
)
from diffserve.schedulers.unipc import UniPCSampler

CONFIGS = Path(diffserve.testing.__file__).parent / "model_configs"


class ToyModel(torch.nn.Module):
    """A small deterministic non-linear 'transformer': latents (B, N, 16), context (B, T, 8)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(16, 16, generator=g) / 4)
        self.u = torch.nn.Parameter(torch.randn(8, 16, generator=g) / 4)
        self.config = SimpleNamespace(in_channels=16, guidance_embeds=False)  # what QwenImagePipeline reads

    device = property(lambda self: self.w.device)
    dtype = property(lambda self: self.w.dtype)

    def cache_context(self, name: str) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                return_dict: bool = False, **_: object) -> tuple[torch.Tensor]:
        h = torch.tanh(hidden_states @ self.w + encoder_hidden_states.mean(1, keepdim=True) @ self.u)
        return (h * (1 + timestep[:, None, None]),)


class ToyPredictor:
    """Calls ToyModel as QwenImagePipeline does (timestep / 1000); counts prepares and model calls."""

    def __init__(self) -> None:
        self.model = ToyModel()
        self.prepared = 0
        self.calls: list[tuple[int, str]] = []

    def prepare(self, state: PipelineState) -> PredictFn:
        self.prepared += 1

        def predict(x: torch.Tensor, i: int, t: torch.Tensor, cond: Cond) -> torch.Tensor:
            self.calls.append((i, cond["name"]))  # type: ignore[arg-type]
            ts = t.expand(x.shape[0]).to(x.dtype)
            return self.model(hidden_states=x, timestep=ts / 1000, encoder_hidden_states=cond["ctx"])[0]

        return predict


def _qwen_raw() -> dict:
    return json.loads((CONFIGS / "Qwen-Image/scheduler/scheduler_config.json").read_text())


def _state(steps: int = 4, scale: float = 4.0, cfg: bool = True, **kw: object) -> PipelineState:
    g = torch.Generator().manual_seed(1)
    state = PipelineState(requests=[GenerationRequest(prompt="p", guidance_scale=scale, num_inference_steps=steps)],
                          device=torch.device("cpu"), dtype=torch.float32, **kw)  # type: ignore[arg-type]
    state.latents = torch.randn(2, 16, 16, generator=g)
    state.cond = {"ctx": torch.randn(2, 5, 8, generator=g), "name": "cond"}  # type: ignore[dict-item]
    if cfg:
        state.uncond = {"ctx": torch.randn(2, 5, 8, generator=g), "name": "uncond"}  # type: ignore[dict-item]
    state.sampler = FlowMatchEulerSampler.create(steps, FlowMatchConfig.from_dict(_qwen_raw()), state.device,
                                                 image_seq_len=state.latents.shape[1])
    return state


# ---------------------------------------------------------------------------------------------------------
# guidance combines


def test_cfg_combines_match_hand_formulas() -> None:
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(2, 7, 16, generator=g), torch.randn(2, 7, 16, generator=g)
    assert torch.equal(cfg_combine(cond, uncond, 5.0), uncond + 5.0 * (cond - uncond))
    assert torch.equal(ClassifierFreeGuidance().combine(cond, uncond, 5.0), uncond + 5.0 * (cond - uncond))
    comb = uncond + 4.0 * (cond - uncond)
    got = NormRescaledCfg().combine(cond, uncond, 4.0)
    # per token: the combination's direction, the conditional prediction's length
    assert torch.allclose(got.norm(dim=-1), cond.norm(dim=-1), rtol=1e-5)
    assert torch.allclose(got / got.norm(dim=-1, keepdim=True), comb / comb.norm(dim=-1, keepdim=True), atol=1e-6)
    # the three lines of QwenImagePipeline's loop, bit for bit
    cond_norm = torch.norm(cond, dim=-1, keepdim=True)
    noise_norm = torch.norm(comb, dim=-1, keepdim=True)
    assert torch.equal(norm_rescaled_cfg(cond, uncond, 4.0), comb * (cond_norm / noise_norm))


@pytest.mark.parametrize("guidance", [NoGuidance(), EmbeddedGuidance()])
def test_single_branch_guidance_has_nothing_to_combine(guidance: Guidance) -> None:
    assert not guidance.uses_uncond
    with pytest.raises(ValueError, match="no unconditional branch"):
        guidance.combine(torch.zeros(1), torch.zeros(1), 2.0)


def test_norm_rescaled_loop_matches_diffusers_qwen_pipeline() -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    state = _state(steps=5, scale=4.0)
    predictor = ToyPredictor()
    ref = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler.from_config(_qwen_raw()), vae=None,
                            text_encoder=None, tokenizer=None, transformer=predictor.model)
    ref.set_progress_bar_config(disable=True)
    expected = ref(prompt_embeds=state.cond["ctx"], negative_prompt_embeds=state.uncond["ctx"],  # type: ignore[index]
                   latents=state.latents, true_cfg_scale=4.0, num_inference_steps=5, height=32, width=32,
                   output_type="latent", return_dict=False)[0]
    assert torch.equal(state.sampler.timesteps, ref.scheduler.timesteps)  # type: ignore[union-attr]
    DenoisingStage(predictor, NormRescaledCfg()).run(state)
    assert torch.equal(state.latents, expected)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------
# the stage


def _manual_cfg_loop(state: PipelineState, model: ToyModel, scale: float) -> torch.Tensor:
    """Plain CFG and Euler written out by hand."""
    x, sampler = state.latents, state.sampler
    for i, t in enumerate(sampler.timesteps):  # type: ignore[union-attr]
        ts = t.expand(x.shape[0]) / 1000  # type: ignore[union-attr]
        c = model(hidden_states=x, timestep=ts, encoder_hidden_states=state.cond["ctx"])[0]
        u = model(hidden_states=x, timestep=ts, encoder_hidden_states=state.uncond["ctx"])[0]  # type: ignore[index]
        v = u + scale * (c - u)
        x = (x.float() + (sampler.sigmas[i + 1] - sampler.sigmas[i]) * v).to(v.dtype)  # type: ignore[union-attr]
    return x  # type: ignore[return-value]


def test_cfg_stage_matches_hand_loop_and_reports_progress() -> None:
    seen: list[tuple[int, int]] = []
    state = _state(steps=4, scale=3.0, on_step=lambda done, total: seen.append((done, total)))
    predictor = ToyPredictor()
    expected = _manual_cfg_loop(state, predictor.model, 3.0)
    DenoisingStage(predictor, ClassifierFreeGuidance()).run(state)
    assert torch.equal(state.latents, expected)  # type: ignore[arg-type]
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert predictor.prepared == 1
    assert predictor.calls == [(i, b) for i in range(4) for b in ("cond", "uncond")]


def test_without_uncond_the_prediction_is_used_as_is() -> None:
    calls: list[int] = []

    def runner(branch: Branch, cond: Cond, uncond: Cond) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(1)
        return sequential_branches(branch, cond, uncond)

    a, b = _state(steps=3, cfg=False), _state(steps=3, cfg=False)
    DenoisingStage(ToyPredictor(), ClassifierFreeGuidance(), branches=runner).run(a)
    DenoisingStage(ToyPredictor(), EmbeddedGuidance()).run(b)
    assert not calls and torch.equal(a.latents, b.latents)  # type: ignore[arg-type]


def test_custom_branch_runner_gives_the_sequential_result() -> None:
    """A runner that evaluates both branches as one batch (as a batched-CFG optimisation would)."""

    def batched(branch: Branch, cond: Cond, uncond: Cond) -> tuple[torch.Tensor, torch.Tensor]:
        both = {"ctx": torch.cat([cond["ctx"], uncond["ctx"]]), "name": "both"}
        v = branch(both)  # type: ignore[arg-type]
        return v[: len(v) // 2], v[len(v) // 2:]

    class BatchedPredictor(ToyPredictor):
        def prepare(self, state: PipelineState) -> PredictFn:
            inner = super().prepare(state)
            return lambda x, i, t, cond: inner(x if cond["name"] != "both" else torch.cat([x, x]), i, t, cond)

    a, b = _state(steps=3), _state(steps=3)
    DenoisingStage(ToyPredictor(), NormRescaledCfg()).run(a)
    batched_predictor = BatchedPredictor()
    DenoisingStage(batched_predictor, NormRescaledCfg(), branches=batched).run(b)
    assert batched_predictor.calls == [(0, "both"), (1, "both"), (2, "both")]
    assert torch.allclose(a.latents, b.latents, atol=1e-6)  # type: ignore[arg-type]


def test_cancellation_stops_before_the_next_step() -> None:
    seen: list[int] = []
    state = _state(steps=5, on_step=lambda done, total: seen.append(done), should_stop=lambda: len(seen) >= 2)
    predictor = ToyPredictor()
    with pytest.raises(CancelledError):
        DenoisingStage(predictor, ClassifierFreeGuidance()).run(state)
    assert seen == [1, 2] and len(predictor.calls) == 4


def test_stage_errors() -> None:
    state = _state(steps=2)
    with pytest.raises(ValueError, match="EmbeddedGuidance takes no unconditional branch"):
        DenoisingStage(ToyPredictor(), EmbeddedGuidance()).run(state)
    state.sampler = None
    with pytest.raises(RuntimeError, match="needs latents and a sampler"):
        DenoisingStage(ToyPredictor(), ClassifierFreeGuidance()).run(state)


def test_unipc_sampler_wraps_diffusers_in_order() -> None:
    from diffusers import UniPCMultistepScheduler

    raw = json.loads((CONFIGS / "Wan2.1-T2V-1.3B-Diffusers/scheduler/scheduler_config.json").read_text())
    ref = UniPCMultistepScheduler.from_config(raw)
    ref.set_timesteps(6)
    sampler = UniPCSampler(raw, 6, torch.device("cpu"))
    assert torch.equal(sampler.timesteps, ref.timesteps)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 2, 3, 3, generator=g)
    for i, t in enumerate(ref.timesteps):
        v = torch.randn(1, 4, 2, 3, 3, generator=g)
        expected = ref.step(v, t, x, return_dict=False)[0]
        x_next = sampler.step(v, i, x)
        assert torch.equal(x_next, expected)
        x = expected
    with pytest.raises(ValueError, match="in order"):
        UniPCSampler(raw, 6, torch.device("cpu")).step(v, 1, x)


# ---------------------------------------------------------------------------------------------------------
# CFG parallelism


def _pipeline(guidance: Guidance) -> ComposedPipeline:
    defaults = ModelDefaults(kind="image", height=32, width=32, num_inference_steps=4, guidance_scale=4.0)
    return ComposedPipeline("ToyPipeline", [InputValidationStage(defaults), DenoisingStage(ToyPredictor(), guidance)],
                            defaults)


def test_install_cfg_parallel_puts_the_runner_on_the_stage() -> None:
    pipe = _pipeline(NormRescaledCfg())
    install_cfg_parallel(pipe, CommGroup(None, (0, 1), 0), uses_cfg=True)
    assert isinstance(pipe.stages[1].branches, CfgParallel)  # type: ignore[attr-defined]
    for guidance, uses_cfg in ((EmbeddedGuidance(), True), (NoGuidance(), True), (ClassifierFreeGuidance(), False)):
        with pytest.raises(UserError, match="ToyPipeline has no classifier-free guidance branch to split"):
            install_cfg_parallel(_pipeline(guidance), CommGroup(None, (0, 1), 0), uses_cfg=uses_cfg)
    with pytest.raises(ValueError, match="group of 2 ranks"):
        CfgParallel(CommGroup.single())


def _cfg_parallel_worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        results = {}
        for name, guidance in (("cfg", ClassifierFreeGuidance()), ("norm", NormRescaledCfg())):
            single, split = _state(steps=3), _state(steps=3)
            DenoisingStage(ToyPredictor(), guidance).run(single)
            predictor = ToyPredictor()
            DenoisingStage(predictor, guidance, branches=CfgParallel(CommGroup(dist.group.WORLD, (0, 1), rank))).run(split)
            assert predictor.calls == [(i, "cond" if rank == 0 else "uncond") for i in range(3)]
            results[name] = (single.latents, split.latents)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_cfg_parallel_runner_matches_sequential_under_gloo() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_cfg_parallel_worker, args=(os.path.join(tmp, "init"), tmp), nprocs=2)
        ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(2)]
    for name in ("cfg", "norm"):
        single = ranks[0][name][0]
        for r in range(2):
            assert torch.equal(ranks[r][name][1], single), (name, r)  # both ranks: the single-process latents


def test_pipeline_checks_cancellation_between_stages() -> None:
    """A request cancelled while an early stage runs (image preprocessing, say) stops before the next stage."""
    import pytest as _pytest

    from diffserve.config import ModelDefaults
    from diffserve.errors import CancelledError
    from diffserve.pipelines.base import ComposedPipeline, InputValidationStage, PipelineStage, PipelineState

    ran: list[str] = []
    flag = {"stop": False}

    class Slow(PipelineStage):
        name = "slow"

        def run(self, state: PipelineState) -> None:
            ran.append(self.name)
            flag["stop"] = True  # the client gives up while this stage runs

    class Next(PipelineStage):
        name = "next"

        def run(self, state: PipelineState) -> None:
            ran.append(self.name)

    class NoCheck(InputValidationStage):
        def run(self, state: PipelineState) -> None:
            pass

    defaults = ModelDefaults(kind="image", height=8, width=8, num_inference_steps=1, guidance_scale=0.0)
    pipe = ComposedPipeline("toy", [NoCheck(defaults), Slow(), Next()], defaults)
    state = PipelineState(requests=[], device=torch.device("cpu"), dtype=torch.float32,
                          should_stop=lambda: flag["stop"])
    with _pytest.raises(CancelledError):
        pipe(state)
    assert ran == ["slow"]
